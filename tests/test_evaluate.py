"""evaluate.py: official and our checkpoints load through the command line's path and give the
reference logits, ours from the checkpoint alone, released weights through --pretrained; accuracy
is exact on any number of processes; the analysis measures what it says, from each block's real
input, with the paper's explicit attention; pictures are readable (800 px and more, numeric colour
bars, a chance line); JSON and the benchmark table are made; bad input gets one clear line."""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import evaluate
import locvit
import train
from conftest import ROOT, fixture
from test_backbones import FIXTURE_MODELS
from test_checkpoints import FIXTURES

REFERENCE_FIXTURES = {**FIXTURES, **FIXTURE_MODELS}      # fixture -> (arch, overrides)
TINY_CONVIT = ['--arch', 'convit_t', '--depth', '3', '--embed-dim', '48', '--num-heads', '4',
               '--local-up-to-layer', '2']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec('matplotlib') is None,
                                      reason='pictures need matplotlib')


def released_layout(name, state_dict):
    """The file layout each reference was released in: pycls {'model_state': ...}, LocalViT
    (and its PVT, Swin, TNT, T2T) {'model': ...}, timm a bare state dict."""
    if name.startswith('vit_'):
        return {'model_state': state_dict}
    if name in ('deit', 'convit', 'convit_h9'):
        return state_dict
    return {'model': state_dict}


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A tiny ConViT trained for a few steps by train.py (with EMA), validated on 101 images."""
    out = tmp_path_factory.mktemp('run')
    result = subprocess.run(
        [sys.executable, 'train.py', *TINY_CONVIT, '--epochs', '1', '--max-steps', '8',
         '--synthetic-train', '256', '--synthetic-val', '101', '--batch-size', '32', '--ema',
         '--ema-decay', '0.5', '--workers', '0', '--no-progress', '--out', str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def accuracy_line(text):
    m = re.search(r'top-1 ([\d.]+)%  top-5 ([\d.]+)%  loss ([\d.]+)  \((\d+) images\)', text)
    assert m, text
    return float(m[1]), float(m[2]), float(m[3]), int(m[4])


# --------------------------------------------------------------------------------------------------
# Loading: the official releases' files give the reference implementations' logits
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(REFERENCE_FIXTURES))
def test_released_checkpoints_give_the_reference_logits(name, tmp_path):
    fx = fixture(name)
    arch, overrides = REFERENCE_FIXTURES[name]
    torch.save(released_layout(name, fx['state_dict']), tmp_path / f'{name}.pth')
    model, _ = evaluate.load_model(str(tmp_path / f'{name}.pth'), arch, **overrides)
    assert not model.training and model.num_classes == 10      # read from the classifier
    x = fx['input'].flip(1) if name.startswith('vit_') else fx['input']    # pycls: BGR in, ours: RGB
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(tokens), fx['logits'], atol=1e-5, rtol=1e-4)
        if 'final_tokens' in fx:
            torch.testing.assert_close(tokens, fx['final_tokens'], atol=1e-5, rtol=1e-4)


def test_a_released_checkpoint_on_the_command_line(tmp_path, capsys):
    """timm's DeiT layout, no arch inside: --arch and the model's options from the flags; the
    image size follows the model (not the synthetic data's default)."""
    torch.save(fixture('deit')['state_dict'], tmp_path / 'deit.pth')
    stats = evaluate.main(['--checkpoint', str(tmp_path / 'deit.pth'), '--arch', 'deit_t',
                           '--embed-dim', '24', '--depth', '3', '--num-heads', '3', '--img-size',
                           '32', '--patch-size', '4', '--synthetic-val', '15', '--workers', '0'])
    assert stats['count'] == 15 and 0 <= stats['top1'] <= 100
    assert 'deit_t, model weights of' in capsys.readouterr().out


def test_our_checkpoint_alone_rebuilds_the_run_and_another_resolution_loads(tiny_run, capsys):
    model, ckpt = evaluate.load_model(tiny_run / 'last.pt')
    assert model.arch == 'convit_t' and len(model.blocks) == 3 and model.grid == (8, 8)
    ema, _ = evaluate.load_model(tiny_run / 'last.pt', weights='ema')
    assert not torch.equal(ema.head.weight, model.head.weight)
    bigger, _ = evaluate.load_model(tiny_run / 'last.pt', img_size=48)   # 12 x 12 patches
    assert bigger.pos_embed.shape[1] == 144
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.isfinite(bigger(x)).all()
    assert bigger.blocks[0].attn.positional_attention(bigger.grid).shape == (4, 144, 144)   # GPSA


def test_a_checkpoint_with_a_conv_stem_and_the_locality_ffn_rebuilds_from_its_config(tmp_path, capsys):
    """train.py saves the flags as given ("12,24", "none"); loading converts them as train.py does."""
    train.main(['--arch', 'convit_t', '--depth', '2', '--local-up-to-layer', '1', '--embed-dim', '48',
                '--stem-channels', '12,24', '--stem-strides', '2,2', '--ffn', 'lff',
                '--channel-attn', 'none', '--epochs', '1', '--max-steps', '1', '--synthetic-train', '32',
                '--synthetic-val', '8', '--batch-size', '16', '--workers', '0', '--no-progress',
                '--out', str(tmp_path)])
    model, _ = evaluate.load_model(tmp_path / 'last.pt')
    assert isinstance(model.patch_embed, locvit.ConvStem) and model.grid == (8, 8)
    assert isinstance(model.blocks[0].lff.se, torch.nn.Identity)      # channel_attn "none"
    stats = evaluate.main(['--checkpoint', str(tmp_path / 'last.pt'), '--workers', '0'])
    assert stats['count'] == 8
    assert evaluate.main(['--arch', 'deit_t', '--depth', '1', '--stem-channels', '12,24',
                          '--analyze', '--analyze-images', '2', '--out', str(tmp_path / 'a')])


def test_our_checkpoint_rebuilds_from_its_model_config_alone(tmp_path, capsys):
    """A checkpoint as train.py writes it: 'model_config' is create_model's full configuration
    (here: a conv stem, the LFF with ReLU6 and a 5x5 depthwise kernel, 2 blocks); nothing is
    re-derived from train.py's flags in 'config' (which here say something else)."""
    model = locvit.create_model('localvit_t', num_classes=10, img_size=32, patch_size=4, embed_dim=32,
                                depth=2, num_heads=2, conv_stem=dict(channels=(8, 16)),
                                lff=dict(act='relu6', kernel_size=5, reduction=4))
    with torch.no_grad():
        for m in model.modules():                         # BatchNorms with statistics: fusing counts
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    grids = {k: list(g) for k, (_, g) in model.pos_embed_grids().items()}
    config = dict(dataclasses.asdict(train.Config()), data='synthetic', img_size=32,
                  num_classes=10, synthetic_val=12, depth=7, embed_dim=96, ffn='mlp')   # not the model's
    torch.save({'model': model.state_dict(), 'ema': None, 'arch': 'localvit_t',
                'model_config': model.config, 'config': config, 'classes': list(train.SHAPES),
                'grids': grids, 'epoch': 3, 'best_top1': 12.5}, tmp_path / 'last.pt')
    loaded, ckpt = evaluate.load_model(tmp_path / 'last.pt')
    assert loaded.config == model.config and ckpt['epoch'] == 3
    assert isinstance(loaded.patch_embed, locvit.ConvStem) and len(loaded.blocks) == 2
    assert loaded.blocks[0].lff.dwconv.kernel_size == (5, 5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    bigger, _ = evaluate.load_model(tmp_path / 'last.pt', img_size=48)     # an override on top
    assert bigger.grid == (12, 12) and bigger.blocks[0].lff.dwconv.kernel_size == (5, 5)
    stats = evaluate.main(['--checkpoint', str(tmp_path / 'last.pt'), '--workers', '0'])
    assert stats['count'] == 12                                         # the saved data settings
    assert 'localvit_t, model weights of' in capsys.readouterr().out


def test_pretrained_evaluates_the_released_weights(tmp_path, monkeypatch, capsys):
    """--pretrained: create_model(arch, pretrained=True) downloads locvit.PRETRAINED[arch] (here a
    file:// URL) into torch hub's cache and evaluates it, with the released classifier's class
    count; the numbers are those of the same file given as --checkpoint."""
    torch.save(fixture('deit')['state_dict'], tmp_path / 'deit_tiny_released.pth')   # timm's layout
    monkeypatch.setitem(locvit.PRETRAINED, 'deit_t', (tmp_path / 'deit_tiny_released.pth').as_uri())
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    flags = ['--arch', 'deit_t', '--embed-dim', '24', '--depth', '3', '--num-heads', '3',
             '--img-size', '32', '--patch-size', '4', '--synthetic-val', '15', '--workers', '0']
    released = evaluate.main(['--pretrained', *flags])
    assert (tmp_path / 'torch' / 'hub' / 'checkpoints' / 'deit_tiny_released.pth').exists()
    assert 'deit_t, released weights:' in capsys.readouterr().out
    given = evaluate.main(['--checkpoint', str(tmp_path / 'deit_tiny_released.pth'), *flags])
    assert released == given and released['count'] == 15
    # offline (here: a file that is not there), and a model without released weights: one line
    monkeypatch.setitem(locvit.PRETRAINED, 'deit_s', (tmp_path / 'missing.pth').as_uri())
    assert 'could not download' in cli_error(['--arch', 'deit_s', '--pretrained'], capsys)
    assert 'deit_s24 has no released weights' in cli_error(['--arch', 'deit_s24', '--pretrained'], capsys)
    assert '--pretrained needs --arch' in cli_error(['--pretrained'], capsys)


# --------------------------------------------------------------------------------------------------
# Accuracy: 2 processes count every image once and agree with one process (and with train.py)
# --------------------------------------------------------------------------------------------------

def test_two_processes_agree_with_one_on_an_odd_sized_set(tiny_run, capsys):
    ckpt = str(tiny_run / 'last.pt')
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                          '--nproc_per_node=2', 'evaluate.py', '--checkpoint', ckpt, '--workers', '0'],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert '2 process(es)' in two.stdout
    one = evaluate.main(['--checkpoint', ckpt, '--workers', '0'])
    top1, top5, loss, count = accuracy_line(two.stdout)
    assert count == one['count'] == 101                             # odd: nothing padded
    assert top1 == round(one['top1'], 3) and top5 == round(one['top5'], 3)
    assert loss == pytest.approx(one['loss'], abs=1e-4)
    logged = [json.loads(line) for line in open(tiny_run / 'log.jsonl')][-1]
    assert logged['val_top1'] == pytest.approx(one['top1'], abs=1e-9)   # what train.py measured
    assert logged['ema_top1'] == pytest.approx(
        evaluate.main(['--checkpoint', ckpt, '--weights', 'ema', '--workers', '0'])['top1'], abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Analysis: nonlocality by hand; every block reads its own input
# --------------------------------------------------------------------------------------------------

def test_nonlocality_of_known_maps_on_a_2x3_grid():
    """Patches, row-major: (0,0) (0,1) (0,2) / (1,0) (1,1) (1,2)."""
    grid, n = (2, 3), 6
    itself = torch.eye(n)
    following = torch.roll(torch.eye(n), 1, dims=1)      # patch i attends to patch i + 1 (mod 6)
    uniform = torch.full((n, n), 1 / n)
    d = evaluate.nonlocality(torch.stack([itself, following, uniform]), grid)
    # i -> i+1: four steps of 1; (0,2) -> (1,0) and (1,2) -> (0,0) are sqrt(2² + 1²) = sqrt(5)
    d_following = (4 + 2 * math.sqrt(5)) / 6
    # uniform: each corner is 1, 1, 2, sqrt 2, sqrt 5 from the others, each middle 1, 1, 1,
    # sqrt 2, sqrt 2: (4 (4 + sqrt 2 + sqrt 5) + 2 (3 + 2 sqrt 2)) / 36
    d_uniform = (22 + 8 * math.sqrt(2) + 4 * math.sqrt(5)) / 36
    torch.testing.assert_close(d, torch.tensor([0.0, d_following, d_uniform]))
    assert evaluate.uniform_nonlocality(grid) == pytest.approx(d_uniform)
    # a batch is averaged first: half itself, half the next patch
    assert evaluate.nonlocality(torch.stack([itself, following])[:, None], grid).item() == \
        pytest.approx(d_following / 2)
    # a class token (index 0): patch rows give it half their weight; only patch keys count
    with_cls = torch.zeros(1, n + 1, n + 1)
    with_cls[0, 1:, 0] = 0.5
    with_cls[0, 1:, 1:] = 0.5 * following
    with_cls[0, 0, 1:] = 1 / n
    assert evaluate.nonlocality(with_cls, grid).item() == pytest.approx(d_following)
    assert evaluate.class_token_share(with_cls, grid).item() == pytest.approx(0.5)


def test_every_block_reads_its_own_input_not_the_patch_embedding():
    """The reference weights of the 'convit' fixture (perturbed, not the init): GPSA blocks 1-2,
    then the class token joins and block 3 is MHSA."""
    fx = fixture('convit')
    arch, overrides = FIXTURES['convit']
    model = locvit.create_model(arch, num_classes=10, **overrides)
    locvit.load_checkpoint(model, fx['state_dict'])
    model.eval()
    images = fx['input']
    real = evaluate.layer_attention_maps(model, images)
    with torch.no_grad():
        grid = model.grid                                 # ConViT: the class token joins later
        x = embedding = locvit.img2seq(model.patch_embed(images)) + model.pos_embed
        by_hand = []                                      # the forward pass, block by block
        for i, block in enumerate(model.blocks):
            if i == model.cls_at:
                x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1)
            by_hand.append(evaluate.attention_map(block.attn, block.norm1(x), grid).mean(0))
            x = block(x, grid)
        # ConViT's reference (its issue #23): every GPSA block is fed the patch embedding
        fed_embedding = [evaluate.attention_map(b.attn, b.norm1(embedding), grid).mean(0)
                         for b in model.blocks[:model.cls_at]]
    assert [tuple(m.shape) for m in real] == [(4, 64, 64), (4, 64, 64), (4, 65, 65)]
    for ours, hand in zip(real, by_hand):
        torch.testing.assert_close(ours, hand)
    d_real = [evaluate.nonlocality(m, grid) for m in real[:2]]
    d_embedding = [evaluate.nonlocality(m, grid) for m in fed_embedding]
    torch.testing.assert_close(d_real[0], d_embedding[0])          # block 1 reads the embedding
    # block 2 does not: its maps and nonlocality differ far beyond rounding (~1e-6)
    assert (real[1] - fed_embedding[1]).abs().max() > 1e-2
    assert (d_real[1] - d_embedding[1]).abs().max() > 3e-3, (d_real[1], d_embedding[1])
    result = evaluate.analyze(model, images)
    assert result['nonlocality'][1] == pytest.approx(d_real[1].tolist())
    assert result['attention'] == ['GPSA', 'GPSA', 'MHSA'] and result['gating'][2] is None
    assert result['gating'][0] == pytest.approx(fx['state_dict']['blocks.0.attn.gating_param'].sigmoid().tolist())


def test_attention_map_is_the_explicit_form():
    """GPSA: (1 - g) softmax(q k^T / sqrt(d)) + g P, rows summing to 1; MHSA: softmax(q k^T /
    sqrt(d)), which the module's SDPA forward equals; PVT's and Swin's modules: None."""
    torch.manual_seed(0)
    gpsa = locvit.GPSA(24, 4)
    gpsa.init_local()
    with torch.no_grad():
        gpsa.gating_param.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    x = torch.randn(2, 12, 24)
    a = evaluate.attention_map(gpsa, x, (3, 4))
    assert a.shape == (2, 4, 12, 12)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 12))
    q, k = gpsa.qk(x).chunk(2, dim=-1)
    q, k = (t.view(2, 12, 4, 6).transpose(1, 2) for t in (q, k))
    g = torch.tensor([-2.0, 0.0, 1.0, 3.0]).sigmoid().view(4, 1, 1)
    content = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(6), dim=-1)
    torch.testing.assert_close(a, (1 - g) * content + g * gpsa.positional_attention((3, 4)))
    mhsa = locvit.Attention(24, 4)
    a = evaluate.attention_map(mhsa, x, (3, 4))
    q, k, v = (t.view(2, 12, 4, 6).transpose(1, 2) for t in mhsa.qkv(x).chunk(3, dim=-1))
    torch.testing.assert_close(a, torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(6), dim=-1))
    with torch.no_grad():
        by_map = mhsa.proj((a @ v).transpose(1, 2).reshape(2, 12, 24))
        torch.testing.assert_close(mhsa(x), by_map, atol=1e-5, rtol=1e-4)
    for name in ('pvt', 'swin'):
        arch, overrides = FIXTURE_MODELS[name]
        model = locvit.create_model(arch, num_classes=10, **overrides)
        assert evaluate.attention_map(evaluate.attention_layers(model)[-1][1], x, (3, 4)) is None


