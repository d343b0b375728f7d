"""Evaluate, analyse and benchmark locvit models.

  python evaluate.py --checkpoint runs/convit_t-synthetic/best.pt         # accuracy of our run
  python evaluate.py --arch convit_s --checkpoint convit_small.pth --data folder --data-path /imagenet
  python evaluate.py --arch convit_s --pretrained --data folder --data-path /imagenet  # released weights
  torchrun --standalone --nproc_per_node=2 evaluate.py --checkpoint ...   # the same on 2 processes
  python evaluate.py --checkpoint runs/convit_t-synthetic/best.pt --analyze   # table, JSON, pictures
  python evaluate.py --curves runs/a/log.jsonl runs/b/log.jsonl           # training curves of runs
  python evaluate.py --benchmark deit_t convit_t localvit_t               # speed and memory
  python evaluate.py --zoo                           # params / MACs of every model
Sections, top to bottom: 1 loading, 2 accuracy, 3 analysis, 4 pictures, 5 benchmark, 6 main."""
import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange

import locvit
import train

# ==================================================================================================
# 1. Loading. train.py's checkpoints carry 'arch' and 'model_config', create_model's full
#    configuration: create_model(arch, **model_config) is the exact model; overrides go on top
#    (img_size=320: load_checkpoint resizes the position embeddings). Official releases hold
#    weights only: the caller names the model, and the classifier gives the class count.

NO_ARCH = 'name the model: --arch NAME (official releases hold weights only), or give --checkpoint PATH'


def is_ours(obj):
    """A train.py checkpoint: it names its model and carries create_model's configuration."""
    return isinstance(obj, Mapping) and 'arch' in obj and isinstance(obj.get('model_config'), Mapping)


def classifier_size(obj, weights='model'):
    """The class count of a checkpoint's classifier (the rows of head.weight), or None."""
    head = locvit.to_our_keys(dict(locvit.unwrap_state_dict(obj, weights))).get('head.weight')
    return None if head is None else head.shape[0]


def checkpoint_and_arch(checkpoint, arch=None):
    """-> (the checkpoint: a path is read, a dict or None stays; the model: `arch`, else the checkpoint's)."""
    obj = locvit.read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if arch and is_ours(obj) and locvit.model_name(arch) != obj['arch']:
        raise ValueError(f'the checkpoint is a {obj["arch"]} run, not {locvit.model_name(arch)}; drop --arch (our '
                         f'checkpoints name their model) or give a {locvit.model_name(arch)} checkpoint')
    arch = arch or (obj.get('arch') if isinstance(obj, Mapping) else None)
    if not arch:
        raise ValueError(NO_ARCH)
    return obj, locvit.model_name(arch)


def load_model(checkpoint=None, arch=None, weights='model', pretrained=False, **overrides):
    """-> (model in eval mode, checkpoint or None): from our checkpoint (a path or dict), an official
    one (`arch` names it), the released weights (pretrained) or the initial ones; overrides on top."""
    obj, arch = checkpoint_and_arch(checkpoint, arch)
    options = {**(obj['model_config'] if is_ours(obj) else {}), **overrides}
    if pretrained:                            # with the released classifier's class count
        if arch not in locvit.PRETRAINED:
            raise ValueError(f'{arch} has no released weights; these have: {", ".join(locvit.PRETRAINED)}')
        released = locvit.read_checkpoint(locvit.download(locvit.PRETRAINED[arch]))
        options.setdefault('num_classes', classifier_size(released))
        return locvit.create_model(arch, pretrained=True, **options).eval(), None
    if obj is not None and 'num_classes' not in options and classifier_size(obj, weights):
        options['num_classes'] = classifier_size(obj, weights)
    model = locvit.create_model(arch, **options)
    if obj is not None:
        locvit.load_checkpoint(model, obj, weights)
    return model.eval(), obj


def setup(args):
    """-> (checkpoint, the validation data's train.Config, model), the data's settings and a new
    model's size (image; patch for ViTs) as train.py makes them, after the checkpoint's and the flags."""
    checkpoint, arch = checkpoint_and_arch(args.checkpoint, args.arch)
    saved = (checkpoint.get('config') or {}) if is_ours(checkpoint) else {}
    given = {k: getattr(args, k) for k in ('data', 'data_path', 'num_classes', 'synthetic_val', 'seed',
                                           'batch_size', 'workers') if getattr(args, k, None) is not None}
    fields = {f.name for f in dataclasses.fields(train.Config)}
    cfg = train.Config(**{k: v for k, v in {**saved, **given}.items() if k in fields})
    settings = train.DATA_SETTINGS[train.data_kind(cfg.data)]
    cfg.arch = arch
    train.fill_defaults(cfg)
    overrides = train.model_overrides(argparse.Namespace(**{**vars(args), 'arch': arch}))
    if checkpoint is None and not args.pretrained:
        overrides = {**{k: getattr(cfg, k) for k in ('img_size', 'patch_size')
                        if k in settings and getattr(cfg, k) is not None}, **overrides}
    model, _ = load_model(checkpoint, arch, args.weights, args.pretrained, **overrides)
    cfg.img_size = model.img_size[0]
    return checkpoint, cfg, model


