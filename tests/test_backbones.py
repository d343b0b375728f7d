"""LocalViT beyond DeiT (locvit.py section 7): PVT, Swin, TNT and T2T-ViT, with and without the
locality feed-forward. The official LocalViT repo's weights give its logits in our models; the
published models have the reference's exact sizes; every model trains at 224 px and at a small,
non-square size; the Swin mask and the position-embedding resizing do what they say."""
import json
import os

import pytest
import torch

import locvit
from conftest import FIXTURES, fixture

REFERENCE = json.load(open(os.path.join(FIXTURES, 'reference_models.json')))
REFERENCE_NAMES = {
    'pvt_t': 'pvt_tiny', 'localvit_pvt_t': 'localvit_pvt_tiny',
    'swin_t': 'swin_tiny_patch4_window7_224',
    'localvit_swin_t': 'localvit_swin_tiny_patch4_window7_224',
    'tnt_t': 'tnt_t_patch16_224', 'localvit_tnt_t': 'localvit_tnt_t_patch16_224',
    't2t_vit_7': 'T2t_vit_7', 'localvit_t2t_7': 'localvit_T2t_conv7'}
BACKBONES = list(REFERENCE_NAMES)
# The reference's LocalViT-T2T creates a norm2 = LayerNorm(64) (weight + bias) in both performer
# layers of its tokens-to-token module and never uses it (the LFF replaces norm2 + MLP); we do not
# create those two LayerNorms.
UNUSED_IN_REFERENCE = {'localvit_t2t_7': 2 * (64 + 64)}

# fixture -> (zoo name, overrides reproducing the fixture's configuration)
_PVT = dict(img_size=64, embed_dims=(8, 16, 16, 16), num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1),
            sr_ratios=(4, 2, 2, 1))
_SWIN = dict(img_size=32, patch_size=2, embed_dim=8, depths=(2, 2, 1), num_heads=(1, 2, 4),
             window_size=4)
_TNT = dict(img_size=32, patch_size=8, embed_dim=32, in_dim=8, depth=2, num_heads=2,
            in_num_heads=2, first_stride=2)
FIXTURE_MODELS = {
    'pvt': ('pvt_t', _PVT), 'localvit_pvt': ('localvit_pvt_t', _PVT),
    'swin': ('swin_t', _SWIN), 'localvit_swin': ('localvit_swin_t', _SWIN),
    'tnt': ('tnt_t', _TNT), 'localvit_tnt': ('localvit_tnt_t', _TNT),
    'localvit_t2t': ('localvit_t2t_7', dict(img_size=48, embed_dim=32, depth=2, num_heads=2,
                                            token_dim=8, lff=dict(reduction=16))),
}


def fixture_model(name, **overrides):
    arch, config = FIXTURE_MODELS[name]
    return fixture(name), locvit.create_model(arch, num_classes=10, **{**config, **overrides})


