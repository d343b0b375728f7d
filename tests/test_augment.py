"""train.py's transforms (CPU, under half a minute): RandAugment's magnitudes, draws and ops against
DeiT's timm settings, the crop boxes against torchvision, decoding against Pillow's, the transforms'
outputs, the adapters train.py's datasets use, an ImageFolder of JPEGs through a DataLoader, and
the device path (--gpu-decode) run on the CPU."""
import dataclasses
import functools
import io
import math
import os
import random
import re
import statistics

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import train as A
from bench_input import synthetic_photo

TF = A.TF
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')   # torchvision.io -> TorchCodec

SIGNED = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'ColorIncreasing',
          'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'}


@functools.lru_cache(maxsize=None)
def jpeg_bytes(w, h, seed=0, quality=90):
    buf = io.BytesIO()
    synthetic_photo(w, h, torch.Generator().manual_seed(seed)).save(buf, 'JPEG', quality=quality)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """As in DataLoader workers, which run these transforms: one thread (also far faster for these
    small tensors on a shared machine, where a second thread waits on other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(*flags, data='folder'):
    """A train.Config as train.py's command line makes it (parse_config does not read the data)."""
    return A.parse_config(['--data', data, '--arch', 'deit_t', '--workers', '0',
                           *(['--data-path', 'unused'] if data == 'folder' else []), *flags])


@pytest.fixture(scope='module')
def pil224():
    return synthetic_photo(224, 224, torch.Generator().manual_seed(1))


# ---- RandAugment: magnitudes ----------------------------------------------------------------

def test_arguments_at_magnitude_9():
    expect = {'Rotate': 27.0, 'ShearX': 0.27, 'ShearY': 0.27, 'TranslateXRel': 0.405,
              'TranslateYRel': 0.405, 'ColorIncreasing': 1.81, 'ContrastIncreasing': 1.81,
              'BrightnessIncreasing': 1.81, 'SharpnessIncreasing': 1.81,
              'PosterizeIncreasing': 1, 'SolarizeIncreasing': 26, 'SolarizeAdd': 99,
              'AutoContrast': None, 'Equalize': None, 'Invert': None}
    assert set(expect) == set(A.RANDAUG_OPS)
    for name, value in expect.items():
        assert A.randaug_arg(name, 9) == pytest.approx(value), name
    for name in ('Rotate', 'ShearX', 'TranslateYRel'):
        assert A.randaug_arg(name, 9, -1) == pytest.approx(-expect[name])
    for name in ('ColorIncreasing', 'SharpnessIncreasing'):
        assert A.randaug_arg(name, 9, -1) == pytest.approx(0.19)
    assert A.randaug_arg('PosterizeIncreasing', 10) == 0 and A.randaug_arg('SolarizeIncreasing', 0) == 256


@pytest.mark.parametrize('backend', ['pil', 'tensor'])
def test_ops_apply_those_arguments(backend):
    """The effect each op has at m = 9, measured on simple images, on both backends."""
    def run(name, img, sign=1):
        img = Image.fromarray(img.permute(1, 2, 0).numpy()) if backend == 'pil' else img
        out = A.RANDAUG_OPS[name][0](img, A.randaug_arg(name, 9, sign))
        return TF.pil_to_tensor(out) if backend == 'pil' else out
    flat = torch.full((3, 64, 64), 100, dtype=torch.uint8)
    assert run('BrightnessIncreasing', flat).unique().tolist() == [181]       # factor 1.81
    assert run('BrightnessIncreasing', flat, -1).unique().tolist() == [19]    # factor 0.19
    ramp = torch.arange(256, dtype=torch.uint8).repeat(3, 4, 1)
    assert run('PosterizeIncreasing', ramp).unique().tolist() == [0, 128]     # 1 bit kept
    solarized = run('SolarizeIncreasing', ramp)[0, 0]                         # threshold 26
    assert solarized[:26].tolist() == list(range(26)) and solarized[26].item() == 255 - 26
    added = run('SolarizeAdd', ramp)[0, 0]                                    # +99 below 128
    assert added[:128].tolist() == [i + 99 for i in range(128)] and added[128:].tolist() == list(range(128, 256))
    line = torch.zeros(3, 100, 200, dtype=torch.uint8)
    line[:, :, 150] = 255
    moved = run('TranslateXRel', line)[0, 50]                                 # 0.405 * 200 = 81 px
    assert moved.argmax().item() == 150 - 81 and moved[200 - 81:].tolist() == [A.FILL[0]] * 81


