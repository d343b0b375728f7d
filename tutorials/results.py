"""The tutorials' experiments: every arm, its runs, and every table and number the texts quote.

    python tutorials/results.py                  # every table (Markdown), from tutorials/logs/
    python tutorials/results.py --runs [GROUP]   # the runs still to do: 'name|train.py flags' lines
    python tutorials/results.py --figures        # the pictures that need no checkpoint (curves)

Protocol. Each arm (a model and its settings) first runs a learning-rate sweep on a selection seed
(SELECT = 100) that is never reported (extended past an end of its range while the best is there);
its best rate (the final-epoch validation top-1 on the synthetic data) is then run with the reported
seeds 0, 1, 2, on the synthetic data and on the UCI digits (which uses the rate chosen on the
synthetic data: no digits run chooses anything). A claim's verdict: "holds" when every seed of one
side beats every seed of the other AND the means differ by at least MARGIN points (3 against 3
all-beat-all has a one-sided p of 1/20 = 0.05 under exchangeability); "does not hold" the same in the
other direction; "within noise" otherwise. Every run's log.jsonl is kept in
tutorials/logs/<run>.jsonl, so a fresh clone recomputes every number here.
"""
import json
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))      # train.py, locvit.py, evaluate.py (imported where used)
LOGS = os.path.join(HERE, 'logs')
SELECT, SEEDS, MARGIN = 100, (0, 1, 2), 1.0
COMMON = '--no-progress --workers 0 --batch-size 64 --epochs 15 --warmup-epochs 1 --embed-dim 96'
DATA = {'synthetic': '--synthetic-val 500', 'digits': '--data digits --epochs 10'}
ADAMW = ('4e-3', '8e-3', '1.6e-2')
DEIT6 = '--arch deit_t --depth 6'                                           # 3 heads of 32
CONVIT6 = '--arch convit_t --depth 6 --local-up-to-layer 5'                 # 5 GPSA blocks; 4 heads
DEEP = '--arch deit_t --depth 12 --embed-dim 64 --num-heads 2 --warmup-epochs 2 --clip-grad 1.0'
VITP = '--arch vit_p_1gf --depth 6'                                         # pycls's recipe
VITC = '--arch vit_c_1gf --depth 5 --stem-channels 12,24,48,96 --stem-strides 2,2,1,1'
SGD = '--opt sgd --weight-decay 5e-5'
LONG = '--epochs 60'            # tutorial 01: ConViT 4x longer, seed 0 only: do the gates then fall with depth?
# arm: (group, train.py flags, the learning rates its sweep tries, per 512 images)
ARMS = {
    'deit': ('models', DEIT6, ADAMW),
    'convit': ('models', CONVIT6, ('2e-3', '4e-3', '8e-3')),
    'deit_f0.1': ('fractions', DEIT6 + ' --data-fraction 0.1 --scale-epochs --eval-every 10', ADAMW),
    'convit_f0.1': ('fractions', CONVIT6 + ' --data-fraction 0.1 --scale-epochs --eval-every 10',
                    ('2e-3', '4e-3', '8e-3')),
    'localvit': ('models', '--arch localvit_t --depth 6', ADAMW),
    'localvit_k1': ('models', '--arch localvit_t --depth 6 --lff-kernel 1', ADAMW),
    'vit_p_adamw': ('stems', VITP, ADAMW),
    'vit_c_adamw': ('stems', VITC, ADAMW),
    'vit_p_sgd': ('stems', f'{VITP} {SGD}', ('0.25', '0.5', '1.0')),
    'vit_c_sgd': ('stems', f'{VITC} {SGD}', ('0.25', '0.5', '1.0')),
    'deit_cutmix': ('oversmoothing', DEIT6 + ' --cutmix 1.0 --grid-cutmix', ADAMW),
    'deit_diverse': ('oversmoothing', DEIT6 + ' --cutmix 1.0 --diverse cos,con,mix', ADAMW),
    'deep': ('oversmoothing', DEEP, ('1e-3', '2e-3', '4e-3')),                     # no CutMix: no mix loss
    'deep_diverse': ('oversmoothing', DEEP + ' --diverse cos,con', ('1e-3', '2e-3', '4e-3')),
    'combo': ('combined', CONVIT6 + ' --stem-channels 12,24,48 --stem-strides 2,2,1 --ffn lff --reduction 192',
              ('2e-3', '4e-3', '8e-3')),
}


