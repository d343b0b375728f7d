"""train.py's RandAugment and evaluation transform against timm 1.0.31, DeiT's reference, through
stored outputs (tests/fixtures/timm_augment.json and its two PNGs; remake them with
tests/fixtures/make_augment_fixtures.py): the same ops, levels and arguments, every op's output on
both backends, and the evaluation crop. timm is not needed."""
import functools
import hashlib
import io
import json
import os

import pytest
import torch
from PIL import Image

import train as A
from bench_input import synthetic_photo

TF = A.TF
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')   # torchvision.io -> TorchCodec
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
with open(os.path.join(FIXTURES, 'timm_augment.json')) as f:
    REF = json.load(f)
SIGNED = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'ColorIncreasing',
          'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'}
REMAKE = 'remake the fixture with python tests/fixtures/make_augment_fixtures.py (needs timm 1.0.31)'


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def image(name):
    """A fixture PNG as a uint8 (3, H, W) tensor."""
    return TF.pil_to_tensor(Image.open(os.path.join(FIXTURES, name)).convert('RGB'))


def tile(part, row, col):
    """The tile at (row, col) of a fixture PNG, uint8 (3, tile, tile), a copy."""
    s = part['tile']
    return image(part['image'])[:, row * s:(row + 1) * s, col * s:(col + 1) * s].clone()


def jpeg_bytes(w, h, seed, quality):
    buf = io.BytesIO()
    synthetic_photo(w, h, torch.Generator().manual_seed(seed)).save(buf, 'JPEG', quality=quality)
    return buf.getvalue()


def test_same_ops_and_levels_as_timm():
    ra = REF['randaugment']
    assert ra['config_str'] == 'rand-m9-mstd0.5-inc1' and ra['num_layers'] == 2 and ra['choice_weights'] is None
    assert ra['hparams'] == dict(translate_const=100, img_mean=list(A.FILL), interpolation=int(Image.BICUBIC))
    assert [op['name'] for op in ra['ops']] == list(A.RANDAUG_OPS)
    assert ra['magnitudes'] == [0, 0.3, 1, 2.5, 4.99, 5, 7.5, 8.7, 9, 9.49, 10]
    for op in ra['ops']:
        assert (op['prob'], op['magnitude'], op['magnitude_std'], op['magnitude_max']) == (0.5, 9, 0.5, None)
        assert op['kwargs'] == dict(fillcolor=list(A.FILL), resample=int(Image.BICUBIC))
        if op['levels'] is None:                                     # no argument
            assert all(A.randaug_arg(op['name'], m) is None for m in ra['magnitudes'])
            continue
        assert [m for m, _ in op['levels']] == ra['magnitudes']
        for m, got in op['levels']:                                  # timm's values, both signs
            ours = {A.randaug_arg(op['name'], m, s) for s in ((1, -1) if op['name'] in SIGNED else (1,))}
            assert set(got) == ours, (op['name'], m)


def op_case(name, magnitude, sign):
    [case] = [c for c in REF['op_outputs']['cases']
              if (c['name'], c['magnitude'], c['sign']) == (name, magnitude, sign)]
    return case


@pytest.mark.parametrize('name', list(A.RANDAUG_OPS))
@pytest.mark.parametrize('magnitude,sign', [(9, 1), (9, -1), (6.3, 1)])
def test_ops_match_timm(name, magnitude, sign):
    """PIL backend: identical to timm's op; tensor backend (the GPU path): within interpolation noise."""
    part, case = REF['op_outputs'], op_case(name, magnitude, sign)
    arg = A.randaug_arg(name, magnitude, sign)
    assert arg == case['arg'], REMAKE                  # the argument timm's op was given
    x = tile(part, *part['input']['tile'])             # synthetic_photo(96, 96, seed 1)
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    ref = tile(part, *case['tile']).int()
    assert torch.equal(TF.pil_to_tensor(A.RANDAUG_OPS[name][0](pil, arg)).int(), ref)
    diff = (A.RANDAUG_OPS[name][0](x, arg).int() - ref).abs()
    if name in ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'):
        # grid_sample's bicubic kernel (a = -0.75) is not Pillow's (a = -1): small differences
        assert diff.float().mean() < 1.0 and (diff > 3).float().mean() < 0.02
    else:                                     # rounding of blends: at most one level
        assert diff.max() <= 1


def test_val_transform_matches_timm():
    part = REF['eval']
    cfg = A.parse_config(['--data', 'folder', '--data-path', 'unused', '--arch', 'deit_t', '--workers', '0'])
    mean, std = part['mean'], part['std']
    assert mean == pytest.approx(A.IMAGENET_MEAN) and std == pytest.approx(A.IMAGENET_STD)
    assert [c['size'] for c in part['cases']] == [[500, 375], [375, 500], [640, 480], [1024, 768]]
    for case in part['cases']:
        w, h = case['size']
        raw = jpeg_bytes(w, h, case['seed'], case['quality'])
        assert hashlib.sha256(raw).hexdigest() == case['jpeg_sha256'], \
            f'the synthetic JPEG {w}x{h} is not the one timm was given: {REMAKE}'
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        ref = TF.normalize(tile(part, *case['tile']).float() / 255, mean, std)    # timm's output
        assert ref.double().sum().item() == pytest.approx(case['timm_sum'], rel=1e-9, abs=1e-6)
        diff = (A.augment_val(data) - ref).abs() * 255 * 0.226        # ~ intensity levels
        assert diff.mean() < 0.6 and diff.max() < 5, (w, h)
        assert torch.equal(A.val_transform(data, cfg), A.augment_val(data))    # the folder's adapter
