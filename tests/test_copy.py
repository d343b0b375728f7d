"""A student copies one idea out of locvit.py: GPSA, the locality feed-forward, the conv stem or an
over-smoothing loss. Each, pasted alone into a fresh namespace with torch, einops and only the
helpers its docstring names, runs and gives the same result as the original."""
import functools
import inspect
import math
import random
import re

import einops
from einops import rearrange
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import locvit

# object -> (the helpers its docstring names, at most this many lines)
COPYABLE = {
    'GPSA': (['relative_positions'], 60),
    'LocalityFeedForward': (['seq2img', 'img2seq', 'make_act', 'ACTIVATIONS', 'SqueezeExcite', 'ECA'], 45),
    'ConvStem': ([], 30),
    'patch_cosine_loss': ([], 15),
    'patch_contrastive_loss': ([], 30),
    'patch_mixing_loss': ([], 15),
    'patch_cutmix': ([], 50),
}


def paste(name):
    """The source of locvit.<name> and of the helpers it names, executed in a fresh namespace."""
    helpers, _ = COPYABLE[name]
    namespace = {'torch': torch, 'nn': nn, 'F': F, 'rearrange': einops.rearrange, 'math': math,
                 'random': random, 'functools': functools}
    for helper in helpers + [name]:
        obj = getattr(locvit, helper)
        if isinstance(obj, dict):               # a table: paste its definition line
            source = next(line for line in inspect.getsource(locvit).splitlines()
                          if line.startswith(f'{helper} = '))
        else:
            source = inspect.getsource(obj)
        exec(compile(source, f'<pasted {helper}>', 'exec'), namespace)
    return namespace[name]


@pytest.mark.parametrize('name', sorted(COPYABLE))
def test_each_idea_is_short_and_names_its_helpers(name):
    helpers, budget = COPYABLE[name]
    source = inspect.getsource(getattr(locvit, name))
    assert len(source.splitlines()) <= budget, f'{name}: {len(source.splitlines())} lines'
    doc = inspect.getdoc(getattr(locvit, name))
    needs = re.search(r'Needs (.*?)\.(\s|$)', doc, flags=re.S)
    assert needs, f'{name} does not say what it needs'
    for helper in helpers:
        assert helper in needs.group(1), f'{name}: the docstring does not name {helper}'


def test_pasted_gpsa_equals_the_original():
    torch.manual_seed(0)
    ours = locvit.GPSA(36, 9)
    ours.init_local()
    pasted = paste('GPSA')(36, 9)
    pasted.load_state_dict(ours.state_dict())
    x = torch.randn(2, 30, 36)
    torch.testing.assert_close(pasted(x, (5, 6)), ours(x, (5, 6)))
    # the paper's explicit map, pasted too: forward(x) = proj(A @ v), rows of A sum to 1
    a = pasted.attention(x, (5, 6))
    v = rearrange(pasted.v(x), 'b n (h d) -> b h n d', h=9)
    torch.testing.assert_close(pasted(x, (5, 6)), pasted.proj(rearrange(a @ v, 'b h n d -> b n (h d)')))
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 9, 30))


@pytest.mark.parametrize('channel_attn', ['se', 'eca', 'none'])
def test_pasted_locality_feed_forward_equals_the_original(channel_attn):
    torch.manual_seed(0)
    ours = locvit.LocalityFeedForward(8, 4, 'hswish', channel_attn, reduction=4)
    pasted = paste('LocalityFeedForward')(8, 4, 'hswish', channel_attn, reduction=4)
    pasted.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1 + 12, 8)
    torch.testing.assert_close(pasted(x, (3, 4)), ours(x, (3, 4)))


def test_pasted_conv_stem_equals_the_original():
    torch.manual_seed(0)
    ours = locvit.ConvStem((8, 16), (2, 2), 3, 32)
    pasted = paste('ConvStem')((8, 16), (2, 2), 3, 32)
    pasted.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(pasted(x), ours(x))


def test_pasted_losses_equal_the_originals():
    torch.manual_seed(0)
    a, b = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    for name, args in [('patch_cosine_loss', (a,)), ('patch_contrastive_loss', (a, b)),
                       ('patch_mixing_loss', (torch.randn(2, 12, 5), torch.randint(0, 5, (2, 12))))]:
        torch.testing.assert_close(paste(name)(*args), getattr(locvit, name)(*args), msg=name)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for x, y in zip(paste('patch_cutmix')(images, labels, 4, (4, 4), 4, generator=g1),
                    locvit.patch_cutmix(images, labels, 4, (4, 4), 4, generator=g2)):
        assert torch.equal(x, y)
