"""train.py: learning happens, distributed training equals one process, runs resume exactly,
every model trains, and bad input gets one clear line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import locvit
import train
from conftest import ROOT

TINY = ['--depth', '2', '--embed-dim', '48', '--num-heads', '3', '--workers', '0', '--no-progress']


def run_train(args, tmp_path, check=True, timeout=600, torchrun=0):
    """train.py in a subprocess, as a user runs it; -> CompletedProcess."""
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone',
                               f'--nproc_per_node={torchrun}'] if torchrun else []) + ['train.py'] + args
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def log_lines(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------------
# Learning happens
# --------------------------------------------------------------------------------------------------

def test_a_tiny_synthetic_run_learns(tmp_path):
    out = tmp_path / 'run'
    run_train(['--arch', 'localvit_t', *TINY, '--epochs', '6', '--synthetic-train', '1200',
               '--synthetic-val', '300', '--batch-size', '48', '--lr', '2e-2', '--warmup-epochs',
               '0.5', '--drop-path', '0', '--out', str(out)], tmp_path)
    log = log_lines(out)
    assert len(log) == 6
    assert log[-1]['train_loss'] < log[0]['train_loss'] - 0.2
    assert log[-1]['val_top1'] > 25.0                   # chance: 10%
    for key in ('train_loss', 'val_top1', 'val_top5', 'lr', 'img_per_s', 'epoch_seconds', 'peak_mem_mb'):
        assert key in log[-1]
    ckpt = torch.load(out / 'last.pt', weights_only=True)     # plain data only
    assert ckpt['epoch'] == 6 and ckpt['arch'] == 'localvit_t'
    assert json.load(open(out / 'config.json'))['arch'] == 'localvit_t'
    assert (out / 'best.pt').exists() and not list(out.glob('*.tmp'))


# --------------------------------------------------------------------------------------------------
# Distributed: 2 gloo ranks x batch b == one process on the joint batch 2b
# --------------------------------------------------------------------------------------------------

def ddp_run(tmp_path, name, arch, per_rank_batch, accum, steps=2, ranks=2):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    script = os.path.join(ROOT, 'tests', 'ddp_step.py')
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}']
                              if ranks > 1 else [])
    result = subprocess.run(cmd + [script, str(tmp_path / name), arch, str(per_rank_batch), str(accum),
                                   str(steps)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f'{name}.rank{r}.pt') for r in range(ranks)]


@pytest.mark.parametrize('arch,accum', [('deit_t', 1), ('convit_t', 2), ('localvit_t', 1),
                                        ('vit_c_1gf', 1)])
def test_two_ranks_equal_one_process_on_the_joint_batch(tmp_path, arch, accum):
    """2 ranks x b == one process on 2b. BatchNorm normalises each rank's b images with their
    own statistics, so for the BatchNorm models (LocalViT, ViT_C) the one process takes the 2b
    images as 2 accumulated micro-batches of b: the same statistics, the same gradients."""
    bn = arch in ('localvit_t', 'vit_c_1gf')
    r0, r1 = (r['after_sync'] for r in ddp_run(tmp_path, 'ddp', arch, 4, accum))
    single = ddp_run(tmp_path, 'one', arch, 8, 2 if bn else 1, ranks=1)[0]['after_sync']
    start = train.build_model(train.parse_config(['--arch', arch, '--depth', '2', '--embed-dim', '48',
                                                  '--num-heads', '3'] +
                                                 (['--local-up-to-layer', '1'] if 'convit' in arch else [])), 10)
    moved = 0
    for k in single:
        assert torch.equal(r0[k], r1[k]), k                      # the ranks agree exactly
        if 'running_' in k or 'num_batches' in k:                # 1 update per step per rank, 2 here
            continue
        torch.testing.assert_close(r0[k], single[k], atol=1e-5, rtol=0, msg=k)
        moved += not torch.allclose(single[k], start.state_dict()[k]) if k in start.state_dict() else 0
    assert moved > 10                                             # the steps did change weights


def test_batchnorm_statistics_differ_across_ranks_until_synced(tmp_path):
    """DDP sends rank 0's buffers only at the start of a forward: after the last step the ranks'
    BatchNorm statistics differ; train.sync_buffers makes them rank 0's."""
    r0, r1 = ddp_run(tmp_path, 'bn', 'localvit_t', 4, 1)
    running = [k for k in r0['before_sync'] if k.endswith('running_mean')]
    assert running and any(not torch.equal(r0['before_sync'][k], r1['before_sync'][k]) for k in running)
    for k, v in r0['after_sync'].items():
        assert torch.equal(v, r1['after_sync'][k]) and torch.equal(v, r0['before_sync'][k]), k


