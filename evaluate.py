"""Evaluate, analyse and benchmark locvit models.

  python evaluate.py --checkpoint runs/convit_t-synthetic/best.pt         # accuracy of our run
  python evaluate.py --arch convit_s --checkpoint convit_small.pth --data folder --data-path /imagenet
  torchrun --standalone --nproc_per_node=2 evaluate.py --checkpoint ...   # the same on 2 processes
  python evaluate.py --checkpoint runs/convit_t-synthetic/best.pt --analyze   # locality: tables, JSON, PNGs
  python evaluate.py --curves runs/a/log.jsonl runs/b/log.jsonl           # training curves of runs
  python evaluate.py --benchmark deit_t convit_t localvit_t               # speed and memory
  python evaluate.py --zoo                                                # params / MACs of every model

Read top to bottom:
  1. Loading     load_model: our training checkpoints (arch, options and data inside) and the
                 official releases (timm's DeiT and ConViT, LocalViT, pycls) via locvit.load_checkpoint
  2. Accuracy    train.py's data, shard sampler and evaluate(): exact under torchrun
  3. Analysis    nonlocality, gating, the over-smoothing curve, each from one real forward pass
  4. Pictures    a small PNG toolkit on PIL (colour map, labelled grids, line charts) and the
                 pictures of the analysis and of training runs
  5. Benchmark   parameters, MACs, forward and training-step speed, peak memory; timm beside ours
  6. main
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from einops import rearrange

import locvit
import train

# ==================================================================================================
# 1. Loading. Our checkpoints (train.py) name their arch and carry their config (model options,
#    data settings) and class names, so the checkpoint alone rebuilds the run. The official
#    releases hold weights only: the arch comes from the caller, the class count from the
#    classifier. Any option can be overridden, e.g. img_size (the position embedding is resized).
# ==================================================================================================


def is_training_checkpoint(obj):
    """Ours (train.checkpoint_state): it names its model and carries its config and classes."""
    return isinstance(obj, Mapping) and isinstance(obj.get('config'), Mapping) and 'arch' in obj


def check_arch(arch):
    locvit.check_model_name(arch, 'python evaluate.py --zoo lists')


def load_model(checkpoint=None, arch=None, weights='model', **overrides):
    """Build the model a checkpoint needs and load its weights: -> (model in eval mode, checkpoint).

    checkpoint: a path, or the loaded dict; None keeps the model's initial weights.
      ours (train.py): arch, model options and class count come from the checkpoint;
      official (timm DeiT / ConViT, LocalViT's {'model': ...}, pycls): `arch` names the model and
      the class count is read from the classifier.
    arch and overrides (create_model's options: img_size=384, depth=..., num_classes=...) replace
    what the checkpoint says; at another img_size the position embedding is interpolated.
    weights='ema' loads our EMA weights. A mismatch raises ValueError (what was expected, what
    was found)."""
    obj = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        obj = locvit.read_checkpoint(checkpoint)
    ours = is_training_checkpoint(obj)
    arch = arch or (obj['arch'] if ours else None)
    if arch is None:
        raise ValueError('the checkpoint does not name its model (official releases hold weights '
                         'only); say which it is with --arch, e.g. --arch convit_s')
    check_arch(arch)
    options = {}
    if ours:                                  # the run's own options (img_size, depth, ...)
        saved, allowed = obj['config'], locvit.model_options(arch)
        options = {k: v for k, v in flag_options(saved).items() if k in allowed}
    options.update({k: v for k, v in overrides.items() if v is not None})
    if obj is not None and 'num_classes' not in options:
        sd = locvit.to_our_keys(dict(locvit.unwrap_state_dict(obj, weights)))
        if 'head.weight' in sd:
            options['num_classes'] = sd['head.weight'].shape[0]
    model = locvit.create_model(arch, **options)
    if obj is not None:
        locvit.load_checkpoint(model, obj, weights)
    return model.eval(), obj


def run_config(args, checkpoint):
    """The train.Config this evaluation runs with: our checkpoint's own (arch, model options, data
    settings, seed), then the flags given. An official checkpoint keeps its architecture's sizes
    (the data's defaults, e.g. 32 px for synthetic data, do not apply to it)."""
    fields = {f.name for f in dataclasses.fields(train.Config)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    saved = dict(checkpoint['config']) if is_training_checkpoint(checkpoint) else {}
    cfg = train.Config(**{k: v for k, v in {**saved, **given}.items() if k in fields})
    cfg.arch = given.get('arch') or saved.get('arch')     # official checkpoints: --arch only
    if cfg.data not in ('synthetic', 'cifar10', 'cifar100', 'folder'):
        raise ValueError(f"unknown --data {cfg.data!r}; choose synthetic, cifar10, cifar100 or folder")
    official = checkpoint is not None and not saved
    for name, value in train.DATA_DEFAULTS[train.data_kind(cfg.data)].items():
        if getattr(cfg, name) is None and not (official and name in train.MODEL_FIELDS):
            setattr(cfg, name, value)
    if checkpoint is None:                    # the initial weights: sized as train.py sizes them
        if cfg.arch is None:
            raise ValueError('give --checkpoint PATH, or --arch NAME for a model with its '
                             'initial weights')
        check_arch(cfg.arch)
        train.check_arch(cfg, given)
    return cfg


def flag_options(values):
    """train.py's model flags (a dict, as saved in a checkpoint's config) as create_model options,
    converted as train.py converts them ("24,48,96" -> (24, 48, 96))."""
    return train.model_overrides(SimpleNamespace(**{k: values.get(k) for k in train.MODEL_FIELDS}))


def model_overrides(args, cfg, checkpoint):
    """create_model options from the flags (and, for a model without a checkpoint, the data's)."""
    source = cfg if checkpoint is None else args
    options = flag_options({k: getattr(source, k, None) for k in train.MODEL_FIELDS})
    options.pop('drop_path', None)
    return options


def check_classes(model, classes, cfg, checkpoint):
    """The data must have the classes the model classifies; a note when their names differ."""
    k = getattr(model, 'num_classes', None)
    if k is not None and k != len(classes):
        where = cfg.data if cfg.data == 'synthetic' else f'{cfg.data} {cfg.data_path}'
        fix = (f'; or keep its first {k} classes with --num-classes {k}' if len(classes) > k else '')
        raise ValueError(f'the checkpoint classifies {k} classes, the validation data ({where}) has '
                         f'{len(classes)}; evaluate it on the data it was trained on (e.g. --data '
                         f'folder --data-path IMAGENET){fix}')
    saved = checkpoint.get('classes') if is_training_checkpoint(checkpoint) else None
    if saved and list(saved) != list(classes):
        return 'note: the data names its classes differently from the checkpoint (same count)'
    return None


# ==================================================================================================
# 2. Accuracy: train.py's validation set (SPEC §5's transform: resize img/0.875, centre crop,
#    bicubic, ImageNet mean/std), its shard sampler (rank r takes samples r, r + world, ...; no
#    padding) and its evaluate() (sums over the ranks): the same counts on any number of processes.
# ==================================================================================================


def run_accuracy(args):
    checkpoint = locvit.read_checkpoint(args.checkpoint)
    cfg = run_config(args, checkpoint)
    rank, world, device = train.setup_distributed()
    if args.device and world == 1:
        device = torch.device(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        model, _ = load_model(checkpoint, cfg.arch, args.weights,
                              **model_overrides(args, cfg, checkpoint))
        cfg.img_size = model.img_size[0]
        val_set, classes = train.build_val_set(cfg)
        note = check_classes(model, classes, cfg, checkpoint)
        if note:
            log(note)
        loader = train.build_val_loader(cfg, val_set, rank, world, device)
        stats = train.evaluate(model.to(device), loader, device, AMP[args.dtype])
    finally:
        if train.is_distributed():
            torch.distributed.destroy_process_group()
    log(f'{cfg.arch}, {args.weights} weights of {args.checkpoint}: {cfg.data} data, '
        f'{len(classes)} classes, {cfg.img_size} px, {args.dtype}, {world} process(es) on '
        f'{device.type}')
    log(f'top-1 {stats["top1"]:.3f}%  top-5 {stats["top5"]:.3f}%  loss {stats["loss"]:.4f}  '
        f'({stats["count"]} images)')
    if args.out and rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'eval.json'), 'w') as f:
            json.dump({'arch': cfg.arch, 'checkpoint': args.checkpoint, 'weights': args.weights,
                       'data': cfg.data, 'img_size': cfg.img_size, **stats}, f, indent=1)
    return stats


AMP = {'fp32': 'off', 'bf16': 'bf16', 'fp16': 'fp16'}


# ==================================================================================================
# 3. Analysis (SPEC §6), for any model, from ONE real forward pass: forward pre-hooks record the
#    input each block's attention actually receives (after the block's norm1), and
#    attn.attention_map(that input, grid) gives its weights. (ConViT's reference feeds the patch
#    embedding to every layer instead, its issue #23: wrong from block 2 on.)
#
#    Nonlocality of head h in block l (ConViT, Eq. 8), in patch units:
#        D^{l,h} = (1/n) Σ_i Σ_j A^{l,h}_ij ‖δ_ij‖,   A averaged over the images first,
#    i, j the n = h*w patches and ‖δ_ij‖ the distance between patch centres. A class token has no
#    place on the grid: only patch queries and patch keys count, each patch row renormalised
#    over the patch keys (the share it gives the class token is reported separately, as
#    class_token_share). GPSA blocks have no class token: there this is Eq. 8 exactly.
#    Block numbers start at 1; block l reads layer l-1 of forward_features(return_layers=True).
# ==================================================================================================


def attention_layers(model):
    """[(block number, attention module)] of the blocks on the model's final patch grid: every
    block of the ViT family, T2T-ViT and TNT (its outer, patch-level attention); the last stage
    of PVT and Swin."""
    blocks = model.stages[-1].blocks if hasattr(model, 'stages') else model.blocks
    return [(l, getattr(b, 'outer', b).attn) for l, b in enumerate(blocks, 1)]


@torch.no_grad()
def capture_attention_inputs(model, images):
    """One forward pass -> (inputs, layers): inputs[l-1] = (x, grid), what block l's attention
    received; layers = forward_features(images, return_layers=True)'s list of layers."""
    captured = {}

    def hook(l):
        return lambda module, args: captured.__setitem__(l, (args[0].detach(), args[1]))

    handles = [attn.register_forward_pre_hook(hook(l)) for l, attn in attention_layers(model)]
    try:
        _, layers = model.forward_features(images, return_layers=True)
    finally:
        for handle in handles:
            handle.remove()
    return [captured.get(l) for l, _ in attention_layers(model)], layers


@torch.no_grad()
def attention_maps(model, inputs, average=True, chunk=16):
    """attn.attention_map on each block's captured input: per block (H, N, N), the mean over the
    images (average=False: (B, H, N, N)); None where the module has no attention_map (PVT's
    spatial-reduction and Swin's window attention)."""
    maps = []
    for (_, attn), captured in zip(attention_layers(model), inputs):
        if captured is None or not hasattr(attn, 'attention_map'):
            maps.append(None)
            continue
        x, grid = captured
        parts = [attn.attention_map(x[i:i + chunk], grid).float() for i in range(0, len(x), chunk)]
        maps.append(sum(p.sum(0) for p in parts) / len(x) if average else torch.cat(parts))
    return maps


def layer_attention_maps(model, images, average=True):
    """Every block's attention weights on its REAL input (one forward pass, hooks): a list, per
    block, of (H, N, N) averaged over the images (average=False: (B, H, N, N)), or None where
    the attention has no attention_map."""
    inputs, _ = capture_attention_inputs(model.eval(), images)
    return attention_maps(model, inputs, average)


def patch_distances(grid, device=None):
    """‖δ_ij‖ (n, n): the distance between the centres of patches i and j, in patches."""
    return locvit.relative_positions(*grid, device=device)[..., 2].sqrt()


def patch_attention(attn_map, grid):
    """The patch-query x patch-key block of an attention map (..., N, N) -> (..., n, n): the
    class token's row and column dropped, each row renormalised to sum to 1."""
    n = grid[0] * grid[1]
    if attn_map.ndim < 2 or attn_map.shape[-1] != attn_map.shape[-2] or attn_map.shape[-1] < n:
        raise ValueError(f'an attention map (..., N, N) with N >= {n} (the {grid[0]}x{grid[1]} '
                         f'patches, after any class token) was expected, got {tuple(attn_map.shape)}')
    a = attn_map[..., -n:, -n:]
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def nonlocality(attn_map, grid):
    """D_h = (1/n) Σ_i Σ_j A_h[i, j] ‖δ_ij‖ per head (H,): how far, in patches, a patch looks.
    attn_map (H, N, N), or (B, H, N, N), which is averaged over the batch first; patch queries
    x patch keys only, rows renormalised (see patch_attention)."""
    if attn_map.ndim == 4:
        attn_map = attn_map.mean(0)
    a = patch_attention(attn_map.float(), grid)
    return (a * patch_distances(grid, a.device)).sum(-1).mean(-1)


def class_token_share(attn_map, grid):
    """The mean weight patch queries give the tokens in front of the patches (the class
    token), per head (H,); None without a class token."""
    n = grid[0] * grid[1]
    if attn_map.shape[-1] == n:
        return None
    if attn_map.ndim == 4:
        attn_map = attn_map.mean(0)
    return attn_map[..., -n:, :-n].float().sum(-1).mean(-1)


def uniform_nonlocality(grid):
    """The nonlocality of uniform attention over all patches: the 'global' level."""
    return patch_distances(grid).mean().item()


def attention_kind(module):
    """'GPSA', 'MHSA' (locvit.Attention), or the module's class name (PVT's, Swin's)."""
    return {locvit.GPSA: 'GPSA', locvit.Attention: 'MHSA'}.get(type(module), type(module).__name__)


def gating(model):
    """σ(λ_h) of every GPSA head, per block: (H,), or None for the blocks without GPSA."""
    return [attn.gating_param.detach().float().sigmoid() if isinstance(attn, locvit.GPSA) else None
            for _, attn in attention_layers(model)]


def centre_patch(grid):
    return (grid[0] // 2) * grid[1] + grid[1] // 2


@torch.no_grad()
def positional_kernels(model, query=None):
    """The positional attention of every GPSA head from one query patch (default: the centre
    one), a picture of the head's "convolution kernel": [(block, (H, h, w))] for the GPSA
    blocks. It does not depend on the input."""
    grid = model.grid
    q = centre_patch(grid) if query is None else query
    return [(l, rearrange(attn.positional_attention(grid)[:, q].float(), 'H (h w) -> H h w', h=grid[0]))
            for l, attn in attention_layers(model) if isinstance(attn, locvit.GPSA)]


DEFINITIONS = {
    'nonlocality': 'per block and head: (1/n) sum_ij A_ij |delta_ij|, A the attention weights '
                   'averaged over the images, i, j the n patches, |delta_ij| the distance between '
                   'patch centres in patches; patch queries x patch keys only (a class token is '
                   'dropped and each patch row renormalised over the patch keys)',
    'nonlocality_uniform': 'the nonlocality of uniform attention over all patches',
    'class_token_share': 'per block and head: the mean attention weight a patch gives the class '
                         'token (null without one)',
    'gating': 'per GPSA block and head: sigmoid(lambda_h), the weight of the positional attention',
    'patch_similarity': 'per layer (0 = embedding, l = block l): the mean pairwise |cosine| of '
                        'the patch tokens of an image, averaged over the images (over-smoothing)',
}


@torch.no_grad()
def analyze(model, images):
    """The analysis of `model` on a batch of images (B, 3, H, W), from one forward pass: a dict
    of plain lists (JSON), one entry per block (block numbers in 'blocks'), null where a notion
    does not apply, and 'notes' saying why."""
    model.eval()
    name = getattr(model, 'arch', type(model).__name__)
    inputs, layers = capture_attention_inputs(model, images)
    maps = attention_maps(model, inputs)
    grid, blocks, gates = model.grid, attention_layers(model), gating(model)
    shares = [None if m is None else class_token_share(m, grid) for m in maps]
    nonlocal_ = [None if m is None else nonlocality(m, grid) for m in maps]
    notes = []
    if hasattr(model, 'stages'):
        notes.append(f'{name}: a pyramid; the blocks and layers here are those of its last stage '
                     f'({grid[0]}x{grid[1]} patches)')
    missing = sorted({attention_kind(a) for (_, a), m in zip(blocks, maps) if m is None})
    if missing:
        notes.append(f'{name}: {", ".join(missing)} has no attention_map: no nonlocality and no '
                     f'attention pictures')
    if all(g is None for g in gates):
        notes.append(f'{name}: no GPSA blocks: no gating values and no kernel pictures')
    return {
        'arch': name, 'grid': list(grid), 'images': len(images),
        'blocks': [l for l, _ in blocks],
        'attention': [attention_kind(a) for _, a in blocks],
        'nonlocality': [None if d is None else d.tolist() for d in nonlocal_],
        'nonlocality_mean': [None if d is None else d.mean().item() for d in nonlocal_],
        'nonlocality_uniform': uniform_nonlocality(grid),
        'class_token_share': [None if s is None else s.tolist() for s in shares],
        'gating': [None if g is None else g.tolist() for g in gates],
        'patch_similarity': locvit.patch_similarity(layers, grid).tolist(),
        'notes': notes, 'definitions': DEFINITIONS,
    }


def analysis_table(result):
    """The analysis as a Markdown table: one row per layer (0 = the embedding)."""
    per_head = lambda v: '' if v is None else ' '.join(f'{x:.2f}' for x in v)
    rows = ['| layer | attention | nonlocality (mean) | nonlocality per head | gating σ(λ) per head '
            '| class-token share | patch similarity |', '|---|---|---:|---|---|---|---:|',
            f'| 0 (embedding) | | | | | | {result["patch_similarity"][0]:.3f} |']
    for i, l in enumerate(result['blocks']):
        mean = result['nonlocality_mean'][i]
        rows.append(f'| {l} | {result["attention"][i]} | {"" if mean is None else f"{mean:.2f}"} | '
                    f'{per_head(result["nonlocality"][i])} | {per_head(result["gating"][i])} | '
                    f'{per_head(result["class_token_share"][i])} | '
                    f'{result["patch_similarity"][l]:.3f} |')
    return '\n'.join(rows)


# ==================================================================================================
# 4. Pictures. The project needs no plotting library: a few functions on PIL and torch draw a
#    colour map (a viridis-like ramp), labelled image grids and line charts with axes, ticks, a
#    legend. Charts are drawn at twice their size and scaled down, which smooths the lines.
# ==================================================================================================

VIRIDIS = [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
           (31, 158, 137), (53, 183, 121), (109, 205, 89), (253, 231, 37)]
PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
           '#bcbd22', '#17becf', '#aec7e8', '#ffbb78', '#98df8a', '#ff9896', '#c5b0d5', '#c49c94',
           '#f7b6d2', '#c7c7c7', '#dbdb8d', '#9edae5']
INK, GREY, LIGHT, GREY_HEX = (30, 30, 30), (120, 120, 120), (228, 228, 228), '#787878'


def font(size=13):
    """PIL's default font: scalable where PIL has FreeType, else its small bitmap font."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                         # Pillow < 10.1
        return ImageFont.load_default()


def text_box(text, fnt):
    from PIL import Image, ImageDraw
    left, top, right, bottom = ImageDraw.Draw(Image.new('RGB', (1, 1))).textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top, left, top


def put_text(draw, xy, text, fnt, fill=INK, align='left', valign='top'):
    """Text placed by a corner, an edge's middle or the centre (no font anchors needed)."""
    w, h, left, top = text_box(text, fnt)
    x = xy[0] - {'left': 0, 'center': w / 2, 'right': w}[align] - left
    y = xy[1] - {'top': 0, 'middle': h / 2, 'bottom': h}[valign] - top
    draw.text((x, y), text, font=fnt, fill=fill)


def wrap(text, fnt, width):
    """Split text into lines no wider than width pixels."""
    lines, line = [], ''
    for word in text.split():
        trial = f'{line} {word}'.strip()
        if line and text_box(trial, fnt)[0] > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def colormap(values, vmin=None, vmax=None):
    """values (h, w) -> uint8 RGB (h, w, 3) on a viridis-like ramp (dark blue -> yellow)."""
    v = values.detach().float().cpu()
    lo = v.min() if vmin is None else torch.tensor(float(vmin))
    hi = v.max() if vmax is None else torch.tensor(float(vmax))
    t = ((v - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1) * (len(VIRIDIS) - 1)
    i = t.floor().long().clamp(max=len(VIRIDIS) - 2)
    ramp = torch.tensor(VIRIDIS, dtype=torch.float32)
    f = (t - i)[..., None]
    return (ramp[i] * (1 - f) + ramp[i + 1] * f).round().to(torch.uint8)


def to_pil(rgb):
    """uint8 (h, w, 3) -> PIL image."""
    from torchvision.transforms.functional import to_pil_image
    return to_pil_image(rearrange(rgb, 'h w c -> c h w').contiguous())


def heatmap(values, scale, vmin=0.0, vmax=None):
    """A (h, w) map as a PIL image, each value a scale x scale square."""
    from PIL import Image
    img = to_pil(colormap(values, vmin, vmax))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def image_from_tensor(x, mean=train.IMAGENET_MEAN, std=train.IMAGENET_STD):
    """A normalised image (3, H, W) back to a PIL image."""
    x = x.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return to_pil((rearrange(x, 'c h w -> h w c').clamp(0, 1) * 255).round().to(torch.uint8))


def outline_patch(img, index, grid, colour=(255, 255, 255)):
    """Draw a box around patch `index` of a picture of the grid (in place)."""
    from PIL import ImageDraw
    sy, sx = img.height / grid[0], img.width / grid[1]
    r, c = divmod(index, grid[1])
    ImageDraw.Draw(img).rectangle([c * sx, r * sy, (c + 1) * sx - 1, (r + 1) * sy - 1],
                                  outline=colour, width=max(1, round(min(sx, sy) / 8)))
    return img


def labelled_grid(cells, row_labels=(), col_labels=(), title='', footer='', pad=8,
                  label_size=13, title_size=15):
    """cells: rows of PIL images (or None) -> one white picture with the column labels above,
    the row labels on the left, a wrapped title on top and a footer below."""
    from PIL import Image, ImageDraw
    f_label, f_title = font(label_size), font(title_size)
    cw = max(c.width for row in cells for c in row if c is not None)
    ch = max(c.height for row in cells for c in row if c is not None)
    ncols = max(len(row) for row in cells)
    left = pad + max([text_box(s, f_label)[0] for s in row_labels] + [0]) + pad
    label_h = text_box('Hg', f_label)[1]
    width = left + ncols * (cw + pad)
    title_lines = wrap(title, f_title, width - 2 * pad) if title else []
    line_h = text_box('Hg', f_title)[1] + 5
    top = pad + len(title_lines) * line_h + (label_h + pad if col_labels else 0) + pad // 2
    footer_lines = wrap(footer, f_label, width - 2 * pad) if footer else []
    height = top + len(cells) * (ch + pad) + len(footer_lines) * (label_h + 5) + pad
    out = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(title_lines):
        put_text(draw, (pad, pad + i * line_h), line, f_title)
    for j, label in enumerate(col_labels):
        put_text(draw, (left + j * (cw + pad) + cw / 2, top - pad // 2), label, f_label,
                 align='center', valign='bottom')
    for i, row in enumerate(cells):
        y = top + i * (ch + pad)
        if i < len(row_labels):
            put_text(draw, (left - pad, y + ch / 2), row_labels[i], f_label, align='right',
                     valign='middle')
        for j, cell in enumerate(row):
            if cell is not None:
                out.paste(cell, (left + j * (cw + pad) + (cw - cell.width) // 2, y))
    y = top + len(cells) * (ch + pad)
    for i, line in enumerate(footer_lines):
        put_text(draw, (pad, y + i * (label_h + 5)), line, f_label, fill=GREY)
    return out


def caption(img, text, size=12):
    """A picture with a line of small text under it."""
    from PIL import Image, ImageDraw
    fnt = font(size)
    h = text_box('Hg', fnt)[1] + 6
    out = Image.new('RGB', (img.width, img.height + h), 'white')
    out.paste(img, (0, 0))
    put_text(ImageDraw.Draw(out), (img.width / 2, img.height + 3), text, fnt, fill=GREY, align='center')
    return out


def colour_bar(width, low='0', high='max', length=240, size=12, pad=8):
    """A strip of the colour ramp labelled at both ends, on a white band `width` wide."""
    from PIL import Image, ImageDraw
    fnt = font(size)
    low_w = text_box(low, fnt)[0]
    out = Image.new('RGB', (width, 12 + 2 * pad), 'white')
    out.paste(to_pil(colormap(torch.linspace(0, 1, length)[None].expand(12, -1))), (low_w + 2 * pad, pad))
    draw = ImageDraw.Draw(out)
    put_text(draw, (pad, pad + 6), low, fnt, fill=GREY, valign='middle')
    put_text(draw, (low_w + 3 * pad + length, pad + 6), high, fnt, fill=GREY, valign='middle')
    return out


def stack(images, direction='h', pad=0):
    """Paste pictures side by side ('h') or one under the other ('v', left-aligned), on white."""
    from PIL import Image
    if direction == 'h':
        out = Image.new('RGB', (sum(i.width for i in images) + pad * (len(images) - 1),
                                max(i.height for i in images)), 'white')
        x = 0
        for img in images:
            out.paste(img, (x, 0))
            x += img.width + pad
    else:
        out = Image.new('RGB', (max(i.width for i in images),
                                sum(i.height for i in images) + pad * (len(images) - 1)), 'white')
        y = 0
        for img in images:
            out.paste(img, (0, y))
            y += img.height + pad
    return out


def nice_ticks(lo, hi, count=5, integer=False):
    """Round tick values (1, 2, 2.5 or 5 x a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]
    return ticks, step


def tick_label(v, step):
    """A tick value with as many decimals as the step needs (0.25 -> 2, 5 -> 0)."""
    decimals = 0
    while decimals < 6 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f'{v:.{decimals}f}'


def line_chart(series, title='', xlabel='', ylabel='', size=(440, 300), ylim=None, xlim=None,
               integer_x=True, legend=True):
    """A line chart as a PIL image. series: list of dicts with 'x', 'y' (lists), 'label', and
    optionally 'color', 'style' ('line', 'points' or 'dashed') and 'width'. Axes with round
    ticks and light gridlines; the legend sits right of the plot."""
    from PIL import Image, ImageDraw
    S = 2                                     # drawn at twice the size, then scaled down
    f_tick, f_label, f_title = font(11 * S), font(12 * S), font(13 * S)
    series = [dict(s, color=s.get('color') or PALETTE[i % len(PALETTE)])
              for i, s in enumerate(series) if len(s['x'])]
    xs = [x for s in series for x in s['x']] or [0, 1]
    ys = [y for s in series for y in s['y'] if y is not None and math.isfinite(y)] or [0, 1]
    x0, x1 = xlim or (min(xs), max(xs))
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if not xlim:                              # a little room so the end points clear the axes
        x0, x1 = x0 - 0.03 * (x1 - x0), x1 + 0.03 * (x1 - x0)
    y0, y1 = ylim or (min(ys), max(ys))
    if not ylim:
        span = (y1 - y0) or abs(y1) or 1.0
        y0, y1 = y0 - 0.06 * span, y1 + 0.06 * span
    yticks, ystep = nice_ticks(y0, y1)
    xticks, xstep = nice_ticks(x0, x1, count=min(10, max(1, math.ceil(x1 - x0))) if integer_x else 6,
                               integer=integer_x)          # integers: every one up to 10
    # the legend's size decides the right margin
    entries = [s for s in series if s.get('label')] if legend else []
    row_h = text_box('Hg', f_label)[1] + 8 * S
    plot_h = size[1] * S - 48 * S - 46 * S
    per_col = max(1, plot_h // row_h)
    ncol = math.ceil(len(entries) / per_col) if entries else 0
    col_w = max([text_box(s['label'], f_label)[0] for s in entries] + [0]) + 30 * S
    legend_w = ncol * col_w + (12 * S if entries else 0)
    ytext_w = max(text_box(tick_label(t, ystep), f_tick)[0] for t in yticks)
    left, top, bottom, right = ytext_w + 34 * S, 40 * S, 46 * S, 14 * S + legend_w
    W, H = size[0] * S + legend_w, size[1] * S
    img = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(img)
    px0, px1, py0, py1 = left, W - right, H - bottom, top         # plot box in pixels
    X = lambda x: px0 + (x - x0) / (x1 - x0) * (px1 - px0)
    Y = lambda y: py0 + (y - y0) / (y1 - y0) * (py1 - py0)
    for t in yticks:                          # gridlines and ticks
        if y0 - 1e-9 <= t <= y1 + 1e-9:
            draw.line([(px0, Y(t)), (px1, Y(t))], fill=LIGHT, width=S)
            put_text(draw, (px0 - 6 * S, Y(t)), tick_label(t, ystep), f_tick, GREY, 'right', 'middle')
    for t in xticks:
        if x0 - 1e-9 <= t <= x1 + 1e-9:
            draw.line([(X(t), py0), (X(t), py0 + 5 * S)], fill=GREY, width=S)
            put_text(draw, (X(t), py0 + 8 * S), tick_label(t, xstep), f_tick, GREY, 'center')
    draw.line([(px0, py1), (px0, py0), (px1, py0)], fill=GREY, width=S)
    put_text(draw, (px0, 12 * S), title, f_title)
    put_text(draw, ((px0 + px1) / 2, H - 6 * S), xlabel, f_label, GREY, 'center', 'bottom')
    if ylabel:                                # rotated: drawn on its own strip
        w, h, _, _ = text_box(ylabel, f_label)
        strip = Image.new('RGB', (w + 4, h + 8), 'white')
        put_text(ImageDraw.Draw(strip), (2, 4), ylabel, f_label, GREY)
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (6 * S, int((py0 + py1) / 2 - strip.height / 2)))
    for s in series:                          # the data, clipped to the plot box
        pts = [(X(x), Y(y)) for x, y in zip(s['x'], s['y']) if y is not None and math.isfinite(y)]
        pts = [(x, min(max(y, py1), py0)) for x, y in pts]
        style, width = s.get('style', 'line'), s.get('width', 2) * S
        if style == 'dashed':
            dash_line(draw, pts, s['color'], width, 8 * S)
        elif style == 'line' and len(pts) > 1:
            draw.line(pts, fill=s['color'], width=width, joint='curve')
        if style == 'points' or (style == 'line' and len(pts) <= 30):
            r = (2.5 if style == 'points' else 3) * S
            for x, y in pts:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=s['color'])
    for k, s in enumerate(entries):           # the legend
        cx = W - legend_w + (k // per_col) * col_w
        cy = top + (k % per_col) * row_h + row_h / 2
        if s.get('style') == 'points':
            draw.ellipse([cx + 6 * S, cy - 3 * S, cx + 12 * S, cy + 3 * S], fill=s['color'])
        elif s.get('style') == 'dashed':
            dash_line(draw, [(cx, cy), (cx + 18 * S, cy)], s['color'], 2 * S, 4 * S)
        else:
            draw.line([(cx, cy), (cx + 18 * S, cy)], fill=s['color'], width=3 * S)
        put_text(draw, (cx + 24 * S, cy), s['label'], f_label, INK, 'left', 'middle')
    return img.resize((W // S, H // S), Image.LANCZOS)


def dash_line(draw, pts, colour, width, dash):
    for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
        length = math.hypot(xb - xa, yb - ya)
        for k in range(0, int(length // dash) + 1, 2):
            t0, t1 = k * dash / max(length, 1e-9), min(1.0, (k + 1) * dash / max(length, 1e-9))
            if t0 < 1:
                draw.line([(xa + (xb - xa) * t0, ya + (yb - ya) * t0),
                           (xa + (xb - xa) * t1, ya + (yb - ya) * t1)], fill=colour, width=width)


def titled(img, title, size=15, pad=10):
    """A picture with a wrapped title above it."""
    from PIL import Image, ImageDraw
    fnt = font(size)
    lines = wrap(title, fnt, img.width - 2 * pad)
    line_h = text_box('Hg', fnt)[1] + 5
    out = Image.new('RGB', (img.width, img.height + pad + len(lines) * line_h), 'white')
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        put_text(draw, (pad, pad + i * line_h), line, fnt)
    out.paste(img, (0, pad + len(lines) * line_h))
    return out


# --- the analysis pictures --------------------------------------------------------------------------


def draw_kernels(kernels, grid, gates=None, title='', cell=112):
    """(a) Each GPSA head's positional attention from the centre patch (outlined), its
    "convolution kernel": rows = GPSA blocks, columns = heads, each map scaled to its own maximum,
    with σ(λ) under it. kernels: positional_kernels(model); gates: gating(model) or None."""
    if not kernels:
        return None
    scale = max(2, cell // max(grid))
    gate_of = dict(enumerate(gates or [], 1))            # gates[l - 1]: block l's
    rows, heads = [], max(k.shape[0] for _, k in kernels)
    for l, k in kernels:
        row = []
        for h in range(k.shape[0]):
            img = outline_patch(heatmap(k[h], scale, 0.0), centre_patch(grid), grid)
            g = gate_of.get(l)
            row.append(caption(img, f'gate {g[h]:.2f}') if g is not None else img)
        rows.append(row)
    out = labelled_grid(rows, [f'block {l}' for l, _ in kernels],
                        [f'head {h + 1}' for h in range(heads)], title,
                        footer='Colour: the attention weight, 0 (dark) to the map\'s maximum '
                               '(yellow). gate = sigmoid(lambda), the share of the positional part '
                               'in the head\'s attention.')
    return stack([out, colour_bar(out.width)], 'v')


def draw_attention(image, maps, grid, blocks, heads=9, query='auto', title='', cell=128):
    """(b) Attention over an input image: rows = blocks, columns = the image, then up to `heads`
    heads. Each map is the attention of one query — the class token (query='cls'), the centre
    patch ('centre'), or the class token where the block has one ('auto') — over the patches,
    scaled to its maximum and laid over the image (grey). maps: per block, (H, N, N) for this
    one image (layer_attention_maps(model, image[None])); blocks: the block numbers to draw."""
    from PIL import Image
    picture = image.resize((cell, cell * image.height // image.width), Image.BICUBIC)
    grey = picture.convert('L').convert('RGB')
    n, rows, labels, most = grid[0] * grid[1], [], [], 0
    for l in blocks:
        a = maps[l - 1]
        if a is None:
            continue
        has_cls = a.shape[-1] > n
        use_cls = has_cls and query in ('auto', 'cls')
        q = 0 if use_cls else a.shape[-1] - n + centre_patch(grid)
        marked = picture.copy() if use_cls else outline_patch(picture.copy(), centre_patch(grid), grid,
                                                              (255, 60, 60))
        row = [marked]
        for h in range(min(heads, a.shape[0])):
            weights = rearrange(a[h, q, -n:], '(h w) -> h w', h=grid[0])
            heat = heatmap(weights, 1, 0.0).resize(picture.size, Image.NEAREST)
            over = Image.blend(grey, heat, 0.7)
            row.append(over if use_cls else outline_patch(over, centre_patch(grid), grid, (255, 60, 60)))
        most = max(most, len(row) - 1)
        rows.append(row)
        labels.append(f'block {l} · {"class token" if use_cls else "centre patch"}')
    if not rows:
        return None
    out = labelled_grid(rows, labels, ['image'] + [f'head {h + 1}' for h in range(most)], title,
                        footer='Each map: the attention weights of one query (the class token, or '
                               'the centre patch outlined in red) over the patches, 0 (dark) to '
                               'its maximum (yellow), laid over the image.')
    return stack([out, colour_bar(out.width)], 'v')


def draw_curves(result, title=''):
    """(c) Per-layer curves of an analysis: nonlocality (mean over heads, each head a dot, and
    the level of uniform attention), gating σ(λ) per head of the GPSA blocks, and the patch
    similarity (over-smoothing). Panels whose notion does not apply are left out."""
    panels, blocks = [], result['blocks']
    have = [(l, m, h) for l, m, h in zip(blocks, result['nonlocality_mean'], result['nonlocality'])
            if m is not None]
    if have:
        dots_x = [l for l, _, h in have for _ in h]
        dots_y = [v for _, _, h in have for v in h]
        panels.append(line_chart([
            {'x': dots_x, 'y': dots_y, 'label': 'each head', 'style': 'points', 'color': '#9ab8d8'},
            {'x': [l for l, _, _ in have], 'y': [m for _, m, _ in have], 'label': 'mean over heads',
             'color': PALETTE[0]},
            {'x': [blocks[0], blocks[-1]], 'y': [result['nonlocality_uniform']] * 2,
             'label': 'uniform attention', 'style': 'dashed', 'color': GREY_HEX}],
            'Nonlocality', 'block', 'mean attention distance (patches)',
            ylim=(0, max(dots_y + [result['nonlocality_uniform']]) * 1.1)))
    gpsa = [(l, g) for l, g in zip(blocks, result['gating']) if g is not None]
    if gpsa:
        heads = len(gpsa[0][1])
        panels.append(line_chart(
            [{'x': [l for l, _ in gpsa], 'y': [g[h] for _, g in gpsa], 'label': f'head {h + 1}'}
             for h in range(heads)], 'Gates of the GPSA heads: sigmoid(lambda)', 'block',
            'positional share', ylim=(0, 1)))
    sim = result['patch_similarity']
    panels.append(line_chart([{'x': list(range(len(sim))), 'y': sim, 'label': '',
                               'color': PALETTE[3]}],
                             'Patch similarity (over-smoothing)', 'layer (0 = embedding)',
                             'mean |cosine| between patches', ylim=(0, 1), legend=False))
    return titled(stack(panels, 'h', pad=10), title) if title else stack(panels, 'h', pad=10)


# --- training curves ---------------------------------------------------------------------------------


def read_log(path):
    """The records of a train.py log.jsonl (one JSON object per epoch)."""
    if not os.path.isfile(path):
        raise ValueError(f'--curves: {path!r} not found; give the log.jsonl files of train.py runs')
    with open(path) as f:
        try:
            records = [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f'--curves: {path!r} is not a train.py log (a JSON object per line): '
                             f'{e}') from None
    if not records or not all(isinstance(r, dict) and 'epoch' in r for r in records):
        raise ValueError(f'--curves: {path!r} holds no epochs; give the log.jsonl of a train.py run')
    return records


def run_label(path, paths):
    """A short name for a run: its folder, or more of its path where two folders share a name."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    for depth in range(2, len(parts) + 1):
        label = '/'.join(parts[-depth:-1])
        others = [p for p in paths if p != path]
        if all('/'.join(os.path.normpath(os.path.abspath(o)).split(os.sep)[-depth:-1]) != label
               for o in others):
            return label
    return path


def draw_training_curves(paths, title='Training runs'):
    """Validation top-1 and training loss per epoch of one or more train.py runs (their
    log.jsonl files), one colour per run."""
    runs = [(run_label(p, paths), read_log(p)) for p in paths]
    top1 = [{'x': [r['epoch'] for r in recs if 'val_top1' in r],
             'y': [r['val_top1'] for r in recs if 'val_top1' in r], 'label': label}
            for label, recs in runs]
    loss = [{'x': [r['epoch'] for r in recs if 'train_loss' in r],
             'y': [r['train_loss'] for r in recs if 'train_loss' in r], 'label': label}
            for label, recs in runs]
    panels = [line_chart(top1, 'Validation top-1', 'epoch', 'top-1 (%)', legend=False),
              line_chart(loss, 'Training loss', 'epoch', 'loss')]
    return titled(stack(panels, 'h', pad=10), title)


# --- writing an analysis -------------------------------------------------------------------------------


def analysis_images(cfg, count):
    """`count` validation images spread evenly over the set (so over the classes): (B, 3, H, W)."""
    val_set, _ = train.build_val_set(cfg)
    count = min(count, len(val_set))
    if count < 1:
        raise ValueError('the validation data is empty; nothing to analyse')
    index = torch.linspace(0, len(val_set) - 1, count).round().long().tolist()
    return torch.stack([val_set[i][0] for i in index])


def write_analysis(model, images, out, label=''):
    """analyze() on the images; print the table and notes; save analysis.json, kernels.png,
    attention.png and layers.png (those that apply) in `out`. -> the result dict."""
    os.makedirs(out, exist_ok=True)
    result = analyze(model, images)
    name = result['arch'] + (f' ({label})' if label else '')
    grid = model.grid
    pictures = {}
    kernels = positional_kernels(model)
    pictures['kernels.png'] = draw_kernels(
        kernels, grid, gating(model),
        f'{name}: the positional attention of each GPSA head from the centre patch (outlined), its '
        f'"convolution kernel" on the {grid[0]}x{grid[1]} patch grid; each map scaled to its maximum')
    maps = layer_attention_maps(model, images[:1])
    have = [l for l, m in zip(result['blocks'], maps) if m is not None]
    chosen = sorted({have[round(k * (len(have) - 1) / 3)] for k in range(4)}) if have else []
    pictures['attention.png'] = draw_attention(
        image_from_tensor(images[0]), maps, grid, chosen,
        title=f'{name}: attention maps on a validation image, blocks {", ".join(map(str, chosen))}')
    pictures['layers.png'] = draw_curves(result, f'{name}, {len(images)} validation images')
    saved = []
    for filename, img in pictures.items():
        if img is not None:
            img.save(os.path.join(out, filename), optimize=True)
            saved.append(filename)
    result['pictures'] = saved
    with open(os.path.join(out, 'analysis.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(f'{name}: {len(images)} images, {grid[0]}x{grid[1]} patches')
    print(analysis_table(result))
    for note in result['notes']:
        print(f'note: {note}')
    print(f'saved in {out}/: analysis.json, {", ".join(saved)}')
    return result


def run_analysis(args):
    checkpoint = locvit.read_checkpoint(args.checkpoint) if args.checkpoint else None
    cfg = run_config(args, checkpoint)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model, _ = load_model(checkpoint, cfg.arch, args.weights, **model_overrides(args, cfg, checkpoint))
    cfg.img_size = model.img_size[0]
    images = analysis_images(cfg, args.analyze_images).to(device)
    if args.out:
        out = args.out
    elif args.checkpoint:
        stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
        out = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                           f'analysis-{stem}' + ('-ema' if args.weights == 'ema' else ''))
    else:
        out = os.path.join('runs', 'analysis', f'{cfg.arch}-init')
    label = (f'{args.weights} weights of {os.path.basename(args.checkpoint)}' if args.checkpoint
             else 'initial weights')
    return write_analysis(model.to(device), images, out, label)


# ==================================================================================================
# 5. Benchmark: parameters, MACs, forward images/s (inference), training-step images/s (forward,
#    backward, AdamW step), peak memory; the median of `repeats` timed runs after `warmup` untimed
#    ones. Memory is what the runs add beyond the model's weights and the input batch: on CUDA
#    max_memory_allocated, on the CPU the peak resident set size (each model in a fresh child
#    process, so one model's memory does not hide the next's). timm's models, when installed,
#    run beside ours under the same settings.
# ==================================================================================================

TIMM_NAMES = {'deit_t': 'deit_tiny_patch16_224', 'deit_s': 'deit_small_patch16_224',
              'deit_b': 'deit_base_patch16_224', 'convit_t': 'convit_tiny',
              'convit_s': 'convit_small', 'convit_b': 'convit_base'}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats, warmup):
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_bytes(field):
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux); None elsewhere."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None


def reset_peak_rss():
    """Restart VmHWM from the current RSS (Linux: /proc/self/clear_refs); False if unsupported."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def memory_mark(device):
    """The memory in use now; the peak counter restarts here."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    now = rss_bytes('VmRSS')
    if now is None or not reset_peak_rss():   # no /proc: the peak since the process started
        import resource
        now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return now


def memory_peak(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    peak = rss_bytes('VmHWM')
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def build_bench_model(name, img_size, overrides=None):
    """A zoo model, or 'timm:<name>' for timm's (with its default fused attention)."""
    if name.startswith('timm:'):
        import timm
        timm.layers.set_fused_attn(True)
        return timm.create_model(name[5:], img_size=img_size)
    return locvit.create_model(name, img_size=img_size, **(overrides or {}))


def measure(model, batch_size, img_size, device, dtype='fp32', compile=False, repeats=5, warmup=2):
    """-> {'forward', 'train': images/s, 'peak_mb': MB beyond the weights and the inputs}."""
    device = torch.device(device)
    model = model.to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run = torch.compile(model) if compile else model
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if dtype == 'bf16' else torch.float16)
           if dtype != 'fp32' else nullcontext())
    scaler = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None

    def forward():
        with torch.no_grad(), amp:
            run(x)

    def step():
        with amp:
            loss = F.cross_entropy(run(x).float(), y)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    base = memory_mark(device)
    model.eval()
    t_forward = median_time(forward, device, repeats, warmup)
    model.train()
    t_train = median_time(step, device, repeats, warmup)
    return {'forward': batch_size / t_forward, 'train': batch_size / t_train,
            'peak_mb': max(0, memory_peak(device) - base) / 2 ** 20}


def bench_one(name, args, overrides):
    """Build and measure one model in this process: -> dict of its row's numbers."""
    img_size = args.img_size or 224
    torch.manual_seed(0)
    model = build_bench_model(name, img_size, overrides)
    row = {'model': name, 'params': locvit.count_params(model)}
    if not name.startswith('timm:'):
        row['macs'] = locvit.count_macs(model)
    row.update(measure(model, args.batch_size or 32, img_size, args.device or default_device(),
                       args.dtype, args.compile, args.repeats, args.warmup))
    return row


def bench_in_child(name, args, overrides):
    """bench_one in a fresh Python process (CPU: a per-model peak RSS)."""
    cmd = [sys.executable, os.path.abspath(__file__), '--bench-child', name,
           '--batch-size', str(args.batch_size or 32), '--img-size', str(args.img_size or 224),
           '--dtype', args.dtype, '--device', args.device or default_device(),
           '--repeats', str(args.repeats), '--warmup', str(args.warmup),
           '--threads', str(torch.get_num_threads())]
    cmd += ['--compile'] if args.compile else []
    for k, v in overrides.items():
        flag = k.replace('_', '-')
        cmd += [f'--{flag}' if v is True else f'--no-{flag}'] if isinstance(v, bool) else [f'--{flag}', str(v)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or ['no output'])[-1]
        return {'model': name, 'error': why.removeprefix('error: ')}
    return json.loads(lines[-1])


def median_of_rounds(results):
    """[(ours, theirs) per round] -> (ours, theirs), each number the median over the rounds, and
    ours['ratio'][k]: the median of the per-round ours/theirs ratios. On a shared machine whose
    speed drifts, a round measures ours and timm's one after the other, so their ratio drifts
    less than either number."""
    def median(rows):
        if any('error' in r for r in rows):
            return next(r for r in rows if 'error' in r)
        return {**rows[0], **{k: statistics.median(r[k] for r in rows)
                              for k in ('forward', 'train', 'peak_mb')}}

    ours = median([o for o, _ in results])
    if results[0][1] is None:
        return ours, None
    theirs = median([t for _, t in results])
    if 'error' not in ours and 'error' not in theirs:
        ours['ratio'] = {k: statistics.median(o[k] / t[k] if t[k] else float('nan')
                                              for o, t in results)
                         for k in ('forward', 'train', 'peak_mb')}
    return ours, theirs


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def benchmark_table(names, args, argv=None):
    """Measure every model (and its timm counterpart) -> a Markdown report: the command, device,
    threads and versions, then one row per model."""
    overrides = {k: getattr(args, k) for k in train.MODEL_FIELDS
                 if k not in ('img_size', 'drop_path') and getattr(args, k, None) is not None}
    for name in names:
        check_arch(name)
    device = torch.device(args.device or default_device())
    timm_version, why_no_timm = None, ''
    if args.timm:
        try:
            import timm
            timm_version = timm.__version__
        except ImportError:
            why_no_timm = 'timm is not installed'
        if overrides:
            timm_version, why_no_timm = None, 'model options were overridden'
        elif timm_version and not any(name in TIMM_NAMES for name in names):
            timm_version, why_no_timm = None, 'no timm twin among these models'
    measure_row = bench_in_child if device.type == 'cpu' else bench_one
    rounds = [[] for _ in names]                # per model: (ours, theirs) of every round
    for _ in range(args.rounds):
        for name, results in zip(names, rounds):
            ours = measure_row(name, args, overrides)
            theirs = None
            if timm_version and name in TIMM_NAMES:
                theirs = measure_row('timm:' + TIMM_NAMES[name], args, {})
            results.append((ours, theirs))
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    rows = [median_of_rounds(results) for results in rounds]
    command = 'python evaluate.py ' + ' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    versions = f'torch {torch.__version__}' + (f', timm {timm_version}' if timm_version else '')
    lines = [f'- command: `{command}`',
             f'- device: {device.type} ({device_name(device)}), threads: {torch.get_num_threads()}; '
             f'{versions}',
             f'- {args.dtype}, batch {args.batch_size or 32}, {args.img_size or 224} px'
             f'{", torch.compile" if args.compile else ""}; images/s: the median of {args.repeats} '
             f'timed runs after {args.warmup} warm-up'
             + (f', then the median over {args.rounds} rounds (ratios: the median of the '
                f"rounds' ratios)" if args.rounds > 1 else '')
             + '; train = forward + backward + AdamW '
             f'step; peak memory beyond the weights and the input batch '
             f'({"max_memory_allocated" if device.type == "cuda" else "peak RSS, one process per model"})'
             + (f'; timm: not compared ({why_no_timm})' if args.timm and not timm_version else ''),
             '']
    fmt = lambda v, spec: '–' if v is None else format(v, spec)
    head = '| model | params (M) | GMACs | forward img/s | train img/s | peak MB |'
    rule = '|---|---:|---:|---:|---:|---:|'
    if timm_version:
        head += ' timm model | timm forward img/s | timm train img/s | timm peak MB | forward ours/timm | train ours/timm | memory ours/timm |'
        rule += '---|---:|---:|---:|---:|---:|---:|'
    lines += [head, rule]
    errors = []
    for ours, theirs in rows:
        cells = [f'`{ours["model"]}`']
        if 'error' in ours:
            errors.append(f'{ours["model"]}: {ours["error"]}')
            cells += ['failed'] + ['–'] * 4
        else:
            cells += [f'{ours["params"] / 1e6:.2f}', fmt(ours.get('macs', 0) / 1e9, '.3f'),
                      f'{ours["forward"]:.1f}', f'{ours["train"]:.1f}', f'{ours["peak_mb"]:.0f}']
        if timm_version:
            if theirs is None or 'error' in theirs or 'error' in ours:
                if theirs is not None and 'error' in theirs:
                    errors.append(f'{theirs["model"]}: {theirs["error"]}')
                cells += ['–' if theirs is None else f'`{theirs["model"][5:]}`'] + ['–'] * 6
            else:
                cells += [f'`{theirs["model"][5:]}`', f'{theirs["forward"]:.1f}',
                          f'{theirs["train"]:.1f}', f'{theirs["peak_mb"]:.0f}']
                cells += [fmt(ours['ratio'][k], '.2f') for k in ('forward', 'train', 'peak_mb')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    if errors:
        lines += [''] + [f'- failed: {e}' for e in errors]
    return '\n'.join(lines)


def zoo_table(names):
    rows = ['| model | params | GMACs |', '|---|---:|---:|']
    for name in names:
        model = locvit.create_model(name)
        rows.append(f'| `{name}` | {locvit.count_params(model):,} | '
                    f'{locvit.count_macs(model) / 1e9:.3f} |')
    return '\n'.join(rows)


# ==================================================================================================
# 6. main
# ==================================================================================================


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model and weights', "also train.py's model options: --patch-size, "
                             '--embed-dim, --depth, --num-heads, --mlp-ratio,\n'
                             '--local-up-to-layer, --locality-strength, --[no-]local-init, '
                             '--[no-]talking-heads')
    g.add_argument('--checkpoint', metavar='PATH', help="our run's last.pt / best.pt, or an official "
                   'release (timm DeiT / ConViT, LocalViT, pycls)')
    g.add_argument('--arch', help="the model (default: our checkpoint's; needed for official ones)")
    g.add_argument('--weights', choices=('model', 'ema'), default='model',
                   help='which weights of our checkpoints (default: model)')
    for name in train.MODEL_FIELDS:           # the model options train.py takes, same flags
        if name == 'drop_path':
            continue
        f = next(f for f in dataclasses.fields(train.Config) if f.name == name)
        flag = '--' + name.replace('_', '-')
        if f.type is bool or isinstance(f.default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=argparse.SUPPRESS)
        else:
            kind = {'int': int, 'float': float}.get(getattr(f.type, '__name__', f.type), str)
            g.add_argument(flag, type=kind, metavar=name.upper(),
                           help='build the model at this size (the position embedding is '
                                'resized)' if name == 'img_size' else argparse.SUPPRESS)
    g = p.add_argument_group('data (default: the checkpoint\'s)')
    g.add_argument('--data', help='synthetic | cifar10 | cifar100 | folder (train/ and val/ inside)')
    g.add_argument('--data-path', metavar='DIR')
    g.add_argument('--num-classes', type=int, metavar='K', help='keep the first K classes')
    g.add_argument('--synthetic-val', type=int, metavar='N', help='synthetic data: N images')
    g.add_argument('--seed', type=int, help=argparse.SUPPRESS)
    g.add_argument('--batch-size', type=int, metavar='B', help='per process (benchmark: 32)')
    g.add_argument('--workers', type=int, metavar='W')
    g.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                   help='autocast to bf16 / fp16 (default: fp32)')
    g.add_argument('--device', help='cpu, cuda, cuda:1 (default: cuda if available)')
    g = p.add_argument_group('analysis and pictures')
    g.add_argument('--analyze', action='store_true', help='nonlocality, gating, over-smoothing: '
                   'tables, analysis.json and PNG pictures')
    g.add_argument('--analyze-images', type=int, default=32, metavar='N',
                   help='validation images to analyse (default: 32)')
    g.add_argument('--out', metavar='DIR', help='where to save (default: next to the checkpoint, '
                   'else runs/analysis)')
    g.add_argument('--curves', nargs='+', metavar='LOG', help='draw the training curves of these '
                   "runs' log.jsonl into one PNG")
    g = p.add_argument_group('benchmark')
    g.add_argument('--benchmark', nargs='+', metavar='ARCH', help='time these models')
    g.add_argument('--compile', action='store_true', help='torch.compile the models')
    g.add_argument('--repeats', type=int, default=5, help='timed runs (the median is reported)')
    g.add_argument('--warmup', type=int, default=2, help='untimed runs first')
    g.add_argument('--rounds', type=int, default=1, help='measure every model (and its timm '
                   'twin) this many times in turn; report the medians (default: 1)')
    g.add_argument('--threads', type=int, help="CPU threads (default: torch's)")
    g.add_argument('--timm', action=argparse.BooleanOptionalAction, default=True,
                   help="compare with timm's models when timm is installed (default: on)")
    g.add_argument('--bench-child', metavar='ARCH', help=argparse.SUPPRESS)
    g.add_argument('--zoo', action='store_true', help='parameters and MACs of every model')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ('batch_size', 'analyze_images', 'repeats', 'rounds', 'img_size', 'synthetic_val',
                 'threads'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be at least 1, got {value}')
    if args.arch:
        check_arch(args.arch)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench_child:                      # one benchmark row, as JSON (run by bench_in_child)
        overrides = {k: getattr(args, k) for k in train.MODEL_FIELDS
                     if k not in ('img_size', 'drop_path') and getattr(args, k, None) is not None}
        print(json.dumps(bench_one(args.bench_child, args, overrides)))
        return None
    if args.zoo:
        print(zoo_table(locvit.list_models()))
    if args.benchmark:
        print(benchmark_table(args.benchmark, args, argv))
    if args.curves:
        out = args.out or os.path.join('runs', 'analysis')
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, 'curves.png')
        draw_training_curves(args.curves).save(path, optimize=True)
        print(f'saved {path}')
    if args.analyze:
        return run_analysis(args)
    if args.checkpoint:
        return run_accuracy(args)
    if not (args.zoo or args.benchmark or args.curves):
        raise ValueError('nothing to do: give --checkpoint PATH (accuracy), --analyze, --curves '
                         'LOG, --benchmark ARCH or --zoo (python evaluate.py -h)')
    return None


if __name__ == '__main__':
    train.run_cli(main)
