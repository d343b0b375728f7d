"""Models side by side in ONE process, taking turns call by call: the ratios of their forward
(eval mode, BatchNorms folded) and training-step (forward, backward, AdamW) speeds. On a shared
machine whose speed drifts, turns within one process compare more fairly than the separate
processes of `evaluate.py --benchmark` (which also measures peak memory, per process); the same
calls (`evaluate.workloads`). Also the
activations a training forward saves for backward, in MB (each storage once), and for models with
LocalViT's LFF the same without its recomputation (a model without `train.recompute_lff`).

    python tests/bench_side_by_side.py [--models deit_t localvit_t convit_t] [--batch-size 32] [--rounds 5]

Each round times two calls of every model in turn after one untimed call; the median over the
rounds counts. Prints one Markdown table: images/s and each model's ratio to the first.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import locvit  # noqa: E402


def saved_mb(model, x):
    """MB of the tensors autograd saves for backward in one training forward (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x)
    return sum(storages.values()) / 2 ** 20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['deit_t', 'localvit_t', 'convit_t'])
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--rounds', type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    models = {a: locvit.create_model(a, img_size=args.img_size) for a in args.models}
    calls = {a: dict(zip(('forward', 'train'), evaluate.workloads(m, args.batch_size, args.img_size,
                                                                  torch.device('cpu'))))
             for a, m in models.items()}
    times = {}
    for _ in range(args.rounds):
        for kind in ('forward', 'train'):
            for a in args.models:
                fn = calls[a][kind]
                fn()
                start = time.perf_counter()
                fn(), fn()
                times.setdefault((kind, a), []).append((time.perf_counter() - start) / 2)
    med = {k: statistics.median(v) for k, v in times.items()}
    first = args.models[0]
    print(f'`python tests/bench_side_by_side.py --models {" ".join(args.models)} --batch-size {args.batch_size} '
          f'--rounds {args.rounds}`: fp32, {args.img_size} px, {torch.get_num_threads()} threads, torch {torch.__version__}\n')
    print(f'| model | forward img/s | train img/s | forward / {first} | train / {first} |')
    print('|---|---:|---:|---:|---:|')
    for a in args.models:
        f, t = med[('forward', a)], med[('train', a)]
        print(f'| `{a}` | {args.batch_size / f:.1f} | {args.batch_size / t:.1f} | '
              f'{med[("forward", first)] / f:.2f} | {med[("train", first)] / t:.2f} |')
    print('\n| model | saved for backward (MB) | without the LFF\'s recomputation (MB) |\n|---|---:|---:|')
    for a in args.models:
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
        saved = saved_mb(models[a], x)
        lff = any(isinstance(m, locvit.LocalityFeedForward) for m in models[a].modules())
        if lff:                             # workloads() turned the recomputation on; a fresh model has it off
            plain = saved_mb(locvit.create_model(a, img_size=args.img_size), x)
        print(f'| `{a}` | {saved:.0f} | {f"{plain:.0f}" if lff else "–"} |')


if __name__ == '__main__':
    main()