@pytest.mark.parametrize('arch', ['localvit_t', 'vit_c_1gf'])
def test_two_rank_validation_equals_evaluate_py_on_the_saved_checkpoint(tmp_path, arch):
    """The accuracy train.py logs on 2 ranks is the saved model's: evaluate.py on last.pt (one
    process) finds the same top-1, to the image."""
    import evaluate
    out = tmp_path / 'run'
    run_train(['--arch', arch, *TINY, '--epochs', '1', '--synthetic-train', '128', '--synthetic-val',
               '90', '--batch-size', '16', '--ema', '--out', str(out)], tmp_path, torchrun=2)
    logged = log_lines(out)[-1]
    for weights, key in (('model', 'val_top1'), ('ema', 'ema_top1')):
        stats = evaluate.main(['--checkpoint', str(out / 'last.pt'), '--weights', weights, '--workers', '0'])
        assert stats['top1'] == logged[key] and stats['count'] == 90, weights


def test_lr_scales_with_the_global_batch_on_two_ranks(tmp_path):
    out = tmp_path / 'run'
    run_train(['--arch', 'deit_t', *TINY, '--epochs', '1', '--max-steps', '1', '--synthetic-train', '64',
               '--synthetic-val', '8', '--batch-size', '8', '--accum', '2', '--lr', '1e-3',
               '--out', str(out)], tmp_path, torchrun=2)
    ckpt = torch.load(out / 'last.pt', weights_only=True)
    assert ckpt['base_lr'] == pytest.approx(1e-3 * 8 * 2 * 2 / 512)       # batch x world x accum


# --------------------------------------------------------------------------------------------------
# Resume: a run interrupted after epoch 1 of 2 ends with the same weights as one that was not
# --------------------------------------------------------------------------------------------------

def kill_all(marker):
    """SIGKILL every process whose command line mentions `marker` (torchrun starts its workers
    in sessions of their own), and wait until they are gone."""
    def cmdline(pid):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                return f.read().decode(errors='ignore')
        except OSError:                                           # gone meanwhile
            return ''

    for _ in range(100):
        pids = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()
                and marker in cmdline(p)]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def interrupt_and_resume(args, tmp_path, torchrun=0):
    """Run `args` to the end in full/, and in cut/ killed during epoch 2 then resumed:
    -> the two last.pt checkpoints."""
    run_train(args + ['--out', str(tmp_path / 'full')], tmp_path, torchrun=torchrun)
    launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone',
                                  f'--nproc_per_node={torchrun}'] if torchrun else [])
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    proc = subprocess.Popen(launch + ['train.py', *args, '--out', str(tmp_path / 'cut')], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log = tmp_path / 'cut' / 'log.jsonl'
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count('\n') >= 1) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)                          # killed during epoch 2
    proc.wait()
    kill_all(str(tmp_path / 'cut'))                               # torchrun's workers too
    assert torch.load(tmp_path / 'cut' / 'last.pt', weights_only=True)['epoch'] == 1
    resumed = run_train(args + ['--out', str(tmp_path / 'cut'), '--resume', 'auto'], tmp_path,
                        torchrun=torchrun)
    assert 'resuming after epoch 1' in resumed.stdout
    assert log_lines(tmp_path / 'cut')[-1]['val_top1'] == log_lines(tmp_path / 'full')[-1]['val_top1']
    return (torch.load(tmp_path / run / 'last.pt', weights_only=True) for run in ('full', 'cut'))