def test_the_kernels_of_the_convolutional_init_are_the_taps_of_a_3x3_convolution():
    model = locvit.create_model('convit_t', img_size=40, patch_size=8, embed_dim=36, num_heads=9,
                                depth=1, local_up_to_layer=1)
    (block, kernels), = evaluate.positional_kernels(model)
    assert block == 1 and kernels.shape == (9, 5, 5)
    for h in range(9):                                    # head h = h1 + 3 h2: offset (h2-1, h1-1)
        h1, h2 = h % 3, h // 3
        row, col = divmod(int(kernels[h].argmax()), 5)
        assert (col - 2, row - 2) == (h2 - 1, h1 - 1)


# --------------------------------------------------------------------------------------------------
# Pictures and JSON
# --------------------------------------------------------------------------------------------------

def open_png(path):
    """A complete, valid PNG that reads at 800 px wide or more, and is more than a blank page."""
    with Image.open(path) as img:
        img.verify()
    img = Image.open(path)
    assert img.format == 'PNG' and img.mode == 'RGB'
    assert 800 <= img.width <= 1400 and 300 <= img.height <= 2000, img.size
    colours = img.convert('RGB').getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 20           # more than a blank page
    return img


@needs_matplotlib
def test_analyze_on_the_command_line_writes_tables_json_and_pictures(tiny_run, tmp_path, capsys):
    out = tmp_path / 'analysis'
    evaluate.main(['--checkpoint', str(tiny_run / 'last.pt'), '--analyze', '--analyze-images', '8',
                   '--workers', '0', '--out', str(out)])
    printed = capsys.readouterr().out
    assert '| layer | attention | nonlocality (mean) |' in printed and '| 3 | MHSA |' in printed
    result = json.load(open(out / 'analysis.json'))
    for key in ('arch', 'grid', 'images', 'blocks', 'attention', 'nonlocality', 'nonlocality_mean',
                'nonlocality_uniform', 'class_token_share', 'gating', 'patch_similarity', 'notes',
                'definitions', 'pictures'):
        assert key in result, key
    assert result['arch'] == 'convit_t' and result['images'] == 8 and result['grid'] == [8, 8]
    assert len(result['nonlocality']) == 3 and len(result['nonlocality'][0]) == 4
    assert len(result['patch_similarity']) == 4                   # embedding + 3 blocks
    assert result['gating'][2] is None and result['class_token_share'][0] is None
    assert result['pictures'] == ['kernels.png', 'attention.png', 'layers.png']
    for name in result['pictures']:
        open_png(out / name)
    # what they show: 2 GPSA blocks x 4 heads; 3 blocks x (image + 4 heads); 3 panels
    model, _ = evaluate.load_model(tiny_run / 'last.pt')
    kernels = evaluate.kernels_figure(evaluate.positional_kernels(model), model.grid, evaluate.gating(model))
    assert [ax.get_title() for ax in kernels.axes[:4]] == [
        f'head {h + 1}\ngate {g:.2f}' for h, g in enumerate(result['gating'][0])]
    assert len([ax for ax in kernels.axes if ax.images]) == 2 * 4
    images = torch.randn(1, 3, 32, 32)
    attention = evaluate.attention_figure(images[0], evaluate.layer_attention_maps(model, images),
                                          model.grid, [1, 2, 3])
    assert len([ax for ax in attention.axes if ax.images]) == 3 * 5
    assert [ax.get_ylabel() for ax in attention.axes[::5][:3]] == [
        'block 1\ncentre patch', 'block 2\ncentre patch', 'block 3\nclass token']
    assert len(evaluate.layers_figure(result).axes) == 3