# ---- logs ---------------------------------------------------------------------------------------

def log(name):
    path = os.path.join(LOGS, f'{name}.jsonl')
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def final(name):
    """The last validation top-1 of a finished run (its last epoch evaluated), or None."""
    records = log(name)
    evals = [r['val_top1'] for r in records if r.get('val_top1') is not None]
    return evals[-1] if records and evals and 'val_top1' in records[-1] else None


def run_name(arm, data, lr, seed):
    return f'{arm}_{data}_lr{lr}_s{seed}'


def scaled(lr, factor):
    """'4e-3' x 0.5 -> '2e-3'; '0.25' x 2 -> '0.5'."""
    x = float(lr) * factor
    if x >= 0.01:
        return f'{x:g}'
    mantissa, exponent = f'{x:e}'.split('e')
    return f'{float(mantissa):g}e{int(exponent)}'


def rates(arm, extensions=2):
    """The arm's sweep: its listed rates, extended past an end (x 0.5 or x 2, at most twice) while the
    best finished one is at that end: the chosen rate is then inside the range tried."""
    tried = list(ARMS[arm][2])
    for _ in range(extensions):
        got = [final(run_name(arm, 'synthetic', lr, SELECT)) for lr in tried]
        if None in got:
            break
        best = tried[got.index(max(got))]
        if best == tried[0]:
            tried.insert(0, scaled(best, 0.5))
        elif best == tried[-1]:
            tried.append(scaled(best, 2))
        else:
            break
    return tried


def sweep(arm):
    """{lr: the selection seed's final top-1 on the synthetic data} (finished runs only)."""
    got = {lr: final(run_name(arm, 'synthetic', lr, SELECT)) for lr in rates(arm)}
    return {lr: top1 for lr, top1 in got.items() if top1 is not None}


def best_lr(arm):
    """The arm's chosen rate: the best of its complete sweep, or None while it runs."""
    got = sweep(arm)
    return max(got, key=got.get) if len(got) == len(rates(arm)) else None


def seeds(arm, data='synthetic', key='val_top1'):
    """The reported seeds' final values at the arm's chosen rate."""
    lr = best_lr(arm)
    if lr is None:
        return []
    values = [final(run_name(arm, data, lr, s)) for s in SEEDS]
    return [v for v in values if v is not None]


def runs(group=None):
    """(name, flags) of every run not yet finished: the sweeps, then (once an arm's sweep is complete)
    its reported seeds on both data sets, then tutorial 01's longer ConViT run and tutorial 06's
    fine-tuning runs."""
    todo = []
    for arm, (arm_group, flags, _) in ARMS.items():
        if group not in (None, arm_group):
            continue
        plan = [('synthetic', lr, SELECT) for lr in rates(arm)]
        if best_lr(arm):
            plan += [(data, best_lr(arm), s) for s in SEEDS for data in DATA]
        for data, lr, seed in plan:
            name = run_name(arm, data, lr, seed)
            if final(name) is None:
                todo.append((name, f'{COMMON} {DATA[data]} {flags} --lr {lr} --seed {seed}'))
    if group in (None, 'long') and best_lr('convit') and final(long_run()) is None:
        todo.append((long_run(), f'{COMMON} {DATA["synthetic"]} {CONVIT6} --lr {best_lr("convit")} '
                                 f'--seed 0 {LONG}'))
    if group in (None, 'finetune') and best_lr('deit'):
        lr = best_lr('deit')
        for s in SEEDS:                     # DeiT trained on the shapes, then on the digits
            name = f'finetune_digits_lr{lr}_s{s}'
            source = os.path.join('runs', 'tutorials', run_name('deit', 'synthetic', lr, s), 'last.pt')
            if final(name) is None and os.path.exists(source):
                todo.append((name, f'{COMMON} {DATA["digits"]} {DEIT6} --lr {lr} --seed {s} --finetune {source} '
                                   f'--img-size 32 --patch-size 4'))
    return todo


