#!/usr/bin/env bash
# The GPU check (never run by CI): on one CUDA GPU, in about 8 minutes (each part has a time
# limit), prints
#   1. bf16 training and inference images/s of deit_t, convit_t, localvit_t and timm's twins,
#      eager and with torch.compile, with model FLOP utilisation against the bf16 peak;
#   2. the ImageNet input pipeline: images/s per CPU core (ours and timm's) and on the GPU path
#      (--gpu-decode: nvjpeg + augmentation on the device);
#   3. DDP training steps on NCCL (torchrun, one process per GPU) through train.py, on a folder
#      of JPEGs decoded and augmented on the GPU.
# Usage: bash tests/gpu_check.sh [PEAK_TFLOPS]      (default 989: an H100 / H200 SXM in dense bf16)
set -uo pipefail
cd "$(dirname "$0")/.."
PEAK=${1:-989}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
TMP=$(mktemp -d)
NGPU=$(python -c 'import torch; print(torch.cuda.device_count())')
[ "$NGPU" -ge 1 ] || { echo 'no CUDA device: this check needs a GPU'; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'

section() { echo; echo "## $1"; echo; }

section '1. Models: bf16, batch 256, 224 px (eager, then torch.compile)'
timeout 120 python evaluate.py --benchmark deit_t convit_t localvit_t --dtype bf16 --device cuda \
    --batch-size 256 --min-run-time 1 --warmup 3 --peak-tflops "$PEAK"
timeout 300 python evaluate.py --benchmark deit_t convit_t localvit_t --dtype bf16 --device cuda \
    --batch-size 256 --min-run-time 1 --warmup 3 --peak-tflops "$PEAK" --compile

section '2. Input pipeline: per CPU core (ours vs timm) and on the GPU'
timeout 90 python tests/bench_input.py --n 256 --reps 2 --device cuda

section "3. train.py on NCCL: $NGPU process(es), localvit_t, JPEGs decoded on the GPU, bf16"
python - "$TMP/jpegs" <<'PY'
import os, sys
sys.path.insert(0, 'tests')
import bench_input
for split, n in (('train', 512), ('val', 128)):
    for c in ('a', 'b', 'c', 'd'):
        os.makedirs(os.path.join(sys.argv[1], split, c), exist_ok=True)
    paths = bench_input.make_jpegs(os.path.join(sys.argv[1], split), n, seed=len(split))
    for i, p in enumerate(paths):       # spread the images over 4 classes
        os.rename(p, os.path.join(sys.argv[1], split, 'abcd'[i % 4], os.path.basename(p)))
PY
timeout 120 torchrun --standalone --nproc_per_node="$NGPU" train.py --arch localvit_t --data folder \
    --data-path "$TMP/jpegs" --epochs 2 --batch-size 128 --workers 4 --gpu-decode --no-progress \
    --out "$TMP/run" 2>&1 | grep -v Warning
rm -rf "$TMP"
