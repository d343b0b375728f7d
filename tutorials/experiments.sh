#!/usr/bin/env bash
# The tutorials' experiments: every training run whose results README.md and the tutorials show.
# The arms, their learning-rate sweeps and the protocol are defined once, in tutorials/results.py:
# each arm's sweep on seed 100 (never reported), then its chosen rate on seeds 0, 1, 2 on the
# synthetic shapes and on the UCI digits, then tutorial 06's fine-tuning runs and tutorial 01's
# 4x longer ConViT run. One CPU thread per run, two runs at a time; a finished run (its log in
# tutorials/logs/) is skipped, so the script can be stopped and rerun. The checkpoints stay in
# runs/tutorials/<run>/ (tutorials/figures.sh analyses them); each finished run's log.jsonl is
# copied to tutorials/logs/<run>.jsonl.
# Usage: bash tutorials/experiments.sh [GROUP]   groups: models fractions stems oversmoothing combined finetune long
#        python tutorials/results.py             # the tables, from tutorials/logs/
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/tutorials
mkdir -p "$OUT" tutorials/logs

run() {  # run NAME FLAGS...: train once; keep its log
  local name=$1; shift
  local start=$SECONDS
  OMP_NUM_THREADS=1 python train.py "$@" --out "$OUT/$name" --overwrite > "$OUT/$name.out" 2>&1 || {
    echo "$name: failed (see $OUT/$name.out)"; return 0; }
  echo "wall $((SECONDS - start)) s" >> "$OUT/$name.out"
  cp "$OUT/$name/log.jsonl" "tutorials/logs/$name.jsonl"
  echo "$name: $(grep '^epoch' "$OUT/$name.out" | tail -n 1 | grep -o 'val top-1 [0-9.]*%')"
}
export -f run
export OUT

# group by group (the claims complete one after another); in each, rounds run what is ready
# (the sweeps first, an arm's seeds once its sweep is complete)
for group in ${1:-models stems oversmoothing combined fractions finetune long}; do
  last=
  while true; do
    todo=$(python tutorials/results.py --runs "$group")
    [ -z "$todo" ] && break
    [ "$todo" = "$last" ] && { echo "these runs did not finish:"; echo "$todo" | cut -d'|' -f1; exit 1; }
    last=$todo
    echo "$todo" | xargs -P 2 -I{} bash -c 'line="{}"; run "${line%%|*}" ${line#*|}'
  done
done
python tutorials/results.py > "$OUT/results.md"
echo "tables in $OUT/results.md"