# ---- verdicts and cells -------------------------------------------------------------------------

def verdict(better, worse, margin=MARGIN):
    """Does `better` beat `worse` by the rule above?"""
    if len(better) < 3 or len(worse) < 3:
        return 'not yet measured'
    gap = statistics.mean(better) - statistics.mean(worse)
    if min(better) > max(worse) and gap >= margin:
        return '**holds**'
    if max(better) < min(worse) and -gap >= margin:
        return '**does not hold**'
    return '**within noise**'


def cell(values, digits=1):
    if not values:
        return '–'
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}'


def per_seed(values, digits=1):
    return ' / '.join(f'{v:.{digits}f}' for v in values) or '–'


# (tutorial, the claim, the arm that should win, the arm it should beat)
CLAIMS = [
    ('01', 'ConViT > DeiT, all the data', 'convit', 'deit'),
    ('01', 'ConViT > DeiT, 10 % of the data (10x the epochs)', 'convit_f0.1', 'deit_f0.1'),
    ('02', 'LFF (LocalViT) > MLP (DeiT)', 'localvit', 'deit'),
    ('02', 'LFF 3x3 > LFF 1x1: the locality itself', 'localvit', 'localvit_k1'),
    ('03', 'ViT_C > ViT_P, AdamW', 'vit_c_adamw', 'vit_p_adamw'),
    ('03', 'ViT_C > ViT_P, SGD', 'vit_c_sgd', 'vit_p_sgd'),
    ('04', 'cos + con raise accuracy: 12 blocks of width 64, no CutMix', 'deep_diverse', 'deep'),
    ('04', 'cos + con + mix raise accuracy: 6 blocks of width 96, patch-grid CutMix on both',
     'deit_diverse', 'deit_cutmix'),
    ('05', 'the combination > DeiT', 'combo', 'deit'),
    ('05', 'the combination > ConViT', 'combo', 'convit'),
    ('05', 'the combination > LocalViT', 'combo', 'localvit'),
]


def claim_rows(tutorial=None):
    """The claims (of one tutorial, or all) as table rows, both data sets side by side."""
    rows = ['| tutorial | claim | synthetic shapes: winner vs loser | verdict | UCI digits: winner vs loser '
            '| verdict |', '|---|---|---|---|---|---|']
    for number, text, better, worse in CLAIMS:
        if tutorial not in (None, number):
            continue
        cells = []
        for data in DATA:
            b, w = seeds(better, data), seeds(worse, data)
            cells += [f'{cell(b)} vs {cell(w)}', verdict(b, w)]
        rows.append(f'| {number} | {text} | ' + ' | '.join(cells) + ' |')
    return rows


def summary():
    return '\n'.join(claim_rows()) + f'\n\n{budget()}'


def budget():
    """How many runs the logs hold and their training time (the logs' epoch_seconds, summed)."""
    names = sorted(f[:-len('.jsonl')] for f in os.listdir(LOGS) if f.endswith('.jsonl'))
    minutes = [sum(r.get('epoch_seconds', 0) for r in log(name)) / 60 for name in names]
    return (f'{len(names)} runs, {min(minutes):.1f} to {max(minutes):.1f} minutes of training each, '
            f'{sum(minutes):.0f} run-minutes in all (one CPU thread each)')


# ---- tables -------------------------------------------------------------------------------------

