#!/usr/bin/env bash
# The tutorials' pictures and analyses, from the runs of experiments.sh (run that first), with the
# project's own evaluate.py: --analyze (kernels, gates, attention maps, per-layer curves) of the
# runs the texts discuss, each run's analysis.json kept in tutorials/logs/analysis-<run>.json (the
# numbers tutorials/results.py reads), and the curves of the seeds (tutorials/results.py --figures).
# Usage: bash tutorials/figures.sh   (writes runs/tutorials/analysis-*/ and tutorials/figures/*.png)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=runs/tutorials
FIG=tutorials/figures
mkdir -p "$FIG" tutorials/logs
best() { python -c "import sys; sys.path.insert(0, 'tutorials'); import results; print(results.best_lr('$1'))"; }
analyze() {  # analyze RUN: evaluate.py --analyze of the run's last checkpoint (the final epoch)
  python evaluate.py --checkpoint "$RUNS/$1/last.pt" --analyze --out "$RUNS/analysis-$1" > "$RUNS/analysis-$1.txt"
  cp "$RUNS/analysis-$1/analysis.json" "tutorials/logs/analysis-$1.json"
}

# 01 ConViT: the positional "kernels" at init (no checkpoint: the initial weights) and after
# training (seed 0), every seed's gates and nonlocality, an attention map
python evaluate.py --arch convit_t --depth 6 --local-up-to-layer 5 --embed-dim 96 --analyze \
    --out "$RUNS/analysis-convit-init" > "$RUNS/analysis-convit-init.txt"
cp "$RUNS/analysis-convit-init/kernels.png" "$FIG/convit_kernels_init.png"
lr=$(best convit)
for seed in 0 1 2; do analyze "convit_synthetic_lr${lr}_s$seed"; done
analyze "convit_long_synthetic_lr${lr}_s0"                  # the 4x longer run
cp "$RUNS/analysis-convit_synthetic_lr${lr}_s0/kernels.png" "$FIG/convit_kernels_trained.png"
cp "$RUNS/analysis-convit_synthetic_lr${lr}_s0/layers.png" "$FIG/convit_layers_trained.png"
cp "$RUNS/analysis-convit_synthetic_lr${lr}_s0/attention.png" "$FIG/convit_attention_trained.png"

# 04 over-smoothing: the patch similarity per layer of every seed, with and without the losses
for arm in deep deep_diverse deit_cutmix deit_diverse; do
  lr=$(best $arm)
  for seed in 0 1 2; do analyze "${arm}_synthetic_lr${lr}_s$seed"; done
done
python - <<'PY'
import json, sys
sys.path.insert(0, 'tutorials')
import evaluate, results
fig = evaluate.figure(11, 4.5, 'Patch similarity per layer (synthetic shapes, seeds 0, 1, 2; dotted: the raw pixel '
                      f'patches, {results.data_similarity():.2f})')
for k, (pair, title) in enumerate(((('deep', 'deep_diverse'), '12 blocks of width 64, no CutMix'),
                                   (('deit_cutmix', 'deit_diverse'), '6 blocks of width 96, patch-grid CutMix'))):
    ax = fig.add_subplot(1, 2, k + 1)
    for arm, label, colour in zip(pair, ('without the losses', 'with the losses'), ('tab:blue', 'tab:red')):
        lr = results.best_lr(arm)
        for s in results.SEEDS:
            curve = results.analysis(results.run_name(arm, 'synthetic', lr, s))['patch_similarity']
            ax.plot(range(len(curve)), curve, color=colour, alpha=0.8, label=label if s == 0 else None)
    ax.axhline(results.data_similarity(), color='grey', linestyle=':')
    ax.set(title=title, xlabel='layer (0 = the embedding, l = block l)', ylabel='mean |cosine| between patches',
           ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
evaluate.save_png(fig, 'tutorials/figures/oversmoothing.png')
PY
python tutorials/results.py --figures
python tutorials/results.py > "$RUNS/results.md"
echo "pictures in $FIG/, analyses in tutorials/logs/, tables in $RUNS/results.md"
