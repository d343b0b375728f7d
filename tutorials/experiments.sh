#!/usr/bin/env bash
# The tutorials' experiments: every training run whose results the tutorials show.
# Synthetic data (32 px, built in, offline), seed 0, one process on the CPU.
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
  python train.py --seed 0 --no-progress --out "$OUT/$name" "$@" > "$OUT/$name.out" 2>&1
  echo "wall $((SECONDS - start)) s" >> "$OUT/$name.out"
  tail -n 2 "$OUT/$name.out"
}

want() { [ -z "$SELECTED" ] || [[ " ${SELECTED} " == *" $1 "* ]]; }
SELECTED="$*"

# 01 ConViT / 02 LocalViT: sample efficiency. A fraction f of 10,000 images (the first images of
# each class), trained for 1/f epochs so that every run takes the same number of steps.
if want fractions; then
  for f in 0.1 0.3 1.0; do
    for arch in deit_t convit_t localvit_t; do
      run "frac${f}_${arch}" --arch "$arch" --synthetic-train 10000 --epochs 1 \
          --data-fraction "$f" --scale-epochs --synthetic-val 500
    done
  done
fi

# 03 Early convolutions: ViT_C vs ViT_P, AdamW vs SGD (Nesterov), 8 short epochs for the curves.
if want stems; then
  for arch in vit_p_1gf vit_c_1gf; do
    run "${arch}_adamw" --arch "$arch" --synthetic-train 1000 --epochs 8 --synthetic-val 500
    run "${arch}_sgd" --arch "$arch" --synthetic-train 1000 --epochs 8 --synthetic-val 500 \
        --opt sgd --lr 0.5 --weight-decay 5e-5
  done
fi

# 04 Over-smoothing: DeiT-Ti with and without the three patch-diversity losses; both with CutMix.
if want diverse; then
  run deit_t_cutmix --arch deit_t --cutmix 1.0 --synthetic-val 500
  run deit_t_diverse --arch deit_t --cutmix 1.0 --diverse cos=1,con=1,mix=1 --synthetic-val 500
fi

# 05 Combining: a conv-stem ConViT with the locality feed-forward, without and with the losses.
if want combined; then
  COMBO=(--arch convit_t --stem-channels 24,48,96,192 --stem-strides 2,2,2,2 --ffn lff --reduction 192)
  run combo "${COMBO[@]}" --synthetic-val 500
  run combo_diverse "${COMBO[@]}" --cutmix 1.0 --diverse cos=1,con=1,mix=1 --synthetic-val 500
fi
