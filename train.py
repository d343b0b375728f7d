"""Train locvit models: one process or many (torchrun), CPU or GPU, offline or on ImageNet.

  python train.py                                              # synthetic shapes, CPU, minutes
  torchrun --standalone --nproc_per_node=2 train.py            # the same on 2 processes
  torchrun --nproc_per_node=8 train.py --arch localvit_t --data folder --data-path /imagenet
  python train.py --resume auto --out runs/x                   # continue an interrupted run
  python train.py --arch convit_t --finetune pretrained --data cifar10 --img-size 224

Each model family trains with its paper's recipe (RECIPES) unless a flag says otherwise.
Read top to bottom: config -> distributed setup -> data -> model -> optimizer -> loop.
`train_one_epoch` and `evaluate` are plain functions that evaluate.py reuses.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import locvit

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# Each family's published ImageNet recipe (224 px; batch per process, for 8 GPUs)
_DEIT = dict(epochs=300, batch_size=128, opt='adamw', lr=5e-4, weight_decay=0.05, warmup_epochs=5,
             warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug='2,9',
             autoaugment=False, lighting=0.0, hflip=0.5, reprob=0.25, repeated_aug=3, drop_path=0.1,
             ema=True, ema_decay=0.99996, head_dropout=0.0)
# Xiao et al. (pycls, branch vitconfigs): 1e-3 at batch 2048 (2.5e-4 per 512; 36GF 7e-4), warm-up
# from 0.1x, cosine to 0.005x (absolute values at batch 2048), AutoAugment v0 and PCA lighting, EMA,
# no erasing, no repeats, no drop path; weight decay on everything but norms and biases
_PYCLS = dict(epochs=400, batch_size=256, opt='adamw', lr=2.5e-4, weight_decay=0.24, warmup_epochs=5,
              warmup_lr=1e-4, min_lr=5e-6, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug='off',
              autoaugment=True, lighting=0.1, hflip=0.5, reprob=0.0, repeated_aug=1, drop_path=0.0,
              ema=True, ema_decay=0.99995, head_dropout=0.0)
RECIPES = {
    'deit': _DEIT,                                   # Touvron et al.; LocalViT and the rest use it
    'convit': dict(_DEIT, ema=False),                # d'Ascoli et al.: DeiT's, no EMA
    'convit+': dict(_DEIT, ema=False, lr=4e-4, batch_size=64),   # "+" models: 4e-4 at batch 512
    'pycls': _PYCLS,
    'pycls-36gf': dict(_PYCLS, lr=1.75e-4, warmup_lr=7e-5, min_lr=3.5e-6),
    # Gong et al.'s released training (PatchVisionTransformer): DeiT's, then its own patch mix on top
    # of MixUp/CutMix, its contrastive and region losses, talking heads, dropout 0.2 before the heads
    'patchdiverse': dict(_DEIT, diverse='con-released,mix-released', talking_heads=True,
                         head_dropout=0.2, min_lr=1e-7),
}
_SMALL = dict(img_size=32, patch_size=4, drop_path=0.0, mixup=0.0, cutmix=0.0, randaug='off',
              autoaugment=False, lighting=0.0, reprob=0.0, repeated_aug=1, ema=False, batch_size=64,
              lr=4e-3, warmup_epochs=0.3)
DATA_SETTINGS = {
    # a few minutes on a laptop CPU: short runs, a higher learning rate, no heavy augmentation
    'synthetic': dict(_SMALL, num_classes=10, crop_scale=0.5, epochs=3),
    'digits': dict(_SMALL, crop_scale=0.7, hflip=0.0, epochs=10),       # a flipped digit is another
    'cifar': dict(img_size=32, patch_size=4, crop_scale=0.35, repeated_aug=1, batch_size=128),
    'folder': dict(img_size=224, crop_scale=0.08),
}


# ==================================================================================================
# Config. Every field is a flag (--warmup-epochs ...). None means "the recipe's, as the data
# adapts it": RECIPES holds each family's published ImageNet recipe, DATA_SETTINGS what the data
# changes (32 px images with patch 4 for the small data sets; the built-in data's quick run).
# A model flag names the create_model option it sets (`model`: an option, or (dict option, key)).
# ==================================================================================================

def flag(default, help, choices=None, model=None):
    return dataclasses.field(default=default, metadata={'help': help, 'choices': choices, 'model': model})


@dataclasses.dataclass
class Config:
    # model: a zoo name (or timm's), and overrides in the papers' words
    arch: str = flag('localvit_t', "the model: a zoo name (locvit.list_models()) or timm's name")
    img_size: int = flag(None, 'image size', model='img_size')
    patch_size: int = flag(None, "patch size, or a conv stem's total stride", model='patch_size')
    drop_path: float = flag(None, 'stochastic depth rate of the last block', model='drop_path')
    embed_dim: int = flag(None, "width (default: the model's)", model='embed_dim')
    depth: int = flag(None, "blocks (default: the model's)", model='depth')
    num_heads: int = flag(None, "attention heads (default: the model's)", model='num_heads')
    mlp_ratio: float = flag(None, "the feed-forward's hidden width / width (default: the model's)",
                            model='mlp_ratio')
    local_up_to_layer: int = flag(None, 'ConViT: GPSA in the blocks before this one', model='local_up_to_layer')
    locality_strength: float = flag(None, 'ConViT: alpha of the convolutional init (default 1)',
                                    model=('gpsa', 'locality_strength'))
    local_init: bool = flag(None, 'ConViT: the convolutional init of GPSA (default on)', model=('gpsa', 'local_init'))
    talking_heads: bool = flag(None, 'talking-heads attention (over-smoothing paper)', model='talking_heads')
    stem_channels: str = flag(None, 'a conv stem (ViT_C) of these widths on any ViT, e.g. 24,48,96,192',
                              model=('conv_stem', 'channels'))
    stem_strides: str = flag(None, "the conv stem's strides, e.g. 2,2,2,2 (default 2 each)",
                             model=('conv_stem', 'strides'))
    ffn: str = flag(None, "the feed-forward network (default: the model's)", ('mlp', 'lff'), model='lff')
    act: str = flag(None, "the LFF's activation (default hswish)", tuple(locvit.ACTIVATIONS), model=('lff', 'act'))
    channel_attn: str = flag(None, "the LFF's channel attention (default se)", ('se', 'eca', 'none'),
                             model=('lff', 'channel_attn'))
    reduction: int = flag(None, "the LFF's SE reduction of the expanded width (default: the model's)",
                          model=('lff', 'reduction'))
    lff_kernel: int = flag(None, "the LFF's depthwise kernel; 1 removes the locality (default 3)",
                           model=('lff', 'kernel_size'))
    finetune: str = flag(None, 'start from these weights: a path, a URL, or "pretrained" (the released '
                               'ones); a new classifier when the class count differs')
    # data
    data: str = flag('synthetic', 'the data: synthetic (built in), digits (UCI handwritten digits, '
                     'shipped), CIFAR, or folder = --data-path with train/ and val/',
                     ('synthetic', 'digits', 'cifar10', 'cifar100', 'folder'))
    data_path: str = flag(None, 'where the data is (CIFAR default: data/)')
    download: bool = flag(False, 'CIFAR: download it when missing (needs internet)')
    num_classes: int = flag(None, 'keep the first K classes (sorted order; default: all)')
    data_fraction: float = flag(1.0, 'keep, per class, the first floor(n * f) images')
    scale_epochs: bool = flag(False, 'with --data-fraction f: train for epochs / f (ConViT protocol)')
    synthetic_train: int = flag(2500, 'synthetic data: training images')
    synthetic_val: int = flag(1000, 'synthetic data: validation images')
    gpu_decode: bool = flag(False, 'folder data: decode JPEGs and augment on the GPU, not in workers')
    # recipe: optimisation, regularisation and augmentation
    recipe: str = flag('auto', "whose recipe (auto: the model family's)", tuple(['auto'] + list(RECIPES)))
    epochs: int = flag(None, 'epochs')
    batch_size: int = flag(None, 'images per process and step (recipes: x 8 GPUs)')
    accum: int = flag(1, 'gradient accumulation: micro-batches per optimizer step')
    opt: str = flag(None, 'optimizer (sgd: Nesterov, momentum 0.9)', ('adamw', 'sgd'))
    lr: float = flag(None, 'peak learning rate PER 512 IMAGES, scaled by the global batch')
    weight_decay: float = flag(None, "not on biases and norms; DeiT's recipes: nor on gates, embeddings, tokens")
    warmup_epochs: float = flag(None, 'linear warm-up epochs')
    warmup_lr: float = flag(None, 'learning rate the warm-up starts from')
    min_lr: float = flag(None, 'learning rate the cosine ends at')
    clip_grad: float = flag(None, 'clip the gradient norm to this (default: no clipping)')
    smoothing: float = flag(None, 'label smoothing')
    mixup: float = flag(None, 'MixUp alpha, 0 = off')
    cutmix: float = flag(None, 'CutMix alpha, 0 = off; one of the two per batch')
    grid_cutmix: bool = flag(False, "CutMix's box on the patch grid (locvit.patch_cutmix), as the mixing "
                             'losses use it; on with --diverse mix')
    randaug: str = flag(None, "DeiT's RandAugment 'N,M': N ops at magnitude M of 10, or off")
    autoaugment: bool = flag(None, "pycls's AutoAugment (the v0 policy) instead of RandAugment")
    lighting: float = flag(None, "AlexNet's PCA lighting noise, its std (pycls), 0 = off")
    hflip: float = flag(None, 'horizontal flip probability')
    reprob: float = flag(None, 'random erasing probability')
    crop_scale: float = flag(None, "RandomResizedCrop's smallest area")
    repeated_aug: int = flag(None, 'repeated augmentation: copies of each image per epoch')
    ema: bool = flag(None, 'an exponential moving average of the weights')
    ema_decay: float = flag(None, 'EMA decay per optimizer step')
    diverse: str = flag(None, 'patch-diversity losses (Gong et al.) and weights, e.g. cos=1,con=1,mix=1; '
                              'also con-dot, con-released, mix-released (see parse_diverse)')
    head_dropout: float = flag(None, 'dropout before the class and patch heads (with --diverse)')
    # run
    amp: str = flag(None, 'autocast (default: bf16 on CUDA, off on CPU)', ('bf16', 'fp16', 'off'))
    compile: bool = flag(False, 'torch.compile the model')
    seed: int = flag(0, 'random seed')
    workers: int = flag(None, 'data loader processes per rank (default: half the cores, at most 8)')
    out: str = flag(None, 'output folder (default: runs/<arch>-<data>)')
    resume: str = flag(None, 'auto (OUT/last.pt if present) or a checkpoint path')
    overwrite: bool = flag(False, 'start afresh in an --out that holds a run (its files are replaced)')
    eval_every: int = flag(1, 'evaluate every N epochs (and after the last)')
    max_steps: int = flag(None, 'stop after this many optimizer steps (smoke tests)')
    progress: bool = flag(True, 'progress bars on rank 0 (on a terminal; else a line per epoch)')
    recompute: bool = flag(True, "keep only each LFF's input for backward and recompute the rest")


GROUPS = {'arch': 'model', 'data': 'data', 'recipe': 'recipe', 'amp': 'run'}   # the fields that start each


class TrainError(Exception):
    """A problem with the run's input or state, reported as one line (no traceback)."""


