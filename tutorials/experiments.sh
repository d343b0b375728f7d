#!/usr/bin/env bash
# The tutorials' experiments: every training run whose results the tutorials and the README show.
# Synthetic data (32 px, patch 4, built in, offline), 2,500 training and 500 validation images,
# 15 epochs at batch 64, one CPU thread per run, two runs at a time. The scale: the DeiT baseline
# (6 blocks of width 96) must clearly learn (lr 8e-3 per 512 images, tuned for it: 47 % at seed 0,
# 40 % at 4e-3, 33 % at 1.6e-2, chance at 3.2e-2; chance is 10 %), and a run must take minutes.
# Every claim's comparison has 3 seeds (0, 1, 2).
# Usage: bash tutorials/experiments.sh [group ...]   groups: fractions localvit stems oversmoothing combined
#        (no group: all; a finished run is skipped; results in runs/tutorials/<run>/log.jsonl)
#        python tutorials/results.py                  # the tables, from the logs
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/tutorials
mkdir -p "$OUT"
SELECTED="$*"
want() { [ -z "$SELECTED" ] || [[ " $SELECTED " == *" $1 "* ]]; }
COMMON="--no-progress --workers 0 --synthetic-val 500 --batch-size 64 --epochs 15 --warmup-epochs 1 --embed-dim 96"
DEIT="--arch deit_t --depth 6 --lr 8e-3"                               # 3 heads of 32
CONVIT="--arch convit_t --depth 6 --local-up-to-layer 5 --lr 8e-3"      # 5 GPSA blocks, 1 MHSA; 4 heads
LOCALVIT="--arch localvit_t --depth 6 --lr 8e-3"                        # LFF: hswish + SE; 4 heads
jobs=()
add() { jobs+=("$1|$2"); }       # add NAME "ARGS": one run

for seed in 0 1 2; do
  # 01 ConViT: sample efficiency. The first f of each class's images, 15/f epochs (the same steps)
  if want fractions; then
    for f in 0.1 0.3 1.0; do
      every=$(python -c "print(max(1, round(1 / $f)))")
      for m in deit convit; do
        args=$DEIT; [ $m = convit ] && args=$CONVIT
        add "frac${f}_${m}_s$seed" "$args --data-fraction $f --scale-epochs --eval-every $every --seed $seed"
      done
    done
  fi
  # 02 LocalViT: the LFF against the MLP (DeiT: frac1.0_deit), and the same LFF with a 1x1
  # depthwise kernel: everything equal but the locality
  if want localvit; then
    add "localvit_s$seed" "$LOCALVIT --seed $seed"
    add "localvit_k1_s$seed" "$LOCALVIT --lff-kernel 1 --seed $seed"
  fi
  # 04 Over-smoothing: a deeper DeiT (12 blocks of width 64, 2 heads), CutMix, with and without
  # the three patch-diversity losses
  if want oversmoothing; then
    DEEP="--arch deit_t --depth 12 --embed-dim 64 --num-heads 2 --cutmix 1.0"
    add "deep_s$seed" "$DEEP --lr 8e-3 --seed $seed"
    add "deep_diverse_s$seed" "$DEEP --lr 8e-3 --diverse cos=1,con=1,mix=1 --seed $seed"
    if [ $seed = 0 ]; then         # the same at half the learning rate (one seed: a sensitivity check)
      add "deep_lr4e-3_s0" "$DEEP --lr 4e-3 --seed 0"
      add "deep_diverse_lr4e-3_s0" "$DEEP --lr 4e-3 --diverse cos=1,con=1,mix=1 --seed 0"
    fi
  fi
  # 05 Combining: ConViT's GPSA, a conv stem and LocalViT's LFF in one model (none of the papers
  # built it), against LocalViT alone (localvit) and DeiT (frac1.0_deit); its LFF is LocalViT's
  # (SE reduction 192: the LFF's default, 4, would add 0.45 M parameters at this width)
  if want combined; then
    add "combo_s$seed" "$CONVIT --stem-channels 12,24,48 --stem-strides 2,2,1 --ffn lff --reduction 192 --seed $seed"
  fi
done
# 03 Early convolutions: ViT_P (6 blocks, MLP 3x) against ViT_C (a conv stem scaled to the width,
# 12-24-48-96 with strides 2,2,1,1, then 5 blocks: 38.2 M MACs against ViT_P's 41.1 M), pycls's
# recipe (weight decay 0.24 with AdamW, 5e-5 with SGD), each at 3 learning rates (seed 0), then
# seeds 1 and 2 at each one's best rate (chosen by tutorials/results.py --best-stems)
if want stems; then
  VITP="--arch vit_p_1gf --depth 6"
  VITC="--arch vit_c_1gf --depth 5 --stem-channels 12,24,48,96 --stem-strides 2,2,1,1"
  for m in p c; do
    args=$VITP; [ $m = c ] && args=$VITC
    for lr in 4e-3 8e-3 1.6e-2; do add "vit_${m}_adamw_lr${lr}_s0" "$args --lr $lr"; done
    for lr in 0.25 0.5 1.0; do add "vit_${m}_sgd_lr${lr}_s0" "$args --opt sgd --weight-decay 5e-5 --lr $lr"; done
  done
  if [ -n "${STEMS_BEST:-}" ]; then          # e.g. STEMS_BEST="p_adamw:8e-3 c_adamw:8e-3 p_sgd:0.5 c_sgd:0.5"
    for pick in $STEMS_BEST; do
      m=${pick%%_*}; rest=${pick#*_}; opt=${rest%%:*}; lr=${pick##*:}
      args=$VITP; [ $m = c ] && args=$VITC
      extra=""; [ $opt = sgd ] && extra="--opt sgd --weight-decay 5e-5"
      for seed in 1 2; do add "vit_${m}_${opt}_lr${lr}_s$seed" "$args $extra --lr $lr --seed $seed"; done
    done
  fi
fi

run() {  # run NAME ARGS: train once (skipped when finished), the output in NAME.out
  local name=$1; shift
  if grep -q '^done' "$OUT/$name.out" 2>/dev/null; then return; fi
  rm -rf "$OUT/$name"
  local start=$SECONDS
  OMP_NUM_THREADS=1 python train.py $COMMON "$@" --out "$OUT/$name" > "$OUT/$name.out" 2>&1
  echo "wall $((SECONDS - start)) s" >> "$OUT/$name.out"
  echo "$name: $(grep '^epoch' "$OUT/$name.out" | tail -n 1 | grep -o 'val top-1 [0-9.]*%')"
}
export -f run
export OUT COMMON
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'line="{}"; run "${line%%|*}" ${line#*|}'