# ==================================================================================================
# 2. Accuracy: train.py's validation set, its shard sampler (rank r takes samples r, r + world,
#    ...; no padding) and its evaluate() (sums over the ranks): exact on any number of processes.

def run_accuracy(args):
    rank, world, device = train.setup_distributed()
    device = torch.device(args.device) if args.device and world == 1 else device
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        checkpoint, cfg, model = setup(args)
        val_set, classes = train.build_val_set(cfg)
        k = getattr(model, 'num_classes', None)
        if k is not None and k != len(classes):
            fix = f'; or keep its first {k} classes with --num-classes {k}' if len(classes) > k else ''
            raise ValueError(f'the checkpoint classifies {k} classes, the validation data ({cfg.data}'
                             f'{" " + cfg.data_path if cfg.data_path else ""}) has {len(classes)}; evaluate it '
                             f'on the data it was trained on (e.g. --data folder --data-path IMAGENET){fix}')
        trained_on = checkpoint.get('classes') if is_ours(checkpoint) else None
        if trained_on and list(trained_on) != list(classes):
            raise ValueError(f'the checkpoint was trained on the classes {", ".join(trained_on[:4])}, ..., the '
                             f'validation data holds {", ".join(classes[:4])}, ...; evaluate it on its own data')
        loader = train.build_val_loader(cfg, val_set, rank, world, device)
        model = locvit.fuse_batchnorm(model.to(device))     # BN folded into the convs: exact
        stats = train.evaluate(model, loader, device, {'fp32': 'off'}.get(args.dtype, args.dtype))
    finally:
        if train.is_distributed():
            torch.distributed.destroy_process_group()
    source = f'{args.weights} weights of {args.checkpoint}' if args.checkpoint else 'released weights'
    log(f'{model.arch}, {source}: {cfg.data} data, {len(classes)} classes, {cfg.img_size} px, '
        f'{args.dtype}, {world} process(es) on {device.type}')
    log(f'top-1 {stats["top1"]:.3f}%  top-5 {stats["top5"]:.3f}%  loss {stats["loss"]:.4f}  ({stats["count"]} images)')
    return stats


# ==================================================================================================
# 3. Analysis, for any model, from ONE forward pass: pre-hooks record the input each block's attention
#    really receives (ConViT's reference feeds the patch embedding to all: its issue #23). Nonlocality
#    (ConViT, Eq. 8) D = (1/n) Σ_ij A_ij ‖δ_ij‖ over the n patches, ‖δ_ij‖ in patches, A averaged over
#    the images; a class token's share is dropped (class_token_share), patch rows renormalised.

def attention_map(attn, x, grid):
    """The explicit attention weights (B, H, N, N) of module `attn` on its input x (B, N, C): the
    module's own `attention(x, grid)` (locvit.Attention: softmax(q k^T d^-1/2), talking heads mixed;
    locvit.GPSA: the paper's (1 - g_h) softmax(q k^T d^-1/2) + g_h P_h); None without one global
    map (PVT's and Swin's attention)."""
    if isinstance(attn, (locvit.GPSA, locvit.Attention)):
        return attn.attention(x, grid)
    return None


def attention_layers(model):
    """[(block from 1, attention)] on the final grid (TNT: the outer attention; PVT, Swin: last stage)."""
    blocks = model.stages[-1].blocks if hasattr(model, 'stages') else model.blocks
    return [(l, getattr(b, 'outer', b).attn) for l, b in enumerate(blocks, 1)]


@torch.no_grad()
def attention_maps(model, images, average=True, chunk=16):
    """One forward pass -> (per block: attention_map on the input its attention received, (H, N, N)
    averaged over the images (average=False: (B, H, N, N)) or None; forward_features' layers)."""
    captured, maps = {}, []
    hook = lambda l: lambda module, args: captured.__setitem__(l, (args[0].detach(), args[1]))
    handles = [attn.register_forward_pre_hook(hook(l)) for l, attn in attention_layers(model)]
    try:
        _, layers = model.eval().forward_features(images, return_layers=True)
    finally:
        for handle in handles:
            handle.remove()
    for l, attn in attention_layers(model):
        if l not in captured or not isinstance(attn, (locvit.GPSA, locvit.Attention)):
            maps.append(None)
            continue
        x, grid = captured[l]
        parts = [attention_map(attn, x[i:i + chunk], grid).float() for i in range(0, len(x), chunk)]
        maps.append(sum(p.sum(0) for p in parts) / len(x) if average else torch.cat(parts))
    return maps, layers


def layer_attention_maps(model, images, average=True):
    """Every block's attention weights on its REAL input (one forward pass): see attention_maps."""
    return attention_maps(model, images, average)[0]


