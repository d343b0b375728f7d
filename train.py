"""Train locvit models: one process or many (torchrun), CPU or GPU, offline or on ImageNet.

  python train.py                                              # synthetic shapes, CPU, minutes
  torchrun --standalone --nproc_per_node=2 train.py            # the same on 2 processes
  torchrun --nproc_per_node=8 train.py --arch localvit_t --data folder --data-path /imagenet
  python train.py --resume auto --out runs/x                   # continue an interrupted run

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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

import locvit

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ==================================================================================================
# Config: the defaults are DeiT's recipe (used unchanged by ConViT and LocalViT). Fields left at
# None follow the data (see DATA_DEFAULTS): 32 px images with patch 4 for synthetic and CIFAR data,
# 224 px for an ImageNet-like folder. Every field is a command-line flag (--warmup-epochs ...).
# ==================================================================================================

@dataclass
class Config:
    # model: any zoo name, and overrides in the papers' words (None = the published value)
    arch: str = 'localvit_t'
    img_size: int = None
    patch_size: int = None
    drop_path: float = None                 # stochastic depth: 0.1 (DeiT), 0 for the quick synthetic run
    embed_dim: int = None
    depth: int = None
    num_heads: int = None
    mlp_ratio: float = None
    local_up_to_layer: int = None
    locality_strength: float = None
    local_init: bool = None
    talking_heads: bool = None
    stem_channels: str = None               # "24,48,96,192": a conv stem (ViT_C) on any ViT
    stem_strides: str = None                # "2,2,2,2"
    ffn: str = None                         # mlp | lff (LocalViT's locality feed-forward)
    act: str = None                         # gelu | hswish | relu6
    channel_attn: str = None                # se | eca | none (inside the LFF)
    reduction: int = None                   # SE bottleneck: expanded width / reduction
    # data
    data: str = 'synthetic'                 # synthetic | cifar10 | cifar100 | folder
    data_path: str = None
    download: bool = False                  # CIFAR: download when missing (needs internet)
    num_classes: int = None                 # keep the first K classes (sorted order)
    data_fraction: float = 1.0              # per class, the first floor(n_c * f) samples
    scale_epochs: bool = False              # with --data-fraction f: train for epochs / f
    synthetic_train: int = 2500             # synthetic data: images per epoch
    synthetic_val: int = 1000
    # optimisation (lr is per 512 images, scaled by the global batch)
    epochs: int = None
    batch_size: int = None                  # per process
    accum: int = 1                          # gradient accumulation steps
    opt: str = 'adamw'                      # adamw | sgd (Nesterov, momentum 0.9)
    lr: float = None                        # 5e-4 (DeiT); 4e-3 for the quick synthetic run
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = None
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float = None
    # regularisation and augmentation
    smoothing: float = 0.1
    mixup: float = None                     # MixUp alpha (0 = off)
    cutmix: float = None                    # CutMix alpha (0 = off); one of the two per batch
    randaug: str = None                     # "N,M" for RandAugment(N, M), or "off"
    reprob: float = None                    # random erasing probability
    crop_scale: float = None                # RandomResizedCrop's smallest area fraction
    repeated_aug: int = None                # each image seen this many times per epoch
    ema: bool = False
    ema_decay: float = 0.99996
    # patch diversification (Gong et al.): e.g. "cos=1,con=1,mix=1"; see locvit.parse_diverse
    diverse: str = None
    # running
    amp: str = None                         # bf16 | fp16 | off (default: bf16 on CUDA, off on CPU)
    compile: bool = False
    seed: int = 0
    workers: int = None
    out: str = None                         # default runs/<arch>-<data>
    resume: str = None                      # auto (OUT/last.pt if present) or a path
    eval_every: int = 1
    max_steps: int = None                   # stop after this many optimizer steps (smoke tests)
    progress: bool = True                   # tqdm bars on rank 0


# what "follow the data" means: values for the fields left at None
DATA_DEFAULTS = {
    # a few minutes on a laptop CPU: 3 short epochs, a higher learning rate, no heavy augmentation
    'synthetic': dict(img_size=32, patch_size=4, epochs=3, batch_size=64, lr=4e-3, warmup_epochs=0.3,
                      drop_path=0.0, mixup=0.0, cutmix=0.0, randaug='off', reprob=0.0,
                      crop_scale=0.5, repeated_aug=1, num_classes=10),
    # DeiT's recipe at 32 px: patch 4, milder crops, no repeated augmentation
    'cifar': dict(img_size=32, patch_size=4, epochs=300, batch_size=128, lr=5e-4, warmup_epochs=5,
                  drop_path=0.1, mixup=0.8, cutmix=1.0, randaug='2,9', reprob=0.25,
                  crop_scale=0.35, repeated_aug=1),
    # DeiT's recipe (ImageNet)
    'folder': dict(img_size=224, epochs=300, batch_size=128, lr=5e-4, warmup_epochs=5,
                   drop_path=0.1, mixup=0.8, cutmix=1.0, randaug='2,9', reprob=0.25,
                   crop_scale=0.08, repeated_aug=3),
}
MODEL_FIELDS = ('img_size', 'patch_size', 'drop_path', 'embed_dim', 'depth', 'num_heads',
                'mlp_ratio', 'local_up_to_layer', 'locality_strength', 'local_init',
                'talking_heads', 'stem_channels', 'stem_strides', 'ffn', 'act', 'channel_attn',
                'reduction')


class TrainError(Exception):
    """A problem with the run's input or state, reported as one line (no traceback)."""


