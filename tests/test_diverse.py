"""Suppressing over-smoothing (Gong et al. 2021): the losses' math, patch-grid CutMix, the
over-smoothing curve, every zoo family, and the --diverse weights."""
import math

import pytest
import torch
import torch.nn.functional as F

import locvit


def random_patches(b=2, n=6, c=8, dtype=torch.float64):
    return torch.randn(b, n, c, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# The cosine loss and the over-smoothing curve
# --------------------------------------------------------------------------------------------------

def test_cosine_loss_is_one_for_parallel_and_zero_for_orthogonal_patches():
    h = torch.randn(1, 1, 16)
    parallel = torch.cat([h, 3 * h, -h, 0.5 * h], dim=1)            # |cos| = 1, signs included
    assert locvit.patch_cosine_loss(parallel).item() == pytest.approx(1.0, abs=1e-6)
    orthogonal = torch.eye(5)[None]                                  # 5 patches, 5 channels
    assert locvit.patch_cosine_loss(orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    # per image, then averaged over the batch
    batch = torch.cat([parallel[:, :4, :5].clone().fill_(1.0), orthogonal[:, :4]])
    assert locvit.patch_cosine_loss(batch).item() == pytest.approx(0.5, abs=1e-6)


def test_cosine_loss_by_hand_on_three_patches():
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]])
    # |cos| = 0 (1,2), 1/sqrt(2) (1,3), 1/sqrt(2) (2,3); 6 ordered pairs i != j
    expected = 4 * (1 / math.sqrt(2)) / 6
    assert locvit.patch_cosine_loss(h).item() == pytest.approx(expected, abs=1e-6)


def test_cosine_loss_refuses_fewer_than_two_patches():
    with pytest.raises(ValueError, match='n >= 2'):
        locvit.patch_cosine_loss(torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match=r'got \(6, 8\)'):
        locvit.patch_cosine_loss(torch.randn(6, 8))


@pytest.mark.parametrize('name', ['deit_t', 'convit_t'])
def test_patch_similarity_has_one_value_per_layer(name):
    model = tiny(name)
    x = torch.randn(3, 3, 32, 32)
    tokens, layers = model.forward_features(x, return_layers=True)
    curve = locvit.patch_similarity(layers, model.grid)
    assert curve.shape == (len(model.blocks) + 1,) and not curve.requires_grad
    assert ((curve >= 0) & (curve <= 1)).all()
    # the patch tokens only: the class token (in front, once present) is left out
    last = layers[-1][:, -64:]
    assert layers[-1].shape[1] == 65
    assert curve[-1].item() == pytest.approx(locvit.patch_cosine_loss(last).item(), abs=1e-6)
    assert curve[-1].item() != pytest.approx(locvit.patch_cosine_loss(layers[-1]).item(), abs=1e-6)


def test_patch_tokens_refuses_a_grid_that_does_not_match():
    with pytest.raises(ValueError, match='does not hold the 64 patch tokens of a 8x8 grid'):
        locvit.patch_tokens(torch.randn(2, 97, 8), (8, 8))
    assert locvit.patch_tokens(torch.randn(2, 97, 8), (8, 12)).shape == (2, 96, 8)


# --------------------------------------------------------------------------------------------------
# The contrastive loss: the paper's (default: normalised, with a temperature) and the released one
# --------------------------------------------------------------------------------------------------

def infonce_by_hand(first, last, tau=1.0):
    b, n, _ = first.shape
    total = 0.0
    for k in range(b):
        for i in range(n):
            scores = [math.exp(float(first[k, i] @ last[k, j]) / tau) for j in range(n)]
            total += -math.log(scores[i] / sum(scores))
    return total / (b * n)


def test_contrastive_loss_is_lowest_when_each_patch_keeps_its_own_token():
    first = random_patches(2, 8, 16)
    own = locvit.patch_contrastive_loss(first, first.clone())
    for seed in range(5):
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
        if torch.equal(perm, torch.arange(8)):
            continue
        assert locvit.patch_contrastive_loss(first, first[:, perm]) > own + 0.1
    assert locvit.patch_contrastive_loss(first, random_patches(2, 8, 16)) > own + 0.1
    # the last layer collapsed to one token (over-smoothing): the loss is log n
    collapsed = first[:, :1].expand(-1, 8, -1)
    assert locvit.patch_contrastive_loss(first, collapsed).item() == pytest.approx(math.log(8))


def test_contrastive_loss_sends_no_gradient_to_the_first_layer():
    first = random_patches().requires_grad_()
    last = random_patches().requires_grad_()
    locvit.patch_contrastive_loss(first, last).backward()
    assert first.grad is None
    assert last.grad.abs().sum() > 0


