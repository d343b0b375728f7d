"""The tables of the tutorials' experiments (tutorials/experiments.sh), from their logs.

    python tutorials/results.py                  # every table, Markdown
    python tutorials/results.py --best-stems     # the stems' best learning rates (STEMS_BEST)

Each cell: the final-epoch validation top-1 of 3 seeds, mean ± std (min-max). A claim's verdict:
"holds" when every seed of one side beats every seed of the other in the claimed direction,
"does not hold" when they all lose, "within noise" when the seeds' ranges overlap.
"""
import glob
import json
import os
import re
import statistics
import sys

RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'runs', 'tutorials')


def log(name):
    path = os.path.join(RUNS, name, 'log.jsonl')
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def final(name):
    evals = [r['val_top1'] for r in log(name) if 'val_top1' in r]
    return evals[-1] if evals else None


def seeds(prefix):
    """The final top-1 of every finished seed of a run name without its _s<seed> suffix."""
    return [v for v in (final(f'{prefix}_s{s}') for s in range(3)) if v is not None]


def cell(values):
    if not values:
        return '–'
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.1f} ± {spread:.1f} ({min(values):.1f}–{max(values):.1f}, n={len(values)})'


def verdict(better, worse):
    """Is `better` above `worse`, seed for seed?"""
    if len(better) < 3 or len(worse) < 3:
        return 'not yet measured (3 seeds each)'
    if min(better) > max(worse):
        return '**holds**'
    if max(better) < min(worse):
        return '**does not hold**'
    return '**within noise**'


def epochs_to(name, level):
    """The first epoch whose validation top-1 reaches `level` %, or None."""
    return next((r['epoch'] for r in log(name) if r.get('val_top1', 0) >= level), None)


def fractions():
    rows = ['| data fraction | DeiT | ConViT | ConViT − DeiT | verdict (ConViT > DeiT) |', '|---|---|---|---:|---|']
    for f in ('0.1', '0.3', '1.0'):
        deit, convit = seeds(f'frac{f}_deit'), seeds(f'frac{f}_convit')
        gap = f'{statistics.mean(convit) - statistics.mean(deit):+.1f}' if deit and convit else '–'
        rows.append(f'| {f} | {cell(deit)} | {cell(convit)} | {gap} | {verdict(convit, deit)} |')
    return '\n'.join(rows)


def localvit():
    deit, lff, k1 = seeds('frac1.0_deit'), seeds('localvit'), seeds('localvit_k1')
    return '\n'.join(['| feed-forward | top-1 (%) |', '|---|---|',
                      f'| MLP (DeiT, 3 heads) | {cell(deit)} |', f'| LFF, depthwise 3x3 (LocalViT) | {cell(lff)} |',
                      f'| LFF, depthwise 1x1 (no locality) | {cell(k1)} |', '',
                      f'- LFF (3x3) > MLP: {verdict(lff, deit)}',
                      f'- LFF 3x3 > LFF 1x1 (locality itself): {verdict(lff, k1)}'])


def stem_runs(model, opt):
    """{lr: [final top-1 per seed]} of one stem and optimizer."""
    out = {}
    for path in sorted(glob.glob(os.path.join(RUNS, f'vit_{model}_{opt}_lr*_s*', 'log.jsonl'))):
        name = os.path.basename(os.path.dirname(path))
        lr = re.search(r'_lr([^_]+)_s\d$', name).group(1)
        if final(name) is not None:
            out.setdefault(lr, []).append(final(name))
    return out


def best_stems():
    picks = []
    for opt in ('adamw', 'sgd'):
        for model in ('p', 'c'):
            runs = stem_runs(model, opt)
            seed0 = {lr: final(f'vit_{model}_{opt}_lr{lr}_s0') for lr in runs}
            if seed0:
                picks.append(f'{model}_{opt}:{max(seed0, key=lambda lr: seed0[lr] or -1)}')
    return ' '.join(picks)