def sweeps():
    rows = ['| arm | rates tried (per 512 images): seed-100 top-1 on the synthetic data (%) | chosen |',
            '|---|---|---|']
    for arm in ARMS:
        got, tried_rates = sweep(arm), rates(arm)
        tried = ', '.join(f'{lr}: {got[lr]:.1f}' if lr in got else f'{lr}: –' for lr in tried_rates)
        chosen = best_lr(arm) or '–'
        edge = ' (an end of the range)' if chosen in (tried_rates[0], tried_rates[-1]) else ''
        rows.append(f'| {arm} | {tried} | {chosen}{edge} |')
    return '\n'.join(rows)


def arms_table():
    rows = ['| arm | rate | synthetic: top-1 per seed 0 / 1 / 2 | mean ± std | digits: per seed | mean ± std |',
            '|---|---|---|---|---|---|']
    for arm in ARMS:
        cells = [arm, best_lr(arm) or '–']
        for data in DATA:
            cells += [per_seed(seeds(arm, data)), cell(seeds(arm, data))]
        rows.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def convit():
    return '\n'.join(claim_rows('01'))


def localvit():
    return '\n'.join(claim_rows('02') + speed_rows(('deit', 'localvit', 'localvit_k1')))


def epochs_to(name, level):
    """The first epoch whose validation top-1 reaches `level` %, or None."""
    return next((r['epoch'] for r in log(name) if (r.get('val_top1') or 0) >= level), None)


def speed_rows(arms):
    """Per arm at its chosen rate, the first epoch that reaches 40 % (synthetic) and 80 % (digits)."""
    rows = ['', '| arm | epochs to 40 % (synthetic), seeds 0 / 1 / 2 | digits: epochs to 80 % |', '|---|---|---|']
    for arm in arms:
        lr = best_lr(arm)
        speed = lambda data, level: ' / '.join(str(epochs_to(run_name(arm, data, lr, s), level) or 'never')
                                               for s in SEEDS) if lr else '–'
        rows.append(f'| {arm} | {speed("synthetic", 40)} | {speed("digits", 80)} |')
    return rows


def stems():
    rows = claim_rows('03') + speed_rows(('vit_p_adamw', 'vit_c_adamw', 'vit_p_sgd', 'vit_c_sgd'))
    drop = {}
    for stem in 'pc':
        adamw, sgd = seeds(f'vit_{stem}_adamw'), seeds(f'vit_{stem}_sgd')
        drop[stem] = statistics.mean(adamw) - statistics.mean(sgd) if adamw and sgd else None
    if None not in drop.values():
        rows.append(f'\nAdamW minus SGD (synthetic, means): ViT_P {drop["p"]:+.1f}, ViT_C {drop["c"]:+.1f} points')
    return '\n'.join(rows)


def analysis(name):
    """evaluate.py --analyze's numbers of a run (tutorials/figures.sh keeps them in tutorials/logs/)."""
    path = os.path.join(LOGS, f'analysis-{name}.json')
    return json.load(open(path)) if os.path.exists(path) else None


def data_similarity(data='synthetic', images=32):
    """The mean pairwise |cosine| of the raw (normalised) 4x4 pixel patches of validation images, the
    level the data alone gives layer 0 before any learned weight."""
    import torch
    import locvit
    import train
    cfg = train.fill_defaults(train.Config(arch='deit_t', data=data, synthetic_val=500))
    val_set, _ = train.build_val_set(cfg)
    index = torch.linspace(0, len(val_set) - 1, images).round().long().tolist()  # as evaluate.py picks them
    x = torch.stack([val_set[i][0] for i in index])
    patches = locvit.img2seq(torch.nn.functional.pixel_unshuffle(x, 4))
    return locvit.patch_cosine_loss(patches).item()