@pytest.mark.parametrize('name', sorted(FIXTURE_MODELS))
def test_reference_weights_give_the_reference_logits(name):
    """A strict load: every key of the official state dict is used, except Swin's attn_mask and
    relative_position_index buffers and LocalViT-T2T's unused norm2 (see remap_swin, remap_t2t)."""
    fx, model = fixture_model(name)
    locvit.load_checkpoint(model, fx['state_dict'])
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(fx['input'])
        torch.testing.assert_close(model.forward_head(tokens), fx['logits'], atol=1e-5, rtol=1e-4)
        if 'final_tokens' in fx:        # covers the last LFF, which the logits cannot see
            torch.testing.assert_close(tokens, fx['final_tokens'], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('name', BACKBONES)
def test_parameter_count_and_macs_match_the_reference(name):
    ref = REFERENCE[REFERENCE_NAMES[name]]
    model = locvit.create_model(name)
    unused = UNUSED_IN_REFERENCE.get(name, 0)
    assert locvit.count_params(model) == ref['params'] - unused
    # T2T-ViT: the sinusoid table and the performers' random features are frozen, as there
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == ref['params_trainable'] - unused
    # the meta device counts the same multiply-accumulates without doing the arithmetic
    assert abs(locvit.count_macs(model.to('meta')) - ref['macs']) <= 0.01 * ref['macs']


def test_every_backbone_is_in_the_zoo_and_refuses_unknown_options():
    assert set(BACKBONES) <= set(locvit.list_models())
    with pytest.raises(ValueError, match="swin_t has no option depth; options: img_size"):
        locvit.create_model('swin_t', depth=3)
    with pytest.raises(ValueError, match='PVT needs an image size divisible by 32'):
        locvit.create_model('pvt_t', img_size=100)


# --------------------------------------------------------------------------------------------------
# Every model trains: every parameter gets a gradient
# --------------------------------------------------------------------------------------------------

def gradient_free(model):
    """The last block's LFF where the head reads only the class token (PVT, TNT, T2T-ViT): the
    class token bypasses the LFF, and no block comes after it. Swin's head averages all tokens."""
    lff = [n for n, _ in model.named_parameters() if '.lff.' in n]
    if not lff or not hasattr(model, 'cls_token'):
        return set()
    last = lff[-1].split('.lff.')[0] + '.lff.'
    return {n for n in lff if n.startswith(last)}


def check_all_gradients(model, x):
    model.train()
    tokens, layers = model.forward_features(x, return_layers=True)
    out = model.forward_head(tokens)
    assert out.shape == (x.shape[0], model.num_classes) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    exempt = gradient_free(model)       # only LocalViT-PVT, -TNT and -T2T have such an LFF
    assert bool(exempt) == (model.arch in ('localvit_pvt_t', 'localvit_tnt_t', 'localvit_t2t_7'))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.endswith(('pos_embed', 'random_features')) for n in frozen), frozen
    silent = [n for n, p in model.named_parameters() if n not in exempt | frozen
              and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not silent, silent
    for n, p in model.named_parameters():
        if n in exempt | frozen:
            assert p.grad is None or not p.grad.any(), n
    return layers


# the published widths, heads and stages; fewer blocks per stage so that 224 px stays quick
FEWER_BLOCKS = {'pvt': dict(depths=(1, 1, 1, 1)), 'swin': dict(depths=(2, 2, 2, 2)),
                'tnt': dict(depth=2), 't2t': dict(depth=2)}


def family(name):
    return next(f for f in FEWER_BLOCKS if f in name)


@pytest.mark.parametrize('name', BACKBONES)
def test_forward_backward_at_224(name):
    model = locvit.create_model(name, num_classes=10, **FEWER_BLOCKS[family(name)])
    check_all_gradients(model, torch.randn(2, 3, 224, 224))


# small non-square sizes the strides allow; Swin's 9 x 11 grid pads its windows and merges
SMALL = {'pvt': (64, 96), 'swin': (36, 44), 'tnt': (32, 48), 't2t': (48, 64)}


@pytest.mark.parametrize('name', BACKBONES)
def test_forward_backward_on_a_small_non_square_image(name):
    """The full-size models. return_layers gives [embedding, block outputs] on the final grid:
    the last stage for PVT (class token first) and Swin, every block for TNT and T2T-ViT."""
    size = SMALL[family(name)]
    model = locvit.create_model(name, img_size=size, num_classes=10)
    layers = check_all_gradients(model, torch.randn(2, 3, *size))
    expected_grid = {'pvt': (2, 3), 'swin': (2, 2), 'tnt': (2, 3), 't2t': (3, 4)}[family(name)]
    assert model.grid == expected_grid
    n_blocks = {'pvt': 2, 'swin': 2, 'tnt': 12, 't2t': 7}[family(name)]
    n_tokens = expected_grid[0] * expected_grid[1] + hasattr(model, 'cls_token')
    assert [t.shape[:2] for t in layers] == [(2, n_tokens)] * (1 + n_blocks)


@pytest.mark.parametrize('name', ['localvit_pvt', 'localvit_swin', 'localvit_tnt', 'localvit_t2t'])
def test_stochastic_depth_is_random_in_training_and_off_in_eval(name):
    fx, model = fixture_model(name, drop_path=0.5)
    rates = [m.p for m in model.modules() if isinstance(m, locvit.DropPath)]
    assert rates[0] == 0.0 and rates[-1] == 0.5
    for m in model.modules():           # T2T's performers also hold a (hard-coded) dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = fx['input']
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), model(x))
        for m in model.modules():
            if isinstance(m, locvit.DropPath):
                m.p = 0.0
        assert torch.equal(model.train()(x), model(x))


# --------------------------------------------------------------------------------------------------
# Swin: the shifted-window mask, the window at small sizes
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('h, w, ws, shift', [(8, 8, 4, 2), (6, 10, 4, 2), (5, 7, 4, 0), (14, 14, 7, 3),
                                             (3, 2, 7, 0)])
