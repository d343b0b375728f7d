"""The model zoo: exact sizes, the papers' mechanisms, every model trains, bad input is refused."""
import json
import os

import pytest
import torch

import locvit
from conftest import FIXTURES

REFERENCE = json.load(open(os.path.join(FIXTURES, 'reference_models.json')))
REFERENCE_NAMES = {
    'deit_t': 'deit_tiny_patch16_224', 'deit_s': 'deit_small_patch16_224',
    'deit_b': 'deit_base_patch16_224', 'deit_t_mlp6': 'deit_tiny_patch16_224_ex6',
    'convit_t': 'convit_tiny', 'convit_s': 'convit_small', 'convit_b': 'convit_base',
    'convit_t_plus': 'convit_tiny_plus', 'convit_s_plus': 'convit_small_plus',
    'convit_b_plus': 'convit_base_plus',
    'localvit_t': 'localvit_tiny_mlp4_act3_r192', 'localvit_t_se4': 'localvit_tiny_mlp4_act3_r4',
    'localvit_s': 'localvit_small_mlp4_act3_r384', 'localvit_t_relu6': 'localvit_tiny_mlp6_act1',
    'vit_p_1gf': 'ViTP-1GF', 'vit_c_1gf': 'ViTC-1GF', 'vit_p_4gf': 'ViTP-4GF', 'vit_c_4gf': 'ViTC-4GF',
    'vit_p_18gf': 'ViTP-18GF', 'vit_c_18gf': 'ViTC-18GF', 'vit_p_36gf': 'ViTP-36GF',
    'vit_c_36gf': 'ViTC-36GF',
}
VIT_FAMILY = [n for n in locvit.list_models() if locvit.MODELS[n][0] is locvit.VisionTransformer]


def gpsa_layers(model):
    return [m for m in model.modules() if isinstance(m, locvit.GPSA)]


@pytest.mark.parametrize('name', sorted(REFERENCE_NAMES))
def test_parameter_count_and_macs_match_the_reference(name):
    ref = REFERENCE[REFERENCE_NAMES[name]]
    model = locvit.create_model(name)
    assert locvit.count_params(model) == ref['params']
    # GPSA applies its positional attention as its own product P @ v: N^2 C MACs per GPSA
    # layer beyond the reference's count
    n, c = model.grid[0] * model.grid[1], model.norm.weight.shape[0]
    extra = len(gpsa_layers(model)) * n * n * c
    assert abs(locvit.count_macs(model) - extra - ref['macs']) <= 0.01 * ref['macs']


def test_timm_names_are_aliases():
    for timm_name, ours in locvit.ALIASES.items():
        model = locvit.create_model(timm_name, img_size=32, patch_size=4, depth=1,
                                    **({'local_up_to_layer': 1} if 'convit' in ours else {}))
        assert model.arch == ours
    assert locvit.model_options('convit_tiny') == locvit.model_options('convit_t')


def test_every_zoo_name_of_the_papers_exists():
    wanted = ('deit_t deit_s deit_b deit_s24 deit_b24 convit_t convit_t_plus convit_s convit_s_plus '
              'convit_b convit_b_plus localvit_t localvit_t_se4 localvit_s localvit_t_relu6 '
              'vit_p_1gf vit_p_4gf vit_p_18gf vit_p_36gf vit_c_1gf vit_c_4gf vit_c_18gf vit_c_36gf')
    assert set(wanted.split()) <= set(locvit.list_models())


# --------------------------------------------------------------------------------------------------
# ConViT: the convolutional init, and the fast path against the paper's explicit form
# --------------------------------------------------------------------------------------------------