@needs_matplotlib
def test_models_without_gpsa_or_attention_maps_skip_those_parts(tmp_path, capsys):
    arch, overrides = FIXTURE_MODELS['swin']
    swin = locvit.create_model(arch, num_classes=10, **overrides)
    result = evaluate.write_analysis(swin, torch.randn(2, 3, 32, 32), tmp_path / 'swin')
    assert result['blocks'] == [1]                    # the last stage: one block here
    assert result['nonlocality'] == [None] and result['gating'] == [None]
    assert any('WindowAttention has no attention_map' in n for n in result['notes'])
    assert any('no GPSA' in n for n in result['notes'])
    assert result['pictures'] == ['layers.png'] and len(result['patch_similarity']) == 2
    open_png(tmp_path / 'swin' / 'layers.png')
    arch, overrides = FIXTURES['deit']
    deit = locvit.create_model(arch, num_classes=10, **overrides)
    result = evaluate.write_analysis(deit, torch.randn(2, 3, 32, 32), tmp_path / 'deit')
    assert result['pictures'] == ['attention.png', 'layers.png']
    assert all(len(d) == 3 for d in result['nonlocality'])
    assert 'note: deit_t: no GPSA blocks' in capsys.readouterr().out


@needs_matplotlib
def test_training_curves_of_several_runs(tiny_run, tmp_path):
    """Labels from each run's config (arch + the settings that differ), else its folder; the
    chance level (100 / classes) dashed on the accuracy panel."""
    other = tmp_path / 'other'
    other.mkdir()
    with open(other / 'log.jsonl', 'w') as f:
        for epoch in range(1, 6):
            f.write(json.dumps({'epoch': epoch, 'train_loss': 2.3 / epoch, 'val_top1': 15 * epoch}) + '\n')
    paths = [str(tiny_run / 'log.jsonl'), str(other / 'log.jsonl')]
    evaluate.main(['--curves', *paths, '--out', str(tmp_path)])
    open_png(tmp_path / 'curves.png')
    fig = evaluate.curves_figure(paths)
    top1, loss = fig.axes[:2]
    assert top1.get_ylabel() == 'top-1 accuracy (%)' and loss.get_xlabel() == 'epoch'
    chance = [line for line in top1.get_lines() if line.get_linestyle() == '--']
    assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(10.0)   # 10 classes
    assert chance[0].get_label().startswith('chance (10%')
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:2] == ['convit_t', 'other'] and labels[2].startswith('chance')
    runs = [dict(arch='deit_t', lr=0.004, seed=0, out='runs/a'), dict(arch='deit_t', lr=0.01, seed=0, out='runs/b')]
    assert evaluate.run_labels(['runs/a/log.jsonl', 'runs/b/log.jsonl'], runs) == ['deit_t lr=0.004', 'deit_t lr=0.01']