def nonlocality(attn_map, grid):
    """D_h = (1/n) Σ_ij A_h[i, j] ‖δ_ij‖ per head (H,) of (B,) H, N, N maps: how far a patch looks."""
    n, a = grid[0] * grid[1], (attn_map.mean(0) if attn_map.ndim == 4 else attn_map).float()
    a = a[..., -n:, -n:] / a[..., -n:, -n:].sum(-1, keepdim=True).clamp_min(1e-12)   # patches only
    return (a * locvit.relative_positions(*grid, device=a.device)[..., 2].sqrt()).sum(-1).mean(-1)


def class_token_share(attn_map, grid):
    """The mean weight patches give the class token (the tokens before them), per head; or None."""
    n = grid[0] * grid[1]
    if attn_map.shape[-1] == n:
        return None
    return (attn_map.mean(0) if attn_map.ndim == 4 else attn_map)[..., -n:, :-n].float().sum(-1).mean(-1)


def uniform_nonlocality(grid):
    """The nonlocality of uniform attention over all patches: the 'global' level."""
    return locvit.relative_positions(*grid)[..., 2].float().sqrt().mean().item()


def gating(model):
    """σ(λ_h) of every GPSA head, per block: (H,), or None for the blocks without GPSA."""
    return [attn.gating_param.detach().float().sigmoid() if isinstance(attn, locvit.GPSA) else None
            for _, attn in attention_layers(model)]