def test_posterize_zero_bits_is_black(pil224):
    assert TF.pil_to_tensor(A.posterize(pil224, 0)).max() == 0
    assert A.posterize(TF.pil_to_tensor(pil224), 0).max() == 0


# ---- RandAugment: the draws -----------------------------------------------------------------

def plans(n, seed=0, **kw):
    rng = random.Random(seed)
    return [A.randaug_plan(rng, **kw) for _ in range(n)]


def magnitudes(ps):
    """The magnitudes (0..10) recovered from the arguments of the linear signed ops."""
    scale = {'Rotate': 3.0, 'ShearX': 0.03, 'ShearY': 0.03, 'TranslateXRel': 0.045, 'TranslateYRel': 0.045}
    return [abs(arg) / scale[name] for p in ps for name, arg in p if name in scale]


def test_two_ops_with_replacement_each_with_probability_half():
    ps = plans(30000)
    counts = [sum(len(p) == k for p in ps) / len(ps) for k in (0, 1, 2)]
    assert counts == pytest.approx([0.25, 0.5, 0.25], abs=0.015)           # Binomial(2, 1/2)
    names = [name for p in ps for name, _ in p]
    for name in A.RANDAUG_OPS:                                              # uniform over the 15
        assert names.count(name) / len(names) == pytest.approx(1 / 15, rel=0.12)
    twice = [p for p in ps if len(p) == 2]
    assert sum(p[0][0] == p[1][0] for p in twice) / len(twice) == pytest.approx(1 / 15, rel=0.25)
    for name in SIGNED:                                                     # random sign, p 1/2
        args = [arg for p in ps for n, arg in p if n == name]
        negative = [a < (1 if 'Increasing' in name else 0) for a in args]
        assert sum(negative) / len(args) == pytest.approx(0.5, abs=0.06), name


def test_magnitude_noise_std_half_clipped_to_10():
    ms = magnitudes(plans(40000))
    # N(9, 0.5) clipped at 10: mean 9 - 0.5 (phi(2) - 2 (1 - Phi(2))) = 8.9958, std 0.4866
    assert statistics.mean(ms) == pytest.approx(8.9958, abs=0.02)
    assert statistics.pstdev(ms) == pytest.approx(0.4866, abs=0.02)
    assert max(ms) == pytest.approx(10) and sum(m > 9.9999 for m in ms) / len(ms) == pytest.approx(0.0228, abs=0.008)
    ms = magnitudes(plans(4000, magnitude=0.2))                             # clipped at 0 too
    assert min(ms) == 0 and sum(m == 0 for m in ms) / len(ms) == pytest.approx(0.3446, abs=0.05)


def test_randaugment_reproducible(pil224):
    assert plans(50, seed=3) == plans(50, seed=3) and plans(50, seed=3) != plans(50, seed=4)
    x = TF.pil_to_tensor(pil224)
    for p in plans(20, seed=5):
        assert torch.equal(A.rand_augment(x, p), A.rand_augment(x, p))


# ---- crop boxes, normalisation, erasing -----------------------------------------------------