def defaults_text(f):
    """What a flag defaults to: its own default, else the recipes' and the data sets' values."""
    if f.default is not None:
        return f' (default: {f.default})'

    def grouped(tables, suffix=''):           # {value: [names]}, as 'deit, convit: 0.1'
        by_value = {}
        for name, table in tables.items():
            if f.name in table:
                by_value.setdefault(str(table[f.name]), []).append(name)
        if len(by_value) == 1 and len(next(iter(by_value.values()))) == len(tables):
            return [f'all{suffix}: {next(iter(by_value))}']
        return [f'{", ".join(names)}{suffix}: {value}' for value, names in by_value.items()]
    parts = grouped(RECIPES, ' recipes') + grouped(DATA_SETTINGS, ' data')
    return f' ({"; ".join(parts)})' if parts else ''


def add_flags(parser, names):
    """A flag per Config field named, in groups: its help, its defaults, its choices."""
    group = parser
    for f in (f for f in dataclasses.fields(Config) if f.name in names):
        if f.name in GROUPS and not isinstance(parser, argparse._ArgumentGroup):
            group = parser.add_argument_group(GROUPS[f.name])
        choices = f.metadata['choices']
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(
            type={'int': int, 'float': float}.get(f.type.__name__, str), choices=choices,
            metavar=None if choices else f.name.upper())
        group.add_argument('--' + f.name.replace('_', '-'), default=argparse.SUPPRESS,
                           help=f.metadata['help'] + defaults_text(f), **kind)


def model_flags():
    return [f.name for f in dataclasses.fields(Config) if f.metadata['model']]


def family(arch):
    """Whose recipe a zoo model trains with."""
    arch = locvit.model_name(arch)
    if arch.startswith('convit'):
        return 'convit+' if arch.endswith('_plus') else 'convit'
    if arch.startswith(('vit_p_', 'vit_c_')):
        return 'pycls-36gf' if arch.endswith('36gf') else 'pycls'
    return 'deit'


# (flags, test, what the value must be): checked once the defaults are filled in
LIMITS = [
    (('epochs', 'batch_size', 'accum', 'repeated_aug', 'eval_every', 'img_size', 'patch_size', 'embed_dim',
      'depth', 'num_heads', 'synthetic_train', 'synthetic_val', 'max_steps'), lambda v: v >= 1, 'at least 1'),
    (('lr', 'clip_grad', 'mlp_ratio', 'locality_strength'), lambda v: 0 < v < math.inf, 'a finite number above 0'),
    (('weight_decay', 'warmup_epochs', 'warmup_lr', 'min_lr', 'mixup', 'cutmix', 'lighting'),
     lambda v: 0 <= v < math.inf, 'a finite number, 0 or more'),
    (('smoothing', 'drop_path', 'ema_decay', 'head_dropout'), lambda v: 0 <= v < 1, 'at least 0 and below 1'),
    (('reprob', 'hflip'), lambda v: 0 <= v <= 1, 'a probability, from 0 to 1'),
    (('crop_scale', 'data_fraction'), lambda v: 0 < v <= 1, 'above 0 and at most 1'),
]


def parse_config(argv=None):
    """Flags -> Config: the flags given, then what the data sets, then the family's recipe."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, [f.name for f in dataclasses.fields(Config)])
    cfg = Config(**vars(parser.parse_args(argv)))
    try:
        cfg.arch = locvit.model_name(cfg.arch)
    except ValueError as e:
        raise TrainError(f'--arch: {e}') from None
    fill_defaults(cfg)
    cfg.amp = cfg.amp or ('bf16' if torch.cuda.is_available() else 'off')
    for names, valid, text in LIMITS:
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not valid(value):
                raise TrainError(f'--{name.replace("_", "-")} must be {text}, got {value}')
    try:
        n, m = cfg.randaug.split(',') if cfg.randaug != 'off' else (1, 0)
        if not (int(n) >= 1 and 0 <= float(m) <= 10):       # not an assert: python -O drops those
            raise ValueError
    except ValueError:
        raise TrainError(f"--randaug takes 'N,M' (N ops per image, magnitude M on 0..10, e.g. 2,9 "
                         f"as DeiT) or 'off'; got {cfg.randaug!r}") from None
    weights = parse_diverse(cfg.diverse)
    if mixing_loss(weights) and cfg.mixup > 0 and not weights['mix-released']:
        raise TrainError('the patch mixing loss (--diverse mix) labels every patch with one image, '
                         'which MixUp blends away; add --mixup 0 (the patch-aligned CutMix is used)')
    if cfg.head_dropout and not any(weights.values()):
        raise TrainError('--head-dropout acts in the patch-diversity wrapper; add --diverse (or --head-dropout 0)')
    if cfg.gpu_decode and cfg.data != 'folder':
        raise TrainError(f'--gpu-decode decodes JPEG files (--data folder); {cfg.data} data is decoded '
                         f'already: drop --gpu-decode')
    if cfg.scale_epochs:                    # ConViT's sample-efficiency protocol
        cfg.epochs = round(cfg.epochs / cfg.data_fraction)
    cfg.out = cfg.out or os.path.join('runs', f'{cfg.arch}-{cfg.data}')
    model_overrides(cfg)                    # the model flags fit the model
    return cfg


def fill_defaults(cfg):
    """The fields left at None: what the data sets, then the family's recipe."""
    cfg.recipe = family(cfg.arch) if cfg.recipe == 'auto' else cfg.recipe
    settings = dict(DATA_SETTINGS[data_kind(cfg.data)])
    if cfg.finetune:                        # keep the released patch size: upsample to 224 px
        settings.update(img_size=224, patch_size=None)
    if locvit.MODELS[cfg.arch][0] is not locvit.VisionTransformer:
        settings.pop('patch_size', None)    # the other backbones keep their own patch sizes
    for name, value in {**RECIPES[cfg.recipe], **settings}.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    return cfg


def data_kind(name):
    return 'cifar' if name.startswith('cifar') else name


DIVERSE = ('cos', 'con', 'con-dot', 'con-released', 'mix', 'mix-released')


def parse_diverse(spec):
    """'cos,con,mix' (weight 1 each) or 'cos=1,con=0.5' -> a weight per loss of DIVERSE (0: off):
    cos (locvit.patch_cosine_loss), con (patch_contrastive_loss: cosine, tau 0.1), con-dot (the
    paper's raw dot product, tau 1), con-released (the released code's 3-way form), mix
    (patch_mixing_loss after patch-grid CutMix), mix-released (the released code's patch mix after
    MixUp / CutMix, and its region-mean loss on soft targets)."""
    weights, seen = dict.fromkeys(DIVERSE, 0.0), set()
    for part in (spec.split(',') if (spec or '').strip() else []):
        name, has_weight, value = (s.strip() for s in part.partition('='))
        if name not in DIVERSE or name in seen:
            raise TrainError(f'--diverse: {name!r} is given twice in {spec!r}' if name in seen else
                             f'--diverse: unknown over-smoothing loss {name!r}; choose from '
                             f'{", ".join(DIVERSE)}, e.g. "cos=1,con=1,mix=1"')
        seen.add(name)
        try:
            weights[name] = float(value) if has_weight else 1.0
            if not (math.isfinite(weights[name]) and weights[name] >= 0):
                raise ValueError
        except ValueError:
            raise TrainError(f'--diverse: malformed weight in {part.strip()!r}: a weight is a '
                             f'number >= 0') from None
    if weights['mix'] and weights['mix-released']:
        raise TrainError('--diverse: mix (the paper\'s patch-grid CutMix) and mix-released (the released '
                         'code\'s patch mix) mix the batch differently; choose one')
    return weights