def test_contrastive_loss_with_raw_dot_products_is_the_papers_formula():
    first, last = random_patches() * 0.5, random_patches() * 0.5
    loss = locvit.patch_contrastive_loss(first, last, temperature=1.0, normalize=False)
    assert loss.item() == pytest.approx(infonce_by_hand(first, last), rel=1e-9)
    # the default: cosine similarities with temperature 0.1
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)
    assert locvit.patch_contrastive_loss(first, last).item() == pytest.approx(
        infonce_by_hand(unit(first), unit(last), tau=0.1), rel=1e-9)


def test_contrastive_loss_refuses_mismatched_tokens():
    with pytest.raises(ValueError, match='one shape'):
        locvit.patch_contrastive_loss(random_patches(2, 6), random_patches(2, 5))
    with pytest.raises(ValueError, match='temperature must be > 0'):
        locvit.patch_contrastive_loss(random_patches(), random_patches(), temperature=0)


def test_released_contrastive_loss_by_hand():
    """Anchor = embedding; positive = the same position; negatives = the mean of the other
    patches and the window's neighbours (zero-padded: always divided by k^2 - 1)."""
    h, w, k = 3, 4, 3
    embed, out = random_patches(2, h * w, 5) * 0.3, random_patches(2, h * w, 5) * 0.3
    total = 0.0
    for b in range(2):
        for i in range(h * w):
            r, c = divmod(i, w)
            others = (out[b].sum(0) - out[b, i]) / (h * w - 1)
            near = [j for j in range(h * w)
                    if j != i and abs(j // w - r) <= 1 and abs(j % w - c) <= 1]
            neighbours = out[b, near].sum(0) / (k * k - 1)
            logits = torch.stack([embed[b, i] @ v for v in (out[b, i], others, neighbours)])
            total += -math.log(logits.softmax(0)[0].item() + 1e-8)
    loss = locvit.patch_contrastive_loss_released(embed, out, (h, w), window=k)
    assert loss.item() == pytest.approx(total / (2 * h * w), rel=1e-9)


def test_released_contrastive_loss_detaches_the_embedding():
    embed, out = random_patches(2, 12).requires_grad_(), random_patches(2, 12).requires_grad_()
    locvit.patch_contrastive_loss_released(embed, out, (3, 4)).backward()
    assert embed.grad is None and out.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='for the 4x4 grid'):
        locvit.patch_contrastive_loss_released(embed, out, (4, 4))


# --------------------------------------------------------------------------------------------------
# Patch-grid CutMix and the mixing loss
# --------------------------------------------------------------------------------------------------

def check_patch_cutmix(images, labels, grid, p, seed):
    h, w = grid
    g = torch.Generator().manual_seed(seed)
    mixed, target, patch_labels, mask = locvit.patch_cutmix(images, labels, 10, grid, p,
                                                            generator=g, return_mask=True)
    second = images.roll(1, dims=0)
    pasted = (mixed == second).all(dim=1)                            # (B, H, W)
    kept = (mixed == images).all(dim=1)
    assert (pasted ^ kept).all()                                     # every pixel from one image
    assert (pasted == pasted[:1]).all()                              # one box for the batch
    box = pasted[0]
    if box.any():                                                    # a rectangle on patch edges
        rows, cols = box.any(dim=1).nonzero().flatten(), box.any(dim=0).nonzero().flatten()
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert box[top:bottom, left:right].all() and box.sum() == (bottom - top) * (right - left)
        assert all(int(e) % p == 0 for e in (top, bottom, left, right))
    # the patch-label map marks exactly the pasted patches
    box_patches = box.reshape(h, p, w, p)[:, 0, :, 0].flatten()
    assert torch.equal(mask, box_patches)
    expected = torch.where(box_patches, labels.roll(1)[:, None], labels[:, None])
    assert patch_labels.dtype == torch.long and torch.equal(patch_labels, expected)
    # the class target: weighted by the exact pasted area
    area = box.float().mean().item()
    for b in range(len(labels)):
        assert target[b, labels.roll(1)[b]].item() == pytest.approx(area)
        assert target[b, labels[b]].item() == pytest.approx(1 - area)
    assert torch.allclose(target.sum(-1), torch.ones(len(labels)))
    return area


def test_patch_cutmix_pastes_a_patch_aligned_box_on_a_non_square_grid():
    images, labels = torch.rand(4, 3, 32, 48), torch.tensor([3, 1, 4, 7])
    areas = [check_patch_cutmix(images, labels, (8, 12), 4, seed) for seed in range(12)]
    assert len({round(a, 4) for a in areas}) > 5                     # the box size is random
    assert any(0 < a < 1 for a in areas)


def test_patch_cutmix_box_area_follows_beta():
    images, labels = torch.rand(2, 1, 16, 16), torch.tensor([0, 1])
    areas = [locvit.patch_cutmix(images, labels, 2, (8, 8), 2, alpha=1.0)[1][0, 1].item()
             for _ in range(300)]
    assert sum(areas) / len(areas) == pytest.approx(0.5, abs=0.06)   # E[1 - λ] = 1/2
    small = [locvit.patch_cutmix(images, labels, 2, (8, 8), 2, alpha=0.2)[1][0, 1].item()
             for _ in range(300)]                                    # Beta(0.2, 0.2): extremes
    assert sum(a < 0.05 or a > 0.95 for a in small) > sum(a < 0.05 or a > 0.95 for a in areas)


def test_patch_cutmix_is_reproducible_and_refuses_bad_input():
    images, labels = torch.rand(3, 3, 16, 24), torch.tensor([0, 1, 2])
    run = lambda seed: locvit.patch_cutmix(images, labels, 3, (4, 6), 4,
                                           generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(run(5), run(5))
    assert any(not torch.equal(run(5), run(s)) for s in range(6, 10))
    with pytest.raises(ValueError, match=r'do not fit a 4x4 grid of 4-pixel patches'):
        locvit.patch_cutmix(images, labels, 3, (4, 4), 4)
    with pytest.raises(ValueError, match='class indices'):
        locvit.patch_cutmix(images, labels.float(), 3, (4, 6), 4)


def test_mixing_loss_is_the_mean_per_patch_cross_entropy():
    logits, labels = torch.randn(2, 6, 5), torch.randint(5, (2, 6))
    loss = locvit.patch_mixing_loss(logits, labels)
    by_hand = -torch.stack([logits[b, i].log_softmax(-1)[labels[b, i]]
                            for b in range(2) for i in range(6)]).mean()
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(12, 5), labels.reshape(12)))
    with pytest.raises(ValueError, match=r'patch labels \(B, n\)'):
        locvit.patch_mixing_loss(logits, labels[:, :5])