def assert_same_state(full, cut, parts):
    assert cut['epoch'] == full['epoch'] == 2 and cut['step'] == full['step']
    for part in parts:
        for k, v in full[part].items():
            torch.testing.assert_close(cut[part][k], v, atol=1e-6, rtol=0, msg=f'{part} {k}')


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    args = ['--arch', 'convit_t', '--depth', '2', '--embed-dim', '48', '--num-heads', '3',
            '--local-up-to-layer', '1', '--epochs', '2', '--synthetic-train', '480',
            '--synthetic-val', '64', '--batch-size', '16', '--ema', '--ema-decay', '0.9', '--drop-path', '0.1',
            '--no-progress']                  # default workers, drop_path and augmentations on
    assert_same_state(*interrupt_and_resume(args, tmp_path), ('model', 'ema'))


def test_the_diversity_losses_train_on_two_ranks_and_resume_exactly(tmp_path):
    """--diverse cos,con,mix under DDP; killed and resumed, it ends where an uninterrupted run
    ends: the model, the patch classifier and its optimizer state."""
    args = ['--arch', 'deit_t', *TINY, '--epochs', '2', '--synthetic-train', '192',
            '--synthetic-val', '32', '--batch-size', '16', '--diverse', 'cos,con,mix', '--cutmix', '1.0',
            '--drop-path', '0.1']
    full, cut = interrupt_and_resume(args, tmp_path, torchrun=2)
    assert_same_state(full, cut, ('model', 'wrapper'))
    assert set(full['wrapper']) == {'patch_head.weight', 'patch_head.bias'}
    assert 'loss_mix' in log_lines(tmp_path / 'cut')[-1]
    head = len(full['optimizer']['state']) - 1                    # the patch head's bias: last
    for k, v in full['optimizer']['state'][head].items():
        torch.testing.assert_close(cut['optimizer']['state'][head][k], v, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# Every zoo model trains a step through train.py
# --------------------------------------------------------------------------------------------------

def small_overrides(name):
    if locvit.MODELS[name][0] is not locvit.VisionTransformer:
        return []
    return ['--depth', '3', '--local-up-to-layer', '2'] if 'convit' in name else ['--depth', '2']


@pytest.mark.parametrize('name', locvit.list_models())
def test_every_model_trains_a_step_at_32px(name, tmp_path):
    best = train.main(['--arch', name, *small_overrides(name), '--epochs', '1', '--max-steps', '1',
                       '--synthetic-train', '8', '--synthetic-val', '4', '--batch-size', '4',
                       '--workers', '0', '--no-progress', '--out', str(tmp_path)])
    assert 0.0 <= best <= 100.0
    assert log_lines(tmp_path)[0]['train_loss'] > 0


# --------------------------------------------------------------------------------------------------
# The pieces: data selection, samplers, schedule, weight decay
# --------------------------------------------------------------------------------------------------

def test_data_fraction_keeps_the_first_samples_of_each_class():
    ds = train.SyntheticShapes(8, 40, num_classes=4)              # class of image i: i % 4
    sub = train.select(ds, 3, 0.5)                                # 10 per class -> first 5, classes 0-2
    assert sub.indices == sorted([c + 4 * k for c in range(3) for k in range(5)])
    assert train.select(ds, 4, 1.0) is ds


def test_synthetic_data_is_deterministic_and_balanced():
    a, b = train.SyntheticShapes(32, 20), train.SyntheticShapes(32, 20)
    assert torch.equal(a[7][0], b[7][0]) and a[7][1] == 7 % 10
    assert not torch.equal(a[7][0], a[17][0])                     # same class, another image
    assert a[3][0].dtype == torch.uint8 and a[3][0].shape == (3, 32, 32)


def test_repeated_augmentation_spreads_copies_over_the_ranks():
    """DeiT's RASampler: an epoch holds n / 3 distinct images x 3 copies; with 3 ranks each rank
    gets one copy of each; the ranks' shares are disjoint positions of one list."""
    from collections import Counter
    shares = [list(train.RepeatAugSampler(30, 3, r, repeats=3, seed=0)) for r in range(3)]
    assert all(len(s) == 10 for s in shares)                      # the epoch keeps its length
    assert shares[0] == shares[1] == shares[2]                    # copy k of image i on rank k
    assert len(set(shares[0])) == 10                              # 10 distinct images, 3 copies each
    two = [list(train.RepeatAugSampler(30, 2, r, repeats=3, seed=0)) for r in range(2)]
    counts = Counter(two[0] + two[1])
    assert sorted(counts.values()) == [3] * 10                    # 10 images x 3 copies
    assert all(i in two[0] and i in two[1] for i in counts)      # every image on both ranks


def test_evaluation_shards_count_every_sample_once():
    shards = [list(train.build_val_loader(train.parse_config([]), range(10), r, 3, torch.device("cpu")).sampler) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def test_warmup_then_cosine():
    lr = lambda s: train.lr_at(s, 100, 10, 1.0, 0.0, 0.1)
    assert lr(0) == 0.0 and lr(5) == pytest.approx(0.5) and lr(10) == pytest.approx(1.0)
    assert lr(55) == pytest.approx(0.55) and lr(100) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_gates_and_embeddings():
    model = locvit.create_model('convit_t', img_size=32, patch_size=4, depth=3, local_up_to_layer=2)
    decay, no_decay = train.param_groups(model, 0.05)
    ids = {id(p) for p in no_decay['params']}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    assert {'pos_embed', 'cls_token', 'blocks.0.attn.gating_param', 'blocks.0.norm1.weight',
            'blocks.0.attn.proj.bias', 'head.bias'} <= names
    assert 'blocks.0.attn.qk.weight' not in names and 'head.weight' not in names
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0


def test_the_data_sets_the_defaults():
    cfg = train.parse_config(['--data', 'synthetic'])
    assert (cfg.img_size, cfg.patch_size) == (32, 4)
    cfg = train.parse_config(['--data', 'folder', '--data-path', 'x'])
    assert cfg.img_size == 224 and cfg.patch_size is None and cfg.repeated_aug == 3
    cfg = train.parse_config(['--data', 'cifar100', '--img-size', '64', '--epochs', '10',
                              '--data-fraction', '0.1', '--scale-epochs'])
    assert cfg.img_size == 64 and cfg.epochs == 100
    cfg = train.parse_config(['--arch', 'vit_c_1gf'])
    assert locvit.create_model(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size).grid == (8, 8)


IMAGENET = ['--data', 'folder', '--data-path', 'x']


@pytest.mark.parametrize('arch', ['deit_t', 'localvit_t', 'deit_s24', 'pvt_t'])
def test_deits_recipe_by_value(arch):
    """DeiT's main.py defaults, used unchanged by LocalViT (and here for the other backbones)."""
    cfg = train.parse_config(['--arch', arch] + IMAGENET)
    assert cfg.recipe == 'deit'
    expected = dict(opt='adamw', lr=5e-4, weight_decay=0.05, epochs=300, warmup_epochs=5,
                    warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug='2,9',
                    autoaugment=False, reprob=0.25, repeated_aug=3, drop_path=0.1, ema=True,
                    ema_decay=0.99996, crop_scale=0.08, img_size=224, batch_size=128)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_each_familys_recipe():
    convit = train.parse_config(['--arch', 'convit_s'] + IMAGENET)
    assert (convit.recipe, convit.lr, convit.ema, convit.drop_path) == ('convit', 5e-4, False, 0.1)
    plus = train.parse_config(['--arch', 'convit_s_plus'] + IMAGENET)
    assert (plus.recipe, plus.lr, plus.batch_size) == ('convit+', 4e-4, 64)   # 4e-4 at batch 512
    for arch in ('vit_c_1gf', 'vit_p_4gf'):
        cfg = train.parse_config(['--arch', arch] + IMAGENET)
        expected = dict(recipe='pycls', opt='adamw', lr=1e-3 * 512 / 2048, weight_decay=0.24,
                        epochs=400, warmup_epochs=5, warmup_lr=0.1e-3, min_lr=0.005e-3, smoothing=0.1,
                        mixup=0.8, cutmix=1.0, randaug='off', autoaugment=True, reprob=0.0,
                        repeated_aug=1, drop_path=0.0, ema=True, batch_size=256)
        assert {k: getattr(cfg, k) for k in expected} == expected
    # flags still override, and any family can take another's recipe
    cfg = train.parse_config(['--arch', 'vit_c_1gf', '--lr', '1e-3', '--recipe', 'deit'] + IMAGENET)
    assert (cfg.lr, cfg.weight_decay, cfg.randaug) == (1e-3, 0.05, '2,9')


def test_deits_randaugment_magnitudes():
    """rand-m9-mstd0.5-inc1 on timm's 0..10 scale, not torchvision's 31 bins (3x weaker)."""
    arg = train.randaug_arg
    assert arg('Rotate', 9) == pytest.approx(27.0) and arg('ShearX', 9) == pytest.approx(0.27)
    assert arg('TranslateXRel', 9) == pytest.approx(0.405)
    assert arg('BrightnessIncreasing', 9) == pytest.approx(1.81)
    assert arg('BrightnessIncreasing', 9, -1) == pytest.approx(0.19)
    assert arg('PosterizeIncreasing', 9) == 1 and arg('SolarizeIncreasing', 9) == 26
    assert arg('SolarizeAdd', 9) == 99


# --------------------------------------------------------------------------------------------------
# Bad input: one clear line, no traceback
# --------------------------------------------------------------------------------------------------

def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.run_cli(train.main, argv + ['--workers', '0', '--no-progress'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
    return err


def make_folder(root, classes, per_class=2, bad=None):
    from PIL import Image
    for split in ('train', 'val'):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                Image.new('RGB', (40, 40), (i * 40, 100, 30)).save(root / split / c / f'{i}.png')
    if bad:
        (root / 'train' / classes[0] / bad).write_bytes(b'\x89PNG not really')


def test_unknown_arch(capsys, tmp_path):
    assert 'did you mean deit_t' in cli_error(['--arch', 'deit_tt', '--out', str(tmp_path)], capsys)


def test_missing_data_path(capsys, tmp_path):
    err = cli_error(['--data', 'folder', '--out', str(tmp_path)], capsys)
    assert '--data folder needs --data-path' in err
    err = cli_error(['--data', 'folder', '--data-path', str(tmp_path / 'nowhere'), '--out', str(tmp_path)], capsys)
    assert 'does not exist' in err and 'train/ and val/' in err


def test_a_class_folder_without_images(capsys, tmp_path):
    make_folder(tmp_path / 'data', ['a', 'b'])
    os.makedirs(tmp_path / 'data' / 'train' / 'c')
    err = cli_error(['--data', 'folder', '--data-path', str(tmp_path / 'data'), '--out', str(tmp_path)], capsys)
    assert "Found no valid file for the classes c" in err and 'needs image files' in err


def test_an_unreadable_image(capsys, tmp_path):
    make_folder(tmp_path / 'data', ['a', 'b'], bad='broken.png')
    err = cli_error(['--data', 'folder', '--data-path', str(tmp_path / 'data'), '--arch', 'deit_t',
                     '--depth', '1', '--img-size', '32', '--patch-size', '16', '--batch-size', '1', '--repeated-aug', '1',
                     '--epochs', '1', '--out', str(tmp_path / 'o')], capsys)
    assert 'cannot read image' in err and 'broken.png' in err and 'remove or replace' in err


def test_a_batch_larger_than_the_data(capsys, tmp_path):
    err = cli_error(['--synthetic-train', '10', '--batch-size', '32', '--out', str(tmp_path)], capsys)
    assert 'fewer than one batch per process' in err and 'lower --batch-size' in err


def test_too_many_classes(capsys, tmp_path):
    assert 'must lie in [2, 10]' in cli_error(['--num-classes', '20', '--out', str(tmp_path)], capsys)


def test_cifar_offline_without_the_files(capsys, tmp_path):
    err = cli_error(['--data', 'cifar100', '--data-path', str(tmp_path), '--out', str(tmp_path)], capsys)
    assert 'cifar100 not found' in err and '--download' in err


def test_a_non_finite_loss_names_the_step_and_the_checkpoint(capsys, tmp_path):
    err = cli_error(['--arch', 'deit_t', *TINY, '--epochs', '3', '--synthetic-train', '64',
                     '--synthetic-val', '16', '--batch-size', '16', '--lr', '1e9',
                     '--warmup-epochs', '0', '--out', str(tmp_path)], capsys)
    assert 'the loss became' in err and 'step' in err and 'lower --lr' in err


def test_a_corrupt_or_mismatched_resume_checkpoint(capsys, tmp_path):
    (tmp_path / 'last.pt').write_bytes(b'PK garbage')                 # a zip's magic, then garbage
    err = cli_error(['--resume', str(tmp_path / 'last.pt'), '--out', str(tmp_path)], capsys)
    assert 'truncated or corrupt?)' in err
    run_train(['--arch', 'deit_t', *TINY, '--epochs', '1', '--synthetic-train', '32',
               '--synthetic-val', '8', '--batch-size', '16', '--out', str(tmp_path / 'r')], tmp_path)
    err = cli_error(['--arch', 'convit_t', '--resume', 'auto', '--out', str(tmp_path / 'r')], capsys)
    assert 'is a deit_t run on 10 classes, this run is convit_t on 10' in err


def test_no_epochs_a_malformed_randaug_a_negative_lr(capsys, tmp_path):
    assert '--epochs must be at least 1, got 0' in cli_error(['--epochs', '0', '--out', str(tmp_path)], capsys)
    err = cli_error(['--randaug', '2', '--out', str(tmp_path)], capsys)
    assert "--randaug takes 'N,M'" in err and "got '2'" in err
    assert '--lr must be a finite number above 0, got -1.0' in cli_error(['--lr', '-1', '--out', str(tmp_path)], capsys)


def test_diverse_flag_errors(capsys, tmp_path):
    assert "unknown over-smoothing loss 'cosine'" in cli_error(['--diverse', 'cosine', '--out', str(tmp_path)], capsys)
    assert "--ffn lff" in cli_error(['--arch', 'deit_t', '--reduction', '4', '--out', str(tmp_path)], capsys)
    assert 'malformed weight' in cli_error(['--diverse', 'cos=x', '--out', str(tmp_path)], capsys)
    err = cli_error(['--diverse', 'mix', '--mixup', '0.8', '--out', str(tmp_path)], capsys)
    assert 'add --mixup 0' in err


def test_finetune_loads_the_weights_resizes_and_gives_a_new_classifier(tmp_path, capsys):
    """DeiT's fine-tuning: --finetune PATH (or a URL, or 'pretrained') loads the weights into the
    model at --img-size, position embeddings resized, a new classifier for another class count."""
    source = locvit.create_model('deit_t', img_size=32, patch_size=4, depth=2, embed_dim=48,
                                 num_heads=3, num_classes=10)
    torch.save({'model': source.state_dict()}, tmp_path / 'released.pth')
    cfg = train.parse_config(['--arch', 'deit_t', '--depth', '2', '--embed-dim', '48', '--num-heads', '3',
                              '--finetune', str(tmp_path / 'released.pth'), '--img-size', '48',
                              '--patch-size', '4', '--num-classes', '5'])
    model = train.build_model(cfg, 5)
    assert 'classify 10 classes; a new classifier for 5' in capsys.readouterr().out
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 48) and model.head.out_features == 5
    assert train.parse_config(['--finetune', 'pretrained', '--data', 'cifar10']).img_size == 224


def test_the_digits_data_is_the_shipped_uci_set():
    """tutorials/data/digits.csv.gz: 1,797 images of 8x8 cells (0..16) and their digits; a fixed split
    (0-1296 train, 1297-1796 validation), upsampled to 32 px, white ink on black, three equal channels."""
    cfg = train.parse_config(['--data', 'digits'])
    train_set, val_set, classes = train.build_datasets(cfg)
    assert (len(train_set), len(val_set), classes) == (1297, 500, [str(d) for d in range(10)])
    assert cfg.img_size == 32 and cfg.patch_size == 4 and cfg.hflip == 0.0
    raw = train.Digits('val', 8)                     # at 8 px: the cells themselves, x 255/16
    assert raw.images.shape == (500, 3, 8, 8) and torch.equal(raw.images[:, 0], raw.images[:, 2])
    assert raw.images.max() == 255 and raw.images.min() == 0
    counts = torch.bincount(torch.tensor(train_set.targets), minlength=10)
    assert counts.sum() == 1297 and counts.min() > 120
    image, label = val_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == raw.targets[0]