def test_relative_positions_on_a_non_square_grid():
    r = locvit.relative_positions(2, 3)                 # tokens: row-major over 2 rows, 3 columns
    assert r.shape == (6, 6, 3)
    # query 1 = (row 0, col 1), key 5 = (row 1, col 2): dx = 1, dy = 1
    assert r[1, 5].tolist() == [1.0, 1.0, 2.0]
    # query 5 -> key 0: dx = -2, dy = -1
    assert r[5, 0].tolist() == [-2.0, -1.0, 5.0]
    assert torch.all(r[torch.arange(6), torch.arange(6)] == 0)


@pytest.mark.parametrize('heads', [4, 9, 16])
def test_local_init_head_attends_at_its_offset(heads):
    """With a large locality strength, head h = h1 + k*h2 puts (nearly) all its positional
    attention on the patches nearest to the offset Δ_h = (h2 - c, h1 - c) from the query.
    For an odd kernel that is one patch; for an even one (H = 4, 16) Δ_h falls between
    patches and its 4 nearest share the mass."""
    attn = locvit.GPSA(heads * 4, heads, locality_strength=20.0)
    attn.init_local()
    pos = attn.positional_attention((9, 9))              # (H, N, N)
    k = int(heads ** 0.5)
    c = (k - 1) / 2
    centre = 4 * 9 + 4                                   # query at row 4, col 4
    rows, cols = torch.arange(81) // 9 - 4, torch.arange(81) % 9 - 4
    for h1 in range(k):
        for h2 in range(k):
            h = h1 + k * h2
            dist = (cols - (h2 - c)) ** 2 + (rows - (h1 - c)) ** 2
            nearest = dist == dist.min()
            assert nearest.sum() == (1 if k % 2 else 4)
            assert pos[h, centre, nearest].sum() > 0.99, h
            assert pos[h, centre, nearest].min() > 0.24
    assert torch.equal(attn.v.weight, torch.eye(heads * 4))
    assert torch.all(attn.gating_param == 1)


def test_local_init_can_be_switched_off():
    on = locvit.create_model('convit_t', img_size=32, patch_size=4, depth=2, local_up_to_layer=1)
    off = locvit.create_model('convit_t', img_size=32, patch_size=4, depth=2, local_up_to_layer=1,
                              gpsa=dict(local_init=False))
    assert torch.equal(on.blocks[0].attn.v.weight, torch.eye(192))
    assert not torch.equal(off.blocks[0].attn.v.weight, torch.eye(192))
    assert off.blocks[0].attn.pos_proj.weight.abs().max() < 0.1   # random trunc_normal(.02)


