"""locvit — how locality makes Vision Transformers better, in one file.

Read it top to bottom, in the papers' order; every piece uses only what is above it.

  1. Helpers            tokens <-> images, relative positions, stochastic depth, init
  2. Stems              patchify (ViT / ViT_P) and the convolutional stem (ViT_C)
                        -- Xiao et al. 2021, "Early Convolutions Help Transformers See Better"
  3. Attention          multi-head self-attention (with optional talking heads)
  4. ConViT             gated positional self-attention (GPSA)
                        -- d'Ascoli et al. 2021, "ConViT: Improving Vision Transformers with
                           Soft Convolutional Inductive Biases"
  5. LocalViT           the MLP, and the locality feed-forward (LFF): a depthwise convolution
                        between the two linear layers -- Li et al. 2021, "LocalViT: Bringing
                        Locality to Vision Transformers"
  6. VisionTransformer  the pre-norm block, built from the attention and feed-forward it is
                        given, and one model class for DeiT, ConViT, LocalViT, ViT_P and ViT_C
  7. Over-smoothing     patch diversification: the cosine, contrastive and mixing losses,
                        patch-grid CutMix, and the over-smoothing curve (patch_similarity)
                        -- Gong et al. 2021, "Vision Transformers with Patch Diversification"
  Appendix A            LocalViT's LFF in four more transformers: PVT, Swin, TNT, T2T-ViT
  Appendix B            checkpoints: ours, timm's and the official releases; released weights
  Appendix C            the model zoo: create_model(name, pretrained=False, **overrides)
  Appendix D            measuring: count_params, count_macs
  Appendix E            the over-smoothing paper's released code: its contrastive loss, patch mix
                        and region loss

Shapes: B batch, N tokens, C (= D) width, H heads, d = C/H head width, h x w the patch grid.
Tokens are always row-major over the grid (token n <-> row n // w, column n % w); a class token,
when present, sits in front of the patch tokens, so the patch tokens are always x[:, -h*w:].
"""
import difflib
import functools
import inspect
import math
import os
import pickle
import random
import re
import zipfile
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# ==================================================================================================
# 1. Helpers
# ==================================================================================================

def pair(x):
    """224 -> (224, 224); (224, 160) stays as it is."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def seq2img(x, grid):
    """Seq2Img: patch tokens (B, h*w, C) -> feature map (B, C, h, w), row-major. A view, no copy:
    the map is channels-last in memory, the layout convolutions on it run fastest in."""
    return rearrange(x, 'b (h w) c -> b c h w', h=grid[0], w=grid[1])


def img2seq(x):
    """Img2Seq: feature map (B, C, h, w) -> tokens (B, h*w, C), row-major."""
    return rearrange(x, 'b c h w -> b (h w) c')


@functools.lru_cache(maxsize=32)
def relative_positions(h, w, device=None):
    """r_ij = [dx, dy, dx^2 + dy^2] for query i and key j of an h x w grid (dx = col_j - col_i,
    dy = row_j - row_i: ConViT's order): (h*w, h*w, 3) integers, exact, cached per grid and device."""
    n = torch.arange(h * w, device=device)
    rows, cols = n // w, n % w                  # token n <-> row n // w, column n % w
    dx = cols[None, :] - cols[:, None]
    dy = rows[None, :] - rows[:, None]
    return torch.stack([dx, dy, dx ** 2 + dy ** 2], dim=-1)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self):
        return f'p={self.p}'


def init_deit(module):
    """DeiT's init: every Linear trunc_normal(.02) with zero bias, LayerNorm (1, 0).
    Convolutions and BatchNorm keep PyTorch's defaults."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_pycls(model):
    """The init of pycls's ViT (Xiao et al.): lecun-normal patchify, a scaled normal on the conv
    stem's last 1x1, xavier-uniform attention and MLP weights, a zero head, zero class token."""
    for name, m in model.named_modules():
        if name.endswith('patch_embed.proj'):   # the conv stem's last 1x1, or the patchify conv
            if m.kernel_size == (1, 1):
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / m.out_channels))
            else:                               # lecun normal: std sqrt(1 / fan_in)
                nn.init.trunc_normal_(m.weight, std=math.sqrt(1 / m.weight[0].numel()))
            nn.init.zeros_(m.bias)
        elif name.endswith(('attn.qkv', '.fc1', '.fc2')):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=1e-6 if '.mlp.' in name else 0.0)
        elif name.endswith('attn.proj'):
            nn.init.zeros_(m.bias)              # weight: PyTorch's default
        elif name == 'head':
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.pos_embed, std=0.02)
    nn.init.zeros_(model.cls_token)


# ==================================================================================================
# 2. Stems: how an image becomes a grid of tokens
#    ViT_P cuts the image into P x P patches (one stride-P convolution). ViT_C (Xiao et al.)
#    replaces it by a few stride-2 3x3 convolutions (BN, ReLU), then a 1x1 convolution to D.
#    Both end in `proj` and return a (B, D, h, w) map; `stride` is their total stride.
# ==================================================================================================

class PatchEmbed(nn.Module):
    """Patchify stem (ViT_P): a linear map of each non-overlapping P x P patch."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.stride = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):                       # (B, 3, H, W) -> (B, D, H/P, W/P)
        return self.proj(x)


class ConvStem(nn.Module):
    """Convolutional stem (ViT_C): [3x3 conv (stride s) - BN - ReLU] x k, then 1x1 conv to D. Needs torch."""

    def __init__(self, channels=(24, 48, 96, 192), strides=(2, 2, 2, 2), in_chans=3, embed_dim=192):
        super().__init__()
        layers = []
        for c, s in zip(channels, strides):
            layers += [nn.Conv2d(in_chans, c, 3, stride=s, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            in_chans = c
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=1)
        self.stride = math.prod(strides)

    def forward(self, x):                       # (B, 3, H, W) -> (B, D, H/S, W/S)
        return self.proj(self.convs(x))


def stem_strides_for(strides, total):
    """The conv stem's strides for a given total stride: the last stride-2 convolutions become
    stride 1 (e.g. (2, 2, 2, 2) -> (2, 2, 1, 1) for total 4). Parameters do not change."""
    strides = list(strides)
    for i in reversed(range(len(strides))):
        if math.prod(strides) > total and strides[i] == 2:
            strides[i] = 1
    if math.prod(strides) != total:
        raise ValueError(f'a conv stem with strides {tuple(strides)} cannot have total stride '
                         f'{total}; use a power of two up to {math.prod(strides)}')
    return tuple(strides)


# ==================================================================================================
# 3. Attention: softmax(q k^T / sqrt(d)) v per head, on F.scaled_dot_product_attention
#    (fused kernels, no B x H x N x N tensor). Talking heads (Shazeer et al.; used by the
#    over-smoothing work) mixes the heads' logits before the softmax and the weights after it,
#    which needs the explicit form.
# ==================================================================================================

class Attention(nn.Module):
    """Multi-head self-attention (MHSA). forward(x, grid): the grid is not needed here."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, talking_heads=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads, self.talking_heads = num_heads, talking_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if talking_heads:                       # no biases: a bias after the softmax changes the map
            self.proj_l = nn.Linear(num_heads, num_heads, bias=False)   # mixes the heads' logits
            self.proj_w = nn.Linear(num_heads, num_heads, bias=False)   # mixes their weights

    def weights(self, q, k):
        """softmax(q k^T / sqrt(d)) (B, H, N, N), explicitly; talking heads mix the heads' logits
        before the softmax and their weights after it."""
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if not self.talking_heads:
            return logits.softmax(dim=-1)
        logits = torch.einsum('bhij,gh->bgij', logits, self.proj_l.weight)      # head g <- heads h
        return torch.einsum('bhij,gh->bgij', logits.softmax(dim=-1), self.proj_w.weight)

    def attention(self, x, grid=None):
        """The attention map (B, H, N, N) of tokens x (B, N, C)."""
        q, k, _ = rearrange(self.qkv(x), 'b n (three h d) -> three b h n d', three=3, h=self.num_heads)
        return self.weights(q, k)

    def forward(self, x, grid=None):            # (B, N, C) -> (B, N, C)
        q, k, v = rearrange(self.qkv(x), 'b n (three h d) -> three b h n d', three=3, h=self.num_heads)
        if self.talking_heads:                  # the explicit form: SDPA cannot mix the heads
            out = self.weights(q, k) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, 'b h n d -> b n (h d)'))


# ==================================================================================================
# 4. ConViT: gated positional self-attention (GPSA)
#    Each head mixes a content map and a positional map, AFTER both softmaxes:
#        A_h = (1 - g_h) softmax(q k^T / sqrt(d)) + g_h softmax(pos_proj(r_ij)),  g_h = sigmoid(λ_h)
#    r_ij = [dx, dy, dx^2 + dy^2]. The convolutional init makes head h attend to the patch at
#    offset Δ_h, like one tap of a sqrt(H) x sqrt(H) convolution; the gate λ_h (1 at init,
#    σ ≈ 0.73) lets training decide how much each head stays local.
#    The positional map does not depend on the input: it is computed once per forward as
#    (H, N, N) and shared by the batch; the gates fold into v and into that map, and the content
#    part runs on SDPA, so no B x H x N x N tensor is built:
#        out_h = SDPA(q, k, (1 - g_h) v)_h + (g_h P_h) @ v_h
# ==================================================================================================

