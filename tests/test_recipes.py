"""Each family's training recipe against what its official code does, by value: pycls's per-size rates,
weight-decay rule, AutoAugment and lighting (fixture tests/fixtures/pycls_autoaugment.pt, made with
pycls's own code), its vitconfigs checkpoints; the over-smoothing paper's released training (fixture
tests/fixtures/oversmoothing.pt, made with PatchVisionTransformer's own code); RECIPES, the flags and
describe_recipe agreeing."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import locvit
import train
from conftest import fixture

IMAGENET = ['--data', 'folder', '--data-path', 'unused']


# ---- pycls (Xiao et al.): rates, schedule ends, weight decay ---------------------------------------

@pytest.mark.parametrize('arch, base_lr', [('vit_p_1gf', 1e-3), ('vit_c_4gf', 1e-3), ('vit_c_18gf', 1e-3),
                                           ('vit_p_36gf', 7e-4), ('vit_c_36gf', 7e-4)])
def test_pycls_rates_per_size(arch, base_lr):
    """configs/vitconv_baselines/vit/ViT-{P,C}-*GF*.yaml: BASE_LR 1e-3 (36GF: 7e-4) at batch 2048,
    WARMUP_FACTOR 0.1, MIN_LR 0.005 (both relative), WEIGHT_DECAY 0.24, 400 epochs, 5 warm-up."""
    cfg = train.parse_config(['--arch', arch] + IMAGENET)
    batch = cfg.batch_size * 8                          # the recipe's 8 processes
    assert batch == 2048 and cfg.lr * batch / 512 == pytest.approx(base_lr)
    assert cfg.warmup_lr == pytest.approx(0.1 * base_lr) and cfg.min_lr == pytest.approx(0.005 * base_lr)
    assert (cfg.weight_decay, cfg.epochs, cfg.warmup_epochs, cfg.opt) == (0.24, 400, 5, 'adamw')
    assert cfg.autoaugment and cfg.lighting == 0.1 and cfg.randaug == 'off' and cfg.reprob == 0


def test_pycls_decays_everything_but_norms_and_biases():
    """pycls groups parameters by name: 'bn', 'ln' or 'bias' in the name -> no decay; everything else,
    the position embedding and the class token included, decays. Our groups (on our names) must be
    the groups that rule makes on pycls's names (mapped by the checkpoint key map)."""
    fx = fixture('vit_c_vitconfigs')
    pycls_names = [k for k in fx['state_dict'] if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    theirs = {k: any(s in k for s in ('bn', 'ln', 'bias')) for k in pycls_names}   # True: no decay
    ours_name = {k: locvit.rename(k, locvit.FORMATS['pycls'][1]) for k in pycls_names}
    model = locvit.create_model('vit_c_1gf', img_size=32, embed_dim=24, depth=2, num_heads=3, mlp_ratio=3,
                                num_classes=10, conv_stem=dict(channels=(8, 12, 16), strides=(2, 2, 2)))
    cfg = train.parse_config(['--arch', 'vit_c_1gf'] + IMAGENET)
    decay, no_decay = train.build_optimizer(cfg, model, 512).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {**{names[id(p)]: False for p in decay['params']}, **{names[id(p)]: True for p in no_decay['params']}}
    assert {ours_name[k]: v for k, v in theirs.items()} == ours
    assert not ours['pos_embed'] and not ours['cls_token'] and decay['weight_decay'] == 0.24
    deit = train.build_optimizer(train.parse_config(['--arch', 'vit_c_1gf', '--recipe', 'deit'] + IMAGENET),
                                 model, 512).param_groups   # DeiT's rule on the same model: embeddings exempt
    assert any(p is model.pos_embed for p in deit[1]['params'])


# ---- pycls's AutoAugment and lighting, against its own code -------------------------------------

def test_pycls_autoaugment_policy_and_ranges_are_pycls():
    fx = fixture('pycls_autoaugment')
    assert [[tuple(op) for op in sub] for sub in train.PYCLS_POLICY] == [[tuple(op) for op in sub] for sub in fx['policy']]
    for name, (low, high, signed) in fx['op_ranges'].items():
        assert train.PYCLS_OPS[name][1:] == (low, high, signed), name
    assert fx['posterize_min'] == 1 and tuple(fx['warp_params']['fillcolor']) == train.PYCLS_FILL


def test_pycls_autoaugment_ops_equal_pycls_outputs():
    """Every op of the policy, at magnitudes 0, 0.3, 0.7, 1 and both signs, on a PIL image: equal to
    pycls's op pixel for pixel; on a uint8 tensor (--gpu-decode): within interpolation noise."""
    fx = fixture('pycls_autoaugment')
    img = train.TF.to_pil_image(fx['image'])
    for (name, magnitude, sign, v), ref in zip(fx['cases'], fx['outputs']):
        op, low, high = train.PYCLS_OPS[name][:3]
        ours_v = (low + magnitude * (high - low)) * sign
        assert ours_v == pytest.approx(v), (name, magnitude, sign)
        assert torch.equal(train.TF.pil_to_tensor(op(img, ours_v)), ref), (name, magnitude, sign)
        diff = (op(fx['image'], ours_v).int() - ref.int()).abs()
        if name in ('rotate', 'shear_x', 'shear_y', 'trans_y'):
            assert diff.float().mean() < 1.5, (name, magnitude, sign)
        else:
            assert diff.max() <= 1, (name, magnitude, sign)


def test_pycls_autoaugment_draws_one_sub_policy_with_its_probabilities():
    rng, seen = random.Random(0), []
    original = dict(train.PYCLS_OPS)
    try:                                    # record (op, v) instead of applying
        for name, (op, low, high, signed) in original.items():
            train.PYCLS_OPS[name] = (lambda img, v, name=name: img + [(name, v)], low, high, signed)
        for _ in range(20000):
            seen.append(train.pycls_autoaugment([], rng))
    finally:
        train.PYCLS_OPS.update(original)
    # ('equalize', 1.0, 0.2) of sub-policy 9 always runs; ('shear_x', 0.0, 0.0) of 17 never does
    colour_then_equalize = [s for s in seen if [n for n, _ in s] in (['color', 'equalize'], ['equalize'])]
    assert all(n != 'shear_x' or v != 0 for s in seen for n, v in s)
    rotations = [v for s in seen for n, v in s if n == 'rotate' and abs(v) == pytest.approx(30 * 0.9)]
    assert 0.4 < sum(v < 0 for v in rotations) / len(rotations) < 0.6      # a random sign
    assert len(seen) == 20000 and colour_then_equalize


def test_pycls_lighting_offsets():
    fx = fixture('pycls_autoaugment')['lighting']
    assert torch.allclose(torch.tensor(train.EIGVAL, dtype=torch.float64), fx['eig_vals'][0].double())
    assert torch.allclose(torch.tensor(train.EIGVEC, dtype=torch.float64), fx['eig_vecs'].double())
    for alpha, offset in zip(fx['alphas'], fx['offsets']):
        torch.testing.assert_close(train.lighting_offset(alpha.float()), offset.float(), atol=1e-6, rtol=1e-5)
    # in the pipeline: after normalising, one offset per image, in units of the channel's std
    x = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    torch.manual_seed(3)
    out = train.normalize_erase(x, re_prob=0, lighting=0.1)
    torch.manual_seed(3)
    std = torch.tensor(train.IMAGENET_STD).view(3, 1, 1)
    for img in out:
        shift = train.lighting_offset(torch.randn(3) * 0.1).view(3, 1, 1) / std
        torch.testing.assert_close(img, train.normalize_erase(x[0], re_prob=0) + shift)


# ---- pycls checkpoints of both layouts ------------------------------------------------------------

@pytest.mark.parametrize('name', ['vit_p_vitconfigs', 'vit_c_vitconfigs'])
def test_pycls_vitconfigs_checkpoints_give_their_logits(name):
    """The vitconfigs branch: attn_proj / out_proj keys, pos_embedding (1, N, D). pycls feeds BGR images,
    our key map flips the first convolution: our model on RGB = theirs on BGR."""
    fx = fixture(name)
    stem = dict(conv_stem=dict(channels=(8, 12, 16), strides=(2, 2, 2))) if 'vit_c' in name else dict(patch_size=8)
    model = locvit.create_model(name[:5] + '_1gf', img_size=32, embed_dim=24, depth=2, num_heads=3, mlp_ratio=3,
                                num_classes=10, **stem)
    locvit.load_checkpoint(model, {'model_state': fx['state_dict']})
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(fx['input'].flip(1)), fx['logits'], atol=1e-5, rtol=1e-4)