def mixing_loss(weights):
    """The mixing loss among the weights ('mix', 'mix-released') or None."""
    return next((k for k in ('mix', 'mix-released') if weights.get(k)), None)


# ==================================================================================================
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; nccl on CUDA, gloo on CPU.
# ==================================================================================================

def setup_distributed():
    """-> (rank, world_size, device). One process when not launched by torchrun."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    # torch._dynamo keeps alive any process group that exists when it is first imported; a gloo
    # group alive at exit now and then aborts the process. Import it before the group exists.
    from torch import _dynamo  # noqa: F401
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', world))))
    return rank, world, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t):
    if is_distributed():
        dist.all_reduce(t)
    return t


def sync_buffers(*modules):
    """DDP sends rank 0's buffers to the others only at the start of each forward, so after the
    last step every rank holds BatchNorm statistics of its own. Before evaluating or saving,
    make every rank's buffers (the model's and the EMA's) rank 0's: the ones saved."""
    if is_distributed():
        for buffer in (b for m in modules for b in m.buffers()):
            dist.broadcast(buffer, 0)


# ==================================================================================================
# Data. `synthetic` (the default) draws ten kinds of shapes and textures at random positions,
# scales, rotations and colours over a cluttered background: the class is decided by a small
# local structure, not by colour or position. Each image is drawn on the fly from its index, so
# the data set is the same on every machine and costs no disk.
# ==================================================================================================

SHAPES = ('disk', 'ring', 'square', 'frame', 'triangle', 'plus', 'cross', 'diamond', 'h-stripes', 'v-stripes')


def shape_mask(kind, u, v):
    """Inside-mask of a shape in its own coordinates (u right, v down, radius 1)."""
    a, b, r2 = u.abs(), v.abs(), u * u + v * v
    box = torch.maximum(a, b)
    if kind == 'cross':                     # the plus turned by 45 degrees
        return shape_mask('plus', (u + v) / math.sqrt(2), (u - v) / math.sqrt(2))
    return {'disk': lambda: r2 <= 1, 'ring': lambda: (r2 <= 1) & (r2 >= 0.4),
            'square': lambda: box <= 0.8, 'frame': lambda: (box <= 0.85) & (box >= 0.5),
            'triangle': lambda: (v <= 0.75) & (v >= -1 + 1.9 * a),          # apex up
            'plus': lambda: ((a <= 0.28) & (b <= 0.95)) | ((b <= 0.28) & (a <= 0.95)),
            'diamond': lambda: a + b <= 1,
            'h-stripes': lambda: (box <= 0.85) & (torch.sin(v * 2.6 * math.pi) > 0),
            'v-stripes': lambda: (box <= 0.85) & (torch.sin(u * 2.6 * math.pi) > 0)}[kind]()


@functools.lru_cache(maxsize=8)
def unit_grid(size):
    """Pixel-centre coordinates in [-1, 1]: (ys, xs), each (size, size)."""
    return torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing='ij')


def draw_synthetic(index, label, size, seed):
    """One image (3, size, size) uint8: a shape of class `label` over clutter, from its index."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    r = torch.rand(32, generator=g).tolist()          # every random number this image needs
    ys, xs = unit_grid(size)
    # background: two colours blended by a smooth random field, plus three faint blobs
    c0, c1 = torch.tensor(r[0:3]).view(3, 1, 1), torch.tensor(r[3:6]).view(3, 1, 1)
    blend = 0.5 + 0.25 * (torch.sin(3 * r[6] * xs + 18 * r[7]) + torch.cos(3 * r[8] * ys + 18 * r[9]))
    img = c1 + (c0 - c1) * blend
    for j in range(3):
        cx, cy, rad, grey = 2 * r[10 + j] - 1, 2 * r[13 + j] - 1, 0.05 + 0.1 * r[16 + j], r[19 + j]
        blob = 0.5 * ((xs - cx) ** 2 + (ys - cy) ** 2 <= rad * rad).float()
        img = img * (1 - blob) + grey * blob
    # the shape: radius 0.35-0.6 of the half-width, anywhere it fits, turned by up to 15 degrees
    rad = 0.35 + 0.25 * r[22]
    cx, cy = (2 * r[23] - 1) * (1 - rad), (2 * r[24] - 1) * (1 - rad)
    theta = (r[25] - 0.5) * math.radians(30)
    cos, sin = math.cos(theta), math.sin(theta)
    du, dv = (xs - cx) / rad, (ys - cy) / rad
    mask = shape_mask(SHAPES[label], du * cos + dv * sin, dv * cos - du * sin).float()
    # its colour stands out from the background's mean colour
    mean = img.mean(dim=(1, 2))
    colour = torch.tensor(r[26:29])
    if (colour - mean).abs().sum() < 0.6:
        colour = torch.where(mean > 0.5, colour * 0.3, 0.7 + 0.3 * colour)
    img = img + (colour.view(3, 1, 1) - img) * mask
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


class SyntheticShapes(Dataset):
    """Offline, deterministic data: image i has class i % num_classes."""

    def __init__(self, size, num_images, num_classes=10, seed=0, transform=None):
        if not 2 <= num_classes <= len(SHAPES):
            raise TrainError(f'synthetic data has {len(SHAPES)} classes; --num-classes must lie '
                             f'in [2, {len(SHAPES)}], got {num_classes}')
        self.size, self.seed, self.transform = size, seed, transform
        self.targets = [i % num_classes for i in range(num_images)]
        self.classes = list(SHAPES[:num_classes])

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = draw_synthetic(i, self.targets[i], self.size, self.seed)
        return (self.transform(img) if self.transform else img), self.targets[i]


# The UCI optical handwritten digits (Alpaydin and Kaynak 1998): scikit-learn's copy, shipped
DIGITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tutorials', 'data', 'digits.csv.gz')
DIGITS_TRAIN = 1297                         # images 0..1296 train, 1297..1796 validation (500)


class Digits(Dataset):
    """1,797 handwritten digits of 8x8 cells (0..16: the ink in each 4x4 block of a 32x32 bitmap), 10
    classes: white ink on black, upsampled to size x size (bilinear), three equal channels."""

    def __init__(self, split, size, transform=None):
        import gzip
        with gzip.open(DIGITS, 'rt') as f:
            rows = torch.tensor([[int(v) for v in line.split(',')] for line in f if line.strip()])
        rows = rows[:DIGITS_TRAIN] if split == 'train' else rows[DIGITS_TRAIN:]
        cells = rows[:, :64].view(-1, 1, 8, 8).float() * (255 / 16)
        images = F.interpolate(cells, size=(size, size), mode='bilinear', align_corners=False)
        self.images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
        self.targets, self.classes, self.transform = rows[:, 64].tolist(), [str(d) for d in range(10)], transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), self.targets[i]


class UnreadableImage(Exception):
    pass


class ImageFolder(Dataset):
    """torchvision's ImageFolder over encoded bytes (decoded by the transform, or by the GPU with
    --gpu-decode); a file that cannot be read or decoded fails with its name and the fix."""

    def __init__(self, root, transform):
        from torchvision import datasets
        from torchvision.io import read_file
        self.folder, self.transform = datasets.ImageFolder(root, loader=read_file), transform
        self.classes, self.targets = self.folder.classes, self.folder.targets

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        try:
            data, target = self.folder[i]
            return (self.transform(data) if self.transform else data), target
        except Exception as e:                  # the whole reason, on one line; the cause chained
            reason = ' '.join(str(e).split())
            raise UnreadableImage(f'cannot read image {self.folder.samples[i][0]} ({type(e).__name__}: '
                                  f'{reason}); remove or replace the file') from e


# ==================================================================================================
# Transforms: DeiT's augmentation (and pycls's), fast. RandAugment 'rand-m9-mstd0.5-inc1' exactly as
# timm draws it (magnitude 9 on a 0..10 scale, std 0.5, each op kept with probability 1/2, mean-pixel
# fill, bicubic); pycls's AutoAugment (the v0 policy, bilinear, grey fill) and PCA lighting. The ops
# are written once with torchvision's v2 functional ops, which run them on PIL images (CPU loaders:
# Pillow is fastest there, and bit-identical to timm) and on uint8 tensors on any device
# (--gpu-decode). Crop, flip and erasing are torchvision's v2 transforms (torch's random draws);
# RandAugment and AutoAugment draw from `rng` (Python's random). Both are seeded per loader worker.
# ==================================================================================================

FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)    # (124, 116, 104): DeiT's geometric ops fill with it
BICUBIC = TF.InterpolationMode.BICUBIC


