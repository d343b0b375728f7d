#!/usr/bin/env bash
# The GPU check (never run by CI): on CUDA GPUs, in about 8 minutes (each part has a time limit), prints
#   1. bf16 training and inference images/s of deit_t, convit_t, localvit_t and timm's twins,
#      eager and with torch.compile, and the training step's TFLOP/s;
#   2. the ImageNet input pipeline: images/s per CPU core (ours and timm's) and on the GPU path
#      (--gpu-decode: nvjpeg + augmentation on the device);
#   3. DDP training steps on NCCL (torchrun, one process per GPU) through train.py, on a folder
#      of JPEGs decoded and augmented on the GPU, with loader workers.
# Usage: bash tests/gpu_check.sh           # on the GPUs
#        bash tests/gpu_check.sh --smoke   # the same steps at tiny sizes on the CPU, in seconds (gloo, two
#                                          # processes): the test suite runs it, so the script is known to work
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ "${1:-}" = --smoke ]; then
  DEVICE=cpu; DTYPE=fp32; BATCH=4; SIZE=64; N=16; NPROC=2; LIMIT=240
  BENCH="--min-run-time 0.01 --warmup 1 --no-timm"; COMPILE=''
  export OMP_NUM_THREADS=1
else
  DEVICE=cuda; DTYPE=bf16; BATCH=256; SIZE=224; N=512; LIMIT=300
  BENCH="--min-run-time 1 --warmup 3"; COMPILE=--compile
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count())')
  [ "$NPROC" -ge 1 ] || { echo 'no CUDA device: this check needs a GPU (or: bash tests/gpu_check.sh --smoke)'; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
status=0
section() { echo; echo "## $1"; echo; }
check() { "$@" || { echo "FAILED: $*"; status=1; }; }

section "1. Models: $DTYPE, batch $BATCH, $SIZE px (eager, then torch.compile)"
check timeout $LIMIT python evaluate.py --benchmark deit_t convit_t localvit_t --dtype $DTYPE --device $DEVICE \
    --batch-size $BATCH --img-size $SIZE $BENCH
[ -n "$COMPILE" ] && check timeout $LIMIT python evaluate.py --benchmark deit_t convit_t localvit_t --dtype $DTYPE \
    --device $DEVICE --batch-size $BATCH --img-size $SIZE $BENCH $COMPILE

section "2. Input pipeline: per CPU core (ours vs timm) and on the $DEVICE"
check timeout $LIMIT python tests/bench_input.py --n $N --reps 1 --device $DEVICE

section "3. train.py on $NPROC process(es): localvit_t, JPEGs decoded on the $DEVICE (--gpu-decode), 2 workers"
python - "$TMP/jpegs" "$N" <<'PY'
import os, sys
sys.path.insert(0, 'tests')
import bench_input
for split, n in (('train', int(sys.argv[2])), ('val', int(sys.argv[2]) // 4)):
    for c in ('a', 'b', 'c', 'd'):
        os.makedirs(os.path.join(sys.argv[1], split, c), exist_ok=True)
    paths = bench_input.make_jpegs(os.path.join(sys.argv[1], split), n, seed=len(split))
    for i, p in enumerate(paths):       # spread the images over 4 classes
        os.rename(p, os.path.join(sys.argv[1], split, 'abcd'[i % 4], os.path.basename(p)))
PY
check timeout $LIMIT torchrun --standalone --nproc_per_node="$NPROC" train.py --arch localvit_t --data folder \
    --data-path "$TMP/jpegs" --img-size $SIZE --epochs 2 --batch-size $((BATCH / 2 > 0 ? BATCH / 2 : 1)) \
    --workers 2 --gpu-decode --no-progress --out "$TMP/run"
echo
[ $status = 0 ] && echo 'gpu check: every part ran' || echo 'gpu check: some part failed (above)'
exit $status