def oversmoothing():
    rows, data = claim_rows('04'), data_similarity()
    rows += ['', f'the data alone (raw 4 x 4 pixel patches, normalised, 32 validation images): {data:.3f}', '',
             '| arm (synthetic, seeds 0 / 1 / 2) | patch similarity: layer 0 | last layer | last - layer 0 | '
             'last - the data |', '|---|---|---|---|---|']
    for arm in ('deep', 'deep_diverse', 'deit_cutmix', 'deit_diverse'):
        lr = best_lr(arm)
        curves = [a['patch_similarity'] for a in (analysis(run_name(arm, 'synthetic', lr, s)) for s in SEEDS) if a]
        if curves:
            rows.append(f'| {arm} | {per_seed([c[0] for c in curves], 3)} | {per_seed([c[-1] for c in curves], 3)} | '
                        f'{per_seed([c[-1] - c[0] for c in curves], 3)} | '
                        f'{per_seed([c[-1] - data for c in curves], 3)} |')
    return '\n'.join(rows)


def long_run():
    return run_name('convit_long', 'synthetic', best_lr('convit'), 0)


def gates():
    lr = best_lr('convit')
    runs_ = [a for a in (analysis(run_name('convit', 'synthetic', lr, s)) for s in SEEDS) if a]
    if not runs_:
        return 'not yet analysed (bash tutorials/figures.sh)'
    long = [a for a in [analysis(long_run())] if a]

    def cells(analyses, i):             # block i's gate (mean over heads) and nonlocality, per run
        gate = [statistics.mean(a['gating'][i]) for a in analyses if a['gating'][i]]
        far = [a['nonlocality_mean'][i] for a in analyses if a['nonlocality_mean'][i] is not None]
        return f'{per_seed(gate, 2)} | {per_seed(far, 2)}'

    rows = [f'15 epochs: {gate_reach()}', f'60 epochs: {gate_reach(LONG)}\n',
            '| block | gate σ(λ), mean over heads (seeds 0 / 1 / 2) | nonlocality, patches | 60 epochs, seed 0: '
            'gate | nonlocality |', '|---|---|---|---|---|']
    for i, block in enumerate(runs_[0]['blocks']):
        rows.append(f'| {block} ({runs_[0]["attention"][i]}) | {cells(runs_, i)} | {cells(long, i)} |')
    if final(long_run()) is not None:
        rows.append(f'\n60 epochs, seed 0: top-1 {final(long_run()):.1f} %')
    if long:                            # every head: where its gate ended, and how far λ moved from 1
        heads = [g for block in long[0]['gating'] if block for g in block]
        moved = max(abs(math.log(g / (1 - g)) - 1) for g in heads)
        rows.append(f'60 epochs, seed 0, every GPSA head: gate {min(heads):.3f} to {max(heads):.3f}; '
                    f'the largest |λ - 1| {moved:.3f}')
    return '\n'.join(rows)


def lr_budget(arm, extra='', data='synthetic'):
    """The sum of the learning rate over a run's optimizer steps (its schedule, as train.py steps it):
    Adam moves a parameter by about the rate each step, so this bounds how far one can travel."""
    import shlex
    import train
    lr = best_lr(arm)
    flags = f'{COMMON} {DATA[data]} {ARMS[arm][1]} --lr {lr} {extra}'
    cfg = train.parse_config(shlex.split(flags))
    images = 2500 if data == 'synthetic' else 1297
    steps = int(images * cfg.data_fraction) // cfg.batch_size
    schedule = train.Schedule(cfg, steps, cfg.lr * cfg.batch_size / 512)
    total = 0.0
    for step in range(schedule.total):
        schedule.step = step
        total += schedule.lr()
    return total


def gate_reach(extra='', arm='convit'):
    """sigmoid(1 +- the summed rate): the farthest a gate starting at sigmoid(1) can move."""
    budget = lr_budget(arm, extra)
    return (f'summed learning rate {budget:.3f}: a gate starting at σ(1) = 0.731 can reach '
            f'{1 / (1 + math.exp(-(1 - budget))):.3f} to {1 / (1 + math.exp(-(1 + budget))):.3f}')