def affine(img, m, resample=Image.BICUBIC, fill=FILL):
    """Output pixel (x, y) takes the input at (m0 x + m1 y + m2, m3 x + m4 y + m5), in pixels from the
    top-left corner (PIL's convention, timm's ops); `fill` where that point is outside."""
    if isinstance(img, Image.Image):
        return img.transform(img.size, Image.AFFINE, m, resample, fillcolor=fill)
    c, h, w = img.shape                     # tensors: grid_sample (affine() has no bicubic)
    a, b, tx, d, e, ty = m
    theta = torch.tensor([[a, b * h / w, a + b * h / w + 2 * tx / w - 1],
                          [d * w / h, e, d * w / h + e + 2 * ty / h - 1]], device=img.device)
    grid = F.affine_grid(theta[None], [1, c, h, w], align_corners=False)
    mode = 'bicubic' if resample == Image.BICUBIC else 'bilinear'
    out = F.grid_sample(img[None].float(), grid, mode, 'border', align_corners=False)[0]
    fill = torch.tensor(fill, dtype=out.dtype, device=img.device).view(3, 1, 1)
    out = torch.where(((grid < -1) | (grid >= 1)).any(-1), fill, out)     # outside, as PIL
    return out.round_().clamp_(0, 255).to(torch.uint8)


def rotate(img, degrees, resample=Image.BICUBIC, fill=FILL):
    """Counter-clockwise about the image centre, as PIL's Image.rotate."""
    h, w = TF.get_size(img)
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    matrix = (cos, -sin, w / 2 * (1 - cos) + sin * h / 2, sin, cos, h / 2 * (1 - cos) - sin * w / 2)
    return affine(img, matrix, resample, fill)


def posterize(img, bits):
    """Keep the `bits` high bits; 0 (magnitude 10) gives black, as old Pillow did (Pillow 13 raises)."""
    if bits == 0 and isinstance(img, Image.Image):
        return Image.new(img.mode, img.size)
    return TF.posterize(img, bits)


def solarize(img, threshold):
    """Invert the values >= threshold (256: nothing)."""
    return TF.solarize(img, threshold) if threshold < 256 else img


def solarize_add(img, add):
    """Add `add` to the values below 128 (torchvision has no such op)."""
    if isinstance(img, Image.Image):
        return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * len(img.mode))
    return torch.where(img < 128, img + add, img)        # add <= 128: no uint8 overflow below 128


def enhance(m, sign):                                    # the blend factor of the *Increasing ops
    return max(0.1, 1.0 + sign * m * 0.9)


# name: (op(img, arg), level(m, sign) -> arg): timm's level formulas, m = magnitude / 10 in [0, 1];
# the levels that use `sign` get a random one, as timm negates those
RANDAUG_OPS = {
    'AutoContrast': (lambda img, _: TF.autocontrast(img), lambda m, s: None),
    'Equalize': (lambda img, _: TF.equalize(img), lambda m, s: None),
    'Invert': (lambda img, _: TF.invert(img), lambda m, s: None),
    'Rotate': (rotate, lambda m, s: s * m * 30),                                    # degrees
    'PosterizeIncreasing': (posterize, lambda m, s: 4 - int(m * 4)),                # bits kept
    'SolarizeIncreasing': (solarize, lambda m, s: 256 - min(256, int(m * 256))),    # invert >= t
    'SolarizeAdd': (solarize_add, lambda m, s: min(128, int(m * 110))),
    'ColorIncreasing': (TF.adjust_saturation, enhance),
    'ContrastIncreasing': (TF.adjust_contrast, enhance),
    'BrightnessIncreasing': (TF.adjust_brightness, enhance),
    'SharpnessIncreasing': (TF.adjust_sharpness, enhance),
    'ShearX': (lambda img, f: affine(img, (1, f, 0, 0, 1, 0)), lambda m, s: s * m * 0.3),
    'ShearY': (lambda img, f: affine(img, (1, 0, 0, f, 1, 0)), lambda m, s: s * m * 0.3),
    'TranslateXRel': (lambda img, f: affine(img, (1, 0, f * TF.get_size(img)[1], 0, 1, 0)),
                      lambda m, s: s * m * 0.45),                                   # x width
    'TranslateYRel': (lambda img, f: affine(img, (1, 0, 0, 0, 1, f * TF.get_size(img)[0])),
                      lambda m, s: s * m * 0.45),                                   # x height
}


def randaug_arg(name, magnitude, sign=1):
    """The argument of op `name` at `magnitude` (timm's 0..10 scale): Rotate 9 -> 27 degrees."""
    return RANDAUG_OPS[name][1](magnitude / 10, sign)


def randaug_plan(rng=random, num_ops=2, magnitude=9, std=0.5, prob=0.5):
    """One image's RandAugment as [(op, argument)]: `num_ops` ops drawn uniformly with replacement,
    each kept with probability `prob`, at a magnitude ~ N(magnitude, std) clipped to [0, 10]."""
    plan = []
    for name in rng.choices(list(RANDAUG_OPS), k=num_ops):
        if rng.random() < prob:
            m = min(max(rng.gauss(magnitude, std), 0.0), 10.0)
            plan.append((name, randaug_arg(name, m, -1 if rng.random() < 0.5 else 1)))
    return plan


def rand_augment(img, plan):
    """Apply a plan to a PIL image or a uint8 (3, H, W) tensor."""
    for name, arg in plan:
        img = RANDAUG_OPS[name][0](img, arg)
    return img


# pycls's AutoAugment (Xiao et al.'s recipe; pycls/datasets/augment.py): the TPU "v0" policy of 25
# sub-policies (op, probability, magnitude in [0, 1]); one sub-policy per image. Geometric ops are
# bilinear with grey fill (128); posterize keeps at least 1 bit.
PYCLS_FILL = (128, 128, 128)
PYCLS_POLICY = [
    [('equalize', 0.8, 0.1), ('shear_y', 0.8, 0.4)], [('color', 0.4, 0.9), ('equalize', 0.6, 0.3)],
    [('color', 0.4, 0.1), ('rotate', 0.6, 0.8)], [('solarize', 0.8, 0.3), ('equalize', 0.4, 0.7)],
    [('solarize', 0.4, 0.2), ('solarize', 0.6, 0.2)], [('color', 0.2, 0.0), ('equalize', 0.8, 0.8)],
    [('equalize', 0.4, 0.8), ('solarize_add', 0.8, 0.3)], [('shear_x', 0.2, 0.9), ('rotate', 0.6, 0.8)],
    [('color', 0.6, 0.1), ('equalize', 1.0, 0.2)], [('invert', 0.4, 0.9), ('rotate', 0.6, 0.0)],
    [('equalize', 1.0, 0.9), ('shear_y', 0.6, 0.3)], [('color', 0.4, 0.7), ('equalize', 0.6, 0.0)],
    [('posterize', 0.4, 0.6), ('auto_contrast', 0.4, 0.7)], [('solarize', 0.6, 0.8), ('color', 0.6, 0.9)],
    [('solarize', 0.2, 0.4), ('rotate', 0.8, 0.9)], [('rotate', 1.0, 0.7), ('trans_y', 0.8, 0.9)],
    [('shear_x', 0.0, 0.0), ('solarize', 0.8, 0.4)], [('shear_y', 0.8, 0.0), ('color', 0.6, 0.4)],
    [('color', 1.0, 0.0), ('rotate', 0.6, 0.2)], [('equalize', 0.8, 0.4), ('equalize', 0.0, 0.8)],
    [('equalize', 1.0, 0.4), ('auto_contrast', 0.6, 0.2)], [('shear_y', 0.4, 0.7), ('solarize_add', 0.6, 0.7)],
    [('posterize', 0.8, 0.2), ('solarize', 0.6, 1.0)], [('solarize', 0.6, 0.8), ('equalize', 0.6, 0.1)],
    [('color', 0.8, 0.6), ('rotate', 0.4, 0.5)],
]
_BILINEAR = dict(resample=Image.BILINEAR, fill=PYCLS_FILL)
# name: (op(img, v), v at magnitude 0, v at magnitude 1, whether v gets a random sign)
PYCLS_OPS = {
    'auto_contrast': (lambda img, v: TF.autocontrast(img), 0, 1, False),
    'equalize': (lambda img, v: TF.equalize(img), 0, 1, False),
    'invert': (lambda img, v: TF.invert(img), 0, 1, False),
    'rotate': (lambda img, v: rotate(img, v, **_BILINEAR), 0, 30, True),
    'posterize': (lambda img, v: TF.posterize(img, max(1, int(v))), 0, 4, False),
    'solarize': (lambda img, v: solarize(img, int(v)), 0, 256, False),
    'solarize_add': (lambda img, v: solarize_add(img, int(v)), 0, 110, False),
    'color': (TF.adjust_saturation, 0.1, 1.9, False),
    'shear_x': (lambda img, v: affine(img, (1, v, 0, 0, 1, 0), **_BILINEAR), 0, 0.3, True),
    'shear_y': (lambda img, v: affine(img, (1, 0, 0, v, 1, 0), **_BILINEAR), 0, 0.3, True),
    'trans_y': (lambda img, v: affine(img, (1, 0, 0, 0, 1, v * TF.get_size(img)[0]), **_BILINEAR), 0, 0.45, True),
}


def pycls_autoaugment(img, rng=random):
    """One sub-policy of PYCLS_POLICY, drawn uniformly; each op applied with its probability, at
    v = low + magnitude (high - low), negated with probability 1/2 where signed."""
    for name, prob, magnitude in rng.choice(PYCLS_POLICY):
        if prob < 1 and rng.random() > prob:
            continue
        op, low, high, signed = PYCLS_OPS[name]
        v = low + magnitude * (high - low)
        if signed and rng.random() > 0.5:
            v = -v
        img = op(img, v)
    return img


