"""tests/gpu_check.sh, the check a GPU machine runs, in its CPU smoke mode: every part at tiny sizes
(the benchmark, the input pipeline, train.py under torchrun with --gpu-decode and loader workers)."""
import os
import subprocess

from conftest import ROOT


def test_the_gpu_check_runs_on_the_cpu():
    result = subprocess.run(['bash', 'tests/gpu_check.sh', '--smoke'], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, env=dict(os.environ, PYTHONPATH=ROOT))
    out = result.stdout
    assert result.returncode == 0 and 'gpu check: every part ran' in out, out[-3000:] + result.stderr[-3000:]
    for piece in ('## 1. Models', '| `localvit_t` |', '## 2. Input pipeline', 'train.py train_transform',
                  '## 3. train.py on 2 process(es)', 'epoch 2/2', 'done: best val top-1'):
        assert piece in out, piece
    assert 'Grad strides do not match' not in result.stderr