@pytest.mark.parametrize('hflip', [0.0, 1.0])
def test_crop_and_flip_are_torchvisions(hflip):
    """The crop box is RandomResizedCrop's own draw (torch's generator), resized bicubic with antialias,
    then RandomHorizontalFlip with probability hflip."""
    from torchvision.transforms import v2
    x = A.to_image(jpeg_bytes(500, 375))
    for seed in range(5):
        torch.manual_seed(seed)
        ours = A.crop_flip(x, 64, (0.35, 1.0), hflip)
        torch.manual_seed(seed)
        top, left, h, w = v2.RandomResizedCrop.get_params(x, [0.35, 1.0], [3 / 4, 4 / 3])
        ref = TF.resized_crop(x, top, left, h, w, [64, 64], TF.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(ours, TF.horizontal_flip(ref) if hflip else ref)


def test_normalisation_is_imagenets():
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    ref = TF.normalize(x.float() / 255, A.IMAGENET_MEAN, A.IMAGENET_STD)
    assert torch.allclose(A.normalize_erase(x, re_prob=0), ref, atol=1e-5)
    assert torch.allclose(A.normalize_erase(x[None].expand(2, 3, 32, 32), re_prob=0), ref, atol=1e-5)


def test_erasing_pixel_mode():
    torch.manual_seed(0)
    flat = torch.full((150, 3, 224, 224), 124, dtype=torch.uint8)
    out = A.normalize_erase(flat, re_prob=1.0)
    base = out[0, :, 0, 0].clone()                                   # most corners are not erased
    fractions, noise = [], []
    for img in out:
        erased = (img != base.view(3, 1, 1)).any(0)
        if not erased.any():                                          # 10 misses: no box (rare)
            continue
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert erased.sum() == h * w                                  # one solid box
        fractions.append((h * w).item() / 224 ** 2)
        assert 0.3 / 1.2 <= w / h <= 3.34 * 1.2
        noise.append(img[:, erased])
    assert len(fractions) > 145
    assert min(fractions) >= 0.018 and max(fractions) <= 0.34
    # area ~ U(0.02, 1/3), less the big boxes of extreme aspect that do not fit (redrawn)
    assert 0.15 < statistics.mean(fractions) < (0.02 + 1 / 3) / 2
    noise = torch.cat(noise, 1)
    assert noise.mean().abs() < 0.01 and noise.std() == pytest.approx(1, abs=0.01)       # N(0, 1)
    some = A.normalize_erase(flat, re_prob=0.25)
    erased = [(img != some[0, :, 0, 0].view(3, 1, 1)).any().item() for img in some]
    assert sum(erased) / len(erased) == pytest.approx(0.25, abs=0.08)


# ---- the transforms -------------------------------------------------------------------------

def test_train_transform_output():
    rng, data = random.Random(0), jpeg_bytes(500, 375)
    outs = torch.stack([A.augment_train(data, rng=rng, re_prob=0) for _ in range(40)])
    assert outs.shape == (40, 3, 224, 224) and outs.dtype == torch.float32
    assert not torch.equal(outs[0], outs[1])
    mean, std = torch.tensor(A.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(A.IMAGENET_STD).view(3, 1, 1)
    levels = (outs * std + mean) * 255                                  # back to 0..255 integers
    assert levels.min() > -1e-3 and levels.max() < 255 + 1e-3 and (levels - levels.round()).abs().max() < 1e-3
    assert A.augment_train(data, rng=rng).isfinite().all()


def test_val_solid_colour_normalised():
    buf = io.BytesIO()
    Image.new('RGB', (400, 300), (200, 100, 50)).save(buf, 'JPEG', quality=95)
    out = A.augment_val(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    expect = [(c / 255 - m) / s for c, m, s in zip((200, 100, 50), A.IMAGENET_MEAN, A.IMAGENET_STD)]
    assert out.mean((1, 2)).tolist() == pytest.approx(expect, abs=0.03)


def test_device_path_on_cpu():
    """--gpu-decode's train.device_batch, run on the CPU: its crop, flip and erasing draw from torch's
    generator, its RandAugment plans from Python's random."""
    cfg = config()
    datas = [jpeg_bytes(500, 375, seed=1), jpeg_bytes(375, 500, seed=2), jpeg_bytes(640, 480, seed=3)]
    random.seed(0)
    torch.manual_seed(0)
    batch = A.device_batch(datas, 'cpu', cfg, train=True)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32 and batch.isfinite().all()
    random.seed(0)
    torch.manual_seed(0)
    assert torch.equal(batch, A.device_batch(datas, 'cpu', cfg, train=True))       # reproducible
    cpu = torch.stack([A.train_transform(d, cfg, random.Random(0)) for d in datas])
    assert cpu.shape == batch.shape and cpu.dtype == batch.dtype
    val = A.device_batch(datas, torch.device('cpu'), cfg, train=False)
    for d, v in zip(datas, val):                                        # the same decoder and steps
        assert torch.allclose(v, A.val_transform(d, cfg), atol=1e-6)
        assert torch.allclose(v, A.augment_val(d), atol=1e-6)           # resize 256, crop 224
    # same crop, flip and plan draws -> same image as the CPU path, up to the backend's rounding
    no_erase = dataclasses.replace(cfg, reprob=0.0)
    for s in (11, 12, 13):
        random.seed(s)
        torch.manual_seed(s)
        dev = A.device_batch(datas[:1], 'cpu', no_erase, train=True)
        torch.manual_seed(s)
        cpu = A.train_transform(datas[0], no_erase, random.Random(s))
        assert (dev[0] - cpu).abs().mean() < 0.05, s
    # a file the batched JPEG decoder refuses (a PNG in an ImageNet folder) is decoded alone
    buf = io.BytesIO()
    synthetic_photo(300, 200, torch.Generator().manual_seed(0)).save(buf, 'PNG')
    png = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    val = A.device_batch([datas[0], png], 'cpu', cfg, train=False)
    assert torch.allclose(val[0], A.augment_val(datas[0]), atol=1e-6)
    assert torch.allclose(val[1], A.augment_val(png), atol=1e-6)


def test_uint8_outputs_and_whole_decode_is_pils():
    data = jpeg_bytes(500, 375)
    x = A.augment_train(data, rng=random.Random(0), normalize=False)
    v = A.augment_val(data, normalize=False)
    assert x.dtype == v.dtype == torch.uint8 and x.shape == v.shape == (3, 224, 224)
    assert torch.allclose(A.normalize_erase(v, re_prob=0), A.augment_val(data))


@pytest.mark.parametrize('mode', ['RGB', 'L', 'CMYK', 'PNG'])
def test_decoding_gives_pillows_pixels(mode):
    """torchvision's libjpeg-turbo decode = Pillow's (timm's), grey and CMYK JPEGs and PNGs too."""
    buf = io.BytesIO()
    img = synthetic_photo(300, 200, torch.Generator().manual_seed(0))
    img.convert(mode if mode != 'PNG' else 'RGB').save(buf, 'PNG' if mode == 'PNG' else 'JPEG', quality=90)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    ref = TF.pil_to_tensor(Image.open(io.BytesIO(buf.getvalue())).convert('RGB'))
    assert torch.equal(A.to_image(data), ref) and torch.equal(A.to_image(Image.open(buf)), ref)
    assert A.augment_train(data).shape == A.augment_val(data).shape == (3, 224, 224)


def test_train_py_options_and_decoded_inputs():
    """What train.py passes: crop scale, RandAugment (ops, magnitude) or None, AutoAugment, and
    already decoded images (CIFAR's PIL images, the synthetic data's uint8 tensors, 32 px)."""
    data = jpeg_bytes(500, 375)
    torch.manual_seed(5)
    plain = A.augment_train(data, rng=random.Random(5), randaug=None, normalize=False)
    torch.manual_seed(5)
    assert torch.equal(plain, A.crop_flip(A.to_image(data), 224))           # no RandAugment
    # the flags -> the transforms' arguments
    assert A.randaug_setting(config()) == (2, 9.0) and A.randaug_setting(config('--randaug', '1,5')) == (1, 5.0)
    assert A.randaug_setting(config('--randaug', 'off')) is None and A.randaug_setting(config('--autoaugment')) is None
    assert A.crop_fraction(config()) == 0.875 and A.crop_fraction(config(data='cifar10')) == 1.0
    for flags, args in [((), ((0.08, 1.0), (2, 9), 0.25)),
                        (('--crop-scale', '0.35', '--randaug', 'off', '--reprob', '0'), ((0.35, 1.0), None, 0.0))]:
        torch.manual_seed(0)
        ours = A.train_transform(data, config(*flags), random.Random(3))
        torch.manual_seed(0)
        assert torch.equal(ours, A.augment_train(data, 224, random.Random(3), *args)), flags
    torch.manual_seed(0)
    auto = A.train_transform(data, config('--autoaugment'), random.Random(0))        # pycls's recipe
    assert auto.shape == (3, 224, 224) and auto.dtype == torch.float32 and auto.isfinite().all()
    small = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    pil = Image.fromarray(small.permute(1, 2, 0).numpy())
    for img in (small, pil):
        out = A.augment_train(img, size=32, rng=random.Random(1), scale=(0.35, 1.0), randaug=(2, 9))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert A.augment_val(img, size=32, crop_pct=1.0).shape == (3, 32, 32)
        for cfg in (config(data='cifar10'), config(data='synthetic')):              # the adapters
            out = A.train_transform(img, cfg, random.Random(1))
            assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and out.isfinite().all()
            assert torch.allclose(A.val_transform(img, cfg), A.normalize_erase(small, re_prob=0))
    assert torch.allclose(A.augment_val(small, size=32, crop_pct=1.0),
                          A.normalize_erase(small, re_prob=0))                # 32 -> 32: unchanged
    synthetic, _, _ = A.build_datasets(config(data='synthetic'))
    assert synthetic[0][0].shape == (3, 32, 32) and synthetic[0][0].dtype == torch.float32
    random.seed(0)
    torch.manual_seed(0)
    out = A.device_batch((data, data), 'cpu', config('--crop-scale', '0.35', '--randaug', '1,5'), train=True)
    assert out.shape == (2, 3, 224, 224)


# ---- an ImageNet-like folder through train.py's datasets and loaders ------------------------

def write_folder(root, n=3, size=(160, 120)):
    """root/{train,val}/{cat,dog}/i.jpg: n synthetic JPEGs per class and split."""
    for split in ('train', 'val'):
        for c, name in enumerate(('cat', 'dog')):
            os.makedirs(os.path.join(root, split, name))
            for i in range(n):
                synthetic_photo(*size, torch.Generator().manual_seed(10 * c + i)).save(
                    os.path.join(root, split, name, f'{i}.jpg'), quality=90)


def folder_config(root, *flags):
    return A.parse_config(['--data', 'folder', '--data-path', str(root), '--arch', 'deit_t', '--img-size', '64',
                           '--batch-size', '2', *flags])


def test_image_folder_through_a_data_loader(tmp_path):
    write_folder(tmp_path)
    cfg = folder_config(tmp_path, '--workers', '1')
    train_set, val_set, classes = A.build_datasets(cfg)
    assert classes == ['cat', 'dog'] and len(train_set) == len(val_set) == 6
    train_loader, val_loader = A.build_loaders(cfg, train_set, val_set, 0, 1, torch.device('cpu'))
    mean, std = torch.tensor(A.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(A.IMAGENET_STD).view(3, 1, 1)
    for loader in (train_loader, val_loader):
        batches = list(loader)
        assert len(batches) == 3
        for images, targets in batches:
            assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32 and images.isfinite().all()
            assert set(targets.tolist()) <= {0, 1}
    val_images = torch.cat([images for images, _ in batches])
    levels = (val_images * std + mean) * 255                               # normalised 0..255 levels
    assert levels.min() > -1e-3 and levels.max() < 255 + 1e-3 and (levels - levels.round()).abs().max() < 1e-3
    assert torch.cat([t for _, t in batches]).tolist() == [0, 0, 0, 1, 1, 1]
    from torchvision.io import read_file
    paths = [p for p, _ in val_set.folder.samples]
    assert torch.allclose(val_images, torch.stack([A.val_transform(read_file(p), cfg) for p in paths]), atol=1e-6)
    # --gpu-decode: the workers pass the files' bytes, device_batch decodes and augments each batch
    for workers in ('0', '2'):
        gpu = folder_config(tmp_path, '--gpu-decode', '--workers', workers)
        train_set, val_set, _ = A.build_datasets(gpu)
        train_loader, val_loader = A.gpu_decode_loaders(gpu, train_set, val_set, 0, 1, torch.device('cpu'))
        for images, targets in train_loader:
            assert images.shape == (2, 3, 64, 64) and set(targets.tolist()) <= {0, 1}
        val = torch.cat([images for images, _ in val_loader])
        assert torch.allclose(val, val_images, atol=1e-6)


@pytest.mark.parametrize('content', ['truncated', 'not an image'])
def test_corrupt_jpeg_names_the_file(tmp_path, content):
    write_folder(tmp_path, n=2)
    bad = tmp_path / 'train' / 'dog' / 'broken.jpg'
    bad.write_bytes(bytes(jpeg_bytes(160, 120).numpy()[:300]) if content == 'truncated' else b'<html>404</html>')
    cfg = folder_config(tmp_path, '--workers', '0')
    train_set, _, _ = A.build_datasets(cfg)
    with pytest.raises(A.UnreadableImage, match=re.escape(str(bad))):
        list(DataLoader(train_set, batch_size=2))