# AlexNet's PCA lighting (pycls, from fb.resnet.torch): ImageNet's RGB eigenvalues and eigenvectors
EIGVAL = (0.2175, 0.0188, 0.0045)
EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def lighting_offset(alpha):
    """The RGB offset (3,), on the 0..1 scale, that lighting noise alpha (3,) adds: V (alpha * lambda)."""
    return torch.tensor(EIGVEC) @ (alpha * torch.tensor(EIGVAL))


def crop_flip(x, size, scale=(0.08, 1.0), hflip=0.5):
    """RandomResizedCrop (torchvision's box: area ~ U(scale), log aspect ~ U(log 3/4, log 4/3)) to
    size x size, bicubic, antialiased; then a horizontal flip with probability hflip. The crop is
    copied channels-last first: torch's uint8 resize is fastest so, and its output goes to PIL free."""
    top, left, h, w = v2.RandomResizedCrop.get_params(x, list(scale), [3 / 4, 4 / 3])
    x = x[:, top:top + h, left:left + w].permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return v2.RandomHorizontalFlip(hflip)(TF.resize(x, [size, size], BICUBIC, antialias=True))


def normalize_erase(x, re_prob=0.25, lighting=0.0):
    """uint8 (..., 3, H, W) -> float (x / 255 - mean) / std on x's device; per image, pycls's PCA
    lighting noise (alpha ~ N(0, lighting)) and timm's RandomErasing 'pixel' mode with probability
    re_prob (torchvision's: a box of 2-33% of the area, aspect 0.3-3.3, N(0, 1) noise)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    x = x.contiguous().float().div_(255).sub_(mean).div_(std)
    erase = v2.RandomErasing(re_prob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value='random', inplace=True)
    for img in x.view(-1, *x.shape[-3:]):
        if lighting:
            img += lighting_offset(torch.randn(3) * lighting).to(x.device).view(3, 1, 1) / std
        if re_prob:
            erase(img)
    return x


def to_image(data):
    """Encoded bytes (a 1-D uint8 tensor), a PIL image or a (3, H, W) tensor -> uint8 (3, H, W):
    torchvision decodes with libjpeg-turbo (Pillow's pixels, faster); 16-bit PNGs are rescaled."""
    if isinstance(data, Image.Image):
        return TF.pil_to_tensor(data.convert('RGB'))
    x = decode_image(data, mode=ImageReadMode.RGB) if data.ndim == 1 else data
    return x if x.dtype == torch.uint8 else TF.to_dtype(x, torch.uint8, scale=True)


def randaug_setting(cfg):
    """'2,9' -> (2, 9.0): ops per image, magnitude on 0..10; None when off or under AutoAugment."""
    if cfg.randaug == 'off' or cfg.autoaugment:
        return None
    n, m = cfg.randaug.split(',')
    return int(n), float(m)


def augment_train(data, size=224, rng=random, scale=(0.08, 1.0), randaug=(2, 9), re_prob=0.25,
                  normalize=True, autoaugment=False, hflip=0.5, lighting=0.0):
    """DeiT's train transform of one image (encoded bytes, PIL or a uint8 tensor): RandomResizedCrop
    (bicubic), flip, RandAugment (randaug = (ops, magnitude), or None; or pycls's AutoAugment),
    normalise, [lighting], RandomErasing ('pixel'). normalize=False returns uint8 (before the last three)."""
    x = crop_flip(to_image(data), size, scale, hflip)
    plan = randaug_plan(rng, *randaug) if randaug else []
    if plan or autoaugment:                               # on a CPU, Pillow runs the ops fastest
        pil = Image.fromarray(x.permute(1, 2, 0).numpy())
        x = TF.pil_to_tensor(pycls_autoaugment(pil, rng) if autoaugment else rand_augment(pil, plan))
    return normalize_erase(x, re_prob, lighting) if normalize else x


def resize_center(x, size, crop_pct):
    """Shorter side to size / crop_pct (bicubic, antialiased), then the centre size x size."""
    return TF.center_crop(TF.resize(x, int(size / crop_pct), BICUBIC, antialias=True), size)


def augment_val(data, size=224, crop_pct=0.875, normalize=True):
    """DeiT's evaluation transform: resize to size / 0.875 (256), centre crop, normalise."""
    x = resize_center(to_image(data), size, crop_pct)
    return normalize_erase(x, re_prob=0) if normalize else x


def train_transform(img, cfg, rng=random):
    return augment_train(img, cfg.img_size, rng, (cfg.crop_scale, 1.0), randaug_setting(cfg), cfg.reprob,
                         autoaugment=cfg.autoaugment, hflip=cfg.hflip, lighting=cfg.lighting)


def val_transform(img, cfg):                    # ImageNet-like folders: DeiT's crop; else whole
    return augment_val(img, cfg.img_size, crop_fraction(cfg))


def crop_fraction(cfg):
    return 0.875 if cfg.data == 'folder' else 1.0


def build_datasets(cfg, splits=('train', 'val')):
    """-> the data sets of `splits` (--num-classes and --data-fraction applied to train), then the
    class names the run uses (the first --num-classes, sorted)."""
    sets = [build_split(cfg, split) for split in splits]
    classes = list(sets[0].classes)
    if len(sets) == 2 and list(sets[1].classes) != classes:
        differ = sorted(set(classes) ^ set(sets[1].classes))
        raise TrainError(f'train/ and val/ hold different classes ({", ".join(differ[:4])}'
                         f'{", ..." if len(differ) > 4 else ""} in one only); give both the same class folders')
    if cfg.num_classes is not None and cfg.data != 'synthetic':
        if not 2 <= cfg.num_classes <= len(classes):
            raise TrainError(f'--num-classes {cfg.num_classes}: the data has {len(classes)} '
                             f'classes; choose a number from 2 to {len(classes)}')
        classes = classes[:cfg.num_classes]
    if len(classes) < 2:
        raise TrainError(f'the data holds {len(classes)} class ({", ".join(classes)}); a classifier needs '
                         f'at least 2: add a folder per class')
    fractions = [cfg.data_fraction if s == 'train' else 1.0 for s in splits]
    return [select(d, len(classes), f) for d, f in zip(sets, fractions)] + [classes]


def build_val_set(cfg):
    """-> (val set, class names), without reading the training images (evaluate.py)."""
    return tuple(build_datasets(cfg, ('val',)))


def build_split(cfg, split):
    """One split ('train' or 'val') of the data, with its transform."""
    is_train = split == 'train'
    transform = functools.partial(train_transform if is_train else val_transform, cfg=cfg)
    if cfg.data == 'synthetic':
        return SyntheticShapes(cfg.img_size, cfg.synthetic_train if is_train else cfg.synthetic_val,
                               cfg.num_classes, cfg.seed + (not is_train), transform)
    if cfg.data == 'digits':
        return Digits(split, cfg.img_size, transform)
    if cfg.data.startswith('cifar'):
        from torchvision import datasets
        root = cfg.data_path or 'data'
        try:
            return getattr(datasets, cfg.data.upper())(root, is_train, transform, download=cfg.download)
        except RuntimeError as e:
            raise TrainError(f'{cfg.data} not found under {root!r} ({e}); add --download to fetch it '
                             f'(needs internet), or point --data-path at the folder that holds it') from None
        except OSError as e:                # no network while downloading
            raise TrainError(f'could not download {cfg.data} ({e}); copy it into {root!r} '
                             f'and run without --download') from None
    root = os.path.join(cfg.data_path or '', split)
    if not cfg.data_path or not os.path.isdir(root):
        raise TrainError('--data folder needs --data-path DIR, a folder with train/ and val/ holding '
                         'one sub-folder of images per class' + (f'; {root!r} does not exist' if cfg.data_path else ''))
    try:
        return ImageFolder(root, transform)
    except FileNotFoundError as e:          # no class folders, or a class folder without images
        raise TrainError(f'{root}: {e}; every class folder needs image files (.jpg, .png, ...)') from None


def select(dataset, num_classes, fraction):
    """Per class (the first num_classes), the first floor(n_c * fraction) samples in order."""
    targets = list(dataset.targets)
    if fraction == 1.0 and max(targets) < num_classes:
        return dataset
    by_class = {}
    for i, t in enumerate(targets):
        if t < num_classes:
            by_class.setdefault(t, []).append(i)
    keep = sorted(i for idx in by_class.values() for i in idx[:int(len(idx) * fraction)])
    subset = Subset(dataset, keep)
    subset.targets = [targets[i] for i in keep]
    return subset


class RepeatAugSampler(Sampler):
    """Repeated augmentation (Hoffer et al.; DeiT's RASampler): an epoch holds len / repeats distinct
    images, each `repeats` times (each under its own augmentation). The images are shuffled, each one's
    copies placed side by side, and position i of that list goes to rank i % world: the copies spread
    over the ranks, whose shares are disjoint. Every rank sees len / world samples, as without repeats."""

    def __init__(self, n, world, rank, repeats=3, seed=0):
        self.n, self.world, self.rank, self.repeats, self.seed, self.epoch = n, world, rank, repeats, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order.repeat_interleave(self.repeats)[self.rank::self.world][:len(self)].tolist())

    def __len__(self):
        return self.n // self.world