@needs_matplotlib
def test_pictures_have_numeric_colour_bars_on_one_scale(tmp_path):
    """Every map of a figure shares one colour scale, 0 to the largest weight, whose bar is
    labelled in attention-weight units; the figures read at 800 px or more."""
    model = locvit.create_model('convit_t', img_size=32, patch_size=4, embed_dim=36, num_heads=9,
                                depth=3, local_up_to_layer=2)
    kernels = evaluate.positional_kernels(model)
    fig = evaluate.kernels_figure(kernels, model.grid, evaluate.gating(model))
    maps = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(maps) == 2 * 9 and len({id(m.norm) for m in maps}) == 1
    top = max(k.max().item() for _, k in kernels)
    assert maps[0].norm.vmin == 0 and maps[0].norm.vmax == pytest.approx(top)
    bar = maps[-1].colorbar
    assert bar is not None and bar.ax.get_ylabel() == 'positional attention weight'
    fig.canvas.draw()
    assert bar.ax.get_ylim() == pytest.approx((0, top))              # the bar spans the weights
    ticks = [float(t.get_text().replace('\N{MINUS SIGN}', '-')) for t in bar.ax.get_yticklabels() if t.get_text()]
    assert len([t for t in ticks if 0 <= t <= top]) >= 3             # numbers, not '0' and 'max'
    evaluate.save_png(fig, tmp_path / 'kernels.png')
    assert open_png(tmp_path / 'kernels.png').width >= 800
    images = torch.randn(1, 3, 32, 32)
    fig = evaluate.attention_figure(images[0], evaluate.layer_attention_maps(model, images),
                                    model.grid, [1, 3])
    maps = [ax.images[-1] for ax in fig.axes if len(ax.images) == 2]     # the overlays
    assert len(maps) == 2 * 6 and maps[-1].colorbar.ax.get_ylabel() == 'attention weight'
    assert len({id(m.norm) for m in maps}) == 1


