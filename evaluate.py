"""Evaluate, analyse and benchmark locvit models.

  python evaluate.py --benchmark deit_t convit_t localvit_t      # img/s side by side
  python evaluate.py --zoo                                         # params / MACs of every model
"""
import argparse
import statistics
import sys
import time

import torch

import locvit


def benchmark_forward(model, x, repeats=5, warmup=2):
    """Median images/s of the forward pass (inference mode), after warm-up runs."""
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync(x.device)
            start = time.perf_counter()
            model(x)
            sync(x.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def zoo_table(names):
    rows = ['| model | params | GMACs |', '|---|---:|---:|']
    for name in names:
        model = locvit.create_model(name)
        rows.append(f'| `{name}` | {locvit.count_params(model):,} | '
                    f'{locvit.count_macs(model) / 1e9:.3f} |')
    return '\n'.join(rows)


def benchmark_table(names, batch_size, img_size, device, repeats):
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    rows = ['| model | params | forward img/s | vs first |', '|---|---:|---:|---:|']
    first = None
    for name in names:
        model = locvit.create_model(name, img_size=img_size).to(device)
        speed = benchmark_forward(model, x, repeats)
        first = first or speed
        rows.append(f'| `{name}` | {locvit.count_params(model) / 1e6:.2f}M | {speed:.1f} | '
                    f'{speed / first:.2f} |')
    return '\n'.join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--benchmark', nargs='+', metavar='ARCH', help='time these models')
    p.add_argument('--zoo', action='store_true', help='parameters and MACs of every model')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args(argv)
    try:
        if args.zoo:
            print(zoo_table(locvit.list_models()))
        if args.benchmark:
            print(f'forward, batch {args.batch_size}, {args.img_size} px, fp32, {args.device}, '
                  f'{torch.get_num_threads()} threads')
            print(benchmark_table(args.benchmark, args.batch_size, args.img_size,
                                  torch.device(args.device), args.repeats))
    except ValueError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