def build_loaders(cfg, train_set, val_set, rank, world, device, collate_fn=None):
    """Training: repeated augmentation or a shuffled shard per rank. Evaluation: rank r takes samples
    r, r + world, ... (nothing padded, nothing twice: evaluate() sums exact counts). Workers restart every
    epoch, seeded from torch's generator: a resumed run (which restores it) draws the same augmentations."""
    from torch.utils.data.distributed import DistributedSampler
    sampler = (RepeatAugSampler(len(train_set), world, rank, cfg.repeated_aug, cfg.seed) if cfg.repeated_aug > 1
               else DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True))
    train = DataLoader(train_set, cfg.batch_size, sampler=sampler, drop_last=True, collate_fn=collate_fn,
                       **loader_options(cfg, device))
    kept = f' kept by --data-fraction {cfg.data_fraction:g}' if cfg.data_fraction < 1 else ''
    if len(train) == 0:
        raise TrainError(f'the training set{kept} has {len(train_set)} images, fewer than one batch per process '
                         f'({cfg.batch_size} x {world} process(es)); lower --batch-size' +
                         (' or raise --data-fraction' if kept else ''))
    if len(train) < cfg.accum:
        raise TrainError(f'an epoch has {len(train)} batches per process, and --accum {cfg.accum} needs '
                         f'{cfg.accum} for one optimizer step; lower --accum or --batch-size')
    return train, build_val_loader(cfg, val_set, rank, world, device, collate_fn)


def build_val_loader(cfg, val_set, rank, world, device, collate_fn=None):
    return DataLoader(val_set, cfg.batch_size, sampler=range(rank, len(val_set), world),
                      collate_fn=collate_fn, **loader_options(cfg, device))