# ---- the over-smoothing paper's released training -------------------------------------------------

def released_model():
    """Our DeiT with talking heads and the PatchDiversity wrapper, holding the released model's weights."""
    fx = fixture('oversmoothing')
    model = locvit.create_model('deit_t', img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=3,
                                num_classes=10, talking_heads=True)
    weights = dict.fromkeys(train.DIVERSE, 0.0) | {'con-released': 1.0, 'mix-released': 1.0}
    wrapper = train.PatchDiversity(model, weights, 10, smoothing=0.1)
    state = {k.replace('proj_pre', 'proj_l').replace('proj_post', 'proj_w'): v for k, v in fx['state_dict'].items()}
    locvit.load_checkpoint(model, {k: v for k, v in state.items() if not k.startswith('patch_head.')})
    wrapper.patch_head.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith('patch_head.')})
    return fx, wrapper


def test_released_losses_equal_the_released_code():
    """Their training forward on their mixed batch: the class logits, the region KL loss (patch_loss),
    the 3-way contrastive loss (sim_loss) and the total loss of engine.py."""
    fx, wrapper = released_model()
    mask, perm = fx['mask'].bool().flatten(), fx['img_index']
    wrapper.patch_targets = (torch.stack([fx['targets'], fx['targets'][perm]], 1), mask)
    logits, terms = wrapper.train()(fx['mixed_input'])
    torch.testing.assert_close(logits, fx['train_logits'], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(terms['mix-released'], fx['patch_loss'], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(terms['con-released'], fx['sim_loss'], atol=1e-5, rtol=1e-4)
    class_loss = F.cross_entropy(logits, fx['mixed_targets'])           # soft targets, smoothed already
    torch.testing.assert_close(class_loss + sum(terms.values()), fx['loss'], atol=1e-4, rtol=1e-4)


def test_released_mix_is_their_two_mix_given_its_draws():
    """two_mix keeps each image inside the rectangle and takes the permuted batch outside; targets
    mix by the rectangle's share. Our released_patch_mix, with its draws replaced by theirs."""
    fx = fixture('oversmoothing')
    box, perm = fx['mask'].bool(), fx['img_index']
    pixels = box.repeat_interleave(4, 0).repeat_interleave(4, 1)
    torch.testing.assert_close(torch.where(pixels, fx['input'], fx['input'][perm]), fx['mixed_input'])
    share = box.float().mean()
    assert share.item() == fx['mix_rate']
    torch.testing.assert_close(share * fx['targets'] + (1 - share) * fx['targets'][perm], fx['mixed_targets'])
    # our draw of the rectangle: rows in [1, max(1, min(h, a) - 1)], columns a // rows (at most w)
    rng = random.Random(0)
    for _ in range(2000):
        a = int(64 * rng.random())
        rows = rng.randint(1, max(1, min(8, a) - 1))
        cols = min(a // rows, 8)
        assert rows * cols <= a and rows <= 8
    assert (fx['mask_rows'][1] - fx['mask_rows'][0]) * (fx['mask_cols'][1] - fx['mask_cols'][0]) == box.sum()


def test_patchdiverse_recipe_is_the_released_training():
    cfg = train.parse_config(['--arch', 'deit_s', '--recipe', 'patchdiverse'] + IMAGENET)
    assert train.parse_diverse(cfg.diverse) == dict.fromkeys(train.DIVERSE, 0.0) | {
        'con-released': 1.0, 'mix-released': 1.0}
    assert (cfg.talking_heads, cfg.head_dropout, cfg.min_lr, cfg.mixup, cfg.cutmix) == (True, 0.2, 1e-7, 0.8, 1.0)
    model = train.build_model(cfg, 10)
    assert all(b.attn.talking_heads for b in model.blocks)
    text = train.describe_recipe(cfg)
    assert 'con-released,mix-released' in text and 'head dropout 0.2' in text and 'cosine to 1e-07' in text


def test_recipes_the_flags_and_the_description_agree():
    """Every recipe value reaches the config (where no flag or data setting overrides it) and the
    one-line description names it."""
    for name, recipe in train.RECIPES.items():
        cfg = train.parse_config(['--arch', 'deit_t', '--recipe', name] + IMAGENET)
        for key, value in recipe.items():
            assert getattr(cfg, key) == value, (name, key)
        text = train.describe_recipe(cfg)
        for piece in (f'recipe {name}', f'lr {cfg.lr:g}', f'weight decay {cfg.weight_decay:g}',
                      f'{cfg.epochs} epochs', f'cosine to {cfg.min_lr:g}', f'smoothing {cfg.smoothing:g}',
                      f'erasing {cfg.reprob:g}', f'repeats {cfg.repeated_aug}', f'lighting {cfg.lighting:g}'):
            assert piece in text, (name, piece)
        assert ('AutoAugment' in text) == cfg.autoaugment


def test_the_schedule_is_per_step():
    """We step the learning rate every optimizer step (DeiT's timm scheduler steps per epoch: the
    README's recipe section says so): within an epoch it changes, the warm-up is linear in steps."""
    cfg = train.parse_config(['--epochs', '10', '--warmup-epochs', '2', '--lr', '0.512', '--warmup-lr', '0',
                              '--min-lr', '0'])
    schedule = train.Schedule(cfg, steps_per_epoch=5, base_lr=1.0)
    lrs = []
    for step in range(50):
        schedule.step = step
        lrs.append(schedule.lr())
    assert lrs[:10] == pytest.approx([s / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[11] < lrs[10] and lrs[49] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 39 / 40)))