def centre_patch(grid):
    return (grid[0] // 2) * grid[1] + grid[1] // 2


@torch.no_grad()
def positional_kernels(model, query=None):
    """[(block, (H, h, w))]: each GPSA head's positional attention from the centre patch, its kernel."""
    grid, q = model.grid, centre_patch(model.grid) if query is None else query
    return [(l, rearrange(attn.positional_attention(grid)[:, q].float(), 'H (h w) -> H h w', h=grid[0]))
            for l, attn in attention_layers(model) if isinstance(attn, locvit.GPSA)]


DEFINITIONS = {
    'nonlocality': 'per block and head: (1/n) sum_ij A_ij |delta_ij| over the n patches, A the attention '
                   'averaged over the images (a class token dropped, patch rows renormalised), |delta_ij| the '
                   'distance between patch centres in patches',
    'nonlocality_uniform': 'the nonlocality of uniform attention over all patches',
    'class_token_share': 'per block and head: the mean attention weight a patch gives the class token',
    'gating': 'per GPSA block and head: sigmoid(lambda), the weight of the positional attention',
    'patch_similarity': 'per layer (0 = embedding, l = block l): the mean pairwise |cosine| of the patch '
                        'tokens of an image, averaged over the images (over-smoothing)',
}


@torch.no_grad()
def analyze(model, images):
    """From one forward pass: plain lists (JSON) per block, null where a notion does not apply."""
    name, grid = getattr(model, 'arch', type(model).__name__), model.grid
    (maps, layers), blocks, gates = attention_maps(model, images), attention_layers(model), gating(model)
    kind = lambda a: {locvit.GPSA: 'GPSA', locvit.Attention: 'MHSA'}.get(type(a), type(a).__name__)
    nonlocal_ = [None if m is None else nonlocality(m, grid) for m in maps]
    missing = sorted({kind(a) for (_, a), m in zip(blocks, maps) if m is None})
    notes = []
    if hasattr(model, 'stages'):
        notes.append(f'{name}: a pyramid; the blocks and layers here are those of its last stage '
                     f'({grid[0]}x{grid[1]} patches)')
    if missing:
        notes.append(f'{name}: {", ".join(missing)} has no attention_map (no one global map): no '
                     f'nonlocality and no attention pictures')
    if all(g is None for g in gates):
        notes.append(f'{name}: no GPSA blocks: no gating values and no kernel pictures')
    similarity = None
    if grid[0] * grid[1] > 1:
        similarity = locvit.patch_similarity(layers, grid).tolist()
    else:
        notes.append(f'{name}: one patch on the final grid at this image size: no patch similarity')
    listed = lambda values: [None if v is None else v.tolist() for v in values]
    return {'arch': name, 'grid': list(grid), 'images': len(images), 'blocks': [l for l, _ in blocks],
            'attention': [kind(a) for _, a in blocks], 'nonlocality': listed(nonlocal_),
            'nonlocality_mean': [None if d is None else d.mean().item() for d in nonlocal_],
            'nonlocality_uniform': uniform_nonlocality(grid),
            'class_token_share': listed([None if m is None else class_token_share(m, grid) for m in maps]),
            'gating': listed(gates), 'patch_similarity': similarity,
            'notes': notes, 'definitions': DEFINITIONS}


def analysis_table(result):
    """The analysis as a Markdown table: one row per layer (0 = the embedding)."""
    heads = lambda v: '' if v is None else ' '.join(f'{x:.2f}' for x in v)
    similarity = result['patch_similarity'] or [None] * (len(result['blocks']) + 1)
    number = lambda v, digits: '' if v is None else f'{v:.{digits}f}'
    rows = ['| layer | attention | nonlocality (mean) | nonlocality per head | gating σ(λ) per head | '
            'class-token share | patch similarity |', '|---|---|---:|---|---|---|---:|',
            f'| 0 (embedding) | | | | | | {number(similarity[0], 3)} |']
    for i, l in enumerate(result['blocks']):
        rows.append(f'| {l} | {result["attention"][i]} | {number(result["nonlocality_mean"][i], 2)} | '
                    f'{heads(result["nonlocality"][i])} | {heads(result["gating"][i])} | '
                    f'{heads(result["class_token_share"][i])} | {number(similarity[l], 3)} |')
    return '\n'.join(rows)


# ==================================================================================================
# 4. Pictures on matplotlib, imported here only. Each *_figure returns a Figure (to inspect, or to
#    save_png) at 100 dpi, 8-12 inches wide. The maps of a figure share one colour scale in
#    attention-weight units, square-root spaced so that diffuse heads stay visible.

def figure(width, height, title=''):
    """An empty Figure on the Agg backend (files only: no display, no pyplot state), in inches."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError('pictures need matplotlib: pip install matplotlib') from None
    fig = Figure(figsize=(width, height), dpi=100, layout='constrained')
    FigureCanvasAgg(fig)
    fig.suptitle(textwrap.fill(title, int(width * 11)))
    return fig


def save_png(fig, path):
    """The figure as an opaque RGB PNG."""
    from PIL import Image
    fig.canvas.draw()
    rgba = Image.frombuffer('RGBA', fig.canvas.get_width_height(), fig.canvas.buffer_rgba(), 'raw', 'RGBA', 0, 1)
    rgba.convert('RGB').save(path, optimize=True)


def maps_figure(rows, grid, title, colour_label, background=None, boxed=()):
    """Rows [(label, [(title, (h, w) map)])], one colour bar; a background image (h, w, 3) first in
    each row and under every map; a red box on the centre patch in the `boxed` rows."""
    from matplotlib.colors import PowerNorm
    from matplotlib.patches import Rectangle
    cols = max(len(cells) for _, cells in rows) + (background is not None)
    cell, lines = min(1.6, 10.5 / cols), max(t.count('\n') + 1 for _, cells in rows for t, _ in cells)
    fig = figure(max(8.0, cell * cols + 1.5), (cell + 0.25 * lines) * len(rows) + 1.0, title)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    norm = PowerNorm(0.5, vmin=0.0, vmax=max(m.max().item() for _, cells in rows for _, m in cells))
    extent, (r, c) = (0, grid[1], grid[0], 0), divmod(centre_patch(grid), grid[1])
    for i, (label, cells) in enumerate(rows):
        cells = cells if background is None else [('image', None)] + cells
        for ax, (name, m) in zip(axes[i], cells):
            ax.set(title=name, xticks=[], yticks=[])
            if background is not None:
                ax.imshow(background if m is None else background.mean(-1), cmap='gray', extent=extent)
            if m is not None:
                image = ax.imshow(m.cpu().numpy(), norm=norm, extent=extent, alpha=None if background is None else 0.75)
                if i in boxed:
                    ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor='red', linewidth=1.5))
        axes[i, 0].set_ylabel(label)
        for ax in axes[i, len(cells):]:
            ax.axis('off')
    fig.colorbar(image, ax=axes, shrink=0.9, label=colour_label)
    return fig


def kernels_figure(kernels, grid, gates=None, title=''):
    """(a) rows = GPSA blocks, columns = heads (with their gate σ(λ)); None without GPSA."""
    rows = [(f'block {l}', [(f'head {h + 1}' + (f'\ngate {gates[l - 1][h]:.2f}' if gates else ''), k[h])
                            for h in range(len(k))]) for l, k in kernels]
    return maps_figure(rows, grid, title, 'positional attention weight', boxed=range(len(rows))) if rows else None


def attention_figure(image, maps, grid, blocks, heads=6, title=''):
    """(b) rows = blocks, columns = the image and `heads` heads: one query's weights (the class
    token, else the centre patch) over the image. maps: per block (H, N, N); None without."""
    n, rows, boxed = grid[0] * grid[1], [], []
    for l in [l for l in blocks if maps[l - 1] is not None]:
        a, cls = maps[l - 1].float(), maps[l - 1].shape[-1] > n
        w = rearrange(a[:heads, 0 if cls else -n + centre_patch(grid), -n:], 'H (h w) -> H h w', h=grid[0])
        boxed += [] if cls else [len(rows)]
        rows.append((f'block {l}\n' + ('class token' if cls else 'centre patch'),
                     [(f'head {h + 1}', w[h]) for h in range(len(w))]))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (train.IMAGENET_MEAN, train.IMAGENET_STD))
    picture = rearrange((image.detach().float().cpu() * std + mean).clamp(0, 1), 'c h w -> h w c').numpy()
    return maps_figure(rows, grid, title, 'attention weight', picture, boxed) if rows else None


def layers_figure(result, title=''):
    """(c) per block: nonlocality, GPSA gates, patch similarity (panels that apply)."""
    from matplotlib.ticker import MaxNLocator
    blocks, uniform = result['blocks'], result['nonlocality_uniform']
    have = [(l, h) for l, h in zip(blocks, result['nonlocality']) if h is not None]
    gpsa = [(l, g) for l, g in zip(blocks, result['gating']) if g is not None]
    fig = figure(max(8.0, 4.0 * (1 + bool(have) + bool(gpsa))), 4.4, title)
    axes = list(fig.subplots(1, 1 + bool(have) + bool(gpsa), squeeze=False)[0])
    if have:
        ax = axes.pop(0)
        ax.scatter(*zip(*[(l, v) for l, h in have for v in h]), s=14, alpha=0.35, label='each head')
        ax.plot([l for l, _ in have], [sum(h) / len(h) for _, h in have], 'o-', label='mean over heads')
        ax.axhline(uniform, color='grey', linestyle='--', label=f'uniform attention ({uniform:.2f})')
        ax.set(title='Nonlocality', xlabel='block', ylabel='mean attention distance (patches)', ylim=(0, None))
        ax.legend(fontsize=8)
    if gpsa:
        ax = axes.pop(0)
        for h in range(len(gpsa[0][1])):
            ax.plot([l for l, _ in gpsa], [g[h] for _, g in gpsa], 'o-', label=f'head {h + 1}')
        ax.set(title='Gates of the GPSA heads', xlabel='block', ylim=(0, 1),
               ylabel='gate σ(λ): share of positional attention')
        ax.legend(fontsize=8, ncol=1 + (len(gpsa[0][1]) > 6))
    if result['patch_similarity']:
        axes[0].plot(result['patch_similarity'], 'o-', color='tab:red')
    axes[0].set(title='Patch similarity (over-smoothing)', xlabel='layer (0 = embedding)',
                ylabel='mean |cosine| between patches', ylim=(0, 1))
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig


def run_labels(paths, configs):
    """Per run: its arch and the settings in which the runs differ (config.json), else its folder."""
    folder = lambda p: os.path.basename(os.path.dirname(os.path.abspath(p)))
    skip = {'arch', 'out', 'resume', 'progress', 'workers', 'download', 'data_path', 'recipe', 'base_lr', 'scale_epochs'}
    differ = sorted(k for k in set().union(*configs) - skip if len({json.dumps(c.get(k)) for c in configs if c}) > 1)
    labels = [' '.join([c['arch']] + [f'{k}={c[k]}' for k in differ if c.get(k) is not None])
              if c.get('arch') else folder(p) for p, c in zip(paths, configs)]
    return [f'{s} ({folder(p)})' if labels.count(s) > 1 else s for s, p in zip(labels, paths)]


def curves_figure(paths, title='Training runs'):
    """Validation top-1 (chance level dashed) and training loss per epoch of train.py runs."""
    from matplotlib.ticker import MaxNLocator
    logs, configs = [], []
    for path in paths:                        # a log.jsonl: one JSON object per epoch
        try:
            logs.append([json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()])
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f'--curves: {path!r} is not a train.py log.jsonl ({e})') from None
        if not logs[-1] or not all(isinstance(r, dict) and 'epoch' in r for r in logs[-1]):
            raise ValueError(f'--curves: {path!r} holds no epochs; give the log.jsonl of a train.py run')
        config = os.path.join(os.path.dirname(os.path.abspath(path)), 'config.json')
        configs.append(json.loads(pathlib.Path(config).read_text()) if os.path.isfile(config) else {})
    fig = figure(11, 4.8, title)
    top1, loss = fig.subplots(1, 2)
    for i, (records, label) in enumerate(zip(logs, run_labels(paths, configs))):
        for ax, key in ((top1, 'val_top1'), (loss, 'train_loss')):
            x, y = [r['epoch'] for r in records if key in r], [r[key] for r in records if key in r]
            ax.plot(x, y, marker='o' if len(x) <= 30 else None, markersize=3, color=f'C{i % 10}',
                    label=label if ax is top1 else None)
    for k in sorted({c['num_classes'] for c in configs if c.get('num_classes')}):
        top1.axhline(100 / k, color='grey', linestyle='--', label=f'chance ({100 / k:.3g}%, {k} classes)')
    top1.set(title='Validation top-1', xlabel='epoch', ylabel='top-1 accuracy (%)')
    loss.set(title='Training loss', xlabel='epoch', ylabel='loss')
    for ax in (top1, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    longest = max(len(line.get_label()) for line in top1.get_lines())
    fig.legend(loc='outside lower center', ncol=max(1, min(len(top1.get_lines()), 150 // (longest + 8))))
    return fig


def write_analysis(model, images, out, label=''):
    """analyze(); print the table; save analysis.json and the pictures that apply in `out`."""
    result = analyze(model, images)
    name, grid = result['arch'] + (f' ({label})' if label else ''), model.grid
    maps = layer_attention_maps(model, images[:1])
    have = [l for l, m in zip(result['blocks'], maps) if m is not None]
    chosen = sorted({have[round(k * (len(have) - 1) / 3)] for k in range(4)}) if have else []
    figures = {                               # all drawn before anything is written
        'kernels.png': kernels_figure(positional_kernels(model), grid, gating(model), f'{name}: positional '
                                      f'attention of each GPSA head from the centre patch (red box), its '
                                      f'"convolution kernel" on the {grid[0]}x{grid[1]} patch grid'),
        'attention.png': attention_figure(images[0], maps, grid, chosen, title=f'{name}: attention on a '
                                          f'validation image, blocks {", ".join(map(str, chosen))}'),
        'layers.png': layers_figure(result, f'{name}, {len(images)} validation images')}
    os.makedirs(out, exist_ok=True)
    result['pictures'] = [f for f, fig in figures.items() if fig is not None]
    for filename in result['pictures']:
        save_png(figures[filename], os.path.join(out, filename))
    pathlib.Path(out, 'analysis.json').write_text(json.dumps(result, indent=1))
    print(f'{name}: {len(images)} images, {grid[0]}x{grid[1]} patches\n{analysis_table(result)}')
    print(''.join(f'note: {note}\n' for note in result['notes']) + f'saved in {out}/: analysis.json, '
          f'{", ".join(result["pictures"])}')
    return result


def run_analysis(args):
    _, cfg, model = setup(args)
    val_set, _ = train.build_val_set(cfg)     # images spread evenly over the set (the classes)
    index = torch.linspace(0, len(val_set) - 1, min(args.analyze_images, len(val_set))).round().long()
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    images = torch.stack([val_set[i][0] for i in index.tolist()]).to(device)
    if args.checkpoint:
        stem = os.path.splitext(os.path.basename(args.checkpoint))[0] + ('-ema' if args.weights == 'ema' else '')
        out = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f'analysis-{stem}')
        label = f'{args.weights} weights of {os.path.basename(args.checkpoint)}'
    else:
        out = os.path.join('runs', 'analysis', f'{model.arch}-{"pretrained" if args.pretrained else "init"}')
        label = 'released weights' if args.pretrained else 'initial weights'
    return write_analysis(model.to(device), images, args.out or out, label)


# ==================================================================================================
# 5. Benchmark: parameters, MACs, forward (eval, BatchNorms folded) and training-step images/s, each
#    from torch.utils.benchmark's blocked_autorange (the median per call; it synchronises CUDA and
#    sets the threads); peak memory beyond weights and inputs; timm's twins (locvit.ALIASES) beside.

def workloads(model, batch_size, img_size, device, dtype='fp32', compile=False):
    """-> (forward, step) on a random batch on a torch.device: inference (BN folded), a training step
    as train.py runs it (the LFF's recomputation on)."""
    model = model.to(device)
    fused = locvit.fuse_batchnorm(copy.deepcopy(model))     # inference: BN folded into the convs
    train.recompute_lff(model)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, getattr(model, 'num_classes', 1000), (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.train().parameters(), lr=1e-4)
    infer, learn = (torch.compile(fused), torch.compile(model)) if compile else (fused, model)
    low = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(dtype)
    amp = lambda: torch.autocast(device.type, dtype=low) if low else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == 'fp16')

    def forward():
        with torch.no_grad(), amp():
            infer(x)

    def step():
        with amp():
            loss = F.cross_entropy(learn(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return forward, step


def peak_memory(device, reset=False):
    """Bytes: the peak since the last reset (reset=True restarts it from what is in use now): CUDA's
    max_memory_allocated, or on the CPU this process's peak RSS (VmHWM, reset via clear_refs)."""
    if device.type == 'cuda':
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device)
    try:
        if reset:
            pathlib.Path('/proc/self/clear_refs').write_text('5')
        status = pathlib.Path('/proc/self/status').read_text().splitlines()
        return int(next(line for line in status if line.startswith('VmHWM:')).split()[1]) * 1024
    except OSError:                           # no /proc: the peak since the process started
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_one(name, overrides, img_size, batch_size, device, dtype, compile, min_run_time, warmup, threads):
    """Build and measure one model ('timm:<name>': timm's) in this process: -> its row, images/s and
    the peak memory beyond the weights and the input batch."""
    from torch.utils import benchmark
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if name.startswith('timm:'):              # timm's model: no MACs counted
        import timm
        model, row = timm.create_model(name[5:], img_size=img_size), {}
    else:
        model = locvit.create_model(name, img_size=img_size, **overrides)
        row = {'macs': locvit.count_macs(model)}
    device = torch.device(device)
    forward, step = workloads(model, batch_size, img_size, device, dtype, compile)
    base = peak_memory(device, reset=True)
    for key, fn in (('forward', forward), ('train', step)):
        for _ in range(warmup):               # compilation, autotuning, the optimizer's state
            fn()
        timer = benchmark.Timer('fn()', globals={'fn': fn}, num_threads=torch.get_num_threads())
        row[key] = batch_size / timer.blocked_autorange(min_run_time=min_run_time).median
    return {'model': name, 'params': locvit.count_params(model), **row,
            'peak_mb': max(0, peak_memory(device) - base) / 2 ** 20}


def bench_in_child(spec):
    """bench_one in a fresh Python process (on the CPU: a process's peak RSS never goes down, so only
    a fresh process per model measures that model's peak)."""
    code = 'import json, sys, evaluate; print(json.dumps(evaluate.bench_one(**json.loads(sys.argv[1]))))'
    result = subprocess.run([sys.executable, '-c', code, json.dumps(spec)], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {'model': spec['name'], 'error': (result.stderr.strip().splitlines() or ['no output'])[-1]}
    return json.loads(lines[-1])


KEYS = ('forward', 'train', 'peak_mb')


def median_of_rounds(pairs):
    """[(ours, timm's or None) per round] -> the medians of each over the rounds (a failure: the first);
    ours['ratio']: the median of the rounds' own ours/timm ratios (a round measures both one after the
    other: on a drifting machine, it drifts less)."""
    median = lambda rows: next((r for r in rows if 'error' in r), None) or {
        **rows[0], **{k: statistics.median(r[k] for r in rows) for k in KEYS}}
    ours = median([o for o, _ in pairs])
    if pairs[0][1] is None:
        return ours, None
    theirs = median([t for _, t in pairs])
    if 'error' not in ours and 'error' not in theirs:
        ours['ratio'] = {k: statistics.median(o[k] / t[k] if t[k] else float('nan') for o, t in pairs) for k in KEYS}
    return ours, theirs


def benchmark_table(names, args, argv=None):
    """Measure every model and its timm twin, R rounds in turn -> a Markdown report (the command,
    device and versions, then the table; each ours/timm ratio is the median of the rounds' ratios)."""
    names, twins = [locvit.model_name(n) for n in names], {o: t for t, o in locvit.ALIASES.items()}
    overrides = {n: {k: v for k, v in train.model_overrides(argparse.Namespace(**{**vars(args), 'arch': n}))
                     .items() if k not in ('img_size', 'drop_path')} for n in names}
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    timm = args.timm and importlib.util.find_spec('timm') is not None and not any(overrides.values())
    img_size, batch_size = getattr(args, 'img_size', None) or 224, args.batch_size or 32
    spec = dict(img_size=img_size, batch_size=batch_size, device=str(device), dtype=args.dtype, compile=args.compile,
                min_run_time=args.min_run_time, warmup=args.warmup, threads=torch.get_num_threads())
    run = bench_in_child if device.type == 'cpu' else lambda spec: bench_one(**spec)
    pairs = {n: [] for n in names}            # per model: (ours, timm's or None) of every round
    for _ in range(args.rounds):
        for n in names:
            twin = run({**spec, 'name': f'timm:{twins[n]}', 'overrides': {}}) if timm and n in twins else None
            pairs[n].append((run({**spec, 'name': n, 'overrides': overrides[n]}), twin))
    processor = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()
    lines = [f'- command: `python evaluate.py {" ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))}`',
             f'- device: {device.type} ({processor}), threads: {torch.get_num_threads()}; torch {torch.__version__}'
             + (f', timm {__import__("timm").__version__}' if timm else ''),
             f'- {args.dtype}, batch {batch_size}, {img_size} px{", torch.compile" if args.compile else ""}; images/s: '
             f'batch / the median time per call (torch.utils.benchmark: {args.min_run_time:g} s of timed calls after {args.warmup} warm-up; '
             f'the median of {args.rounds} round(s)); forward: eval mode, BatchNorms folded; train: forward, '
             f'backward, AdamW step; peak memory beyond the weights and the input (CUDA: max_memory_allocated; '
             f'CPU: peak RSS, a process per model); TFLOP/s: 6 FLOPs per MAC and image',
             '', '| model | params (M) | GMACs | forward img/s | train img/s | peak MB | train TFLOP/s |'
             + (' timm forward img/s | timm train img/s | timm peak MB | ours/timm: forward | train | memory |' if timm else ''),
             '|---|---:|---:|---:|---:|---:|---:|' + ('---:|' * 6 if timm else '')]
    errors = []
    for n in names:
        ours, theirs = median_of_rounds(pairs[n])
        errors += [f'{r["model"]}: {r["error"]}' for r in (ours, theirs) if r and 'error' in r]
        if 'error' in ours:
            lines.append(f'| `{n}` | failed |')
            continue
        cells = [f'`{n}`', f'{ours["params"] / 1e6:.2f}', f'{ours["macs"] / 1e9:.3f}', f'{ours["forward"]:.1f}',
                 f'{ours["train"]:.1f}', f'{ours["peak_mb"]:.0f}', f'{6 * ours["macs"] * ours["train"] / 1e12:.3g}']
        if 'ratio' in ours:
            cells += [f'{theirs["forward"]:.1f}', f'{theirs["train"]:.1f}', f'{theirs["peak_mb"]:.0f}',
                      *(f'{ours["ratio"][k]:.2f}' for k in KEYS)]
        elif timm:
            cells += ['–'] * 6
        lines.append('| ' + ' | '.join(cells) + ' |')
    if errors:
        lines += [''] + [f'- failed: {e}' for e in errors]
    return '\n'.join(lines)


# ==================================================================================================
# 6. main

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model and weights')
    g.add_argument('--checkpoint', metavar='PATH', help="our run's last.pt / best.pt (it names its model), "
                   'or an official release (weights only: add --arch)')
    g.add_argument('--arch', metavar='NAME', help="the model (default: our checkpoint's); timm's names work too")
    g.add_argument('--pretrained', action='store_true', help="the released weights of --arch, downloaded "
                   "once into torch hub's cache (default: off)")
    g.add_argument('--weights', choices=('model', 'ema'), default='model',
                   help="our checkpoint's model or EMA weights (default: model)")
    train.add_flags(p.add_argument_group('model options', "train.py's model flags, on top of the "
                                               "checkpoint's (default: the checkpoint's, else the published)"),
                    train.model_flags())
    g = p.add_argument_group('data', "train.py's data flags (default: our checkpoint's, else train.py's)")
    train.add_flags(g, ('data', 'data_path', 'num_classes', 'synthetic_val', 'seed', 'workers'))
    g.add_argument('--batch-size', type=int, metavar='B', help="per process (default: the data's; benchmark: 32)")
    g.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                   help='autocast to bf16 / fp16 (default: fp32)')
    g.add_argument('--device', help="cpu, cuda, cuda:1 (default: cuda if available; torchrun: each rank's)")
    g = p.add_argument_group('analysis and pictures (pictures need matplotlib)')
    g.add_argument('--analyze', action='store_true', help='nonlocality, gating, over-smoothing: a table, '
                   'analysis.json and PNG pictures')
    g.add_argument('--analyze-images', type=int, default=32, metavar='N', help='images to analyse (default: 32)')
    g.add_argument('--out', metavar='DIR', help='where to save (default: next to the checkpoint, else '
                   'runs/analysis)')
    g.add_argument('--curves', nargs='+', metavar='LOG', help="draw these train.py runs' log.jsonl into OUT/curves.png")
    g = p.add_argument_group('benchmark')
    g.add_argument('--benchmark', nargs='+', metavar='ARCH', help='time these models (default size: 224 px)')
    g.add_argument('--compile', action='store_true', help='torch.compile the models (default: off)')
    g.add_argument('--min-run-time', type=float, default=1.0, metavar='S', help='seconds of timed calls per '
                   'measurement (default: 1)')
    g.add_argument('--warmup', type=int, default=2, metavar='N', help='untimed calls first (default: 2)')
    g.add_argument('--rounds', type=int, default=1, metavar='R', help='measure every model and its timm twin '
                   'R times in turn; report the medians (default: 1)')
    g.add_argument('--threads', type=int, metavar='T', help="CPU threads (default: torch's)")
    g.add_argument('--timm', action=argparse.BooleanOptionalAction, default=True, help="vs. timm's twins (default: on)")
    g.add_argument('--zoo', action='store_true', help='parameters and MACs of every model')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ('batch_size', 'analyze_images', 'rounds', 'img_size', 'synthetic_val', 'threads'):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be at least 1, got {getattr(args, flag)}')
    if args.warmup < 0 or args.min_run_time <= 0:
        raise ValueError('--warmup must be at least 0 and --min-run-time above 0')
    args.arch = args.arch and locvit.model_name(args.arch)
    if args.pretrained and (args.checkpoint or not args.arch):
        raise ValueError(f'--pretrained needs --arch and no --checkpoint; released: {", ".join(locvit.PRETRAINED)}')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.zoo:
        print('| model | params | GMACs |\n|---|---:|---:|\n' + '\n'.join(
            f'| `{n}` | {locvit.count_params(m):,} | {locvit.count_macs(m) / 1e9:.3f} |'
            for n, m in ((n, locvit.create_model(n)) for n in locvit.list_models())))
    if args.benchmark:
        print(benchmark_table(args.benchmark, args, argv))
    if args.curves:
        fig, out = curves_figure(args.curves), args.out or os.path.join('runs', 'analysis')
        os.makedirs(out, exist_ok=True)
        save_png(fig, os.path.join(out, 'curves.png'))
        print(f'saved {os.path.join(out, "curves.png")}')
    if args.analyze:
        return run_analysis(args)
    if args.checkpoint or args.pretrained:
        return run_accuracy(args)
    if not (args.zoo or args.benchmark or args.curves):
        raise ValueError('nothing to do: give --checkpoint PATH (accuracy), --analyze, --curves LOG, '
                         '--benchmark ARCH or --zoo (python evaluate.py -h)')
    return None


if __name__ == '__main__':
    train.run_cli(main)