def loader_options(cfg, device):
    workers = cfg.workers if cfg.workers is not None else min(8, max(1, (os.cpu_count() or 2) // 2))
    return dict(num_workers=workers, pin_memory=device.type == 'cuda')


def build_batch_mix(cfg, num_classes, model):
    """The batch's mixing, (images, labels) -> (images, soft targets), or None: MixUp or CutMix (one
    of the two per batch), or CutMix with its box on the model's patch grid (--grid-cutmix)."""
    if cfg.grid_cutmix:
        return lambda images, labels: locvit.patch_cutmix(images, labels, num_classes, model.grid,
                                                          model.patch_size, cfg.cutmix or 1.0)[:2]
    mixes = [mix(alpha=a, num_classes=num_classes) for mix, a in
             ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if a > 0]
    return v2.RandomChoice(mixes) if mixes else None


# ==================================================================================================
# --gpu-decode: the loaders hand over each file's bytes (no decoding in the workers); every batch
# is decoded on the device (nvjpeg on a GPU) and augmented there by the steps above. main() wraps
# the loaders with it; nothing else knows of it.
# ==================================================================================================

def device_batch(datas, device, cfg, train=True):
    """JPEG bytes (a list of uint8 tensors) -> normalised float (B, 3, S, S) on `device`: one batched
    decode there (if it refuses a file, PNG or CMYK, the batch is decoded on the CPU), then per image
    the crop, flip and RandAugment (or AutoAugment) of train_transform, or the centre crop of val."""
    try:
        images = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = [to_image(d).to(device) for d in datas]
    out, setting = [], randaug_setting(cfg)
    for x in images:
        if not train:
            out.append(resize_center(x, cfg.img_size, crop_fraction(cfg)))
            continue
        x = crop_flip(x, cfg.img_size, (cfg.crop_scale, 1.0), cfg.hflip)
        if cfg.autoaugment:
            out.append(pycls_autoaugment(x))
        else:
            out.append(rand_augment(x, randaug_plan(random, *setting) if setting else []))
    if not train:
        return normalize_erase(torch.stack(out), re_prob=0)
    return normalize_erase(torch.stack(out), cfg.reprob, cfg.lighting)


def packed(batch):
    """Collate (bytes, label) pairs into one flat byte tensor, the lengths and the labels: a worker
    passes one tensor to the main process, not a file's tensor each."""
    datas, labels = zip(*batch)
    return torch.cat(datas), [len(d) for d in datas], torch.tensor(labels)


class DeviceDecoded:
    """A loader of packed JPEG bytes -> (images decoded and augmented on `device`, labels)."""

    def __init__(self, loader, device, cfg, train):
        self.loader, self.sampler, self.device, self.cfg, self.train = loader, loader.sampler, device, cfg, train

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for flat, lengths, labels in self.loader:
            yield device_batch(flat.split(lengths), self.device, self.cfg, self.train), labels


def gpu_decode_loaders(cfg, train_set, val_set, rank, world, device):
    """build_loaders over the files' bytes, each batch decoded on the device."""
    for dataset in (train_set, val_set):
        getattr(dataset, 'dataset', dataset).transform = None      # (a Subset holds the folder)
    train, val = build_loaders(cfg, train_set, val_set, rank, world, device, collate_fn=packed)
    return DeviceDecoded(train, device, cfg, True), DeviceDecoded(val, device, cfg, False)


# ==================================================================================================
# Model and optimizer: no weight decay on biases, norm / BN weights, GPSA gates, position
# embeddings and class tokens; a per-step linear warmup then a cosine decay.
# ==================================================================================================

def model_overrides(cfg):
    """The model flags that were set, as create_model overrides: each Config field's `model` says
    where (the conv stem's, GPSA's and the LFF's options go into their dicts; "24,48" -> (24, 48))."""
    overrides, arch = {}, locvit.model_name(getattr(cfg, 'arch', None) or 'deit_t')
    for f in dataclasses.fields(Config):
        where, value = f.metadata['model'], getattr(cfg, f.name, None)
        if where is None or value is None:
            continue
        if f.name.startswith('stem_'):
            try:
                value = tuple(int(v) for v in str(value).split(','))
            except ValueError:
                raise TrainError(f'--{f.name.replace("_", "-")} takes integers separated by '
                                 f'commas, e.g. 24,48,96,192; got {value!r}') from None
        if f.name == 'ffn':                 # mlp: no LFF; lff: an LFF (the model's, or defaults)
            overrides['lff'] = None if value == 'mlp' else {**(overrides.get('lff') or {})}
        elif isinstance(where, tuple):
            if where[0] == 'lff' and overrides.get('lff', locvit.MODELS[arch][1].get('lff')) is None:
                raise TrainError(f'--{f.name.replace("_", "-")} sets the locality feed-forward, '
                                 f'which {arch} has not; add --ffn lff')
            overrides.setdefault(where[0], {})[where[1]] = value
        else:
            overrides[where] = value
    unknown = [k for k in overrides if k not in locvit.model_options(arch)]
    if unknown:
        raise TrainError(f'{arch} has no option {", ".join(unknown)}')
    return overrides


def build_model(cfg, num_classes):
    model = locvit.create_model(cfg.arch, num_classes=num_classes, **model_overrides(cfg))
    if cfg.finetune:                        # DeiT's fine-tuning: new classifier, resized positions
        locvit.load_pretrained(model, None if cfg.finetune == 'pretrained' else cfg.finetune)
    if cfg.recompute:
        recompute_lff(model)
    return model


def recompute(module, fn, *inputs):
    """fn(*inputs) (a part of `module`) keeping only `inputs` for backward, which reruns fn
    (torch.utils.checkpoint); `module`'s BatchNorms update their running statistics in the first run only.
    Outside training (no grad, eval mode, or under torch.compile) it is a plain call."""
    if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return fn(*inputs)
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    runs = []

    def run(*args):
        state = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in bns]
        if runs:                                # the second run: running stats unchanged
            for bn in bns:
                bn.momentum = 0.0
        runs.append(1)
        try:
            return fn(*args)
        finally:
            for bn, (momentum, tracked) in zip(bns, state):
                bn.momentum = momentum
                if len(runs) > 1:
                    bn.num_batches_tracked.copy_(tracked)
    return torch.utils.checkpoint.checkpoint(run, *inputs, use_reentrant=False)


def recompute_lff(model):
    """--recompute (on by default): each LFF keeps only its input for backward and reruns its expanded
    (4x) maps there: a fifth of the activation memory at about the same speed, the same numbers."""
    for m in model.modules():
        if isinstance(m, locvit.LocalityFeedForward):
            m.branch = functools.partial(recompute, m, m.branch)
    return model


class PatchDiversity(nn.Module):
    """A model trained with the patch-diversity losses (Gong et al.): forward(images) -> (logits,
    {name: weight x loss}) for the losses with a weight. It owns what the losses add beside the
    published model: the patch classifier, a dropout before the heads, and mix(images, labels), the
    batch mixing its mixing loss needs, which leaves the patches' targets for the next forward: the
    paper's CutMix on the patch grid (instead of the batch mix), or the batch mix and then the
    released code's patch mix."""

    def __init__(self, model, weights, num_classes, batch_mix=None, cutmix=1.0, smoothing=0.0, head_dropout=0.0):
        super().__init__()
        if not hasattr(model, 'patch_size'):
            raise TrainError(f'{model.arch} has no single patch grid; the patch-diversity losses '
                             f'need one (any ViT-family model: deit_*, convit_*, localvit_*, vit_*)')
        self.model, self.weights = model, {k: w for k, w in weights.items() if w > 0}
        self.num_classes, self.batch_mix, self.cutmix, self.smoothing = num_classes, batch_mix, cutmix, smoothing
        self.drop = nn.Dropout(head_dropout) if head_dropout > 0 else nn.Identity()
        if mixing_loss(weights):
            self.patch_head = locvit.PatchHead(model.head.in_features, num_classes)
        self.patch_targets = None               # what mix() leaves for forward()

    def mix(self, images, labels):
        grid, p = self.model.grid, self.model.patch_size
        if 'mix' in self.weights:               # the paper's: each patch from one image, its label
            images, targets, self.patch_targets = locvit.patch_cutmix(images, labels, self.num_classes,
                                                                      grid, p, self.cutmix)
            return images, targets
        targets = labels
        if self.batch_mix is not None:
            images, targets = self.batch_mix(images, labels)
        if 'mix-released' in self.weights:      # the released: its patch mix, smoothed soft targets
            if targets.ndim == 1:
                targets = F.one_hot(targets, self.num_classes).float()
            images, targets, regions, mask = locvit.released_patch_mix(images, targets, grid, p)
            self.patch_targets = (regions * (1 - self.smoothing) + self.smoothing / self.num_classes, mask)
        return images, targets

    def forward(self, images):
        tokens, layers = self.model.forward_features(images, return_layers=True)
        grid = self.model.grid
        embed = locvit.patch_tokens(layers[0], grid) - self.model.pos_embed[:, -grid[0] * grid[1]:]  # the stem's
        last, out = locvit.patch_tokens(layers[-1], grid), locvit.patch_tokens(tokens, grid)  # before / after the norm
        if mixing_loss(self.weights) and self.patch_targets is None:
            raise ValueError('the mixing loss needs the patch targets of mix(images, labels): mix the batch first')
        losses = {}
        for name, weight in self.weights.items():
            if name == 'cos':
                loss = locvit.patch_cosine_loss(last)
            elif name == 'con':
                loss = locvit.patch_contrastive_loss(embed, last)
            elif name == 'con-dot':
                loss = locvit.patch_contrastive_loss(embed, last, 1.0, normalize=False)
            elif name == 'con-released':
                loss = locvit.patch_contrastive_loss_released(embed, out, grid)
            elif name == 'mix':
                loss = locvit.patch_mixing_loss(self.patch_head(self.drop(out)), self.patch_targets)
            else:                               # mix-released
                loss = locvit.region_mixing_loss(lambda t: self.patch_head(self.drop(t)), out, *self.patch_targets)
            losses[name] = weight * loss
        return self.model.forward_head(self.drop(tokens)), losses


NO_DECAY = ('pos_embed', 'cls_token', 'relative_position_bias_table', 'patch_pos', 'pixel_pos')


def param_groups(model, weight_decay, exempt=NO_DECAY):
    """Two groups: weight decay, and none on every 1-D parameter (biases, norm and BN weights, GPSA
    gates) and the parameters named in `exempt`: DeiT's rule exempts embeddings, tokens and bias
    tables too; pycls's rule (exempt=()) exempts only norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.split('.')[-1] in exempt else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(cfg, model, global_batch):
    exempt = () if cfg.recipe.startswith('pycls') else NO_DECAY
    lr, groups = cfg.lr * global_batch / 512, param_groups(model, cfg.weight_decay, exempt)
    if cfg.opt == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step, total_steps, warmup_steps, base_lr, warmup_lr, min_lr):
    """Linear warmup from warmup_lr, then cosine from base_lr to min_lr (per step)."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def autocast(amp, device):
    return torch.autocast(device.type, dtype=torch.float16 if amp == 'fp16' else torch.bfloat16,
                          enabled=amp != 'off')


class Schedule:
    """Where the run stands: the learning rate is a function of the optimizer step."""

    def __init__(self, cfg, steps_per_epoch, base_lr):
        self.total, self.warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
        self.base_lr, self.warmup_lr, self.min_lr, self.step = base_lr, cfg.warmup_lr, cfg.min_lr, 0

    def lr(self):
        return lr_at(self.step, self.total, self.warmup, self.base_lr, self.warmup_lr, self.min_lr)


# ==================================================================================================
# The loop
# ==================================================================================================

def train_one_epoch(model, loader, optimizer, schedule, cfg, device, epoch, criterion,
                    mix=None, scaler=None, ema=None, progress=None):
    """One pass over the loader; returns {'train_loss', 'img_per_s', ...}. `mix` mixes each batch;
    the model returns logits, or (logits, {name: extra loss}). With cfg.accum = k, k micro-batches make
    one optimizer step (DDP syncs gradients only on the last one)."""
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    sums, names = None, []                               # [loss, images, each term] (x images)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mix is not None:
            images, targets = mix(images, targets)
        last_micro = (i + 1) % cfg.accum == 0
        with (model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro
              else nullcontext()), autocast(cfg.amp, device):
            out = model(images)
            logits, terms = out if isinstance(out, tuple) else (out, {})
            loss = criterion(logits, targets) + sum(terms.values())
        scaler.scale(loss / cfg.accum).backward()
        n = torch.tensor(float(len(images)), device=device)
        batch = all_reduce_sum(torch.stack([loss.detach().float() * n, n] +
                                           [t.detach().float() * n for t in terms.values()]))
        if not torch.isfinite(batch[0]):
            raise TrainError(non_finite(cfg, batch[0].item(), epoch, schedule.step))
        sums, names = (batch if sums is None else sums + batch), list(terms)
        if not last_micro:
            continue
        for group in optimizer.param_groups:
            group['lr'] = schedule.lr()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(published(model))
        schedule.step += 1
        if progress is not None:
            progress.update(cfg.accum)
            progress.set_postfix(loss=f'{(sums[0] / sums[1]).item():.3f}', lr=f'{group["lr"]:.2e}',
                                 img_s=f'{sums[1].item() / (time.perf_counter() - start):.0f}')
        if cfg.max_steps and schedule.step >= cfg.max_steps:
            break
    seconds = time.perf_counter() - start
    means = (sums / sums[1].clamp(min=1)).tolist()
    return {'train_loss': means[0], **{f'loss_{k}': m for k, m in zip(names, means[2:])},
            'img_per_s': sums[1].item() / seconds, 'epoch_seconds': seconds,
            'lr': optimizer.param_groups[0]['lr']}


def non_finite(cfg, value, epoch, step):
    """The message for a loss that became NaN or infinite: where, the last good checkpoint, the fixes."""
    last = os.path.join(cfg.out, 'last.pt')
    saved = (f'the last good checkpoint is {last} (epoch {locvit.read_checkpoint(last)["epoch"]})'
             if os.path.exists(last) else 'no checkpoint was written yet')
    fixes = 'lower --lr' + ('' if cfg.clip_grad else ', set --clip-grad 1.0') + (
        ' or use --amp off' if cfg.amp != 'off' else '')
    return f'the loss became {value} at epoch {epoch + 1}, step {step + 1}; {saved}; {fixes}'


@torch.no_grad()
def evaluate(model, loader, device, amp='off'):
    """Top-1, top-5, loss and image count, summed exactly over the ranks."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)   # correct1, correct5, loss, count
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(amp, device):
            logits = model(images)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                             F.cross_entropy(logits.float(), targets, reduction='sum'),
                             torch.tensor(len(targets), device=device)]).double()
    c1, c5, loss, n = all_reduce_sum(sums).tolist()
    return {'top1': 100 * c1 / max(n, 1), 'top5': 100 * c5 / max(n, 1), 'loss': loss / max(n, 1),
            'count': int(n)}


# ==================================================================================================
# Checkpoints: plain data only (torch.load(weights_only=True) reads them), written atomically.
# They carry the model's full configuration: locvit.create_model(arch, **model_config) rebuilds it.
# A run folder is never written over by accident.
# ==================================================================================================

def unwrap(model):
    """The bare module inside DDP and torch.compile wrappers (PatchDiversity stays)."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def published(model):
    """The zoo model itself, without the patch-diversity wrapper."""
    model = unwrap(model)
    return model.model if isinstance(model, PatchDiversity) else model


RUN_FILES = ('last.pt', 'best.pt', 'log.jsonl', 'config.json')


def claim_out(cfg):
    """Check --out before anything runs: a folder; one that holds a run is continued (--resume),
    replaced (--overwrite: its run files removed) or refused. A killed save's temporary file goes."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise TrainError(f'--out {cfg.out} is a file, not a folder; name a folder for the run')
    taken = [f for f in RUN_FILES[:3] if os.path.exists(os.path.join(cfg.out, f))]
    if taken and not (cfg.resume or cfg.overwrite):
        raise TrainError(f'{cfg.out} already holds a run ({", ".join(taken)}); continue it with --resume auto, '
                         f'give another --out, or replace it with --overwrite')
    if os.environ.get('RANK', '0') != '0' or not os.path.isdir(cfg.out):
        return
    for name in os.listdir(cfg.out):
        if name.endswith('.tmp') or (cfg.overwrite and not cfg.resume and name in RUN_FILES):
            os.remove(os.path.join(cfg.out, name))


def save_checkpoint(path, state):
    """A reader sees the old file or the new one, never half of one; an interrupted save leaves no
    temporary file behind."""
    try:
        torch.save(state, f'{path}.tmp')
        os.replace(f'{path}.tmp', path)
    finally:
        if os.path.exists(f'{path}.tmp'):
            os.remove(f'{path}.tmp')


def rng_states():
    """Every rank's random generators (gathered on all ranks): a resumed run draws the same."""
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    states = [state] * (dist.get_world_size() if is_distributed() else 1)
    if is_distributed():
        dist.all_gather_object(states, state)
    return states


def checkpoint_state(cfg, model, optimizer, schedule, scaler, ema, epoch, best, classes, rng):
    base, trained = published(model), unwrap(model)
    extras = {} if trained is base else {k: v for k, v in trained.state_dict().items() if not k.startswith('model.')}
    return {'model': base.state_dict(), 'arch': cfg.arch, 'model_config': base.config,
            'grids': {k: list(g) for k, (_, g) in base.pos_embed_grids().items()},
            'classes': list(classes), 'config': dataclasses.asdict(cfg), 'wrapper': extras,
            'ema': ema.module.state_dict() if ema is not None else None,
            'ema_updates': int(ema.n_averaged) if ema is not None else 0,
            'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'epoch': epoch,
            'step': schedule.step, 'base_lr': schedule.base_lr, 'best_top1': best, 'rng': rng}


def resume_from(cfg, model, optimizer, schedule, scaler, ema, classes, rank):
    """-> (first epoch, best top-1). --resume auto starts fresh when OUT/last.pt is absent."""
    path = os.path.join(cfg.out, 'last.pt') if cfg.resume == 'auto' else cfg.resume
    if cfg.resume == 'auto' and not os.path.exists(path):
        return 0, 0.0
    try:
        state = locvit.read_checkpoint(path)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if not isinstance(state, dict) or 'optimizer' not in state:
        raise TrainError(f'{path} holds weights only, no training state to resume; start from its weights '
                         f'with --finetune {path} instead')
    if state.get('arch') != cfg.arch or len(state.get('classes', classes)) != len(classes):
        raise TrainError(f'{path} is a {state.get("arch")} run on {len(state.get("classes", []))} '
                         f'classes, this run is {cfg.arch} on {len(classes)}; use another --out '
                         f'or the same --arch and data')
    saved, own = state.get('model_config') or {}, published(model).config
    differ = [k for k in own if k in saved and saved[k] != own[k]]
    if differ:
        raise TrainError(f'{path} was trained with ' + ', '.join(f'{k} {saved[k]}' for k in differ) +
                         ' (this run: ' + ', '.join(f'{k} {own[k]}' for k in differ) + '); resume with the '
                         'same model flags, or use another --out')
    locvit.load_checkpoint(published(model), state)
    if state.get('wrapper'):
        unwrap(model).load_state_dict({**{f'model.{k}': v for k, v in published(model).state_dict().items()},
                                       **state['wrapper']})
    optimizer.load_state_dict(state['optimizer'])
    scaler.load_state_dict(state['scaler'])
    if ema is not None and state.get('ema') is not None:
        ema.module.load_state_dict(state['ema'])
        ema.n_averaged.fill_(state['ema_updates'])     # else the next update restarts the average
    schedule.step = state['step']
    rng = state['rng'][rank if rank < len(state['rng']) else 0]
    torch.set_rng_state(rng['torch'])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng['python']))
    if torch.cuda.is_available() and rng['cuda']:
        torch.cuda.set_rng_state_all(rng['cuda'])
    return state['epoch'], state['best_top1']