class GPSA(nn.Module):
    """Gated positional self-attention. forward(x, grid): the patch tokens (B, h*w, C) of an
    h x w grid (no class token). Needs torch, einops and relative_positions."""

    def __init__(self, dim, num_heads=9, qkv_bias=False, locality_strength=1.0, local_init=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads, self.locality_strength, self.local_init = num_heads, locality_strength, local_init
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.gating_param = nn.Parameter(torch.ones(num_heads))

    def init_local(self):
        """The convolutional init (after the generic one): v = identity (each head passes on the patch
        it attends to unchanged, as one tap of a convolution copies its pixel), and head h = h1 + k*h2
        scores key j by -α ||δ_ij - Δ_h||^2 + const with Δ_h = (h2 - c, h1 - c)."""
        with torch.no_grad():
            self.v.weight.copy_(torch.eye(self.v.weight.shape[0]))
            k = int(self.num_heads ** 0.5)
            c = (k - 1) / 2
            for h in range(k * k):              # h1 = h % k, h2 = h // k
                self.pos_proj.weight[h] = torch.tensor([2 * (h // k - c), 2 * (h % k - c), -1.0])
            self.pos_proj.weight.mul_(self.locality_strength)
            self.pos_proj.bias.zero_()

    def positional_attention(self, grid):
        """softmax_j(pos_proj(r_ij)) for every head: (H, N, N), the same for every image; float32
        whatever the weights' dtype or autocast (bf16 would round the distance d^2 = 313 to 312)."""
        w = self.pos_proj.weight
        rel = relative_positions(*grid, device=w.device).float()                 # (N, N, 3)
        with torch.autocast(w.device.type, enabled=False):
            scores = F.linear(rel, w.float(), self.pos_proj.bias.float())         # (N, N, H)
        pos = rearrange(scores, 'i j h -> h i j').softmax(dim=-1)
        # far keys get float32 subnormals, which make CPU matmuls ~10x slower and change nothing
        return pos.masked_fill(pos < torch.finfo(pos.dtype).tiny, 0.0)

    def attention(self, x, grid):
        """The paper's map A = (1 - g) softmax(q k^T / sqrt(d)) + g softmax(pos_proj(r)), (B, H, N, N):
        forward(x) = proj(A @ v), computed explicitly (for analysis and teaching)."""
        q, k = rearrange(self.qk(x), 'b n (two h d) -> two b h n d', two=2, h=self.num_heads)
        content = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        g = rearrange(self.gating_param.sigmoid(), 'h -> h 1 1')
        return (1 - g) * content + g * self.positional_attention(grid)

    def forward(self, x, grid):                 # (B, h*w, C) -> (B, h*w, C): the same, fused
        q, k = rearrange(self.qk(x), 'b n (two h d) -> two b h n d', two=2, h=self.num_heads)
        v = rearrange(self.v(x), 'b n (h d) -> b h n d', h=self.num_heads)
        g = rearrange(self.gating_param.sigmoid(), 'h -> h 1 1')
        pos = (g * self.positional_attention(grid)).to(v.dtype)                   # (H, N, N), once
        # (g P) @ v for every image in one matmul per head: the batch goes beside d
        pos_out = pos @ rearrange(v, 'b h n d -> h n (b d)')
        out = F.scaled_dot_product_attention(q, k, v * (1 - g).to(v.dtype))
        out = out + rearrange(pos_out, 'h n (b d) -> b h n d', b=x.shape[0])
        return self.proj(rearrange(out, 'b h n d -> b n (h d)'))


# ==================================================================================================
# 5. LocalViT: feed-forward networks with locality
#    The transformer's MLP treats every token on its own. LocalViT's locality feed-forward puts a
#    depthwise 3x3 convolution between its two 1x1 ("linear") layers, so each token also sees its
#    8 neighbours on the patch grid (an inverted residual block, as in MobileNetV2):
#      tokens -> Seq2Img -> 1x1 (C -> γC) - BN - act -> depthwise 3x3 - BN - act -> [SE | ECA]
#             -> 1x1 (γC -> C) - BN -> + input -> Img2Seq
#    A class token has no place on the grid: it bypasses the module unchanged. At inference each
#    BatchNorm is a fixed affine map: fuse_batchnorm folds it into the convolution before it.
# ==================================================================================================

ACTIVATIONS = {'gelu': nn.GELU, 'hswish': nn.Hardswish, 'relu6': nn.ReLU6, 'relu': nn.ReLU}


def make_act(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Mlp(nn.Module):
    """fc1 (C -> hidden) - GELU - fc2 (hidden -> C), applied to each token on its own."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SqueezeExcite(nn.Module):
    """SE with LocalViT's h-sigmoid gate: pool -> fc1 -> ReLU -> fc2 -> h-sigmoid -> scale."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x):                       # (B, C, h, w)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * rearrange(s, 'b c -> b c 1 1')


class ECA(nn.Module):
    """Efficient channel attention: a 1D convolution across the pooled channels, sigmoid, scale."""

    def __init__(self, channels):
        super().__init__()
        t = int(abs((math.log2(channels) + 1) / 2))
        k = t if t % 2 else t + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):                       # (B, C, h, w)
        s = self.conv(rearrange(x.mean(dim=(2, 3)), 'b c -> b 1 c')).sigmoid()
        return x * rearrange(s, 'b 1 c -> b c 1 1')


class LocalityFeedForward(nn.Module):
    """LocalViT's locality feed-forward; the residual lives inside, there is no norm before it.
    forward(x, grid): x (B, n_prefix + h*w, C); the n_prefix leading tokens (a class token) pass
    unchanged. kernel_size 1 removes the locality alone (an ablation).
    Needs torch, einops, seq2img, img2seq, make_act (ACTIVATIONS), SqueezeExcite and ECA."""

    def __init__(self, dim, expand_ratio=4.0, act='hswish', channel_attn='se', reduction=4, kernel_size=3):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden,
                                bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        if channel_attn == 'se':
            self.se = SqueezeExcite(hidden, reduction)
        elif channel_attn == 'eca':
            self.se = ECA(hidden)
        elif channel_attn in ('none', None):
            self.se = nn.Identity()
        else:
            raise ValueError(f"unknown channel_attn {channel_attn!r}; choose 'se', 'eca' or 'none'")
        self.conv2 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(dim)
        self.act = make_act(act)

    def branch(self, y):                        # the inverted residual, on the map (B, C, h, w)
        z = self.act(self.bn1(self.conv1(y)))
        z = self.se(self.act(self.bn2(self.dwconv(z))))
        return self.bn3(self.conv2(z))

    def forward(self, x, grid):                 # (B, n_prefix + h*w, C) -> same
        n = grid[0] * grid[1]
        prefix, y = x[:, :x.shape[1] - n], seq2img(x[:, -n:], grid)     # (B, C, h, w), a view
        y = img2seq(y + self.branch(y))
        if prefix.shape[1]:                     # the class token rejoins, unchanged
            return torch.cat([prefix, y], dim=1)
        return y


@torch.no_grad()
def fuse_batchnorm(model):
    """For inference (in place; -> the model, in eval mode): fold each BatchNorm of the LFFs and conv
    stems into the conv before it, W' = W s, b' = β - μ s, s = γ / sqrt(σ² + ε); 3 passes fewer."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    model.eval()
    for m in model.modules():
        pairs = [('conv1', 'bn1'), ('dwconv', 'bn2'), ('conv2', 'bn3')]
        if isinstance(m, nn.Sequential):        # the conv stem: conv, BN, ReLU, conv, BN, ...
            pairs = [(str(i), str(i + 1)) for i in range(len(m) - 1)]
        for conv, bn in pairs:
            if isinstance(getattr(m, conv, None), nn.Conv2d) and isinstance(getattr(m, bn, None), nn.BatchNorm2d):
                setattr(m, conv, fuse_conv_bn_eval(getattr(m, conv), getattr(m, bn)))
                setattr(m, bn, nn.Identity())
    return model


# ==================================================================================================
# 6. The pre-norm block and the VisionTransformer
#    x = x + drop_path(attn(norm1(x)));  x = x + drop_path(mlp(norm2(x)))        (DeiT, ConViT)
#    x = x + drop_path(attn(norm1(x)));  x = lff(x)                               (LocalViT)
#    ConViT: GPSA in blocks 0..L-1 (L = local_up_to_layer), which see patch tokens only; the
#    class token joins just before block L. pos_embed covers the tokens present at block 0.
# ==================================================================================================

class Block(nn.Module):
    """A pre-norm block around the attention and feed-forward modules it is given: attn(x, grid); an
    Mlp as mlp(x), a LocalityFeedForward (its own norm, BatchNorm, and residual) as lff(x, grid)."""

    def __init__(self, dim, attn, ffn, drop_path=0.0, eps=1e-6):
        super().__init__()
        self.norm1, self.attn, self.drop_path = nn.LayerNorm(dim, eps=eps), attn, DropPath(drop_path)
        if isinstance(ffn, LocalityFeedForward):
            self.lff = ffn
        else:
            self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), ffn

    def forward(self, x, grid):
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        if hasattr(self, 'lff'):
            return self.lff(x, grid)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def feed_forward(dim, ratio, lff=None):
    """The MLP, or LocalViT's LFF when lff is a dict of its options (act, channel_attn, reduction, ...)."""
    return Mlp(dim, int(dim * ratio)) if lff is None else LocalityFeedForward(dim, ratio, **lff)


class Backbone(nn.Module):
    """What every model of the zoo shares: its size, the input check, and the class-token head
    (a model without a class token overrides forward_head). A subclass defines forward_features,
    `grid` (the final patch grid) and, where it learns position embeddings, pos_embed_grids."""

    def __init__(self, img_size, in_chans, num_classes):
        super().__init__()
        self.img_size, self.in_chans, self.num_classes = pair(img_size), in_chans, num_classes
        if min(self.img_size) < 1 or in_chans < 1 or num_classes < 1:
            raise ValueError(f'img_size {img_size}, in_chans {in_chans} and num_classes {num_classes} must be '
                             f'positive')

    def pos_embed_grids(self):
        """{state-dict key: (class-token slots, grid)} of every learned position embedding."""
        return {}

    def check_input(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'expected images (B, {self.in_chans}, H, W), got {tuple(x.shape)}; '
                             f'build the model with in_chans={x.shape[1] if x.ndim == 4 else "?"}')
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f'the model was built for {self.img_size[0]}x{self.img_size[1]} images, got '
                             f'{x.shape[-2]}x{x.shape[-1]}; resize the input, or build the model with '
                             f'img_size={tuple(x.shape[-2:])} and load the checkpoint into it (position '
                             f'embeddings are resized)')

    def join_cls(self, x):
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def forward_head(self, x):
        return self.head(x[:, 0])

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class VisionTransformer(Backbone):
    """DeiT and ViT_P; ViT_C with conv_stem={'channels': ..., 'strides': ...}; ConViT with
    local_up_to_layer > 0 (gpsa: GPSA's options, locality_strength and local_init); LocalViT with
    lff={...} (LocalityFeedForward's options). Each option goes to the one module that uses it."""

    def __init__(self, img_size=224, patch_size=None, in_chans=3, num_classes=1000, embed_dim=192, depth=12,
                 num_heads=3, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, conv_stem=None,
                 local_up_to_layer=0, gpsa=None, lff=None, talking_heads=False, init='deit'):
        super().__init__(img_size, in_chans, num_classes)
        if conv_stem is not None:               # ViT_C; strides 2 each unless given
            channels = conv_stem['channels']
            strides = tuple(conv_stem.get('strides') or (2,) * len(channels))
            strides = stem_strides_for(strides, patch_size) if patch_size else strides
            self.patch_embed = ConvStem(channels, strides, in_chans, embed_dim)
        else:                                   # ViT_P
            self.patch_embed = PatchEmbed(patch_size or 16, in_chans, embed_dim)
        self.patch_size = p = self.patch_embed.stride
        if any(s % p for s in self.img_size):
            raise ValueError(f'img_size {self.img_size} is not divisible by the stem stride {p}; '
                             f'use a multiple of {p}')
        self.grid = (self.img_size[0] // p, self.img_size[1] // p)
        if not 0 <= local_up_to_layer <= depth:
            raise ValueError(f'local_up_to_layer {local_up_to_layer} must lie in [0, depth={depth}]')
        if gpsa and local_up_to_layer == 0:
            raise ValueError(f'gpsa={gpsa} sets GPSA blocks, and this model has none; add local_up_to_layer=L '
                             f'(GPSA in the first L blocks)')
        self.cls_at = local_up_to_layer           # the block before which the class token joins
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        cls_slots = 1 if self.cls_at == 0 else 0  # pos_embed covers the tokens of block 0
        self.pos_embed = nn.Parameter(torch.zeros(1, cls_slots + math.prod(self.grid), embed_dim))
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList([Block(     # GPSA in blocks 0 .. local_up_to_layer - 1
            embed_dim, GPSA(embed_dim, num_heads, qkv_bias, **(gpsa or {})) if i < local_up_to_layer
            else Attention(embed_dim, num_heads, qkv_bias, talking_heads),
            feed_forward(embed_dim, mlp_ratio, lff), dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        # init: DeiT's (trunc_normal .02), or pycls's for ViT_P / ViT_C; then ConViT's local init
        if init == 'pycls':
            init_pycls(self)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            self.apply(init_deit)
        for m in self.modules():
            if isinstance(m, GPSA) and m.local_init:
                m.init_local()

    def pos_embed_grids(self):
        return {'pos_embed': (self.pos_embed.shape[1] - math.prod(self.grid), self.grid)}

    def forward_features(self, x, return_layers=False):
        """Tokens after the final norm (B, 1 + h*w, C), class token first. With return_layers,
        also the list [embedding, block 1 output, ..., block L output] (before the final norm);
        ConViT's first layers hold patch tokens only (the class token joins later)."""
        self.check_input(x)
        x = img2seq(self.patch_embed(x))
        x = (self.join_cls(x) if self.cls_at == 0 else x) + self.pos_embed
        layers = [x]
        for i, block in enumerate(self.blocks):
            if i == self.cls_at and i > 0:      # ConViT: the class token joins here
                x = self.join_cls(x)
            x = block(x, self.grid)
            layers.append(x)
        if self.cls_at > 0 and self.cls_at == len(self.blocks):     # after the last block
            x = self.join_cls(x)
        x = self.norm(x)
        return (x, layers) if return_layers else x


# ==================================================================================================
# 7. Suppressing over-smoothing: patch diversification (Gong et al. 2021)
#    With depth, the patch tokens of one image become nearly parallel ("over-smoothing"): their
#    mean pairwise |cosine| climbs towards 1 (≈ 0.9 in the last layer of a 24-layer DeiT-B).
#    Three losses, added to the usual one, keep the last layer's patches h^L apart:
#      cosine       L_cos = 1/(n(n-1)) Σ_{i≠j} |cos(h^L_i, h^L_j)|
#      contrastive  L_con = -(1/n) Σ_i log softmax_j(sim(e_i, h^L_j) / τ)[i], e = the patch
#                   embedding (detached): each last-layer patch stays closest to its own input
#      mixing       CutMix on the patch grid, every patch labelled with the image it came from;
#                   L_mix = (1/n) Σ_i CE(head_patch(h^L_i), y_i)
#    The mean |cosine| measured on every layer is the over-smoothing curve (patch_similarity).
#    Plain functions on token tensors; the training script weighs and adds them. The released
#    code's variants of the losses and of the mixing are in appendix E.
# ==================================================================================================

def patch_tokens(layer, grid):
    """The patch tokens (B, h*w, C) of one layer (B, N, C): its last h*w tokens; a class token,
    when the layer has one, sits in front."""
    n = grid[0] * grid[1]
    if layer.ndim != 3 or layer.shape[1] - n not in (0, 1):
        raise ValueError(f'a layer of shape {tuple(layer.shape)} does not hold the {n} patch '
                         f'tokens of a {grid[0]}x{grid[1]} grid (plus at most a class token); '
                         f'pass the grid of the model that made it (model.grid)')
    return layer[:, -n:]


def patch_cosine_loss(tokens):
    """L_cos = 1/(n(n-1)) Σ_{i≠j} |cos(h_i, h_j)| over the patch tokens (B, n, C) of one layer, per image,
    averaged over the batch: 1 when the patches are parallel, 0 when orthogonal. Needs torch."""
    if tokens.ndim != 3 or tokens.shape[1] < 2:
        raise ValueError(f'expected patch tokens (B, n, C) with n >= 2 patches, got '
                         f'{tuple(tokens.shape)}')
    n = tokens.shape[1]
    unit = F.normalize(tokens, dim=-1)
    cos = unit @ unit.transpose(1, 2)                                       # (B, n, n)
    self_pairs = torch.eye(n, dtype=torch.bool, device=tokens.device)
    return (cos.abs().masked_fill(self_pairs, 0.0).sum(dim=(1, 2)) / (n * (n - 1))).mean()


@torch.no_grad()
def patch_similarity(layers, grid):
    """The over-smoothing curve: the mean pairwise |cosine| of the patch tokens of every layer (embedding,
    block 1, ..., block L), averaged over the images: a 1-D tensor, one value in [0, 1] per layer."""
    return torch.stack([patch_cosine_loss(patch_tokens(x, grid).float()) for x in layers])


def patch_contrastive_loss(embed, last, temperature=0.1, normalize=True):
    """InfoNCE between the patches of one image: each patch's embedding e_i (the stem's output, before
    any attention) must pick out its own last-layer token h^L_i (the positive) among all h^L_j:
        L_con = -(1/n) Σ_i log softmax_j(sim(e_i, h^L_j) / τ)[i],  per image, batch-averaged.
    embed, last: (B, n, C); the embedding is detached (a fixed target: only the last layer moves).
    The paper's sim is the raw dot product, τ = 1 (normalize=False, temperature=1), which saturates
    the softmax on wide tokens (and overflows exp() in half precision); so by default sim is the
    cosine with τ = 0.1, the usual InfoNCE temperature (logits within [-10, 10]). Needs torch, einops."""
    if embed.ndim != 3 or embed.shape != last.shape or embed.shape[1] < 2:
        raise ValueError(f'expected embedding and last-layer patch tokens of one shape (B, n, C), '
                         f'n >= 2; got {tuple(embed.shape)} and {tuple(last.shape)}')
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    anchor = embed.detach()
    if normalize:
        anchor, last = F.normalize(anchor, dim=-1), F.normalize(last, dim=-1)
    logits = anchor @ last.transpose(1, 2) / temperature                  # (B, n, n): (i, j)
    b, n = logits.shape[:2]
    positives = torch.arange(n, device=logits.device).repeat(b)            # row i: column i
    return F.cross_entropy(rearrange(logits, 'b i j -> (b i) j'), positives)


def patch_cutmix(images, labels, num_classes, grid, patch_size, alpha=1.0, generator=None,
                 return_mask=False):
    """CutMix with the box on the patch grid, so that every patch comes from one image: λ ~ Beta(α,
    α), a box of round(sqrt(1-λ) h) x round(sqrt(1-λ) w) patches placed uniformly inside the grid;
    one box for the batch, image b receives it from image b - 1 (as torchvision's CutMix).
    images (B, C, h*P, w*P) (P: model.patch_size, a conv stem's total stride), labels (B,). ->
      mixed (B, C, H, W); target (B, num_classes) = (1 - a) onehot(y_b) + a onehot(y_{b-1}) with a
      the pasted fraction of the grid; patch_labels (B, h*w): the label of each patch's image;
      mask (h*w,) bool, True inside the box (only with return_mask=True).
    The draws come from `generator` or torch's global one. Needs torch and einops."""
    (h, w), p = grid, patch_size
    if images.ndim != 4 or tuple(images.shape[-2:]) != (h * p, w * p):
        raise ValueError(f'images {tuple(images.shape)} do not fit a {h}x{w} grid of {p}-pixel '
                         f'patches: expected (B, C, {h * p}, {w * p})')
    if labels.shape != images.shape[:1] or labels.is_floating_point():
        raise ValueError(f'expected labels as (B,) = ({images.shape[0]},) class indices, got '
                         f'{labels.dtype} {tuple(labels.shape)}')
    if not alpha > 0:
        raise ValueError(f'alpha must be > 0, got {alpha}')
    rng = random.Random(int(torch.randint(2 ** 62, (), generator=generator)))
    cut = math.sqrt(1.0 - rng.betavariate(alpha, alpha))
    bh, bw = round(h * cut), round(w * cut)                  # the box, in patches
    top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
    rows, cols = slice(top * p, (top + bh) * p), slice(left * p, (left + bw) * p)
    mixed = images.clone()
    mixed[:, :, rows, cols] = images.roll(1, dims=0)[:, :, rows, cols]
    box = torch.zeros(h, w, dtype=torch.bool, device=images.device)
    box[top:top + bh, left:left + bw] = True
    mask, rolled = rearrange(box, 'h w -> (h w)'), labels.roll(1, dims=0)
    patch_labels = torch.where(mask, rolled[:, None], labels[:, None])
    area = bh * bw / (h * w)
    target = ((1 - area) * F.one_hot(labels, num_classes).float()
              + area * F.one_hot(rolled, num_classes).float())
    return (mixed, target, patch_labels, mask) if return_mask else (mixed, target, patch_labels)


class PatchHead(nn.Linear):
    """The mixing loss's patch classifier: one Linear(C, num_classes) for all patch tokens after the final
    norm (as released), DeiT's init; beside the model, whose state_dict stays the published one."""

    def __init__(self, dim, num_classes):
        super().__init__(dim, num_classes)
        init_deit(self)


def patch_mixing_loss(patch_logits, patch_labels):
    """L_mix = (1/n) Σ_i CE(head_patch(h^L_i), y_i): each patch's prediction (B, n, K) against the label
    of the image it came from (B, n), averaged over patches and images. Needs torch and einops."""
    if patch_logits.ndim != 3 or patch_labels.shape != patch_logits.shape[:2]:
        raise ValueError(f'expected patch logits (B, n, K) and patch labels (B, n), got '
                         f'{tuple(patch_logits.shape)} and {tuple(patch_labels.shape)}')
    return F.cross_entropy(rearrange(patch_logits, 'b n k -> (b n) k'),
                           rearrange(patch_labels, 'b n -> (b n)'))


# ==================================================================================================
# Appendix A. LocalViT beyond DeiT: PVT, Swin, TNT, T2T-ViT (Li et al. 2021)
#    LocalViT puts the same locality feed-forward into four more transformers, in place of every (outer)
#    block's norm2 + MLP (lff={...}: h-swish + SE; a class token bypasses it). They are built from the
#    pieces above (Block with PVT's and Swin's own attention modules, Attention, Mlp, LocalityFeedForward)
#    and share VisionTransformer's interface: img_size, in_chans, num_classes, grid (the final patch
#    grid), pos_embed_grids, forward_features(x, return_layers), forward_head, forward. return_layers
#    gives [embedding, block outputs...] on `grid` only: for the pyramids (PVT, Swin) the last stage,
#    for TNT and T2T-ViT the (outer) patch tokens of every block, as in the ViT.
# ==================================================================================================

def finish(model, dim, eps, *tables):
    """A backbone's final norm and head, then DeiT's init; the learned tables trunc_normal(.02)."""
    model.norm, model.head = nn.LayerNorm(dim, eps=eps), nn.Linear(dim, model.num_classes)
    model.apply(init_deit)
    for t in tables:
        nn.init.trunc_normal_(t, std=0.02)


def run_blocks(blocks, x, grid):
    """-> the last output and [x, every block's output]."""
    layers = [x]
    for block in blocks:
        layers.append(block(layers[-1], grid))
    return layers[-1], layers


def with_reduction(lff, reduction):
    """An LFF's options with the family's SE reduction (None: the MLP)."""
    return None if lff is None else {'reduction': reduction, **lff}


class NormedPatchEmbed(PatchEmbed):
    """PatchEmbed (section 2), then a LayerNorm over the tokens (PVT, Swin; eps 1e-5)."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__(patch_size, in_chans, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):                       # (B, C, H, W) -> (B, h*w, D), (h, w)
        x = self.proj(x)
        return self.norm(img2seq(x)), tuple(x.shape[-2:])


# --- PVT (Wang et al. 2021): a pyramid of four stages --------------------------------------------
# Stage i: a strided-conv patch embedding (+ LayerNorm) to grid H/4, /8, /16, /32, + the stage's
# position embedding, then blocks. Spatial-reduction attention: queries from every token, keys and
# values from the map shrunk sr x by a strided convolution (+ LayerNorm). The class token joins in
# the last stage (sr = 1). LocalViT-PVT: LFF(γ = the stage's MLP ratio, SE width γ: reduction =
# dim). LayerNorm eps: blocks and the final norm 1e-6, patch embeddings and the reduction norm 1e-5.

class SpatialReductionAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, sr_ratio=1):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:                        # (the stages with a class token have sr = 1)
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, grid):                 # (B, N, C) -> (B, N, C)
        q = rearrange(self.q(x), 'b n (h d) -> b h n d', h=self.num_heads)
        if hasattr(self, 'sr'):                 # keys and values from the reduced map
            x = self.norm(img2seq(self.sr(seq2img(x, grid))))
        k, v = rearrange(self.kv(x), 'b n (two h d) -> two b h n d', two=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, 'b h n d -> b n (h d)'))


class PVTStage(nn.Module):
    def __init__(self, in_chans, dim, stride, num_tokens, num_heads, mlp_ratio, sr_ratio, qkv_bias,
                 drop_paths, lff):
        super().__init__()
        self.patch_embed = NormedPatchEmbed(stride, in_chans, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))   # [class token +] h*w
        self.blocks = nn.ModuleList([
            Block(dim, SpatialReductionAttention(dim, num_heads, qkv_bias, sr_ratio),
                  feed_forward(dim, mlp_ratio, with_reduction(lff, dim)), p, eps=1e-6)
            for p in drop_paths])


class PVT(Backbone):
    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000,
                 embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), qkv_bias=True, drop_path=0.0, lff=None):
        super().__init__(img_size, in_chans, num_classes)
        total = patch_size * 2 ** (len(depths) - 1)
        if any(s % total for s in self.img_size):
            raise ValueError(f'PVT needs an image size divisible by {total} (patch_size x 2 per '
                             f'later stage), got {self.img_size}')
        self.grid, self.num_stages = tuple(s // total for s in self.img_size), len(depths)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
        dprs = torch.linspace(0, drop_path, sum(depths)).split(list(depths))    # per stage
        self.stages = nn.ModuleList([PVTStage(     # the last stage's tokens: class token + h*w
            embed_dims[i - 1] if i else in_chans, dim, 2 if i else patch_size,
            self.cls_slots(i) + math.prod(self.stage_grid(i)), num_heads[i], mlp_ratios[i],
            sr_ratios[i], qkv_bias, dp.tolist(), lff) for i, (dim, dp) in enumerate(zip(embed_dims, dprs))])
        finish(self, embed_dims[-1], 1e-6, self.cls_token, *[stage.pos_embed for stage in self.stages])

    def stage_grid(self, i):
        """Stage i's grid: 2^(stages - 1 - i) x the final one."""
        return tuple(s * 2 ** (self.num_stages - 1 - i) for s in self.grid)

    def cls_slots(self, i):
        """The class token joins in the last stage only."""
        return 1 if i == self.num_stages - 1 else 0

    def pos_embed_grids(self):
        return {f'stages.{i}.pos_embed': (self.cls_slots(i), self.stage_grid(i)) for i in range(self.num_stages)}

    def forward_features(self, x, return_layers=False):
        """(B, 1 + h*w, C) after the final norm, class token first; layers: the last stage's."""
        self.check_input(x)
        for i, stage in enumerate(self.stages):
            last = i == self.num_stages - 1
            x, grid = stage.patch_embed(x)      # map -> tokens (B, h*w, C)
            x = (self.join_cls(x) if last else x) + stage.pos_embed      # the class token joins last
            x, layers = run_blocks(stage.blocks, x, grid)
            x = x if last else seq2img(x, grid)     # tokens -> map for the next stage
        x = self.norm(x)
        return (x, layers) if return_layers else x


# --- Swin (Liu et al. 2021): attention in shifted windows -----------------------------------------
# Attention runs inside non-overlapping ws x ws windows, plus a learned bias per relative position.
# Every second block first rolls the map by ws/2, and a mask (-100, as the reference) keeps apart
# the tokens that were not neighbours before the roll. Stages end in patch merging (2x2 -> 4C ->
# 2C); the head reads the mean token. A stage whose grid is no larger than the window (the last
# one at 224 px) is not shifted. Grids the window does not divide are zero-padded and the padded
# keys masked, so any size works; unlike the reference, a grid smaller than the window keeps the
# window size (and its bias table, so one checkpoint loads at every size) instead of shrinking it.
# LayerNorm eps 1e-5. LocalViT-Swin: LFF(γ 4, SE width 16: reduction = dim / 4) in every block.

def relative_position_index(ws):
    """Row of the (2ws-1)^2 bias table for query i and key j of a window: by pos_i - pos_j."""
    r = relative_positions(ws, ws)              # pos_j - pos_i
    return (ws - 1 - r[..., 1]) * (2 * ws - 1) + (ws - 1 - r[..., 0])    # each in 0 .. 2ws-2


def window_mask(h, w, ws, shift, device=None):
    """Additive mask (windows, 1, ws*ws, ws*ws) for the padded, rolled h x w map (None: nothing masked): a
    query sees only keys of its own region (rows / columns wrapped around by the roll; padding: -1)."""
    hp, wp = h + -h % ws, w + -w % ws
    if shift == 0 and (hp, wp) == (h, w):
        return None
    rows, cols = torch.arange(hp, device=device), torch.arange(wp, device=device)
    region = 2 * (rows < shift)[:, None] + (cols < shift)[None, :]
    region = region.masked_fill((rows >= h)[:, None] | (cols >= w)[None, :], -1)
    region = rearrange(torch.roll(region, (-shift, -shift), (0, 1)), '(m i) (n j) -> (m n) (i j)',
                       i=ws, j=ws)
    return (region[:, :, None] != region[:, None, :]).float()[:, None] * -100.0


class WindowAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size=7, shift_size=0, qkv_bias=True):
        super().__init__()
        self.num_heads, self.window_size, self.shift_size = num_heads, window_size, shift_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(window_size), persistent=False)

    def forward(self, x, grid):                 # (B, h*w, C) -> (B, h*w, C)
        (h, w), ws, s = grid, self.window_size, self.shift_size
        qkv = rearrange(self.qkv(x), 'b (h w) c -> b h w c', h=h)
        qkv = F.pad(qkv, (0, 0, 0, -w % ws, 0, -h % ws))           # padding: q = k = v = 0
        qkv = torch.roll(qkv, (-s, -s), dims=(1, 2))
        m, n = qkv.shape[1] // ws, qkv.shape[2] // ws               # windows down, across
        # windows and heads share one batch axis: 4-d tensors, as SDPA's fused kernels want
        q, k, v = rearrange(qkv, 'b (m i) (n j) (three h d) -> three b (m n h) (i j) d',
                            i=ws, j=ws, three=3, h=self.num_heads)
        bias = self.relative_position_bias_table[self.relative_position_index]     # (N, N, H)
        mask = window_mask(h, w, ws, s, x.device)                   # (windows, 1, N, N) or None
        bias = rearrange(bias, 'i j h -> 1 h i j') + (0 if mask is None else mask)
        bias = rearrange(bias.expand(m * n, -1, -1, -1), 'w h i j -> (w h) i j')
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = rearrange(out, 'b (m n h) (i j) d -> b (m i) (n j) (h d)', m=m, n=n, i=ws)
        out = torch.roll(out, (s, s), dims=(1, 2))[:, :h, :w]
        return self.proj(rearrange(out, 'b h w c -> b (h w) c'))


class PatchMerging(nn.Module):
    """2 x 2 neighbouring tokens -> one token of 4C channels -> LayerNorm -> Linear to 2C."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, grid):                 # (B, h*w, C) -> (B, h/2 * w/2, 2C)
        h, w = grid                             # an odd side is zero-padded
        x = F.pad(rearrange(x, 'b (h w) c -> b h w c', h=h), (0, 0, 0, w % 2, 0, h % 2))
        # channels: the neighbours (row, col) in the order (0,0) (1,0) (0,1) (1,1)
        x = rearrange(x, 'b (h i) (w j) c -> b (h w) (j i c)', i=2, j=2)
        return self.reduction(self.norm(x)), ((h + 1) // 2, (w + 1) // 2)


class SwinStage(nn.Module):
    def __init__(self, dim, grid, num_heads, window_size, mlp_ratio, qkv_bias, drop_paths, lff, downsample):
        super().__init__()
        shift = window_size // 2 if min(grid) > window_size else 0     # the reference's rule
        self.blocks = nn.ModuleList([
            Block(dim, WindowAttention(dim, num_heads, window_size, shift if i % 2 else 0, qkv_bias),
                  feed_forward(dim, mlp_ratio, with_reduction(lff, dim // 4)), p, eps=1e-5)
            for i, p in enumerate(drop_paths)])
        self.downsample = PatchMerging(dim) if downsample else None


class Swin(Backbone):
    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                 qkv_bias=True, drop_path=0.0, lff=None):
        super().__init__(img_size, in_chans, num_classes)
        if any(s % patch_size for s in self.img_size):
            raise ValueError(f'img_size {self.img_size} is not divisible by patch_size {patch_size}')
        self.patch_embed = NormedPatchEmbed(patch_size, in_chans, embed_dim)
        grid = tuple(s // patch_size for s in self.img_size)
        self.stages = nn.ModuleList()
        for i, dp in enumerate(torch.linspace(0, drop_path, sum(depths)).split(list(depths))):
            last = i == len(depths) - 1
            self.stages.append(SwinStage(embed_dim * 2 ** i, grid, num_heads[i], window_size,
                                         mlp_ratio, qkv_bias, dp.tolist(), lff, downsample=not last))
            grid = grid if last else ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        self.grid = grid
        finish(self, embed_dim * 2 ** (len(depths) - 1), 1e-5, *[
            m.relative_position_bias_table for m in self.modules() if isinstance(m, WindowAttention)])

    def forward_features(self, x, return_layers=False):
        """(B, h*w, C) after the final norm, no class token; layers: the last stage's."""
        self.check_input(x)
        x, grid = self.patch_embed(x)
        for stage in self.stages:
            x, layers = run_blocks(stage.blocks, x, grid)
            if stage.downsample is not None:
                x, grid = stage.downsample(x, grid)
        x = self.norm(x)
        return (x, layers) if return_layers else x

    def forward_head(self, x):
        return self.head(x.mean(dim=1))


# --- TNT (Han et al. 2021): a transformer inside every patch --------------------------------------
# Each 16 x 16 patch is also a sequence of p x p "pixel" tokens (width in_dim, from a 7x7 stride-4
# convolution). A block runs an inner transformer over the pixels of each patch, adds the pixels
# (flattened, normed, projected) to their patch token (the class token gets none), then runs the
# outer transformer over the patches. LocalViT-TNT replaces only the outer MLP (LFF γ 4, SE
# width 4: reduction = dim). The reference's separate qk and v Linears are the rows of our one
# qkv. LayerNorm eps 1e-5.

class TNTBlock(nn.Module):
    def __init__(self, dim, in_dim, num_pixel, num_heads, in_num_heads, mlp_ratio, qkv_bias, drop_path, lff):
        super().__init__()
        self.inner = Block(in_dim, Attention(in_dim, in_num_heads, qkv_bias), Mlp(in_dim, 4 * in_dim),
                           drop_path, eps=1e-5)
        self.pixel_norm = nn.LayerNorm(in_dim)
        self.pixel_proj = nn.Linear(num_pixel * in_dim, dim)
        self.outer = Block(dim, Attention(dim, num_heads, qkv_bias),
                           feed_forward(dim, mlp_ratio, with_reduction(lff, dim)), drop_path, eps=1e-5)

    def forward(self, pixels, patches, grid):   # (B*h*w, p*p, c), (B, 1 + h*w, C)
        pixels = self.inner(pixels, None)
        info = rearrange(self.pixel_norm(pixels), '(b n) p c -> b n (p c)', b=patches.shape[0])
        patches = torch.cat([patches[:, :1], patches[:, 1:] + self.pixel_proj(info)], dim=1)
        return pixels, self.outer(patches, grid)


class TNT(Backbone):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192,
                 in_dim=12, depth=12, num_heads=3, in_num_heads=3, mlp_ratio=4.0, qkv_bias=False,
                 first_stride=4, drop_path=0.0, lff=None):
        super().__init__(img_size, in_chans, num_classes)
        if any(s % patch_size for s in self.img_size) or patch_size % first_stride:
            raise ValueError(f'TNT needs img_size {self.img_size} divisible by patch_size '
                             f'{patch_size}, and patch_size by first_stride {first_stride}')
        self.grid = tuple(s // patch_size for s in self.img_size)
        self.pixel_size = p = patch_size // first_stride    # a patch is p x p pixel tokens
        self.pixel_embed = nn.Conv2d(in_chans, in_dim, 7, stride=first_stride, padding=3)
        self.pixel_pos = nn.Parameter(torch.zeros(1, p * p, in_dim))
        self.pixel_norm = nn.LayerNorm(p * p * in_dim)
        self.pixel_proj = nn.Linear(p * p * in_dim, embed_dim)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.blocks = nn.ModuleList([
            TNTBlock(embed_dim, in_dim, p * p, num_heads, in_num_heads, mlp_ratio, qkv_bias, dp, lff)
            for dp in torch.linspace(0, drop_path, depth).tolist()])
        finish(self, embed_dim, 1e-5, self.cls_token, self.patch_pos, self.pixel_pos)

    def pos_embed_grids(self):                  # pixel_pos does not depend on the image size
        return {'patch_pos': (1, self.grid)}

    def forward_features(self, x, return_layers=False):
        """(B, 1 + h*w, C) after the final norm, class token first; layers: the outer blocks'."""
        self.check_input(x)
        p = self.pixel_size
        pixels = rearrange(self.pixel_embed(x), 'b c (h i) (w j) -> (b h w) (i j) c', i=p, j=p)
        pixels = pixels + self.pixel_pos
        patches = rearrange(pixels, '(b n) p c -> b n (p c)', b=x.shape[0])
        patches = self.join_cls(self.patch_norm(self.pixel_proj(self.pixel_norm(patches)))) + self.patch_pos
        layers = [patches]
        for block in self.blocks:
            pixels, patches = block(pixels, patches, self.grid)
            layers.append(patches)
        x = self.norm(patches)
        return (x, layers) if return_layers else x


# --- T2T-ViT (Yuan et al. 2021): tokens-to-token ------------------------------------------------
# The tokens-to-token module soft-splits the image into overlapping 7x7 patches (stride 4), re-
# structures them with a one-head performer layer (width token_dim), folds them back into a map,
# and repeats with 3x3 patches (stride 2) twice: grid H/16. Then a plain ViT with a class token
# and a frozen sinusoid position table. Performer: softmax(q k^T) ≈ φ(q) φ(k)^T with m =
# token_dim/2 random features φ(x) = exp(ωx - |x|²/2)/√m, ω frozen (orthogonal rows x √m);
# the width changes, so v is the skip: y = v + proj(attention). LocalViT-T2T: LFF in every
# block (γ = MLP ratio, SE width 4: reduction 128), and in the performers an LFF (γ 1, h-swish,
# no SE) replaces norm2 + MLP. LayerNorm eps 1e-5.

SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))   # (kernel, stride, padding): grids H/4, /8, /16


def soft_split(x, kernel, stride, padding):
    """Overlapping k x k patches of a map as tokens (B, h*w, C*k*k), channel-major, and the grid."""
    grid = tuple((s + 2 * padding - kernel) // stride + 1 for s in x.shape[-2:])
    patches = F.unfold(x, kernel, padding=padding, stride=stride)     # (B, C*k*k, h*w)
    return rearrange(patches, 'b ckk n -> b n ckk'), grid


def sinusoid_table(n, dim):
    """The Transformer's fixed position table (1, n, dim): sin on even, cos on odd channels."""
    j = torch.arange(dim)
    angle = torch.arange(n, dtype=torch.float64)[:, None] / 10000 ** (2 * (j // 2) / dim)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()[None]


class TokenPerformer(nn.Module):
    def __init__(self, dim, token_dim, with_lff=False, kernel_ratio=0.5, drop=0.1):
        super().__init__()
        m = int(token_dim * kernel_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * token_dim)
        self.proj = nn.Linear(token_dim, token_dim)
        omega = nn.init.orthogonal_(torch.empty(m, token_dim)) * math.sqrt(m)
        self.random_features = nn.Parameter(omega, requires_grad=False)
        self.drop = nn.Dropout(drop)            # 0.1, hard-coded in the reference
        if with_lff:
            self.lff = LocalityFeedForward(token_dim, 1.0, 'hswish', None)
        else:
            self.norm2, self.mlp = nn.LayerNorm(token_dim), Mlp(token_dim, token_dim)

    def phi(self, x):                           # (B, T, d) -> (B, T, m)
        w = self.random_features
        return torch.exp(x @ w.T - x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    def forward(self, x, grid):                 # (B, T, dim) -> (B, T, token_dim)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        qp, kp = self.phi(q), self.phi(k)
        out = (qp @ (kp.transpose(1, 2) @ v)) / (qp @ kp.sum(dim=1)[:, :, None] + 1e-8)
        x = v + self.drop(self.proj(out))
        if hasattr(self, 'lff'):
            return self.lff(x, grid)
        return x + self.drop(self.mlp(self.norm2(x)))


class TokensToToken(nn.Module):
    def __init__(self, in_chans, token_dim, embed_dim, with_lff):
        super().__init__()
        self.performer1 = TokenPerformer(in_chans * 7 * 7, token_dim, with_lff)
        self.performer2 = TokenPerformer(token_dim * 3 * 3, token_dim, with_lff)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    def forward(self, x):                       # (B, C, H, W) -> (B, h*w, D), (h, w)
        x, grid = soft_split(x, *SOFT_SPLITS[0])
        for performer, split in zip([self.performer1, self.performer2], SOFT_SPLITS[1:]):
            x, grid = soft_split(seq2img(performer(x, grid), grid), *split)
        return self.project(x), grid


class T2TViT(Backbone):
    def __init__(self, img_size=224, in_chans=3, num_classes=1000, embed_dim=256, depth=7,
                 num_heads=4, mlp_ratio=2.0, token_dim=64, qkv_bias=False, drop_path=0.0, lff=None):
        super().__init__(img_size, in_chans, num_classes)
        self.grid = self.img_size
        for kernel, stride, padding in SOFT_SPLITS:          # the grid after the soft splits
            self.grid = tuple((s + 2 * padding - kernel) // stride + 1 for s in self.grid)
        self.tokens_to_token = TokensToToken(in_chans, token_dim, embed_dim, lff is not None)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sinusoid_table(1 + self.grid[0] * self.grid[1], embed_dim),
                                      requires_grad=False)   # a fixed function of the grid
        self.blocks = nn.ModuleList([
            Block(embed_dim, Attention(embed_dim, num_heads, qkv_bias),
                  feed_forward(embed_dim, mlp_ratio, lff), dp, eps=1e-5)
            for dp in torch.linspace(0, drop_path, depth).tolist()])
        finish(self, embed_dim, 1e-5, self.cls_token)

    def forward_features(self, x, return_layers=False):
        """(B, 1 + h*w, C) after the final norm, class token first; layers as the ViT's."""
        self.check_input(x)
        x, grid = self.tokens_to_token(x)
        x = self.join_cls(x) + self.pos_embed
        x, layers = run_blocks(self.blocks, x, grid)
        x = self.norm(x)
        return (x, layers) if return_layers else x


# ==================================================================================================
# Appendix B. Checkpoints: ours, timm's (DeiT, ConViT: the same key names as ours), the official
#    releases (DeiT, ConViT, LocalViT with its PVT, Swin, TNT and T2T-ViT models, pycls's ViT_P /
#    ViT_C), inside a {'model': ...} / {'model_state': ...} / {'state_dict': ...} wrapper or not.
#    Each format is one table of key renames (and, where the tensors differ, one fix); the format
#    is recognised by a key only it has. Position embeddings are resized in one loop.
# ==================================================================================================

def read_checkpoint(path):
    """torch.load with weights_only=True (tensors and plain data only; DeiT-style training checkpoints
    also hold their argparse.Namespace) and one clear line for a missing, empty, corrupt or unsafe file."""
    import argparse
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f'checkpoint {path!r} is a folder; give the file in it (e.g. {os.path.join(path, "last.pt")})')
    if not os.path.isfile(path):
        raise ValueError(f'checkpoint {path!r} not found; check the path')
    if os.path.getsize(path) == 0:
        raise ValueError(f'checkpoint {path!r} is empty (0 bytes: an interrupted copy?); re-download or re-save it')
    with open(path, 'rb') as f:
        head = f.read(16)
    if not head.startswith((b'PK', b'\x80')):    # a zip archive, or a legacy pickle
        raise ValueError(f'checkpoint {path!r} is not a PyTorch file (it begins {head!r}); give a .pt/.pth '
                         f'checkpoint, re-downloaded or re-saved')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:                  # pickle's, zip's, torch's or a text file's own errors
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:80]
        error = (f'refused: it holds a {found[1]} object, and only tensors and plain data are loaded '
                 f'(for safety)' if found else f'unreadable (not a PyTorch file, truncated or corrupt?): {reason}')
    raise ValueError(f'checkpoint {path!r} is {error}; re-download or re-save it')


def unwrap_state_dict(obj, weights='model'):
    """The state dict inside a checkpoint: ours ({'model', 'ema', ...}), DeiT/LocalViT ({'model': ...}),
    pycls ({'model_state': ...}), timm's scripts ({'state_dict': ...}), or a bare one (ConViT's release)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f'a checkpoint must be a dict of tensors or wrap one, got {type(obj).__name__}')
    if weights == 'ema':
        if not isinstance(obj.get('ema'), Mapping):
            raise ValueError('this checkpoint holds no EMA weights (train with --ema)')
        return obj['ema']
    for key in ('model', 'model_state', 'state_dict'):
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    if all(torch.is_tensor(v) for v in obj.values()):
        return obj
    raise ValueError(f'no state dict found in the checkpoint (keys: {", ".join(list(obj)[:8])})')


def _stage(prefix):
    return lambda m: f'stages.{int(m[1]) - 1}.{prefix}'


def _fuse_qk_v(sd):                             # TNT: separate qk and v Linears -> our one qkv
    for k in [k for k in sd if re.search(r'\.qk\.(weight|bias)$', k)]:
        sd[k.replace('.qk.', '.qkv.')] = torch.cat([sd.pop(k), sd.pop(k.replace('.qk.', '.v.'))])
    sd['pixel_pos'] = rearrange(sd['pixel_pos'], '1 c i j -> 1 (i j) c')
    return sd


def _t2t_fix(sd):                               # T2T-ViT: the performers split k, q, v in that order
    for k in [k for k in sd if k.startswith('tokens_to_token.') and '.qkv.' in k]:
        key, query, value = sd[k].chunk(3)
        sd[k] = torch.cat([query, key, value])
    # LocalViT-T2T's performers create a norm2 that their LFF replaces: never used, dropped
    with_lff = {k.split('.conv.conv.')[0] for k in sd if '.conv.conv.' in k}
    return {k: v for k, v in sd.items() if not ('.norm2.' in k and k.split('.norm2.')[0] in with_lff)}


def _pycls_fix(sd):                             # pycls: positions (N, 1, D) (main) or (1, N, D)
    if sd['pos_embed'].shape[1] == 1:
        sd['pos_embed'] = rearrange(sd['pos_embed'], 'n 1 c -> 1 n c')
    # pycls trains on BGR images (its loader reads them with OpenCV): the first convolution's input
    # channels are flipped so that the model takes RGB, as every other model here
    first = 'patch_embed.convs.0.weight' if 'patch_embed.convs.0.weight' in sd else 'patch_embed.proj.weight'
    sd[first] = sd[first].flip(1)
    return sd


_BLOCK = r'encoder\.block_(\d+)\.'
# format: (a key only it has, [(pattern at the key's start, replacement)], a fix of the tensors)
FORMATS = {
    'pycls': ('class_token', [
        ('class_token', 'cls_token'), ('pos_embedding', 'pos_embed'),
        (r'stem\.(patchify|cstem_last_conv)\.', 'patch_embed.proj.'),
        (r'stem\.cstem(\d+)_conv\.', lambda m: f'patch_embed.convs.{3 * int(m[1])}.'),
        (r'stem\.cstem(\d+)_bn\.', lambda m: f'patch_embed.convs.{3 * int(m[1]) + 1}.'),
        (_BLOCK + r'ln_1\.', r'blocks.\1.norm1.'), (_BLOCK + r'ln_2\.', r'blocks.\1.norm2.'),
        (_BLOCK + r'self_attention\.block\.in_proj_', r'blocks.\1.attn.qkv.'),     # main branch
        (_BLOCK + r'self_attention\.block\.out_proj\.', r'blocks.\1.attn.proj.'),
        (_BLOCK + r'self_attention\.attn_proj\.', r'blocks.\1.attn.qkv.'),         # vitconfigs
        (_BLOCK + r'self_attention\.out_proj\.', r'blocks.\1.attn.proj.'),
        (_BLOCK + r'mlp_block\.linear_1\.', r'blocks.\1.mlp.fc1.'),
        (_BLOCK + r'mlp_block\.linear_2\.', r'blocks.\1.mlp.fc2.'),
        (r'encoder\.ln\.', 'norm.'), (r'head\.head_fc\.', 'head.')], _pycls_fix),
    'pvt': ('patch_embed1.proj.weight', [
        (r'patch_embed(\d)\.', _stage('patch_embed.')), (r'pos_embed(\d)$', _stage('pos_embed')),
        (r'block(\d)\.', _stage('blocks.'))], None),
    'swin': ('layers.0.blocks.0.norm1.weight', [(r'layers\.', 'stages.')],   # buffers: rebuilt
             lambda sd: {k: v for k, v in sd.items() if not k.endswith(('attn_mask', 'position_index'))}),
    'tnt': ('pixel_embed.proj.weight', [
        (r'pixel_embed\.proj\.', 'pixel_embed.'), (r'proj\.', 'pixel_proj.'),
        (r'norm1_proj\.', 'pixel_norm.'), (r'norm2_proj\.', 'patch_norm.')] + [
        (rf'(blocks\.\d+)\.{old}\.', rf'\1.{new}.') for old, new in {
            'norm_in': 'inner.norm1', 'attn_in': 'inner.attn', 'norm_mlp_in': 'inner.norm2',
            'mlp_in': 'inner.mlp', 'norm1_proj': 'pixel_norm', 'proj': 'pixel_proj',
            'norm_out': 'outer.norm1', 'attn_out': 'outer.attn', 'norm_mlp': 'outer.norm2',
            'mlp': 'outer.mlp', 'conv': 'outer.conv'}.items()], _fuse_qk_v),
    't2t': ('tokens_to_token.attention1.kqv.weight', [
        (r'tokens_to_token\.attention(\d)\.kqv\.', r'tokens_to_token.performer\1.qkv.'),
        (r'tokens_to_token\.attention(\d)\.w$', r'tokens_to_token.performer\1.random_features'),
        (r'tokens_to_token\.attention(\d)\.mlp\.0\.', r'tokens_to_token.performer\1.mlp.fc1.'),
        (r'tokens_to_token\.attention(\d)\.mlp\.2\.', r'tokens_to_token.performer\1.mlp.fc2.'),
        (r'tokens_to_token\.attention(\d)\.', r'tokens_to_token.performer\1.')], _t2t_fix),
}
# LocalViT's LFF: '<p>.conv.conv.<i>' (a Sequential; 2 and 5 are activations, 6 the channel
# attention when there is one) -> '<p>.lff.<name>'
_LFF_NAMES = {True: ['conv1', 'bn1', '', 'dwconv', 'bn2', '', 'se', 'conv2', 'bn3'],
              False: ['conv1', 'bn1', '', 'dwconv', 'bn2', '', 'conv2', 'bn3']}


def rename(key, rules):
    for pattern, replacement in rules:
        key, found = re.subn(f'^{pattern}', replacement, key, count=1)
        if found:
            break
    return key


def to_our_keys(sd):
    """Recognise a state dict's format by its keys and map it onto ours."""
    sd = {k.removeprefix('module.').replace('_orig_mod.', ''): v for k, v in sd.items()}
    for marker, rules, fix in FORMATS.values():
        if marker in sd:
            sd = {rename(k, rules): v for k, v in sd.items()}
            sd = fix(sd) if fix else sd
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r'(.*)\.conv\.conv\.(\d+)\.(.*)', k)
        if m:
            with_attn = f'{m[1]}.conv.conv.8.weight' in sd
            rest = m[3].replace('fc.0.', 'fc1.').replace('fc.2.', 'fc2.')
            k = f'{m[1]}.lff.{_LFF_NAMES[with_attn][int(m[2])]}.{rest}'
        out[k] = v
    return out


def resize_pos_embed(pos, n_prefix, new_grid, old_grid=None):
    """Interpolate a (1, n_prefix + h*w, C) position embedding to another grid (bicubic)."""
    n = pos.shape[1] - n_prefix
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f'the position embedding holds {n} patches, no square grid; '
                             f'pass the grid it was trained on')
        old_grid = (side, side)
    prefix, grid = pos[:, :n_prefix], seq2img(pos[:, n_prefix:], old_grid)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode='bicubic', align_corners=False)
    return torch.cat([prefix, img2seq(grid).to(pos.dtype)], dim=1)


def load_checkpoint(model, checkpoint, weights='model', skip_head=False, strict=True):
    """Load a path or a loaded checkpoint into `model`, in any format above. At another resolution every
    learned position embedding (model.pos_embed_grids()) is interpolated to the model's grid; fixed
    tables (T2T-ViT's) stay the model's own; GPSA rebuilds its relative positions by itself.
    weights='ema' picks our EMA weights; skip_head=True keeps the model's own classifier (fine-tuning
    on another class count). Any mismatch raises ValueError saying what was expected and what was found."""
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    old_grids = obj.get('grids') or {} if isinstance(obj, Mapping) else {}   # ours know theirs
    sd = to_our_keys(dict(unwrap_state_dict(obj, weights)))
    own = model.state_dict()
    if skip_head:
        sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
    name = getattr(model, 'arch', type(model).__name__)
    theirs, head = sd.get('head.weight'), own.get('head.weight')
    if theirs is not None and head is not None and theirs.shape[0] != head.shape[0]:
        raise ValueError(f'the checkpoint classifies {theirs.shape[0]} classes, model {name} has '
                         f'{head.shape[0]}; build it with num_classes={theirs.shape[0]}, or load '
                         f'with skip_head=True to fine-tune')
    missing = [k for k in own if k not in sd and not (skip_head and k.startswith('head.'))]
    unexpected = [k for k in sd if k not in own]
    for key, (n_prefix, grid) in model.pos_embed_grids().items():            # another resolution
        if not (missing or unexpected) and sd[key].shape != own[key].shape:
            sd[key] = resize_pos_embed(sd[key], n_prefix, grid, old_grids.get(key))
    for key, p in model.named_parameters():     # frozen tables are functions of the grid
        if not p.requires_grad and key in sd and sd[key].shape != p.shape:
            sd[key] = own[key]
    wrong = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if (missing or unexpected) and strict or wrong:
        kinds = {'attn.gating_param': 'GPSA blocks (ConViT)', '.lff.': 'a locality FFN (LocalViT)',
                 'patch_embed.convs.': 'a conv stem (ViT_C)'}
        kind = lambda d: ', '.join([v for k, v in kinds.items() if any(k in key for key in d)] or
                                   ['plain ViT blocks'])
        detail = '; '.join(f'{label} {len(keys)} (e.g. {", ".join(keys[:3])})' for label, keys in
                           [('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)] if keys)
        raise ValueError(f'the checkpoint ({kind(sd)}) does not fit model {name} ({kind(own)}): {detail}')
    model.load_state_dict(sd, strict=strict and not skip_head)
    return model


# The official releases (URLs from the authors' repositories). DeiT's file names carry the first
# hex digits of the file's sha256, which the download checks (torch.hub's convention).
PRETRAINED = {
    **{f'deit_{size[0]}': f'https://dl.fbaipublicfiles.com/deit/deit_{size}_patch16_224-{sha}.pth'
       for size, sha in [('tiny', 'a1311bcf'), ('small', 'cd65a155'), ('base', 'b5f2ef4d')]},
    **{f'convit_{size[0]}': f'https://dl.fbaipublicfiles.com/convit/convit_{size}.pth'
       for size in ('tiny', 'small', 'base')},
    **{name: f'https://github.com/ofsoundof/LocalViT/releases/download/v1.0.0/{file}.pth'
       for name, file in [('localvit_t', 'localvit_t'), ('localvit_t_se4', 'localvit_t_se4'),
                          ('localvit_s', 'localvit_s'), ('localvit_pvt_t', 'localvit_pvt'),
                          ('localvit_swin_t', 'localvit_swin'), ('localvit_tnt_t', 'localvit_tnt')]},
    'pvt_t': 'https://github.com/whai362/PVT/releases/download/v2/pvt_tiny.pth',
    'swin_t': 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth',
    't2t_vit_7': 'https://github.com/yitu-opensource/T2T-ViT/releases/download/main/71.7_T2T_ViT_7.pth.tar',
}


def download(url):
    """`url` downloaded once into torch hub's cache (TORCH_HOME/hub/checkpoints) -> its path. A name like
    deit_..._224-a1311bcf.pth is checked against that sha256 prefix; a file that fails is not kept."""
    from urllib.parse import urlparse
    filename = os.path.basename(urlparse(url).path)
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', filename)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    digest = re.search(r'-([a-f0-9]{8,})\.', filename)
    try:
        torch.hub.download_url_to_file(url, path, digest and digest[1], progress=False)
    except RuntimeError as e:                   # torch.hub: "invalid hash value ..."
        raise ValueError(f'{url} does not match its checksum ({e}); nothing was kept, try again') from None
    except OSError as e:                        # no network, or the server said no
        raise ValueError(f'could not download {url} ({getattr(e, "reason", e)}); without a network, '
                         f'fetch the file elsewhere and put it at {path}') from None
    return path


def load_pretrained(model, source=None):
    """Released weights into a zoo model: source None takes PRETRAINED[model.arch], a URL is downloaded
    (cached), else a path. Position embeddings resized to img_size; another class count: a new head."""
    if source is None:
        if model.arch not in PRETRAINED:
            raise ValueError(f'{model.arch} has no released weights; these models have them: '
                             f'{", ".join(PRETRAINED)}')
        source = PRETRAINED[model.arch]
    path = download(source) if '://' in str(source) else source
    try:
        obj = read_checkpoint(path)
    except ValueError:
        if path != source:                      # a broken download: not kept in the cache
            os.remove(path)
        raise
    theirs = to_our_keys(dict(unwrap_state_dict(obj))).get('head.weight')
    new_head = theirs is not None and theirs.shape[0] != model.num_classes
    if new_head:
        print(f'{getattr(model, "arch", "model")}: the weights classify {theirs.shape[0]} classes; '
              f'a new classifier for {model.num_classes} (to be trained)')
    return load_checkpoint(model, obj, skip_head=new_head)


# ==================================================================================================
# Appendix C. The model zoo: names -> configurations (the papers' published models)
# ==================================================================================================

def _vit(**cfg):
    return (VisionTransformer, cfg)


_CONVIT = dict(local_up_to_layer=10, qkv_bias=False)
_PYCLS = dict(init='pycls')
_STEM_18GF = dict(channels=(64, 128, 128, 256, 256, 512), strides=(2, 2, 1, 2, 1, 2))
_PVT_T = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8),
              mlp_ratios=(8, 8, 4, 4), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), qkv_bias=True)
_SWIN_T = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
               window_size=7, mlp_ratio=4.0, qkv_bias=True)
_TNT_T = dict(patch_size=16, embed_dim=192, in_dim=12, depth=12, num_heads=3, in_num_heads=3,
              mlp_ratio=4.0, qkv_bias=False, first_stride=4)
_T2T_7 = dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, token_dim=64, qkv_bias=False)