def combined():
    return '\n'.join(claim_rows('05'))


def finetune():
    lr = best_lr('deit')
    tuned = [v for v in (final(f'finetune_digits_lr{lr}_s{s}') for s in SEEDS) if v is not None] if lr else []
    scratch = seeds('deit', 'digits')
    return '\n'.join(['| DeiT (6 blocks of width 96) on the digits, 10 epochs | top-1 per seed | mean ± std |',
                      '|---|---|---|', f'| from scratch | {per_seed(scratch)} | {cell(scratch)} |',
                      f'| fine-tuned from the synthetic shapes | {per_seed(tuned)} | {cell(tuned)} |', '',
                      f'- fine-tuning beats training from scratch: {verdict(tuned, scratch)}'])


TABLES = [('Every claim', summary), ('Rate sweeps (seed 100, not reported)', sweeps),
          ('Every arm at its chosen rate', arms_table),
          ('01 ConViT', convit), ('01 ConViT: gates after training', gates), ('02 LocalViT', localvit),
          ('03 Early convolutions', stems), ('04 Over-smoothing', oversmoothing), ('05 Combining', combined),
          ('06 Fine-tuning', finetune)]


# ---- figures ------------------------------------------------------------------------------------

def curves_figure(arms, data='synthetic', title=''):
    """Validation top-1 per epoch: the mean of the reported seeds, their range shaded."""
    import evaluate
    fig = evaluate.figure(8, 4.5, title)
    ax = fig.add_subplot()
    for i, arm in enumerate(arms):
        lr = best_lr(arm)
        curves = [[r['val_top1'] for r in log(run_name(arm, data, lr, s)) if r.get('val_top1') is not None]
                  for s in SEEDS] if lr else []
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(map(len, curves))
        epochs = [r['epoch'] for r in log(run_name(arm, data, lr, SEEDS[0])) if r.get('val_top1') is not None][:n]
        mean = [statistics.mean(c[e] for c in curves) for e in range(n)]
        ax.plot(epochs, mean, color=f'C{i}', label=f'{arm} (lr {lr}, mean of {len(curves)} seeds)')
        ax.fill_between(epochs, [min(c[e] for c in curves) for e in range(n)],
                        [max(c[e] for c in curves) for e in range(n)], color=f'C{i}', alpha=0.2)
    ax.axhline(10, color='grey', linestyle='--', label='chance (10 classes)')
    ax.set(xlabel='epoch', ylabel='validation top-1 (%)', ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def figures():
    import evaluate
    out = os.path.join(HERE, 'figures')
    for filename, arms, title in [
            ('curves_deit_convit_localvit.png', ('deit', 'convit', 'localvit', 'localvit_k1'),
             'Synthetic shapes: DeiT, ConViT, LocalViT and its 1x1 ablation, each at its chosen rate'),
            ('curves_stems.png', ('vit_p_adamw', 'vit_c_adamw', 'vit_p_sgd', 'vit_c_sgd'),
             'Synthetic shapes: patchify (ViT_P) and conv stem (ViT_C), AdamW and SGD, each at its chosen rate')]:
        evaluate.save_png(curves_figure(arms, title=title), os.path.join(out, filename))
        print(f'saved {os.path.join(out, filename)}')


if __name__ == '__main__':
    if '--runs' in sys.argv:
        group = sys.argv[sys.argv.index('--runs') + 1] if len(sys.argv) > sys.argv.index('--runs') + 1 else None
        print('\n'.join(f'{name}|{flags}' for name, flags in runs(group)))
    elif '--figures' in sys.argv:
        figures()
    else:
        print(f'Synthetic data: 2,500 training / 500 validation images, 15 epochs; digits: 1,297 / 500, '
              f'10 epochs; final-epoch validation top-1 (%); verdict margin {MARGIN:g} point.\n')
        for title, table in TABLES:
            print(f'## {title}\n\n{table()}\n')