def stems():
    rows = ['| optimizer | lr per 512 | ViT_P (patchify) | ViT_C (conv stem) | epochs to 40 % (P / C, seed 0) |',
            '|---|---|---|---|---|']
    verdicts = []
    for opt in ('adamw', 'sgd'):
        p, c = stem_runs('p', opt), stem_runs('c', opt)
        for lr in sorted(set(p) | set(c), key=float):
            speed = ' / '.join(str(epochs_to(f'vit_{m}_{opt}_lr{lr}_s0', 40) or '–') for m in 'pc')
            rows.append(f'| {opt} | {lr} | {cell(p.get(lr, []))} | {cell(c.get(lr, []))} | {speed} |')
        best = dict(pick.split(':') for pick in best_stems().split())
        if f'p_{opt}' in best and f'c_{opt}' in best:
            verdicts.append(f'- {opt}, each at its best lr (P {best[f"p_{opt}"]}, C {best[f"c_{opt}"]}): '
                            f'ViT_C > ViT_P {verdict(c[best[f"c_{opt}"]], p[best[f"p_{opt}"]])}')
    return '\n'.join(rows + [''] + verdicts)


def analysis(name):
    """evaluate.py --analyze's numbers of a run (tutorials/figures.sh writes them), or None."""
    path = os.path.join(RUNS, f'analysis-{name}', 'analysis.json')
    return json.load(open(path)) if os.path.exists(path) else None


def convit_gates():
    """The gates sigma(lambda) after training, per GPSA block (mean over heads), over the seeds."""
    runs = [a for a in (analysis(f'frac1.0_convit_s{s}') for s in range(3)) if a]
    if not runs:
        return 'not yet analysed (bash tutorials/figures.sh)'
    rows = ['| block | gate, mean over heads (per seed) | nonlocality, patches (per seed) |', '|---|---|---|']
    for i, block in enumerate(runs[0]['blocks']):
        gates = [statistics.mean(a['gating'][i]) for a in runs if a['gating'][i]]
        far = [a['nonlocality_mean'][i] for a in runs if a['nonlocality_mean'][i] is not None]
        rows.append(f'| {block} ({runs[0]["attention"][i]}) | {" ".join(f"{g:.2f}" for g in gates) or "–"} | '
                    f'{" ".join(f"{d:.2f}" for d in far)} |')
    return '\n'.join(rows)


def oversmoothing():
    plain, diverse = seeds('deep'), seeds('deep_diverse')
    last = lambda prefix: [a['patch_similarity'][-1] for a in (analysis(f'{prefix}_s{s}') for s in range(3)) if a]
    sim_plain, sim_diverse = last('deep'), last('deep_diverse')
    fmt = lambda v: f'{statistics.mean(v):.3f} ({min(v):.3f}–{max(v):.3f}, n={len(v)})' if v else '–'
    return '\n'.join(['| 12 blocks of width 64, CutMix | top-1 (%) | last-layer patch similarity |',
                      '|---|---|---|', f'| without the losses | {cell(plain)} | {fmt(sim_plain)} |',
                      f'| with cos + con + mix | {cell(diverse)} | {fmt(sim_diverse)} |', '',
                      f'- the losses lower the last layer\'s patch similarity: {verdict([-v for v in sim_diverse], [-v for v in sim_plain])}',
                      f'- the losses raise accuracy: {verdict(diverse, plain)}',
                      f'- at half the learning rate (4e-3, seed 0): without {final("deep_lr4e-3_s0")}, with '
                      f'{final("deep_diverse_lr4e-3_s0")}'])


def combined():
    combo, lff, deit, convit = seeds('combo'), seeds('localvit'), seeds('frac1.0_deit'), seeds('frac1.0_convit')
    return '\n'.join(['| model (6 blocks of width 96) | top-1 (%) |', '|---|---|', f'| DeiT | {cell(deit)} |',
                      f'| ConViT | {cell(convit)} |', f'| LocalViT (LFF) | {cell(lff)} |',
                      f'| conv stem + GPSA (5 blocks) + LFF | {cell(combo)} |', '',
                      f'- the combination beats DeiT: {verdict(combo, deit)}',
                      f'- the combination beats ConViT: {verdict(combo, convit)}',
                      f'- the combination beats LocalViT alone: {verdict(combo, lff)}'])

if __name__ == '__main__':
    if '--best-stems' in sys.argv:
        print(best_stems())
    else:
        for title, table in (('01 ConViT: sample efficiency', fractions), ('01 ConViT: gates', convit_gates),
                             ('02 LocalViT', localvit),
                             ('03 Early convolutions', stems), ('04 Over-smoothing', oversmoothing),
                             ('05 Combining', combined)):
            print(f'## {title}\n\n{table()}\n')
