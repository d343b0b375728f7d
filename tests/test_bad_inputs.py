"""Bad input, as a new user gives it, to train.py, evaluate.py and the Python API: each gets one line
naming the problem and the fix (no traceback), or is accepted because it is valid. Runs are never
lost: a second run into a used folder stops, --overwrite replaces it, --resume continues it, and no
temporary file is left. Logs: valid JSON, no progress bars when the output is not a terminal."""
import json
import os

import pytest
import torch
from PIL import Image

import evaluate
import locvit
import train

TINY = ['--arch', 'deit_t', '--depth', '1', '--embed-dim', '48', '--num-heads', '3', '--workers', '0',
        '--no-progress', '--synthetic-train', '32', '--synthetic-val', '8', '--batch-size', '16', '--epochs', '1']


def error(main, argv, capsys):
    """Run a script's main as the command line does; -> its one line on stderr (exit code 2)."""
    with pytest.raises(SystemExit) as e:
        train.run_cli(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
    return err


def folder(root, train_classes=('a', 'b'), val_classes=None, per_class=4, size=40):
    for split, classes in (('train', train_classes), ('val', val_classes or train_classes)):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                Image.new('RGB', (size, size), (i * 40, 100 + 50 * (c == 'b'), 30)).save(root / split / c / f'{i}.png')
    return str(root)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A finished tiny run: its folder (last.pt, best.pt, log.jsonl)."""
    out = tmp_path_factory.mktemp('run')
    train.main(TINY + ['--out', str(out)])
    return out


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('files')
    (d / 'text.pt').write_text('this is a text file, not a checkpoint\n')
    (d / 'empty.pt').write_bytes(b'')
    (d / 'a_file').write_text('x')
    return d


# flags -> a piece of the one-line message (the data is the built-in synthetic set unless a case says)
FLAG_CASES = [
    (['--lr', 'inf'], '--lr must be a finite number above 0, got inf'),
    (['--lr', 'nan'], '--lr must be a finite number above 0'),
    (['--lr', '-1'], '--lr must be a finite number above 0'),
    (['--clip-grad', '-1'], '--clip-grad must be a finite number above 0'),
    (['--warmup-epochs', '-1'], '--warmup-epochs must be a finite number, 0 or more'),
    (['--mixup', '-1'], '--mixup must be a finite number, 0 or more'),
    (['--weight-decay', '-0.1'], '--weight-decay must be a finite number, 0 or more'),
    (['--crop-scale', '2'], '--crop-scale must be above 0 and at most 1'),
    (['--data-fraction', '0'], '--data-fraction must be above 0 and at most 1'),
    (['--smoothing', '1.5'], '--smoothing must be at least 0 and below 1'),
    (['--drop-path', '1.5'], '--drop-path must be at least 0 and below 1'),
    (['--ema-decay', '1.5'], '--ema-decay must be at least 0 and below 1'),
    (['--reprob', '2'], '--reprob must be a probability'),
    (['--hflip', '-0.5'], '--hflip must be a probability'),
    (['--img-size', '0'], '--img-size must be at least 1, got 0'),
    (['--patch-size', '0'], '--patch-size must be at least 1'),
    (['--epochs', '0'], '--epochs must be at least 1, got 0'),
    (['--batch-size', '0'], '--batch-size must be at least 1'),
    (['--accum', '0'], '--accum must be at least 1'),
    (['--synthetic-train', '0'], '--synthetic-train must be at least 1'),
    (['--synthetic-train', '10', '--batch-size', '32'], 'fewer than one batch per process'),
    (['--data-fraction', '0.01', '--synthetic-train', '200', '--batch-size', '16'], 'raise --data-fraction'),
    (['--accum', '4', '--synthetic-train', '48', '--batch-size', '16'], '--accum 4 needs 4 for one optimizer step'),
    (['--gpu-decode'], '--gpu-decode decodes JPEG files (--data folder)'),
    (['--arch', 'convit_tiy'], 'did you mean convit_t'),
    (['--randaug', '2'], "--randaug takes 'N,M'"),
    (['--diverse', 'cosine'], "unknown over-smoothing loss 'cosine'"),
    (['--diverse', 'mix', '--mixup', '0.8'], 'add --mixup 0'),
    (['--diverse', 'mix,mix-released'], 'choose one'),
    (['--head-dropout', '0.2'], '--head-dropout acts in the patch-diversity wrapper'),
    (['--reduction', '4'], 'add --ffn lff'),
    (['--no-local-init'], 'sets GPSA blocks, and this model has none'),
    (['--stem-channels', 'a,b'], 'takes integers separated by commas'),
    (['--num-heads', '5', '--embed-dim', '48'], 'not divisible by num_heads 5'),
    (['--img-size', '30', '--patch-size', '4'], 'not divisible by the stem stride 4'),
    (['--num-classes', '11'], '--num-classes must lie in [2, 10]'),
    (['--data', 'cifar10', '--data-path', '/nonexistent'], 'add --download to fetch it'),
    (['--data', 'folder'], '--data folder needs --data-path DIR'),
]


@pytest.mark.parametrize('flags, message', FLAG_CASES, ids=[' '.join(f) for f, _ in FLAG_CASES])
def test_bad_flags(flags, message, tmp_path, capsys):
    assert message in error(train.main, TINY + flags + ['--out', str(tmp_path / 'o')], capsys)


def test_the_diversity_losses_need_a_patch_grid(tmp_path, capsys):
    err = error(train.main, ['--arch', 'swin_t', '--diverse', 'cos', '--img-size', '32', '--workers', '0',
                             '--out', str(tmp_path / 'o')], capsys)
    assert 'no single patch grid' in err


@pytest.mark.parametrize('flag', ['--resume', '--finetune'])
@pytest.mark.parametrize('name, message', [('text.pt', 'is not a PyTorch file'), ('empty.pt', 'is empty (0 bytes'),
                                           ('', 'is a folder; give the file in it'), ('nope.pt', 'not found')])
def test_bad_checkpoint_files(flag, name, message, files, tmp_path, capsys):
    assert message in error(train.main, TINY + [flag, str(files / name), '--out', str(tmp_path / 'o')], capsys)


@pytest.mark.parametrize('name, message', [('text.pt', 'is not a PyTorch file'), ('empty.pt', 'is empty (0 bytes'),
                                           ('', 'is a folder; give the file in it'), ('nope.pt', 'not found')])
def test_bad_checkpoint_files_in_evaluate_and_the_api(name, message, files, capsys):
    assert message in error(evaluate.main, ['--checkpoint', str(files / name), '--workers', '0'], capsys)
    with pytest.raises(ValueError, match=message.replace('(', r'\(')):
        locvit.load_checkpoint(locvit.create_model('deit_t'), files / name)


def test_folder_data_problems(tmp_path, capsys):
    one = folder(tmp_path / 'one', ('a',))
    assert 'a classifier needs at least 2' in error(train.main, TINY + ['--data', 'folder', '--data-path', one,
                                                                        '--out', str(tmp_path / 'o')], capsys)
    other = folder(tmp_path / 'other', ('a', 'b'), ('a', 'c'))
    err = error(train.main, TINY + ['--data', 'folder', '--data-path', other, '--out', str(tmp_path / 'o')], capsys)
    assert 'train/ and val/ hold different classes (b, c in one only)' in err
    two = folder(tmp_path / 'two')
    assert '--num-classes 1' in error(train.main, TINY + ['--data', 'folder', '--data-path', two, '--num-classes', '1',
                                                          '--out', str(tmp_path / 'o')], capsys)


def test_a_16_bit_png_is_valid(tmp_path):
    """A 16-bit PNG decodes to 16-bit values: rescaled to 8 bits, not refused."""
    root = tmp_path / 'data'
    folder(root)
    value = torch.tensor([[40000] * 40] * 40, dtype=torch.int32).numpy().astype('uint16')
    Image.fromarray(value).save(root / 'train' / 'a' / 'deep.png')
    data = torch.frombuffer(bytearray((root / 'train' / 'a' / 'deep.png').read_bytes()), dtype=torch.uint8)
    image = train.to_image(data)
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 40) and image.float().mean() == pytest.approx(155, abs=1)
    assert train.main(TINY + ['--data', 'folder', '--data-path', str(root), '--img-size', '32', '--patch-size', '8',
                              '--batch-size', '4', '--out', str(tmp_path / 'o')]) >= 0


def test_resuming_another_model_or_another_shape(run, tmp_path, capsys):
    last = str(run / 'last.pt')
    err = error(train.main, TINY + ['--depth', '2', '--resume', last, '--out', str(tmp_path / 'o')], capsys)
    assert 'was trained with depth 1 (this run: depth 2); resume with the same model flags' in err
    err = error(train.main, TINY + ['--arch', 'convit_t', '--local-up-to-layer', '1', '--resume', last,
                                    '--out', str(tmp_path / 'o')], capsys)
    assert 'is a deit_t run on 10 classes, this run is convit_t' in err
    torch.save({'model': locvit.read_checkpoint(last)['model']}, tmp_path / 'weights.pt')
    err = error(train.main, TINY + ['--resume', str(tmp_path / 'weights.pt'), '--out', str(tmp_path / 'o')], capsys)
    assert 'holds weights only' in err and '--finetune' in err


def test_evaluate_refuses_another_arch_for_our_checkpoint(run, capsys):
    err = error(evaluate.main, ['--checkpoint', str(run / 'last.pt'), '--arch', 'localvit_t', '--workers', '0'], capsys)
    assert 'the checkpoint is a deit_t run, not localvit_t; drop --arch' in err


def test_evaluate_refuses_other_classes(run, tmp_path, capsys):
    other = folder(tmp_path / 'other', [str(i) for i in range(10)])     # 10 classes, other names
    err = error(evaluate.main, ['--checkpoint', str(run / 'last.pt'), '--data', 'folder', '--data-path', other,
                                '--workers', '0'], capsys)
    assert 'trained on the classes disk, ring, square, frame, ..., the validation data holds 0, 1, 2, 3' in err


def test_evaluate_analysis_skips_what_a_one_patch_grid_lacks(tmp_path, capsys):
    """PVT and Swin at 32 px end on a 1 x 1 grid: no patch similarity, said in a note; no stop."""
    result = evaluate.main(['--arch', 'pvt_t', '--img-size', '32', '--analyze', '--analyze-images', '2',
                            '--out', str(tmp_path), '--workers', '0'])
    assert result['patch_similarity'] is None and any('one patch' in n for n in result['notes'])


def test_python_api_gets_value_errors_that_name_the_fix():
    with pytest.raises(ValueError, match='img_size 0, in_chans 3 and num_classes 1000 must be positive'):
        locvit.create_model('deit_t', img_size=0)
    with pytest.raises(ValueError, match='add local_up_to_layer=L'):
        locvit.create_model('deit_t', gpsa={'local_init': False})
    with pytest.raises(ValueError, match=r"no option lff\['kernal_size'\].*lff: act, channel_attn, reduction, kernel_size"):
        locvit.create_model('localvit_t', lff={'kernal_size': 1})
    with pytest.raises(ValueError, match='built for 224x224 images, got 32x32'):
        locvit.create_model('deit_t')(torch.randn(1, 3, 32, 32))


# ---- runs are never lost ----------------------------------------------------------------------------

def test_a_second_run_into_a_used_folder_stops(run, capsys):
    before = (run / 'log.jsonl').read_text()
    err = error(train.main, TINY + ['--out', str(run)], capsys)
    assert 'already holds a run (last.pt, best.pt, log.jsonl)' in err and '--resume auto' in err and '--overwrite' in err
    assert (run / 'log.jsonl').read_text() == before
    assert 'is a file, not a folder' in error(train.main, TINY + ['--out', str(run / 'log.jsonl')], capsys)


def test_overwrite_replaces_and_resume_continues(tmp_path):
    out = str(tmp_path / 'o')
    train.main(TINY + ['--out', out])
    train.main(TINY + ['--out', out, '--overwrite', '--seed', '1'])
    assert [r['epoch'] for r in map(json.loads, open(os.path.join(out, 'log.jsonl')))] == [1]   # a fresh log
    (tmp_path / 'o' / 'last.pt.tmp').write_bytes(b'half a file')        # a save killed midway
    train.main(TINY[:-1] + ['2', '--out', out, '--resume', 'auto'])
    assert [r['epoch'] for r in map(json.loads, open(os.path.join(out, 'log.jsonl')))] == [1, 2]
    assert not (tmp_path / 'o' / 'last.pt.tmp').exists()


def test_an_interrupted_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def killed(state, path):
        open(path, 'wb').write(b'half')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', killed)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(str(tmp_path / 'last.pt'), {'x': 1})
    assert os.listdir(tmp_path) == []


# ---- logs -------------------------------------------------------------------------------------------

def test_log_lines_are_valid_json_and_bars_only_on_a_terminal(run, capsys, tmp_path):
    line = train.json_line({'epoch': 1, 'train_loss': float('nan'), 'lr': float('inf'), 'val_top1': 50.0})
    assert json.loads(line) == {'epoch': 1, 'train_loss': None, 'lr': None, 'val_top1': 50.0}
    json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} is not JSON'))
    train.main([a for a in TINY if a != '--no-progress'] + ['--out', str(tmp_path / 'o')])   # stderr: not a tty
    captured = capsys.readouterr()
    assert '\r' not in captured.err + captured.out
    assert sum(line.startswith('epoch 1/1') for line in captured.out.splitlines()) == 1


def test_gpu_decode_with_loader_workers_finishes_an_epoch(tmp_path):
    """--gpu-decode on the CPU: two workers pass the files' bytes, each batch is decoded in the main process."""
    root = folder(tmp_path / 'data', per_class=8)
    for name in os.listdir(os.path.join(root, 'train', 'a')):          # JPEGs, as ImageNet's
        path = os.path.join(root, 'train', 'a', name)
        Image.open(path).save(path[:-4] + '.jpg', quality=90)
        os.remove(path)
    flags = [a for a in TINY if a not in ('--workers', '0')] + ['--workers', '2', '--gpu-decode', '--data', 'folder',
                                                               '--data-path', root, '--img-size', '32', '--patch-size', '8']
    assert train.main(flags + ['--out', str(tmp_path / 'o')]) >= 0
    assert len(open(tmp_path / 'o' / 'log.jsonl').readlines()) == 1


def test_help_is_grouped_and_names_what_each_data_set_uses(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(['--help'])
    out = capsys.readouterr().out
    for group in ('model:', 'data:', 'recipe:', 'run:'):
        assert f'\n{group}\n' in out, group
    text = ' '.join(out.split())
    assert 'stochastic depth rate of the last block (deit, convit, convit+, patchdiverse recipes: 0.1; pycls, ' \
           'pycls-36gf recipes: 0.0; synthetic, digits data: 0.0)' in text
    assert 'image size (synthetic, digits, cifar data: 32; folder data: 224)' in text
