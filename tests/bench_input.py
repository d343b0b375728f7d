"""The ImageNet input pipeline's speed: DeiT's train and val transforms, timm's create_transform
against train.py's (train_transform / val_transform on the file's bytes), in images/s per CPU core;
with --device cuda, also train.device_batch (--gpu-decode) on batches of 128, in images/s.

    python tests/bench_input.py [--n 200] [--reps 3] [--device cuda]

CPU rows: one process, one thread, CPU time (robust to other jobs on a shared machine), file to
normalised (3, 224, 224) tensor; each image runs --reps times with the same seeds (same crop, ops,
noise), the pipelines taking turns pass by pass; its fastest run counts. Device rows: wall time
with torch.cuda.synchronize, the fastest of --reps passes. Prints one Markdown table.
"""
import argparse
import math
import os
import random
import shlex
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

warnings.filterwarnings('ignore', category=DeprecationWarning)   # torchvision.io -> TorchCodec notice

# (width, height): weight. Mostly ImageNet's typical 500 x 375 / 375 x 500 / 500 x 333, some larger.
SIZES = {(500, 375): 30, (375, 500): 15, (500, 333): 15, (333, 500): 5, (640, 480): 10,
         (480, 640): 5, (800, 600): 5, (1024, 768): 8, (1600, 1200): 4, (2048, 1536): 3}


def synthetic_photo(w, h, g):
    """A photo-like RGB PIL image: smooth colour fields at 4 scales, a few shapes, sensor noise."""
    def field(gh, gw, amp):
        coarse = torch.rand(1, 3, gh, gw, generator=g) * amp
        return F.interpolate(coarse, size=(h, w), mode='bicubic', align_corners=False)[0]
    img = field(4, 5, 255) + field(24, 32, 60) + field(h // 6, w // 6, 40) + field(h // 2, w // 2, 30)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    for _ in range(6):
        cx, cy, rx, ry = (torch.rand(4, generator=g) * torch.tensor([w, h, w / 3, h / 3])).tolist()
        inside = ((xx - cx) / (rx + 5)) ** 2 + ((yy - cy) / (ry + 5)) ** 2 < 1
        img = torch.where(inside, img * 0.3 + torch.rand(3, 1, 1, generator=g) * 180, img)
    img = img + torch.randn(3, h, w, generator=g) * 12
    return Image.fromarray(img.clamp(0, 255).byte().permute(1, 2, 0).numpy())


def make_jpegs(folder, n=200, seed=0):
    """n JPEGs (quality 90, 4:2:0) with sizes drawn from SIZES -> their paths."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        w, h = rng.choices(list(SIZES), weights=list(SIZES.values()))[0]
        paths.append(os.path.join(folder, f'{i:04d}_{w}x{h}.jpg'))
        synthetic_photo(w, h, g).save(paths[-1], quality=90)
    return paths


def timm_transforms():
    """DeiT's (train, val) transforms from timm.data.create_transform, or None without timm."""
    try:
        import timm.data.auto_augment as aa
        from timm.data import create_transform
    except ImportError:
        return None
    # timm 1.0.31 + Pillow >= 11 raise on posterize bits=0 (magnitude clipped at 10, ~0.15% of
    # images); give timm the old Pillow behaviour (a black image), as train.posterize does
    aa.NAME_TO_OP['PosterizeIncreasing'] = lambda img, bits, **_: train.posterize(img, bits)
    return (create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
                             interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1),
            create_transform(224, is_training=False, interpolation='bicubic', crop_pct=0.875))


def read_image(path):                      # timm's loader
    with open(path, 'rb') as f:
        return Image.open(f).convert('RGB')


def seed(i):
    """The same random draws for every run on image i: crop, flip, ops, magnitudes, erasing."""
    random.seed(i)
    np.random.seed(i)                      # timm draws its RandAugment ops with numpy
    torch.manual_seed(i)


def race(pipelines, paths, reps):
    """{name: images per CPU-second}: image i has the same seed in every pass; its fastest run counts."""
    best = {name: [math.inf] * len(paths) for name in pipelines}
    for _ in range(reps):
        for name, fn in pipelines.items():
            fn(paths[0])                                      # warm-up
            for i, path in enumerate(paths):
                seed(i)
                t = time.process_time()
                fn(path)
                best[name][i] = min(best[name][i], time.process_time() - t)
    return {name: len(paths) / sum(times) for name, times in best.items()}


def device_speed(datas, cfg, device, reps, batch=128):
    """[train, val] wall images/s of train.device_batch on full batches (the images cycled)."""
    batches = [[datas[(b * batch + j) % len(datas)] for j in range(batch)]
               for b in range(max(1, math.ceil(len(datas) / batch)))]
    out = []
    for is_train in (True, False):
        train.device_batch(batches[0], device, cfg, train=is_train)     # warm-up (nvjpeg, kernels)
        best = math.inf
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for b in batches:
                train.device_batch(b, device, cfg, train=is_train)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out.append(len(batches) * batch / best)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=200, help='number of JPEGs (default 200)')
    ap.add_argument('--reps', type=int, default=3, help='passes; the fastest counts (default 3)')
    ap.add_argument('--device', default='cpu', choices=('cpu', 'cuda'),
                    help='cuda: also time train.device_batch on the GPU')
    args = ap.parse_args(argv)
    command = ' '.join(shlex.quote(a) for a in ['python', sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(1)
    from torchvision.io import read_file
    timm = timm_transforms()
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(folder, args.n)
        cfg = train.parse_config(['--data', 'folder', '--data-path', folder, '--arch', 'deit_t'])
        kb = sum(os.path.getsize(p) for p in paths) / 1024 / len(paths)
        mpx = sum(math.prod(Image.open(p).size) for p in paths) / 1e6 / len(paths)
        pipes = {('ours', 'train'): lambda p: train.train_transform(read_file(p), cfg),
                 ('ours', 'val'): lambda p: train.val_transform(read_file(p), cfg)}
        if timm:
            pipes['timm', 'train'] = lambda p: timm[0](read_image(p))
            pipes['timm', 'val'] = lambda p: timm[1](read_image(p))
        speed = race(pipes, paths, args.reps)
        if args.device == 'cuda':
            device = device_speed([read_file(p) for p in paths], cfg, 'cuda', args.reps) \
                if torch.cuda.is_available() else 'CUDA is not available'
    rows = [(name, 'per core', *(f'{speed[key, s]:.0f}' for s in ('train', 'val'))) for name, key in
            (("timm create_transform (DeiT's settings) + PIL loading", 'timm'),
             ('train.py train_transform / val_transform on read_file bytes', 'ours')) if timm or key == 'ours']
    rows.append(('ratio train.py / timm', '', *(f'{speed["ours", s] / speed["timm", s]:.2f}x' for s in (
        'train', 'val'))) if timm else ('timm rows skipped: timm is not installed', '', '', ''))
    if args.device == 'cuda':
        rows.append((f'train.device_batch, batches of 128 on {torch.cuda.get_device_name()}', 'wall',
                     *(f'{v:.0f}' for v in device)) if isinstance(device, list) else
                    (f'train.device_batch skipped: {device}', '', '', ''))
    versions = f'torch {torch.__version__}, Pillow {Image.__version__}' + (
        f', timm {sys.modules["timm"].__version__}' if timm else '')
    print(f'`{command}`: {args.n} synthetic JPEGs, {kb:.0f} KB and {mpx:.2f} Mpixel on average; {versions}\n')
    print('| pipeline | measured | train img/s | val img/s |\n|---|---|---:|---:|')
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
    main()