MODELS = {
    # DeiT (Touvron et al. 2021); S24/B24 are the deeper models of the over-smoothing paper
    'deit_t': _vit(embed_dim=192, depth=12, num_heads=3),
    'deit_s': _vit(embed_dim=384, depth=12, num_heads=6),
    'deit_b': _vit(embed_dim=768, depth=12, num_heads=12),
    'deit_s24': _vit(embed_dim=384, depth=24, num_heads=6),
    'deit_b24': _vit(embed_dim=768, depth=24, num_heads=12),
    'deit_t_mlp6': _vit(embed_dim=192, depth=12, num_heads=3, mlp_ratio=6),  # LocalViT Table 1
    # ConViT (d'Ascoli et al. 2021): 10 GPSA blocks then 2 MHSA; "+" = 64 channels per head
    'convit_t': _vit(embed_dim=192, depth=12, num_heads=4, **_CONVIT),
    'convit_t_plus': _vit(embed_dim=256, depth=12, num_heads=4, **_CONVIT),
    'convit_s': _vit(embed_dim=432, depth=12, num_heads=9, **_CONVIT),
    'convit_s_plus': _vit(embed_dim=576, depth=12, num_heads=9, **_CONVIT),
    'convit_b': _vit(embed_dim=768, depth=12, num_heads=16, **_CONVIT),
    'convit_b_plus': _vit(embed_dim=1024, depth=12, num_heads=16, **_CONVIT),
    # LocalViT (Li et al. 2021): SE reduction divides the expanded width (768 / 192 = 4 channels)
    'localvit_t': _vit(embed_dim=192, depth=12, num_heads=4, lff=dict(reduction=192)),
    'localvit_t_se4': _vit(embed_dim=192, depth=12, num_heads=4, lff=dict(reduction=4)),
    'localvit_s': _vit(embed_dim=384, depth=12, num_heads=8, lff=dict(reduction=384)),
    'localvit_t_relu6': _vit(embed_dim=192, depth=12, num_heads=4, mlp_ratio=6,
                             lff=dict(act='relu6', channel_attn='none')),
    # Early convolutions (Xiao et al. 2021): ViT_C drops one block to match ViT_P's FLOPs
    'vit_p_1gf': _vit(embed_dim=192, depth=12, num_heads=3, mlp_ratio=3, **_PYCLS),
    'vit_c_1gf': _vit(embed_dim=192, depth=11, num_heads=3, mlp_ratio=3, **_PYCLS,
                      conv_stem=dict(channels=(24, 48, 96, 192), strides=(2, 2, 2, 2))),
    'vit_p_4gf': _vit(embed_dim=384, depth=12, num_heads=6, mlp_ratio=3, **_PYCLS),
    'vit_c_4gf': _vit(embed_dim=384, depth=11, num_heads=6, mlp_ratio=3, **_PYCLS,
                      conv_stem=dict(channels=(48, 96, 192, 384), strides=(2, 2, 2, 2))),
    'vit_p_18gf': _vit(embed_dim=768, depth=12, num_heads=12, **_PYCLS),
    'vit_c_18gf': _vit(embed_dim=768, depth=11, num_heads=12, **_PYCLS, conv_stem=_STEM_18GF),
    'vit_p_36gf': _vit(embed_dim=1024, depth=14, num_heads=16, **_PYCLS),
    'vit_c_36gf': _vit(embed_dim=1024, depth=13, num_heads=16, **_PYCLS, conv_stem=_STEM_18GF),
    # LocalViT beyond DeiT (appendix A): each backbone with its MLP, and with LocalViT's LFF
    'pvt_t': (PVT, _PVT_T), 'localvit_pvt_t': (PVT, dict(_PVT_T, lff={})),
    'swin_t': (Swin, _SWIN_T), 'localvit_swin_t': (Swin, dict(_SWIN_T, lff={})),
    'tnt_t': (TNT, _TNT_T), 'localvit_tnt_t': (TNT, dict(_TNT_T, lff={})),
    't2t_vit_7': (T2TViT, _T2T_7), 'localvit_t2t_7': (T2TViT, dict(_T2T_7, lff=dict(reduction=128))),
}

