#!/usr/bin/env bash
# The tutorials' experiments: every training run whose results the tutorials show.
# Synthetic data (32 px, built in, offline), seed 0, one process on the CPU.
# All models at one small "tutorial scale": 6 blocks of width 96 (ViT_C: 5 blocks and its conv
# stem), 2,500 training images x 10 epochs (or the same number of steps on a fraction), batch 32,
# validation on 500 images. 16 runs, 53 minutes in all on 2 CPU cores.
# Usage: bash tutorials/experiments.sh [name ...]   (no names: all of them; results in runs/tutorials/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/tutorials
mkdir -p "$OUT"

run() {  # run NAME ARGS...: train once (skipped when NAME already finished), log to NAME.out
  local name=$1; shift
  if [ -f "$OUT/$name/last.pt" ] && grep -q '^done' "$OUT/$name.out" 2>/dev/null; then return; fi
  rm -rf "$OUT/$name"
  local start=$SECONDS
  python train.py --seed 0 --no-progress --out "$OUT/$name" --embed-dim 96 --batch-size 32 \
      --synthetic-val 500 "$@" > "$OUT/$name.out" 2>&1
  echo "wall $((SECONDS - start)) s" >> "$OUT/$name.out"
  tail -n 2 "$OUT/$name.out"
}

want() { [ -z "$SELECTED" ] || [[ " ${SELECTED} " == *" $1 "* ]]; }
SELECTED="$*"
DEIT=(--arch deit_t --depth 6)
CONVIT=(--arch convit_t --depth 6 --local-up-to-layer 5)       # 5 GPSA blocks, then 1 MHSA block
LOCALVIT=(--arch localvit_t --depth 6)

# 01 ConViT / 02 LocalViT: sample efficiency. A fraction f of the 2,500 images (the first images
# of each class), trained for 10/f epochs, so that every run takes the same number of steps.
if want fractions; then
  for f in 0.1 0.3 1.0; do
    every=$(python -c "print(max(1, round(1 / $f)))")            # ~10 evaluations per run
    run "frac${f}_deit" "${DEIT[@]}" --epochs 10 --data-fraction "$f" --scale-epochs --eval-every "$every"
    run "frac${f}_convit" "${CONVIT[@]}" --epochs 10 --data-fraction "$f" --scale-epochs --eval-every "$every"
  done
  run frac1.0_localvit "${LOCALVIT[@]}" --epochs 10
fi

# 03 Early convolutions: ViT_P (patchify, 6 blocks) vs ViT_C (conv stem, 5 blocks), AdamW and SGD.
if want stems; then
  for opt in adamw sgd; do
    extra=(); [ "$opt" = sgd ] && extra=(--opt sgd --lr 0.5 --weight-decay 5e-5)
    run "vit_p_$opt" --arch vit_p_1gf --depth 6 --epochs 10 "${extra[@]}"
    run "vit_c_$opt" --arch vit_c_1gf --depth 5 --epochs 10 "${extra[@]}"
  done
fi

# 04 Over-smoothing: DeiT with and without the three patch-diversity losses; both with CutMix.
if want diverse; then
  run deit_cutmix "${DEIT[@]}" --epochs 10 --cutmix 1.0
  run deit_diverse "${DEIT[@]}" --epochs 10 --cutmix 1.0 --diverse cos=1,con=1,mix=1
fi

# 05 Combining: a conv-stem ConViT with the locality feed-forward; with CutMix; with CutMix and the losses.
if want combined; then
  COMBO=("${CONVIT[@]}" --stem-channels 24,48,96 --stem-strides 2,2,1 --ffn lff --reduction 96)
  run combo "${COMBO[@]}" --epochs 10
  run combo_cutmix "${COMBO[@]}" --epochs 10 --cutmix 1.0
  run combo_diverse "${COMBO[@]}" --epochs 10 --cutmix 1.0 --diverse cos=1,con=1,mix=1
fi