def parse_config(argv=None):
    """Flags -> Config. Flags not given keep the recipe's defaults or follow the data."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = '--' + f.name.replace('_', '-')
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            kind = {'int': int, 'float': float}.get(getattr(f.type, '__name__', f.type), str)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper())
    given = vars(parser.parse_args(argv))
    cfg = Config(**given)
    if cfg.data not in ('synthetic', 'cifar10', 'cifar100', 'folder'):
        raise TrainError(f"unknown --data {cfg.data!r}; choose synthetic, cifar10, cifar100 or folder")
    for name, value in DATA_DEFAULTS[data_kind(cfg.data)].items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    check_arch(cfg, given)
    cfg.amp = cfg.amp or ('bf16' if torch.cuda.is_available() else 'off')
    if cfg.amp not in ('bf16', 'fp16', 'off'):
        raise TrainError(f"unknown --amp {cfg.amp!r}; choose bf16, fp16 or off")
    if cfg.opt not in ('adamw', 'sgd'):
        raise TrainError(f"unknown --opt {cfg.opt!r}; choose adamw or sgd")
    if not 0 < cfg.data_fraction <= 1:
        raise TrainError(f'--data-fraction must lie in (0, 1], got {cfg.data_fraction}')
    try:
        weights = locvit.parse_diverse(cfg.diverse)
    except ValueError as e:
        raise TrainError(f'--diverse: {e}') from None
    if weights['mix'] and cfg.mixup > 0:
        raise TrainError('the patch mixing loss (--diverse mix) labels every patch with one image, '
                         'which MixUp blends away; add --mixup 0 (the patch-aligned CutMix is used)')
    if cfg.scale_epochs:                    # ConViT's sample-efficiency protocol
        cfg.epochs = round(cfg.epochs / cfg.data_fraction)
    cfg.out = cfg.out or os.path.join('runs', f'{cfg.arch}-{cfg.data}')
    return cfg


def data_kind(name):
    return 'cifar' if name.startswith('cifar') else name


# ==================================================================================================
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; nccl on CUDA, gloo on CPU.
# ==================================================================================================

def setup_distributed():
    """-> (rank, world_size, device). One process when not launched by torchrun."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    # torch._dynamo (torchvision's transforms import it) keeps alive any process group that exists
    # when it is first imported, past destroy_process_group; a gloo group alive at exit now and
    # then aborts the process ("terminate called without an active exception"). Import it first.
    from torch import _dynamo  # noqa: F401
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
        local_world = int(os.environ.get('LOCAL_WORLD_SIZE', world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t):
    if is_distributed():
        dist.all_reduce(t)
    return t


# ==================================================================================================
# Data. `synthetic` (the default) draws ten kinds of shapes and textures at random positions,
# scales, rotations and colours over a cluttered background: the class is decided by a small
# local structure, not by colour or position. Each image is drawn on the fly from its index, so
# the data set is the same on every machine and costs no disk.
# ==================================================================================================

SHAPES = ('disk', 'ring', 'square', 'frame', 'triangle', 'plus', 'cross', 'diamond',
          'h-stripes', 'v-stripes')


def shape_mask(kind, u, v):
    """Inside-mask of a shape in its own coordinates (u right, v down, radius 1)."""
    a, b = u.abs(), v.abs()
    box = torch.maximum(a, b)
    if kind == 'disk':
        return u * u + v * v <= 1
    if kind == 'ring':
        return ((u * u + v * v) <= 1) & ((u * u + v * v) >= 0.4)
    if kind == 'square':
        return box <= 0.8
    if kind == 'frame':
        return (box <= 0.85) & (box >= 0.5)
    if kind == 'triangle':                  # apex up
        return (v <= 0.75) & (v >= -1 + 1.9 * a)
    if kind == 'plus':
        return ((a <= 0.28) & (b <= 0.95)) | ((b <= 0.28) & (a <= 0.95))
    if kind == 'cross':                     # the plus turned by 45 degrees
        return shape_mask('plus', (u + v) / math.sqrt(2), (u - v) / math.sqrt(2))
    if kind == 'diamond':
        return a + b <= 1
    if kind == 'h-stripes':
        return (box <= 0.85) & (torch.sin(v * 2.6 * math.pi) > 0)
    if kind == 'v-stripes':
        return (box <= 0.85) & (torch.sin(u * 2.6 * math.pi) > 0)
    raise ValueError(kind)


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


class UnreadableImage(Exception):
    pass


def read_image(path):
    """ImageFolder's loader, failing with the file's name and the fix."""
    from PIL import Image
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as e:
        raise UnreadableImage(f'cannot read image {path} ({type(e).__name__}: {e}); remove or '
                              f'replace the file') from None


def build_transforms(cfg, train):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2
    size = cfg.img_size
    steps = [v2.ToImage()]
    if train:
        steps += [v2.RandomResizedCrop(size, scale=(cfg.crop_scale, 1.0),
                                       interpolation=InterpolationMode.BICUBIC, antialias=True),
                  v2.RandomHorizontalFlip()]
        if cfg.randaug != 'off':
            n, m = (int(s) for s in cfg.randaug.split(','))
            steps.append(v2.RandAugment(num_ops=n, magnitude=m, interpolation=InterpolationMode.BILINEAR))
    elif data_kind(cfg.data) == 'folder':     # resize to size / 0.875 (256 for 224), centre crop
        steps += [v2.Resize(int(size / 0.875), interpolation=InterpolationMode.BICUBIC, antialias=True),
                  v2.CenterCrop(size)]
    else:
        steps.append(v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train and cfg.reprob > 0:
        steps.append(v2.RandomErasing(p=cfg.reprob, value='random'))
    return v2.Compose(steps)


def build_datasets(cfg):
    """-> (train set, val set, class names), with --num-classes and --data-fraction applied."""
    train, val = build_split(cfg, 'train'), build_split(cfg, 'val')
    classes = first_classes(cfg, train.classes)
    return select(train, len(classes), cfg.data_fraction), select(val, len(classes), 1.0), classes


def build_val_set(cfg):
    """-> (val set, class names): the validation data alone, as build_datasets makes it, without
    reading the training images (evaluate.py)."""
    val = build_split(cfg, 'val')
    classes = first_classes(cfg, val.classes)
    return select(val, len(classes), 1.0), classes


def build_split(cfg, split):
    """One split ('train' or 'val') of the data, with its transforms."""
    is_train = split == 'train'
    transform = build_transforms(cfg, is_train)
    if cfg.data == 'synthetic':
        return SyntheticShapes(cfg.img_size, cfg.synthetic_train if is_train else cfg.synthetic_val,
                               cfg.num_classes, cfg.seed + (not is_train), transform)
    if cfg.data.startswith('cifar'):
        return cifar(cfg, is_train, transform)
    return image_folder(cfg, split, transform)


def first_classes(cfg, classes):
    """The class names the run uses: all, or the first --num-classes (sorted order)."""
    classes = list(classes)
    if cfg.num_classes is not None and cfg.data != 'synthetic':
        if not 1 <= cfg.num_classes <= len(classes):
            raise TrainError(f'--num-classes {cfg.num_classes}: the data has {len(classes)} '
                             f'classes; choose a number from 1 to {len(classes)}')
        classes = classes[:cfg.num_classes]
    return classes


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


def cifar(cfg, train, transform):
    from torchvision import datasets
    root = cfg.data_path or 'data'
    cls = datasets.CIFAR10 if cfg.data == 'cifar10' else datasets.CIFAR100
    try:
        return cls(root, train=train, transform=transform, download=cfg.download)
    except RuntimeError as e:
        raise TrainError(f'{cfg.data} not found under {root!r} ({e}); add --download to fetch it '
                         f'(needs internet), or point --data-path at the folder that holds it') from None
    except OSError as e:                     # no network while downloading
        raise TrainError(f'could not download {cfg.data} ({e}); copy it into {root!r} '
                         f'and run without --download') from None


def image_folder(cfg, split, transform):
    from torchvision import datasets
    if not cfg.data_path:
        raise TrainError('--data folder needs --data-path DIR, a folder with train/ and val/ '
                         'holding one sub-folder of images per class')
    root = os.path.join(cfg.data_path, split)
    if not os.path.isdir(root):
        raise TrainError(f'{root!r} does not exist; --data-path must hold train/ and val/, '
                         f'each with one sub-folder of images per class')
    try:
        return datasets.ImageFolder(root, transform=transform, loader=read_image)
    except FileNotFoundError as e:          # no class folders, or a class folder without images
        raise TrainError(f'{root}: {e}; every class folder needs image files '
                         f'(.jpg, .jpeg, .png, ...)') from None


class RepeatAugSampler(Sampler):
    """Repeated augmentation (Hoffer et al.; DeiT): each image appears `repeats` times per
    epoch, the copies spread over the ranks (each under its own augmentation); the epoch keeps
    its length (len(dataset) / world_size images per rank)."""

    def __init__(self, n, world, rank, repeats=3, seed=0):
        self.n, self.world, self.rank, self.repeats, self.seed = n, world, rank, repeats, seed
        self.epoch = 0
        self.num_samples = n // world

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).repeat_interleave(self.repeats)
        return iter(order[self.rank::self.world][:self.num_samples].tolist())

    def __len__(self):
        return self.num_samples


class ShardSampler(Sampler):
    """Evaluation: rank r takes samples r, r + world, ...; nothing is padded or counted twice."""

    def __init__(self, n, world, rank):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loaders(cfg, train_set, val_set, rank, world, device):
    if cfg.repeated_aug > 1:
        sampler = RepeatAugSampler(len(train_set), world, rank, cfg.repeated_aug, cfg.seed)
    else:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    # workers restart every epoch and take their seeds from torch's generator, so a resumed run
    # (which restores that generator) draws the same augmentations as an uninterrupted one
    train = DataLoader(train_set, cfg.batch_size, sampler=sampler, drop_last=True,
                       **loader_options(cfg, device))
    val = build_val_loader(cfg, val_set, rank, world, device)
    if len(train) == 0:
        raise TrainError(f'the training set has {len(train_set)} images, fewer than one batch per '
                         f'process ({cfg.batch_size} x {world} processes); lower --batch-size')
    return train, val


def build_val_loader(cfg, val_set, rank, world, device):
    """Rank r evaluates samples r, r + world, ...: evaluate() sums the counts, exact."""
    return DataLoader(val_set, cfg.batch_size, sampler=ShardSampler(len(val_set), world, rank),
                      **loader_options(cfg, device))


def loader_options(cfg, device):
    workers = cfg.workers if cfg.workers is not None else min(8, max(1, (os.cpu_count() or 2) // 2))
    return dict(num_workers=workers, pin_memory=device.type == 'cuda')


def build_batch_mix(cfg, num_classes):
    """MixUp / CutMix on whole batches (one of the two per batch), or None."""
    from torchvision.transforms import v2
    mixes = []
    if cfg.mixup > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    return v2.RandomChoice(mixes) if mixes else None


# ==================================================================================================
# Model and optimizer: no weight decay on biases, norm / BN weights, GPSA gates, position
# embeddings and class tokens; a per-step linear warmup then a cosine decay.
# ==================================================================================================

def model_overrides(cfg):
    """The model flags that were set, as create_model overrides ("24,48" -> (24, 48))."""
    overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS if getattr(cfg, k) is not None}
    for k in ('stem_channels', 'stem_strides'):
        if k in overrides:
            try:
                overrides[k] = tuple(int(v) for v in str(overrides[k]).split(','))
            except ValueError:
                raise TrainError(f'--{k.replace("_", "-")} takes integers separated by commas, '
                                 f'e.g. 24,48,96,192; got {overrides[k]!r}') from None
    return overrides                        # channel_attn 'none' stays a string: None means 'the default'


def build_model(cfg, num_classes):
    return locvit.create_model(cfg.arch, num_classes=num_classes, **model_overrides(cfg))


def check_arch(cfg, given):
    """An unknown --arch fails here, before any data is touched. The data's default patch size
    (4 for 32 px images) applies to the ViT family; the other backbones keep their own."""
    try:
        locvit.check_model_name(cfg.arch)
    except ValueError as e:
        raise TrainError(f'--arch: {e}') from None
    options = locvit.model_options(cfg.arch)
    if 'patch_size' not in given and locvit.MODELS[cfg.arch][0] is not locvit.VisionTransformer:
        cfg.patch_size = None
    unknown = [k for k in MODEL_FIELDS if getattr(cfg, k) is not None and k not in options]
    if unknown:
        raise TrainError(f'{cfg.arch} has no option {", ".join(unknown)}')


class PatchDiversity(nn.Module):
    """A model and the patch-diversity losses (Gong et al.): forward(images, patch_labels) ->
    (logits, {'cos': ..., 'con': ..., 'mix': ...}) for the terms with a weight. The patch
    classifier of the mixing loss lives here, beside the published model."""

    def __init__(self, model, weights, num_classes):
        super().__init__()
        if not hasattr(model, 'grid') or not hasattr(model, 'patch_size'):
            raise TrainError(f'{model.arch} has no single patch grid; the patch-diversity losses '
                             f'need one (any ViT-family model: deit_*, convit_*, localvit_*, vit_*)')
        self.model, self.weights = model, {k: w for k, w in weights.items() if w > 0}
        if 'mix' in self.weights:
            self.patch_head = locvit.PatchHead(self.model.head.in_features, num_classes)

    def forward(self, images, patch_labels=None):
        tokens, layers = self.model.forward_features(images, return_layers=True)
        t = locvit.diversity_tokens(tokens, layers, self.model.grid)
        terms = {}
        if 'cos' in self.weights:
            terms['cos'] = locvit.patch_cosine_loss(t.last)
        if 'con' in self.weights:
            terms['con'] = locvit.patch_contrastive_loss(t.first, t.last)
        if 'mix' in self.weights:
            terms['mix'] = locvit.patch_mixing_loss(self.patch_head(t.out), patch_labels)
        return self.model.forward_head(tokens), terms


NO_DECAY = ('pos_embed', 'cls_token', 'relative_position_bias_table', 'patch_pos', 'pixel_pos')


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(name.endswith(k) or f'{k}' in name.split('.')[-1] for k in NO_DECAY)
        (no_decay if skip else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


def build_optimizer(cfg, model, global_batch):
    lr = cfg.lr * global_batch / 512
    groups = param_groups(model, cfg.weight_decay)
    if cfg.opt == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step, total_steps, warmup_steps, base_lr, warmup_lr, min_lr):
    """Linear warmup from warmup_lr, then cosine from base_lr to min_lr (per step)."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def autocast(cfg, device):
    if cfg.amp == 'off':
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == 'bf16' else torch.float16)


# ==================================================================================================
# The loop
# ==================================================================================================

class Schedule:
    """Where the run stands: the learning rate is a function of the optimizer step."""

    def __init__(self, cfg, steps_per_epoch, base_lr):
        self.total = cfg.epochs * steps_per_epoch
        self.warmup = int(cfg.warmup_epochs * steps_per_epoch)
        self.base_lr, self.warmup_lr, self.min_lr = base_lr, cfg.warmup_lr, cfg.min_lr
        self.step = 0

    def lr(self):
        return lr_at(self.step, self.total, self.warmup, self.base_lr, self.warmup_lr, self.min_lr)


def train_one_epoch(model, loader, optimizer, schedule, cfg, device, epoch, criterion,
                    batch_mix=None, scaler=None, ema=None, progress=None):
    """One pass over the loader; returns {'train_loss', 'img_per_s', ...}. With cfg.accum = k,
    k micro-batches make one optimizer step (DDP syncs gradients only on the last one)."""
    model.train()
    base = unwrap(model)
    diverse = base.weights if isinstance(base, PatchDiversity) else {}
    names = list(diverse)
    sums = torch.zeros(2 + len(names), device=device)    # [loss, images, each term] (x images)
    start, step_in_epoch = time.perf_counter(), 0
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        patch_labels = None
        if 'mix' in diverse:                             # CutMix on the patch grid
            images, targets, patch_labels = locvit.patch_cutmix(
                images, targets, base.patch_head.out_features, base.model.grid,
                base.model.patch_size, alpha=cfg.cutmix or 1.0)
        elif batch_mix is not None:
            images, targets = batch_mix(images, targets)
        last_micro = (i + 1) % cfg.accum == 0
        sync = model.no_sync() if is_distributed() and not last_micro and hasattr(model, 'no_sync') \
            else nullcontext()
        with sync:
            with autocast(cfg, device):
                if diverse:
                    logits, terms = model(images, patch_labels)
                    loss = criterion(logits, targets) + sum(diverse[k] * terms[k] for k in names)
                else:
                    loss, terms = criterion(model(images), targets), {}
            (scaler.scale(loss / cfg.accum) if scaler else loss / cfg.accum).backward()
        n = torch.tensor(float(len(images)), device=device)
        batch_loss = all_reduce_sum(torch.stack([loss.detach().float() * n, n] +
                                                [terms[k].detach().float() * n for k in names]))
        if not torch.isfinite(batch_loss[0]):
            raise TrainError(f'the loss became {batch_loss[0].item()} at epoch {epoch + 1}, step '
                             f'{schedule.step + 1}; {last_good_checkpoint(cfg)}; lower --lr, set '
                             f'--clip-grad 1.0 or use --amp off')
        sums += batch_loss
        if not last_micro:
            continue
        for group in optimizer.param_groups:
            group['lr'] = schedule.lr()
        if cfg.clip_grad:
            if scaler:
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(published(model))
        schedule.step += 1
        step_in_epoch += 1
        if progress is not None:
            seen = sums[1].item()
            progress.update(cfg.accum)
            progress.set_postfix(loss=f'{batch_loss[0].item() / batch_loss[1].item():.3f}',
                                 lr=f'{optimizer.param_groups[0]["lr"]:.2e}',
                                 img_s=f'{seen / (time.perf_counter() - start):.0f}')
        if cfg.max_steps and schedule.step >= cfg.max_steps:
            break
    seconds = time.perf_counter() - start
    means = (sums / sums[1].clamp(min=1)).tolist()
    return {'train_loss': means[0], **{f'loss_{k}': m for k, m in zip(names, means[2:])},
            'img_per_s': sums[1].item() / seconds, 'epoch_seconds': seconds,
            'lr': optimizer.param_groups[0]['lr']}


@torch.no_grad()
def evaluate(model, loader, device, amp='off'):
    """Top-1, top-5, loss and image count, summed exactly over the ranks."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)   # correct1, correct5, loss, count
    ctx = autocast(Config(amp=amp), device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with ctx:
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                             F.cross_entropy(logits.float(), targets, reduction='sum'),
                             torch.tensor(len(targets), device=device)]).double()
    all_reduce_sum(sums)
    c1, c5, loss, n = sums.tolist()
    return {'top1': 100 * c1 / max(n, 1), 'top5': 100 * c5 / max(n, 1), 'loss': loss / max(n, 1),
            'count': int(n)}


# ==================================================================================================
# Checkpoints: plain data only (torch.load(weights_only=True) reads them), written atomically.
# ==================================================================================================

def unwrap(model):
    """The bare module inside DDP and torch.compile wrappers (PatchDiversity stays)."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def published(model):
    """The zoo model itself, without the patch-diversity wrapper."""
    model = unwrap(model)
    return model.model if isinstance(model, PatchDiversity) else model


def save_checkpoint(path, state):
    tmp = f'{path}.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)                    # a reader sees the old file or the new one, never half


def last_good_checkpoint(cfg):
    path = os.path.join(cfg.out, 'last.pt')
    if not os.path.exists(path):
        return 'no checkpoint was written yet'
    epoch = torch.load(path, map_location='cpu', weights_only=True)['epoch']
    return f'the last good checkpoint is {path} (epoch {epoch})'


def checkpoint_state(cfg, model, optimizer, schedule, scaler, ema, epoch, best, classes):
    base, wrapper = published(model), unwrap(model)
    head = wrapper.patch_head.state_dict() if hasattr(wrapper, 'patch_head') else None
    return {'model': base.state_dict(), 'patch_head': head,
            'ema': ema.module.state_dict() if ema is not None else None,
            'ema_updates': int(ema.n_averaged) if ema is not None else 0,
            'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict() if scaler else None,
            'epoch': epoch, 'step': schedule.step, 'best_top1': best,
            'arch': cfg.arch, 'config': dataclasses.asdict(cfg), 'grid': list(getattr(base, 'grid', [])),
            'classes': list(classes),
            'rng': {'torch': torch.get_rng_state(), 'python': random.getstate(),
                    'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}


def resume_from(cfg, model, optimizer, schedule, scaler, ema, classes):
    """-> (first epoch, best top-1). --resume auto starts fresh when OUT/last.pt is absent."""
    path = os.path.join(cfg.out, 'last.pt') if cfg.resume == 'auto' else cfg.resume
    if cfg.resume == 'auto' and not os.path.exists(path):
        return 0, 0.0
    try:
        state = locvit.read_checkpoint(path)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if state.get('arch') != cfg.arch or len(state.get('classes', classes)) != len(classes):
        raise TrainError(f'{path} is a {state.get("arch")} run on {len(state.get("classes", []))} '
                         f'classes, this run is {cfg.arch} on {len(classes)}; use another --out '
                         f'or the same --arch and data')
    locvit.load_checkpoint(published(model), state)
    if hasattr(unwrap(model), 'patch_head') and state.get('patch_head'):
        unwrap(model).patch_head.load_state_dict(state['patch_head'])
    optimizer.load_state_dict(state['optimizer'])
    if scaler and state.get('scaler'):
        scaler.load_state_dict(state['scaler'])
    if ema is not None and state.get('ema') is not None:
        ema.module.load_state_dict(state['ema'])
        ema.n_averaged.fill_(state['ema_updates'])     # else the next update restarts the average
    schedule.step = state['step']
    torch.set_rng_state(state['rng']['torch'])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['rng']['python']))
    if torch.cuda.is_available() and state['rng']['cuda']:
        torch.cuda.set_rng_state_all(state['rng']['cuda'])
    return state['epoch'], state['best_top1']


# ==================================================================================================
# main
# ==================================================================================================

def main(argv=None):
    cfg = parse_config(argv)
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    train_set, val_set, classes = build_datasets(cfg)
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, rank, world, device)
    model = build_model(cfg, len(classes))
    weights = locvit.parse_diverse(cfg.diverse)
    if any(weights.values()):
        model = PatchDiversity(model, weights, len(classes))
    model = model.to(device)
    global_batch = cfg.batch_size * world * cfg.accum
    optimizer = build_optimizer(cfg, model, global_batch)
    steps_per_epoch = len(train_loader) // cfg.accum
    schedule = Schedule(cfg, steps_per_epoch, optimizer.param_groups[0]['lr'])
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == 'fp16' else None
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(published(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                            use_buffers=True)
    start_epoch, best = 0, 0.0
    if cfg.resume:
        start_epoch, best = resume_from(cfg, model, optimizer, schedule, scaler, ema, classes)
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    batch_mix = build_batch_mix(cfg, len(classes))

    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, 'config.json'), 'w') as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    log(f'{cfg.arch}: {locvit.count_params(published(model)) / 1e6:.2f}M parameters, '
        f'{cfg.data} data ({len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, '
        f'{cfg.img_size} px), {world} process(es) on {device.type}, global batch {global_batch}, '
        f'lr {schedule.base_lr:.2e}, {cfg.epochs} epochs' +
        (f', resuming after epoch {start_epoch}' if start_epoch else ''))

    from tqdm import tqdm
    total_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        bar = tqdm(total=len(train_loader), desc=f'epoch {epoch + 1}/{cfg.epochs}', leave=False,
                   dynamic_ncols=True) if rank == 0 and cfg.progress else None
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        stats = train_one_epoch(model, train_loader, optimizer, schedule, cfg, device, epoch,
                                criterion, batch_mix, scaler, ema, bar)
        if bar is not None:
            bar.close()
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            stats.update({f'val_{k}': v for k, v in
                          evaluate(published(model), val_loader, device, cfg.amp).items()})
            if ema is not None:
                stats.update({f'ema_{k}': v for k, v in
                              evaluate(ema.module, val_loader, device, cfg.amp).items()})
        stats['peak_mem_mb'] = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda'
                                else peak_rss()) / 2 ** 20
        top1 = stats.get('val_top1', -1.0)
        is_best = top1 > best
        best = max(best, top1)
        if rank == 0:
            state = checkpoint_state(cfg, model, optimizer, schedule, scaler, ema, epoch + 1, best, classes)
            save_checkpoint(os.path.join(cfg.out, 'last.pt'), state)
            if is_best:
                save_checkpoint(os.path.join(cfg.out, 'best.pt'), state)
            with open(os.path.join(cfg.out, 'log.jsonl'), 'a') as f:
                f.write(json.dumps({'epoch': epoch + 1, **stats}) + '\n')
        terms = ''.join(f'({k} {stats[f"loss_{k}"]:.3f}) ' for k in ('cos', 'con', 'mix') if f'loss_{k}' in stats)
        log(f'epoch {epoch + 1}/{cfg.epochs}  loss {stats["train_loss"]:.4f} {terms} ' +
            (f'val top-1 {top1:.2f}%  top-5 {stats["val_top5"]:.2f}%  ' if 'val_top1' in stats else '') +
            f'lr {stats["lr"]:.2e}  {stats["img_per_s"]:.0f} img/s  {stats["epoch_seconds"]:.0f} s')
        if cfg.max_steps and schedule.step >= cfg.max_steps:
            break
    minutes = (time.perf_counter() - total_start) / 60
    log(f'done: best val top-1 {best:.2f}% ({len(classes)} classes, chance {100 / len(classes):.1f}%), '
        f'{minutes:.1f} min; checkpoints in {cfg.out}/ (last.pt, best.pt), log in {cfg.out}/log.jsonl')
    if is_distributed():
        dist.destroy_process_group()
    return best


def peak_rss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_cli(main_fn, argv=None):
    """Run a script's main; input problems print one line (set LOCVIT_DEBUG=1 for a traceback)."""
    try:
        return main_fn(argv)
    except (TrainError, ValueError, UnreadableImage) as e:
        if os.environ.get('LOCVIT_DEBUG'):
            raise
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        message = message.split('UnreadableImage: ')[-1]
        rank = os.environ.get('RANK')
        print(f'error{f" (rank {rank})" if rank and os.environ.get("WORLD_SIZE", "1") != "1" else ""}: '
              f'{message}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    run_cli(main)