def test_pictures_without_matplotlib_say_so_in_one_line(monkeypatch):
    for name in ('matplotlib', 'matplotlib.figure', 'matplotlib.backends.backend_agg'):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError, match='^pictures need matplotlib: pip install matplotlib$'):
        evaluate.figure(8, 4)
    model = locvit.create_model('deit_t', img_size=32, patch_size=4, depth=1)
    result = evaluate.analyze(model, torch.randn(2, 3, 32, 32))          # analysis needs no matplotlib
    assert result['blocks'] == [1]


# --------------------------------------------------------------------------------------------------
# Benchmark: a smoke test (no timings asserted)
# --------------------------------------------------------------------------------------------------

def test_benchmark_prints_a_markdown_table(capsys):
    threads = torch.get_num_threads()
    try:                                                  # the child process measures on 1 thread
        evaluate.main(['--benchmark', 'convit_t', '--img-size', '32', '--batch-size', '2',
                       '--min-run-time', '0.02', '--warmup', '1', '--rounds', '2', '--no-timm',
                       '--device', 'cpu', '--threads', '1'])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert 'threads: 1' in out and 'the median of 2 round(s)' in out
    assert '- command: `python evaluate.py --benchmark convit_t' in out and 'torch ' in out
    assert 'torch.utils.benchmark' in out and 'BatchNorms folded' in out
    assert '| model | params (M) | GMACs | forward img/s | train img/s | peak MB |' in out
    row = next(line for line in out.splitlines() if line.startswith('| `convit_t`'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1] == f'{locvit.count_params(locvit.create_model("convit_t", img_size=32)) / 1e6:.2f}'
    assert all(float(c) > 0 for c in cells[2:6]) and float(cells[5]) >= 0


def test_benchmark_rounds_take_medians_and_the_median_ratio():
    row = lambda name, f, t, m: {'model': name, 'params': 5, 'forward': f, 'train': t, 'peak_mb': m}
    rounds = [(row('deit_t', 10, 4, 100), row('timm:deit', 20, 4, 100)),     # a slow round: 0.5
              (row('deit_t', 30, 6, 90), row('timm:deit', 25, 5, 100)),      # 1.2
              (row('deit_t', 40, 8, 80), row('timm:deit', 40, 10, 100))]     # 1.0
    ours, theirs = evaluate.median_of_rounds(rounds)
    assert (ours['forward'], ours['train'], ours['peak_mb']) == (30, 6, 90)
    assert (theirs['forward'], theirs['train'], theirs['peak_mb']) == (25, 5, 100)
    assert ours['ratio']['forward'] == 1.0                  # not 30 / 25: the rounds' own ratios
    assert ours['ratio']['train'] == 1.0 and ours['ratio']['peak_mb'] == 0.9
    failed = evaluate.median_of_rounds([(row('deit_t', 1, 1, 1), None),
                                        ({'model': 'deit_t', 'error': 'out of memory'}, None)])
    assert failed == ({'model': 'deit_t', 'error': 'out of memory'}, None)


# --------------------------------------------------------------------------------------------------
# Bad input: one clear line, no traceback
# --------------------------------------------------------------------------------------------------

def test_every_flag_has_a_help_line():
    parser = evaluate.build_parser()
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    text = parser.format_help()
    for flag in ('--checkpoint PATH', '--pretrained', '--img-size', '--data', '--analyze', '--curves',
                 '--benchmark', '--min-run-time S', '--rounds R', '--compile', '--dtype', '--threads T'):
        assert flag in text, flag


def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.run_cli(evaluate.main, argv + ['--workers', '0'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
    return err


def test_bad_input_gets_one_clear_line(tiny_run, tmp_path, capsys):
    ckpt = str(tiny_run / 'last.pt')
    assert "not found; check the path" in cli_error(['--checkpoint', str(tmp_path / 'nope.pt')], capsys)
    data = (tiny_run / 'last.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(data[:len(data) // 3])
    assert 'truncated or corrupt?)' in cli_error(['--checkpoint', str(tmp_path / 'cut.pt')], capsys)
    err = cli_error(['--checkpoint', ckpt, '--arch', 'convit_tt'], capsys)
    assert "unknown model 'convit_tt'; did you mean convit_t" in err
    os.makedirs(tmp_path / 'data' / 'val' / 'cats')                # a class folder, no images
    err = cli_error(['--checkpoint', ckpt, '--data', 'folder', '--data-path', str(tmp_path / 'data')], capsys)
    assert 'Found no valid file for the classes cats' in err and 'needs image files' in err
    err = cli_error(['--checkpoint', ckpt, '--num-classes', '5', '--synthetic-val', '20'], capsys)
    assert 'the checkpoint classifies 10 classes, the validation data (synthetic) has 5' in err
    torch.save(fixture('deit')['state_dict'], tmp_path / 'deit.pth')
    assert '--arch' in cli_error(['--checkpoint', str(tmp_path / 'deit.pth')], capsys)
    err = cli_error(['--checkpoint', str(tmp_path / 'deit.pth'), '--arch', 'convit_t',
                     '--img-size', '32', '--patch-size', '4'], capsys)
    assert 'does not fit model convit_t' in err and 'GPSA' in err
    assert 'nothing to do' in cli_error([], capsys)