def test_gpsa_equals_the_explicit_two_softmax_form():
    """The fast form (one positional map for the batch, gates folded into v and that map, content
    on SDPA) equals the paper's explicit equation (evaluate.attention_map): outputs and every
    gradient."""
    from einops import rearrange
    import evaluate
    torch.manual_seed(0)
    attn = locvit.GPSA(36, 9)
    attn.init_local()
    with torch.no_grad():
        attn.gating_param.uniform_(-2, 2)
        attn.pos_proj.weight.add_(torch.randn(9, 3) * 0.3)
    x = torch.randn(3, 30, 36, requires_grad=True)

    def explicit(x, grid):
        v = rearrange(attn.v(x), 'b n (h d) -> b h n d', h=9)
        return attn.proj(rearrange(evaluate.attention_map(attn, x, grid) @ v, 'b h n d -> b n (h d)'))

    def run(forward):
        attn.zero_grad()
        x.grad = None
        out = forward(x, (6, 5))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in attn.named_parameters()}

    out_f, gx_f, gp_f = run(attn)
    out_e, gx_e, gp_e = run(explicit)
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_f, gx_e, atol=1e-5, rtol=1e-4)
    for n in gp_f:
        torch.testing.assert_close(gp_f[n], gp_e[n], atol=1e-5, rtol=1e-4, msg=n)
    # the explicit form is the paper's: (1 - g) content + g position, rows sum to 1
    torch.testing.assert_close(evaluate.attention_map(attn, x, (6, 5)).sum(-1), torch.ones(3, 9, 30))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_gpsa_geometry_stays_exact_when_the_model_is_cast(dtype):
    """model.to(bf16) must not round the relative positions (d^2 = 313 -> 312 in bf16), and
    half precision must not zero positional weights that are normal floats."""
    model = locvit.create_model('convit_t', img_size=(16 * 4, 14 * 4), patch_size=4, depth=1,
                                local_up_to_layer=1)
    attn = model.blocks[0].attn
    grid = (16, 14)                                     # offsets up to (13, 12): d^2 = 313
    with torch.no_grad():
        attn.pos_proj.weight.mul_(0.05)                 # a broad map: far keys keep weight
    reference = attn.positional_attention(grid)
    model.to(dtype)
    rel = locvit.relative_positions(*grid)
    assert rel.dtype == torch.long and (rel[..., 2] == 313).any()
    pos = attn.positional_attention(grid)
    assert pos.dtype == torch.float32
    w = attn.pos_proj.weight.float()                    # the cast weights, exactly as stored
    scores = locvit.relative_positions(*grid).float() @ w.T + attn.pos_proj.bias.float()
    torch.testing.assert_close(pos, rearrange_hij(scores).softmax(-1), atol=1e-6, rtol=1e-5)
    assert (pos > 0).all() and (reference > 0).all()    # nothing normal was flushed to zero
    y = model(torch.randn(2, 3, 64, 56, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


def rearrange_hij(scores):
    return scores.permute(2, 0, 1)


def test_gpsa_positions_follow_the_grid_and_stay_out_of_the_state_dict():
    model = locvit.create_model('convit_t', img_size=32, patch_size=4, depth=2, local_up_to_layer=1)
    assert not any('rel' in k for k in model.state_dict()) and not list(model.buffers())
    attn = model.blocks[0].attn
    assert attn.positional_attention((4, 6)).shape == (4, 24, 24)    # any grid, built on demand
    assert locvit.relative_positions(4, 6) is locvit.relative_positions(4, 6)    # once per grid
    ema = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)    # nothing to average
    ema.update_parameters(model)


# --------------------------------------------------------------------------------------------------
# LocalViT: tokens <-> image, the class token bypasses the locality feed-forward
# --------------------------------------------------------------------------------------------------

def test_seq2img_is_row_major_and_inverts_img2seq():
    x = torch.arange(2 * 6 * 1, dtype=torch.float).view(2, 6, 1)       # 6 tokens, grid 2 x 3
    img = locvit.seq2img(x, (2, 3))
    assert img.shape == (2, 1, 2, 3)
    assert img[0, 0, 1, 0].item() == 3                                  # token 3 = row 1, col 0
    assert torch.equal(locvit.img2seq(img), x)


@pytest.mark.parametrize('channel_attn', ['se', 'eca', None])
def test_locality_ffn_passes_the_class_token_unchanged(channel_attn):
    lff = locvit.LocalityFeedForward(8, 4, 'hswish', channel_attn, reduction=4).train()
    x = torch.randn(2, 1 + 3 * 5, 8)
    y = lff(x, (3, 5))
    assert y.shape == x.shape
    assert torch.equal(y[:, 0], x[:, 0])
    assert not torch.allclose(y[:, 1:], x[:, 1:])
    # without a class token (PVT, Swin) every token goes through
    assert lff(x[:, 1:], (3, 5)).shape == (2, 15, 8)


@pytest.mark.parametrize('name', ['localvit_t', 'localvit_t_relu6', 'vit_c_1gf', 'localvit_pvt_t'])
def test_fuse_batchnorm_keeps_the_function(name):
    """fuse_batchnorm folds every BatchNorm (the LFF's three, the conv stem's) into the
    convolution before it: the eval-mode function is unchanged, and no BatchNorm is left."""
    import copy
    torch.manual_seed(0)
    size = dict(img_size=64) if 'pvt' in name else dict(img_size=32, patch_size=4, depth=2)
    model = locvit.create_model(name, num_classes=10, **size)
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        bn.running_mean.uniform_(-1, 1)                   # non-trivial running statistics
        bn.running_var.uniform_(0.5, 2)
        torch.nn.init.uniform_(bn.weight, 0.5, 2)
        torch.nn.init.uniform_(bn.bias, -1, 1)
    x = torch.randn(2, 3, *model.img_size)
    with torch.no_grad():
        plain = model.eval().forward_features(x)
        fused = locvit.fuse_batchnorm(copy.deepcopy(model)).forward_features(x)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in locvit.fuse_batchnorm(model).modules())