# timm's names for the models timm has
ALIASES = {'deit_tiny_patch16_224': 'deit_t', 'deit_small_patch16_224': 'deit_s',
           'deit_base_patch16_224': 'deit_b', 'convit_tiny': 'convit_t', 'convit_small': 'convit_s',
           'convit_base': 'convit_b'}


def list_models():
    return sorted(MODELS)


def model_name(name):
    """Our name for a zoo name or timm's (ALIASES); an unknown one raises ValueError naming the closest."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS) + list(ALIASES), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ''
        raise ValueError(f'unknown model {name!r}{hint} (list_models() gives all {len(MODELS)})')
    return name


def model_options(name):
    """The overrides a zoo model accepts: its class's constructor arguments."""
    return list(inspect.signature(MODELS[model_name(name)][0]).parameters)


# the keys of create_model's dict options
DICT_OPTIONS = {'lff': ('act', 'channel_attn', 'reduction', 'kernel_size'),
                'gpsa': ('locality_strength', 'local_init'), 'conv_stem': ('channels', 'strides')}


def create_model(name, pretrained=False, **overrides):
    """Build a zoo model (our name or timm's); overrides (img_size, patch_size, num_classes, embed_dim,
    depth, num_heads, drop_path, ...) replace the published configuration, and a dict option (lff, gpsa,
    conv_stem) is merged into the published one: create_model('localvit_t', lff={'kernel_size': 1}) keeps
    its SE. `patch_size` on a conv-stem model sets its total stride (its last stride-2 convolutions become
    stride 1). pretrained=True loads the released weights (appendix B: PRETRAINED), resized to img_size,
    with a new classifier for another class count. model.config: the full configuration (plain data)."""
    name = model_name(name)
    cls, cfg = MODELS[name]
    unknown = [k for k in overrides if k not in model_options(name)]
    unknown += [f'{k}[{key!r}]' for k, v in overrides.items() if isinstance(v, dict) and k in DICT_OPTIONS
                for key in v if key not in DICT_OPTIONS[k]]
    if unknown:
        keys = '; '.join(f'{k}: {", ".join(v)}' for k, v in DICT_OPTIONS.items())
        raise ValueError(f'{name} has no option {", ".join(unknown)}; options: {", ".join(model_options(name))} '
                         f'(the dict options take {keys})')
    cfg = dict(cfg)
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    model = cls(**cfg)
    model.arch, model.config = name, cfg
    return load_pretrained(model) if pretrained else model