def test_region_mixing_loss_scores_the_mean_of_each_region_by_kl():
    """The released form: each region's mean token classified, KL(p_r || q_r) per image averaged over
    the batch (nn.KLDivLoss 'batchmean'), weighted by the region's area."""
    head = locvit.PatchHead(8, 5)
    patches, mask = torch.randn(2, 6, 8), torch.tensor([0, 1, 1, 0, 0, 0], dtype=torch.bool)
    targets = torch.softmax(torch.randn(2, 2, 5), -1)                 # (B, [box, rest], K)
    by_hand = 0
    for r, (region, area) in enumerate(((mask, 2 / 6), (~mask, 4 / 6))):
        log_q = head(patches[:, region].mean(1)).log_softmax(-1)
        p = targets[:, r]
        by_hand = by_hand + area * (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(locvit.region_mixing_loss(head, patches, targets, mask), by_hand)
    kl = torch.nn.KLDivLoss(reduction='batchmean')                      # the released code's criterion
    torch.testing.assert_close(by_hand, sum(a * kl(head(patches[:, m].mean(1)).log_softmax(-1), targets[:, r])
                                            for r, (m, a) in enumerate(((mask, 2 / 6), (~mask, 4 / 6)))))
    # an empty box (nothing kept): only the rest counts
    none = torch.zeros(6, dtype=torch.bool)
    torch.testing.assert_close(locvit.region_mixing_loss(head, patches, targets, none),
                               kl(head(patches.mean(1)).log_softmax(-1), targets[:, 1]))
    with pytest.raises(ValueError, match=r'region targets \(B, 2, K\)'):
        locvit.region_mixing_loss(head, patches, targets[:, 0], mask)


def test_released_patch_mix_keeps_a_rectangle_and_pastes_the_rest():
    torch.manual_seed(0)
    images, targets = torch.randn(6, 3, 16, 24), torch.softmax(torch.randn(6, 5), -1)    # a 4 x 6 grid
    shares = []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        mixed, mixed_targets, regions, mask = locvit.released_patch_mix(images, targets, (4, 6), 4, generator=g)
        box = mask.view(4, 6)
        if box.any():                                   # one solid rectangle of patches
            rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
            assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        pixels = box.repeat_interleave(4, 0).repeat_interleave(4, 1)
        kept = (mixed == images).all(1)                 # (B, H, W): the pixels of the image itself
        assert kept[:, pixels].all()
        g = torch.Generator().manual_seed(seed)         # the rest: from one permutation of the batch
        torch.randint(2 ** 62, (), generator=g)
        perm = torch.randperm(6, generator=g)
        assert torch.equal(mixed[:, :, ~pixels], images[perm][:, :, ~pixels])
        share = box.float().mean()
        torch.testing.assert_close(mixed_targets, share * targets + (1 - share) * targets[perm])
        torch.testing.assert_close(regions, torch.stack([targets, targets[perm]], 1))
        shares.append(share.item())
    assert 0.4 < sum(shares) / len(shares) < 0.5       # about lambda ~ U(0, 1), rounded down
    with pytest.raises(ValueError, match='do not fit a 4x4 grid'):
        locvit.released_patch_mix(images, targets, (4, 4), 4)


# --------------------------------------------------------------------------------------------------
# Every zoo family: the tokens, and each loss forward and backward
# --------------------------------------------------------------------------------------------------

FAMILIES = ['deit_t', 'convit_t', 'localvit_t', 'vit_c_1gf', 'vit_p_1gf']


def tiny(name, img_size=32):
    depth = dict(depth=3, local_up_to_layer=2) if 'convit' in name else dict(depth=2)
    return locvit.create_model(name, img_size=img_size, patch_size=4, num_classes=10, **depth)


@pytest.mark.parametrize('img_size', [32, (32, 48)], ids=['32px', '32x48'])
@pytest.mark.parametrize('name', FAMILIES)
def test_every_loss_trains_every_family(name, img_size):
    """train.PatchDiversity computes every form (the paper's and the released code's) for every
    ViT family; each reaches the blocks."""
    import train
    model = tiny(name, img_size)
    with torch.no_grad():                  # pycls inits the head at zero
        model.head.weight.normal_(0, 0.02)
    paper = [k for k in train.DIVERSE if k != 'mix-released']
    images, labels = torch.randn(2, 3, *locvit.pair(img_size)), torch.tensor([1, 7])
    for names in (paper, ['con-released', 'mix-released']):
        wrapper = train.PatchDiversity(model, dict.fromkeys(names, 1.0), 10, smoothing=0.1)
        torch.manual_seed(0)
        mixed, target = wrapper.mix(images, labels)
        logits, terms = wrapper(mixed)
        assert set(terms) == set(names)
        for key, loss in terms.items():
            assert loss.ndim == 0 and torch.isfinite(loss), key
        cls = torch.sum(-target * logits.log_softmax(-1), dim=-1).mean()
        model.zero_grad()
        (cls + sum(terms.values())).backward()
        assert model.blocks[-1].norm1.weight.grad.abs().sum() > 0
        assert wrapper.patch_head.weight.grad.abs().sum() > 0
    wrapper = train.PatchDiversity(model, dict.fromkeys(paper, 1.0), 10)
    torch.manual_seed(0)
    mixed, target = wrapper.mix(images, labels)
    logits, terms = wrapper(mixed)
    # the contrastive anchor is the patch embedding: the stem's output, before any attention
    tokens, layers = model.forward_features(mixed, return_layers=True)
    embed = locvit.img2seq(model.patch_embed(mixed))
    torch.testing.assert_close(terms['con'], locvit.patch_contrastive_loss(
        embed, locvit.patch_tokens(layers[-1], model.grid)))
    for key in ('cos', 'con', 'con-dot'):  # each paper loss alone reaches the blocks
        model.zero_grad()
        alone = train.PatchDiversity(model, {key: 1.0}, 10)
        alone(mixed)[1][key].backward()
        assert model.blocks[-1].norm1.weight.grad.abs().sum() > 0, key


# --------------------------------------------------------------------------------------------------
# --diverse weights
# --------------------------------------------------------------------------------------------------

def test_parse_diverse_accepts_names_and_weights():
    import train
    off = dict.fromkeys(train.DIVERSE, 0.0)
    assert train.parse_diverse('cos,con,mix') == {**off, 'cos': 1.0, 'con': 1.0, 'mix': 1.0}
    assert train.parse_diverse('cos=1, con-dot=0.5') == {**off, 'cos': 1.0, 'con-dot': 0.5}
    assert train.parse_diverse(' mix-released = 2e-1 ') == {**off, 'mix-released': 0.2}
    assert train.parse_diverse('') == off


@pytest.mark.parametrize('spec, message', [
    ('cos,cosine', r"unknown over-smoothing loss 'cosine'.*cos, con, con-dot"),
    ('cos=abc', r"malformed weight in 'cos=abc'"),
    ('con=-1', r"malformed weight in 'con=-1'.*>= 0"),
    ('mix=nan', r"malformed weight in 'mix=nan'"),
    ('cos=', r"malformed weight in 'cos='"),
    ('cos,,mix', r"unknown over-smoothing loss ''"),
    ('cos,cos=2', r"'cos' is given twice"),
    ('mix,mix-released', r'mix the batch differently; choose one'),
])
def test_parse_diverse_rejects_bad_parts(spec, message):
    import train
    with pytest.raises(train.TrainError, match=message):
        train.parse_diverse(spec)