def test_locality_ffn_is_local():
    """A change at one patch moves only that patch and its 8 neighbours (one depthwise 3x3),
    apart from the SE's global pooling, which is switched off here."""
    lff = locvit.LocalityFeedForward(4, 2, 'relu6', None).eval()
    x = torch.randn(1, 25, 4)
    x2 = x.clone()
    x2[0, 12] += 1.0                                                    # centre of a 5 x 5 grid
    changed = (lff(x2, (5, 5)) - lff(x, (5, 5))).abs().sum(-1)[0] > 1e-6
    rows, cols = torch.nonzero(changed.view(5, 5), as_tuple=True)
    assert rows.min() >= 1 and rows.max() <= 3 and cols.min() >= 1 and cols.max() <= 3
    assert changed[12]


def test_ECA_kernel_size_follows_the_channel_count():
    assert locvit.ECA(768).conv.kernel_size == (5,)      # t = int(|(log2 768 + 1) / 2|) = 5
    assert locvit.ECA(192).conv.kernel_size == (5,)      # t = 4 -> 5
    assert locvit.ECA(64).conv.kernel_size == (3,)       # t = 3


# --------------------------------------------------------------------------------------------------
# Every model: forward and backward at 224 px, 32 px, and on a non-square image
# --------------------------------------------------------------------------------------------------

def small(name):
    """Fewer blocks (the published widths and heads), so that 224 px runs stay quick."""
    if 'convit' in name:
        return dict(depth=3, local_up_to_layer=2)
    return dict(depth=2)


def known_gradient_free(model):
    """Parameters that cannot influence the logits, by construction:
    - the last LocalViT block's LFF: the class token bypasses it and the head reads only the
      class token;
    - GPSA's pos_proj.bias: a per-head constant added to every score before a softmax."""
    names = {n for n, _ in model.named_parameters() if n.endswith('pos_proj.bias')}
    last = len(model.blocks) - 1
    names |= {n for n, _ in model.named_parameters() if n.startswith(f'blocks.{last}.lff.')}
    return names