# ==================================================================================================
# Appendix D. Measuring: parameters and multiply-accumulates (matmuls and convolutions, attention included)
# ==================================================================================================

def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, img_size=None):
    """MACs of one forward pass at batch 1 = FlopCounterMode's FLOPs / 2. SDPA runs on its math
    backend here so that the attention matmuls are counted on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    h, w = pair(img_size or model.img_size)
    x = torch.zeros(1, model.in_chans, h, w, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


# ==================================================================================================
# Appendix E. The over-smoothing paper's released code (ChengyueGongR/PatchVisionTransformer), where
#    it departs from the paper (section 7): a 3-way contrastive loss, its own patch mix applied on
#    top of MixUp / CutMix, and a mixing loss on the mean token of each region, by KL divergence
#    against the regions' soft targets. train.py's `--recipe patchdiverse` runs them.
# ==================================================================================================

def patch_contrastive_loss_released(embed, out, grid, window=7):
    """The released code's contrastive loss (DiversePatch, deit/models.py, `similarity`). The anchor a_i
    is the detached patch embedding; three candidates from the last layer after the final norm (out)
    compete, by raw dot product (no normalisation, τ = 1):
        positive  out_i                                 the same position
        negative  Σ_{j≠i} out_j / (n - 1)               the mean of the other patches
        negative  Σ_{j∈W(i), j≠i} out_j / (k² - 1)      the k x k neighbourhood W(i), zero-padded (k 7)
        L = -mean_{b,i} log(softmax([a_i·pos, a_i·neg_1, a_i·neg_2])[0] + 1e-8)
    The 1e-8 (kept, as released) caps each term at ≈ 18.4. Needs torch, seq2img, img2seq."""
    h, w = grid
    if embed.ndim != 3 or embed.shape != out.shape or embed.shape[1] != h * w or h * w < 2:
        raise ValueError(f'expected embedding and last-layer patch tokens (B, {h * w}, C) for the '
                         f'{h}x{w} grid, got {tuple(embed.shape)} and {tuple(out.shape)}')
    anchor = embed.detach()
    z = seq2img(out, grid)                                                  # (B, C, h, w)
    window_sum = F.avg_pool2d(z, window, stride=1, padding=window // 2, divisor_override=1)
    neighbours = (window_sum - z) / (window ** 2 - 1)
    others = (z.sum(dim=(2, 3), keepdim=True) - z) / (h * w - 1)
    logits = torch.stack([(anchor * img2seq(c)).sum(-1) for c in (z, others, neighbours)], -1)
    return -(logits.softmax(dim=-1)[..., 0] + 1e-8).log().mean()           # logits (B, n, 3)


def released_patch_mix(images, targets, grid, patch_size, generator=None):
    """The released code's patch mix (PatchVisionTransformer, deit/engine.py), applied after the batch's
    MixUp / CutMix: a rectangle of patches keeps each image, the rest comes from a permuted batch. The
    rectangle covers a = ⌊λ h w⌋ patches, λ ~ U(0, 1), in a random shape: r rows, r drawn in [1,
    max(1, min(h, a) - 1)], and a // r columns (at most w, then r = a // w), at a uniform position.
    images (B, C, h*P, w*P), targets (B, K) probabilities (soft, already mixed). ->
      mixed images; targets s t + (1 - s) t[perm], s the rectangle's share of the grid;
      region targets (B, 2, K) = [t, t[perm]] (the rectangle, the rest); mask (h*w,) bool, True inside.
    The draws come from `generator` or torch's global one. Needs torch and einops."""
    (h, w), p = grid, patch_size
    if images.ndim != 4 or tuple(images.shape[-2:]) != (h * p, w * p) or targets.shape[:1] != images.shape[:1]:
        raise ValueError(f'images {tuple(images.shape)} and targets {tuple(targets.shape)} do not fit a {h}x{w} '
                         f'grid of {p}-pixel patches: expected (B, C, {h * p}, {w * p}) and (B, K)')
    rng = random.Random(int(torch.randint(2 ** 62, (), generator=generator)))
    area = int(h * w * rng.random())
    rows = rng.randint(1, max(1, min(h, area) - 1))
    cols = area // rows
    if cols > w:
        cols, rows = w, area // w
    top, left = rng.randint(0, max(0, h - rows)), rng.randint(0, max(0, w - cols))
    box = torch.zeros(h, w, dtype=torch.bool, device=images.device)
    box[top:top + rows, left:left + cols] = True
    perm = torch.randperm(len(images), generator=generator).to(images.device)
    pixels = box.repeat_interleave(p, 0).repeat_interleave(p, 1)
    mixed = torch.where(pixels, images, images[perm])
    share = box.float().mean()
    return (mixed, share * targets + (1 - share) * targets[perm],
            torch.stack([targets, targets[perm]], dim=1), rearrange(box, 'h w -> (h w)'))


