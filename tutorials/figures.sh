#!/usr/bin/env bash
# The tutorials' pictures and analyses, from the runs of experiments.sh (run that first), with the
# project's own evaluate.py: --analyze (kernels, gates, attention maps, per-layer curves; and the
# numbers tutorials/results.py reads) and --curves.
# Usage: bash tutorials/figures.sh   (writes runs/tutorials/analysis-*/ and tutorials/figures/*.png)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=runs/tutorials
FIG=tutorials/figures
mkdir -p "$FIG"
analyze() {  # analyze RUN: evaluate.py --analyze of the run's last checkpoint (the final epoch)
  python evaluate.py --checkpoint "$RUNS/$1/last.pt" --analyze --out "$RUNS/analysis-$1" > "$RUNS/analysis-$1.txt"
}

# 01 ConViT: the positional "kernels" at init (no checkpoint: the initial weights) and after
# training (seed 0), every seed's gates and nonlocality, an attention map
python evaluate.py --arch convit_t --depth 6 --local-up-to-layer 5 --embed-dim 96 --analyze \
    --out "$RUNS/analysis-convit-init" > "$RUNS/analysis-convit-init.txt"
cp "$RUNS/analysis-convit-init/kernels.png" "$FIG/convit_kernels_init.png"
for seed in 0 1 2; do analyze "frac1.0_convit_s$seed"; done
cp "$RUNS/analysis-frac1.0_convit_s0/kernels.png" "$FIG/convit_kernels_trained.png"
cp "$RUNS/analysis-frac1.0_convit_s0/layers.png" "$FIG/convit_layers_trained.png"
cp "$RUNS/analysis-frac1.0_convit_s0/attention.png" "$FIG/convit_attention_trained.png"

# 01/02 training curves on all the data (seed 0); 03 the stems at their best learning rates
python evaluate.py --curves "$RUNS"/{frac1.0_deit_s0,frac1.0_convit_s0,localvit_s0,localvit_k1_s0}/log.jsonl \
    --out "$RUNS/curves-models"
cp "$RUNS/curves-models/curves.png" "$FIG/curves_deit_convit_localvit.png"
logs=()
for pick in $(python tutorials/results.py --best-stems); do
  m=${pick%%_*}; rest=${pick#*_}; logs+=("$RUNS/vit_${m}_${rest%%:*}_lr${pick##*:}_s0/log.jsonl")
done
python evaluate.py --curves "${logs[@]}" --out "$RUNS/curves-stems"
cp "$RUNS/curves-stems/curves.png" "$FIG/curves_stems.png"

# 04 over-smoothing: the patch similarity per layer of every seed, with and without the losses
for seed in 0 1 2; do analyze "deep_s$seed"; analyze "deep_diverse_s$seed"; done
python - <<'PY'
import json
import evaluate
fig = evaluate.figure(8, 4.5, 'Patch similarity per layer: 12 blocks of width 64 (3 seeds each)')
ax = fig.add_subplot()
for run, label, colour in (('deep', 'CutMix', 'tab:blue'), ('deep_diverse', 'CutMix + cos + con + mix', 'tab:red')):
    curves = [json.load(open(f'runs/tutorials/analysis-{run}_s{s}/analysis.json'))['patch_similarity'] for s in range(3)]
    layers = range(len(curves[0]))
    for k, c in enumerate(curves):
        ax.plot(layers, c, color=colour, alpha=0.8, label=label if k == 0 else None)
ax.set(xlabel='layer (0 = the embedding, l = block l)', ylabel='mean |cosine| between patches', ylim=(0, 1))
ax.grid(alpha=0.3)
ax.legend()
evaluate.save_png(fig, 'tutorials/figures/oversmoothing.png')
PY
python tutorials/results.py > "$RUNS/results.md"
echo "pictures in $FIG/, tables in $RUNS/results.md"