def check_all_gradients(model, x):
    model.train()
    with torch.no_grad():                  # pycls inits the head at zero, which blocks gradients
        model.head.weight.normal_(0, 0.02)
    out = model(x)
    assert out.shape == (x.shape[0], model.num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    exempt = known_gradient_free(model)
    silent = [n for n, p in model.named_parameters()
              if n not in exempt and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not silent, silent
    for n, p in model.named_parameters():
        if n in exempt:
            assert p.grad is None or p.grad.abs().max() < 1e-5, n


@pytest.mark.parametrize('name', VIT_FAMILY)
def test_forward_backward_at_224(name):
    model = locvit.create_model(name, num_classes=10, **small(name))
    check_all_gradients(model, torch.randn(2, 3, 224, 224))


@pytest.mark.parametrize('name', VIT_FAMILY)
def test_forward_backward_at_32px_with_patch_4(name):
    model = locvit.create_model(name, img_size=32, patch_size=4, num_classes=10, **small(name))
    assert model.grid == (8, 8)
    check_all_gradients(model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize('name', ['deit_t', 'convit_t', 'localvit_t', 'vit_c_1gf', 'vit_c_18gf'])
def test_forward_backward_on_a_non_square_image(name):
    model = locvit.create_model(name, img_size=(32, 48), patch_size=4, num_classes=10, **small(name))
    assert model.grid == (8, 12)
    check_all_gradients(model, torch.randn(2, 3, 32, 48))


def test_stochastic_depth_grows_linearly_and_is_off_in_eval():
    model = locvit.create_model('deit_t', img_size=32, patch_size=4, depth=5, drop_path=0.2)
    assert [round(b.drop_path.p, 3) for b in model.blocks] == [0.0, 0.05, 0.1, 0.15, 0.2]
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))


def test_forward_features_returns_every_layer():
    model = locvit.create_model('convit_t', img_size=32, patch_size=4, depth=3, local_up_to_layer=2)
    tokens, layers = model.forward_features(torch.randn(2, 3, 32, 32), return_layers=True)
    assert tokens.shape == (2, 65, 192)
    # embedding + 3 blocks; the class token joins before block 2
    assert [t.shape[1] for t in layers] == [64, 64, 64, 65]


def test_talking_heads_switch():
    """Talking heads mix the heads' logits before the softmax and their weights after it, with
    bias-free H x H maps (the over-smoothing code's proj_pre / proj_post): a bias after the softmax
    would change the function. Checked against the released form, a Linear over the head axis."""
    attn = locvit.Attention(32, 4, talking_heads=True)
    assert attn.proj_l.bias is None and attn.proj_w.bias is None
    assert locvit.count_params(attn) == locvit.count_params(locvit.Attention(32, 4)) + 2 * 4 * 4
    x = torch.randn(2, 10, 32)
    plain = locvit.Attention(32, 4)
    plain.load_state_dict(attn.state_dict(), strict=False)
    with torch.no_grad():                  # identity mixing = ordinary attention
        for lin in (attn.proj_l, attn.proj_w):
            lin.weight.copy_(torch.eye(4))
    torch.testing.assert_close(attn(x), plain(x))
    with torch.no_grad():
        attn.proj_l.weight.copy_(torch.randn(4, 4))
        attn.proj_w.weight.copy_(torch.randn(4, 4))
    assert not torch.allclose(attn(x), plain(x))
    q, k, v = attn.qkv(x).reshape(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * 8 ** -0.5
    logits = attn.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)       # released form
    weights = attn.proj_w(logits.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(attn.attention(x), weights)
    torch.testing.assert_close(attn(x), attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 32)))
    model = locvit.create_model('deit_t', img_size=32, patch_size=4, depth=2, talking_heads=True)
    check_all_gradients(model, torch.randn(2, 3, 32, 32))


# --------------------------------------------------------------------------------------------------
# Bad input: one clear ValueError
# --------------------------------------------------------------------------------------------------

def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'convit_tin'.*did you mean.*convit_t"):
        locvit.create_model('convit_tin')


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match='no option dropout'):
        locvit.create_model('deit_t', dropout=0.1)


def test_image_size_the_stride_does_not_divide():
    with pytest.raises(ValueError, match='not divisible by the stem stride 16'):
        locvit.create_model('deit_t', img_size=100)
    with pytest.raises(ValueError, match='not divisible by the stem stride 4'):
        locvit.create_model('vit_c_1gf', img_size=30, patch_size=4)
    with pytest.raises(ValueError, match='cannot have total stride 3'):
        locvit.create_model('vit_c_1gf', img_size=30, patch_size=3)


def test_wrong_input_is_refused():
    model = locvit.create_model('deit_t', img_size=32, patch_size=4, depth=1)
    with pytest.raises(ValueError, match=r'expected images \(B, 3, H, W\), got \(2, 1, 32, 32\)'):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match='built for 32x32 images, got 64x64'):
        model(torch.randn(2, 3, 64, 64))


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown activation 'gelu6'"):
        locvit.create_model('localvit_t', lff=dict(act='gelu6'))
