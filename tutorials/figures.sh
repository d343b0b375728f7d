#!/usr/bin/env bash
# The tutorials' pictures from the runs of experiments.sh (run that first), with the project's own
# evaluate.py: --analyze (kernels, gates, attention maps, per-layer curves) and --curves.
# Usage: bash tutorials/figures.sh   (writes runs/tutorials/analysis-*/ and tutorials/figures/*.png)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=runs/tutorials
FIG=tutorials/figures
mkdir -p "$FIG"
TUTORIAL_CONVIT=(--arch convit_t --depth 6 --local-up-to-layer 5 --embed-dim 96)

# 01 ConViT: the positional "kernels" at init and after training, the gates, an attention map
python evaluate.py "${TUTORIAL_CONVIT[@]}" --analyze --out "$RUNS/analysis-convit-init"
cp "$RUNS/analysis-convit-init/kernels.png" "$FIG/convit_kernels_init.png"
python evaluate.py --checkpoint "$RUNS/frac1.0_convit/best.pt" --analyze --out "$RUNS/analysis-convit"
cp "$RUNS/analysis-convit/kernels.png" "$FIG/convit_kernels_trained.png"
cp "$RUNS/analysis-convit/layers.png" "$FIG/convit_layers_trained.png"
cp "$RUNS/analysis-convit/attention.png" "$FIG/convit_attention_trained.png"

# 01/02 training curves on all the data; 03 the stems with AdamW and SGD
python evaluate.py --curves "$RUNS"/frac1.0_{deit,convit,localvit}/log.jsonl --out "$RUNS/curves-models"
cp "$RUNS/curves-models/curves.png" "$FIG/curves_deit_convit_localvit.png"
python evaluate.py --curves "$RUNS"/vit_{p,c}_{adamw,sgd}/log.jsonl --out "$RUNS/curves-stems"
cp "$RUNS/curves-stems/curves.png" "$FIG/curves_stems.png"

# 04/05 over-smoothing: the patch similarity per layer, with and without the diversity losses
for run in deit_cutmix deit_diverse combo combo_cutmix combo_diverse; do
  python evaluate.py --checkpoint "$RUNS/$run/best.pt" --analyze --out "$RUNS/analysis-$run" > "$RUNS/analysis-$run.txt"
done
python - <<'PY'
import json
import evaluate
runs = 'runs/tutorials'
series = []
for name, label in [('deit_cutmix', 'DeiT, CutMix'), ('deit_diverse', 'DeiT, CutMix + cos, con, mix'),
                    ('combo', 'combination'), ('combo_cutmix', 'combination, CutMix'),
                    ('combo_diverse', 'combination, CutMix + cos, con, mix')]:
    sim = json.load(open(f'{runs}/analysis-{name}/analysis.json'))['patch_similarity']
    series.append({'x': list(range(len(sim))), 'y': sim, 'label': label,
                   'style': 'dashed' if 'combo' in name else 'line'})
chart = evaluate.line_chart(series, 'Patch similarity per layer (over-smoothing)', 'layer (0 = embedding)',
                            'mean |cosine| between patches', size=(520, 320), ylim=(0, 1))
chart.save('tutorials/figures/oversmoothing.png', optimize=True)
print('saved tutorials/figures/oversmoothing.png')
PY