def json_line(record):
    """One JSON line; a non-finite number (NaN, inf) is written as null."""
    finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
    return json.dumps(finite) + '\n'


# ==================================================================================================
# main
# ==================================================================================================

def describe_recipe(cfg):
    aug = 'AutoAugment (pycls v0)' if cfg.autoaugment else f'RandAugment {cfg.randaug}'
    diverse = f', losses {cfg.diverse}, head dropout {cfg.head_dropout:g}' if cfg.diverse else ''
    return (f'recipe {cfg.recipe} (as {cfg.data} data sets it): {cfg.opt}, lr {cfg.lr:g} per 512 '
            f'images, weight decay {cfg.weight_decay:g}, {cfg.epochs} epochs ({cfg.warmup_epochs:g} '
            f'warm-up from {cfg.warmup_lr:g}), cosine to {cfg.min_lr:g}, smoothing {cfg.smoothing:g}, mixup '
            f'{cfg.mixup:g} / cutmix {cfg.cutmix:g}{" on the patch grid" if cfg.grid_cutmix else ""}, {aug}, '
            f'lighting {cfg.lighting:g}, flip {cfg.hflip:g}, erasing {cfg.reprob:g}, repeats {cfg.repeated_aug}, '
            f'drop path {cfg.drop_path:g}, EMA {cfg.ema_decay if cfg.ema else "off"}{diverse}')


def main(argv=None):
    cfg = parse_config(argv)
    claim_out(cfg)
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    train_set, val_set, classes = build_datasets(cfg)
    loaders = gpu_decode_loaders if cfg.gpu_decode else build_loaders
    train_loader, val_loader = loaders(cfg, train_set, val_set, rank, world, device)
    model = build_model(cfg, len(classes))
    mix = build_batch_mix(cfg, len(classes), model)
    weights = parse_diverse(cfg.diverse)
    if any(weights.values()):
        model = PatchDiversity(model, weights, len(classes), mix, cfg.cutmix or 1.0, cfg.smoothing,
                               cfg.head_dropout)
        mix = model.mix
    model = model.to(device)
    global_batch = cfg.batch_size * world * cfg.accum
    optimizer = build_optimizer(cfg, model, global_batch)
    schedule = Schedule(cfg, len(train_loader) // cfg.accum, optimizer.param_groups[0]['lr'])
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
    ema = torch.optim.swa_utils.AveragedModel(published(model), use_buffers=True, multi_avg_fn=(
        torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay))) if cfg.ema else None
    start_epoch, best = resume_from(cfg, model, optimizer, schedule, scaler, ema, classes, rank) \
        if cfg.resume else (0, 0.0)
    if cfg.compile:
        model = torch.compile(model)
    if is_distributed():
        for m in model.modules():           # an LFF's maps are channels-last views of the tokens, and so
            if isinstance(m, locvit.LocalityFeedForward):   # are its weights' gradients: DDP's buckets
                m.to(memory_format=torch.channels_last)     # want them in the weights' own layout
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, 'config.json'), 'w') as f:
            json.dump({**dataclasses.asdict(cfg), 'base_lr': schedule.base_lr}, f, indent=1)
    log(f'{cfg.arch}: {locvit.count_params(published(model)) / 1e6:.2f}M parameters, '
        f'{cfg.data} data ({len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, '
        f'{cfg.img_size} px), {world} process(es) on {device.type}, global batch {global_batch}, '
        f'lr {schedule.base_lr:.2e}' + (f', resuming after epoch {start_epoch}' if start_epoch else ''))
    log(describe_recipe(cfg))

    from tqdm import tqdm
    bars = rank == 0 and cfg.progress and sys.stderr.isatty()    # to a file: the epoch lines alone
    total_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        with (tqdm(total=len(train_loader), desc=f'epoch {epoch + 1}/{cfg.epochs}', leave=False,
                   dynamic_ncols=True) if bars else nullcontext()) as bar:
            stats = train_one_epoch(model, train_loader, optimizer, schedule, cfg, device, epoch,
                                    criterion, mix, scaler, ema, bar)
        sync_buffers(published(model), *([ema.module] if ema is not None else []))
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            for prefix, net in [('val', published(model))] + ([('ema', ema.module)] if ema else []):
                stats.update({f'{prefix}_{k}': v for k, v in evaluate(net, val_loader, device, cfg.amp).items()})
        import resource
        stats['peak_mem_mb'] = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else
                                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
        top1 = stats.get('val_top1', -1.0)
        is_best, best = top1 > best, max(best, top1)
        rng = rng_states()
        if rank == 0:
            state = checkpoint_state(cfg, model, optimizer, schedule, scaler, ema, epoch + 1, best, classes, rng)
            save_checkpoint(os.path.join(cfg.out, 'last.pt'), state)
            if is_best:
                save_checkpoint(os.path.join(cfg.out, 'best.pt'), state)
            with open(os.path.join(cfg.out, 'log.jsonl'), 'a') as f:
                f.write(json_line({'epoch': epoch + 1, **stats}))
        terms = ''.join(f'({k} {stats[f"loss_{k}"]:.3f}) ' for k in DIVERSE if f'loss_{k}' in stats)
        log(f'epoch {epoch + 1}/{cfg.epochs}  loss {stats["train_loss"]:.4f} {terms} ' +
            (f'val top-1 {top1:.2f}%  top-5 {stats["val_top5"]:.2f}%  ' if 'val_top1' in stats else '') +
            f'lr {stats["lr"]:.2e}  {stats["img_per_s"]:.0f} img/s  {stats["epoch_seconds"]:.0f} s')
        if cfg.max_steps and schedule.step >= cfg.max_steps:
            break
    log(f'done: best val top-1 {best:.2f}% ({len(classes)} classes, chance {100 / len(classes):.1f}%), '
        f'{(time.perf_counter() - total_start) / 60:.1f} min; checkpoints in {cfg.out}/ (last.pt, '
        f'best.pt), log in {cfg.out}/log.jsonl')
    if is_distributed():
        dist.destroy_process_group()
    return best


def run_cli(main_fn, argv=None):
    """Run a script's main; input problems print one line (set LOCVIT_DEBUG=1 for a traceback)."""
    try:
        return main_fn(argv)
    except (TrainError, ValueError, UnreadableImage) as e:
        if os.environ.get('LOCVIT_DEBUG'):
            raise
        message = (str(e).strip().splitlines() or [type(e).__name__])[-1].split('UnreadableImage: ')[-1]
        rank = os.environ.get('RANK') if os.environ.get('WORLD_SIZE', '1') != '1' else None
        print(f'error{f" (rank {rank})" if rank else ""}: {message}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    run_cli(main)