def region_mixing_loss(head, patches, region_targets, mask):
    """The released code's form of the mixing loss: average the patch tokens (B, n, C) of each region
    (mask (n,) True: the rectangle of released_patch_mix; False: the rest), classify each region's
    mean with head, and score it against the region's soft targets (B, 2, K) by KL divergence,
    weighted by the region's area:  L = Σ_r (|r| / n) KL(p_r ‖ softmax(head(mean_{i∈r} h_i))).
    (The released code puts a dropout of 0.2 in `head`.) Needs torch."""
    b, n = patches.shape[:2] if patches.ndim == 3 else (None, None)
    if n is None or region_targets.shape[:2] != (b, 2) or mask.shape != (n,) or mask.dtype != torch.bool:
        raise ValueError(f'expected patch tokens (B, n, C), region targets (B, 2, K) and a bool mask '
                         f'(n,), got {tuple(patches.shape)}, {tuple(region_targets.shape)} and '
                         f'{mask.dtype} {tuple(mask.shape)}')
    regions = torch.stack([mask, ~mask]).to(patches.dtype)                 # (2, n)
    size = regions.sum(dim=1)
    means = regions @ patches / size.clamp(min=1)[:, None]                 # (B, 2, C)
    log_q = F.log_softmax(head(means).float(), dim=-1)                     # (B, 2, K)
    kl = F.kl_div(log_q, region_targets.float(), reduction='none').sum(-1).mean(0)    # (2,)
    return (kl * size / n).sum()