def test_swin_mask_allows_exactly_the_real_unwrapped_neighbours_in_a_window(h, w, ws, shift):
    """An independent rule: in the padded, rolled map, query i may attend to key j iff both are
    real (not padding), share a window, and the roll did not wrap one of them around (their offset
    in the original map equals their offset in the rolled map)."""
    hp, wp = h + -h % ws, w + -w % ws
    mask = locvit.window_mask(h, w, ws, shift)
    assert (mask is None) == (shift == 0 and (hp, wp) == (h, w))
    if mask is None:
        return
    nw = wp // ws
    assert mask.shape == ((hp // ws) * nw, 1, ws * ws, ws * ws)
    for win in range(mask.shape[0]):
        wr, wc = divmod(win, nw)
        rolled = [(wr * ws + i // ws, wc * ws + i % ws) for i in range(ws * ws)]
        orig = [((r + shift) % hp, (c + shift) % wp) for r, c in rolled]
        for i, (ri, ci) in enumerate(orig):
            if ri >= h or ci >= w:      # padded queries are cut off after the attention
                continue
            for j, (rj, cj) in enumerate(orig):
                real = rj < h and cj < w
                unwrapped = (ri - rj, ci - cj) == (rolled[i][0] - rolled[j][0],
                                                   rolled[i][1] - rolled[j][1])
                assert (mask[win, 0, i, j] == 0) == (real and unwrapped), (win, i, j)


def test_swin_shifts_where_the_grid_exceeds_the_window_and_keeps_the_window_everywhere():
    model = locvit.create_model('swin_t')          # stage grids 56, 28, 14, 7; window 7
    shifts = [[b.attn.shift_size for b in stage.blocks] for stage in model.stages]
    assert shifts == [[0, 3], [0, 3], [0, 3] * 3, [0, 0]]
    small = locvit.create_model('swin_t', img_size=64)   # grids 16, 8, 4, 2: one padded window
    assert {b.attn.window_size for s in small.stages for b in s.blocks} == {7}
    assert [b.attn.shift_size for b in small.stages[2].blocks] == [0] * 6
    locvit.load_checkpoint(small, model.state_dict())    # the bias tables fit at every size


# --------------------------------------------------------------------------------------------------
# Checkpoints at another resolution, and the plain T2T-ViT's official key layout
# --------------------------------------------------------------------------------------------------

def test_another_resolution_resizes_the_position_embeddings():
    fx, _ = fixture_model('localvit_pvt')
    pvt = fixture_model('localvit_pvt', img_size=(96, 128))[1]
    locvit.load_checkpoint(pvt, fx['state_dict'])
    assert [s.pos_embed.shape[1] for s in pvt.stages] == [24 * 32, 12 * 16, 6 * 8, 1 + 3 * 4]
    assert torch.equal(pvt.stages[3].pos_embed[0, 0], fx['state_dict']['pos_embed4'][0, 0])
    assert torch.isfinite(pvt.eval()(torch.randn(1, 3, 96, 128))).all()
    fx, _ = fixture_model('tnt')
    tnt = fixture_model('tnt', img_size=48)[1]
    locvit.load_checkpoint(tnt, fx['state_dict'])
    assert tnt.patch_pos.shape == (1, 1 + 6 * 6, 32)
    # T2T-ViT's table is a fixed function of the grid: the model keeps its own
    fx, _ = fixture_model('localvit_t2t')
    t2t = fixture_model('localvit_t2t', img_size=64)[1]
    own = t2t.pos_embed.clone()
    locvit.load_checkpoint(t2t, fx['state_dict'])
    assert torch.equal(t2t.pos_embed, own) and own.shape == (1, 1 + 4 * 4, 32)
    # ours, trained on a non-square image, knows its grid
    pvt2 = fixture_model('localvit_pvt', img_size=(64, 128))[1]
    grids = {k: list(g) for k, (_, g) in pvt.pos_embed_grids().items()}
    locvit.load_checkpoint(pvt2, {'model': pvt.state_dict(), 'grids': grids})
    assert pvt2.stages[0].pos_embed.shape[1] == 16 * 32
    # another architecture is explained
    with pytest.raises(ValueError, match=r'\(a locality FFN \(LocalViT\)\) does not fit model '
                                         r'tnt_t \(plain ViT blocks\)'):
        locvit.load_checkpoint(tnt, pvt.state_dict())


def test_plain_t2t_vit_loads_in_the_official_layout():
    """No fixture exists for the plain T2T-ViT-7: write our weights in the official key layout
    (Token_performer: w, kqv with rows [k; q; v], mlp = Sequential(Linear, GELU, Linear, Dropout))
    and read them back."""
    model = locvit.create_model('t2t_vit_7', img_size=48, num_classes=10, embed_dim=32, depth=1,
                                num_heads=2, token_dim=8)
    official = {}
    for k, v in model.state_dict().items():
        if k.startswith('tokens_to_token.performer'):
            k = (k.replace('performer', 'attention').replace('.random_features', '.w')
                 .replace('.mlp.fc1.', '.mlp.0.').replace('.mlp.fc2.', '.mlp.2.')
                 .replace('.qkv.', '.kqv.'))
            if '.kqv.' in k:
                q, key, val = v.chunk(3)
                v = torch.cat([key, q, val])
        official[k] = v
    assert {k.split('attention1.')[1] for k in official if 'attention1.' in k} == {
        'w', 'kqv.weight', 'kqv.bias', 'proj.weight', 'proj.bias', 'norm1.weight', 'norm1.bias',
        'norm2.weight', 'norm2.bias', 'mlp.0.weight', 'mlp.0.bias', 'mlp.2.weight', 'mlp.2.bias'}
    other = locvit.create_model('t2t_vit_7', img_size=48, num_classes=10, embed_dim=32, depth=1,
                                num_heads=2, token_dim=8)
    locvit.load_checkpoint(other, official)
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(model.eval()(x), other.eval()(x))
