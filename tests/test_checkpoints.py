"""Reference fixtures: the reference implementations' weights give their logits in our models;
official key layouts load through load_checkpoint; mismatches are explained."""
import pytest
import torch

import locvit
from conftest import fixture

# fixture -> (zoo name, overrides reproducing the fixture's configuration)
FIXTURES = {
    'deit': ('deit_t', dict(img_size=32, patch_size=4, embed_dim=24, depth=3, num_heads=3)),
    'convit': ('convit_t', dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4,
                                local_up_to_layer=2)),
    'convit_h9': ('convit_t', dict(img_size=24, patch_size=4, embed_dim=36, depth=2, num_heads=9,
                                   local_up_to_layer=1)),
    'localvit': ('localvit_t', dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                    lff=dict(reduction=32))),
    'localvit_relu6': ('localvit_t_relu6', dict(img_size=32, patch_size=4, embed_dim=24, depth=2,
                                                num_heads=4)),
    'vit_p': ('vit_p_1gf', dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)),
    'vit_c': ('vit_c_1gf', dict(img_size=32, embed_dim=32, depth=2, num_heads=2,
                                conv_stem=dict(channels=(8, 16), strides=(2, 2)))),
}


def fixture_model(name):
    """The fixture and our model for it. pycls's models read BGR images (its loader uses OpenCV), and
    the key map flips their first convolution to take RGB: our input is the fixture's, channels flipped."""
    fx = dict(fixture(name))
    arch, overrides = FIXTURES[name]
    model = locvit.create_model(arch, num_classes=10, **overrides)
    if name.startswith('vit_'):
        fx['input'] = fx['input'].flip(1)
    return fx, model


@pytest.mark.parametrize('name', sorted(FIXTURES))
def test_reference_weights_give_the_reference_logits(name):
    fx, model = fixture_model(name)
    locvit.load_checkpoint(model, fx['state_dict'])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fx['input']), fx['logits'], atol=1e-5, rtol=1e-4)
        if 'final_tokens' in fx:        # covers the last LFF, which the logits cannot see
            torch.testing.assert_close(model.forward_features(fx['input']), fx['final_tokens'],
                                       atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('name', sorted(FIXTURES))
def test_wrapped_and_prefixed_checkpoints_load_from_a_file(name, tmp_path):
    """{'model': ...} (DeiT, LocalViT releases), {'model_state': ...} (pycls), DDP's 'module.'."""
    fx, model = fixture_model(name)
    wrapped = {'model_state' if name.startswith('vit_') else 'model':
               {'module.' + k: v for k, v in fx['state_dict'].items()}, 'epoch': 3}
    torch.save(wrapped, tmp_path / 'ckpt.pth')
    locvit.load_checkpoint(model, tmp_path / 'ckpt.pth')
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(fx['input']), fx['logits'], atol=1e-5, rtol=1e-4)


def test_a_training_checkpoint_with_args_namespace_loads(tmp_path):
    """DeiT-style training checkpoints (the LocalViT release) carry an argparse.Namespace."""
    import argparse
    fx, model = fixture_model('localvit')
    torch.save({'model': fx['state_dict'], 'args': argparse.Namespace(lr=5e-4)}, tmp_path / 'c.pth')
    locvit.load_checkpoint(model, tmp_path / 'c.pth')
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(fx['input']), fx['logits'], atol=1e-5, rtol=1e-4)


def test_our_state_dict_round_trips():
    model = locvit.create_model('convit_t', img_size=32, patch_size=4, depth=3, local_up_to_layer=2)
    other = locvit.create_model('convit_t', img_size=32, patch_size=4, depth=3, local_up_to_layer=2)
    locvit.load_checkpoint(other, model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), other.eval()(x))


def test_another_resolution_interpolates_the_position_embedding():
    fx, _ = fixture_model('convit')
    model = locvit.create_model('convit_t', num_classes=10, img_size=48, patch_size=4, embed_dim=32,
                                depth=3, num_heads=4, local_up_to_layer=2)
    locvit.load_checkpoint(model, fx['state_dict'])
    assert model.pos_embed.shape == (1, 144, 32)
    # an interpolation keeps the corners of the grid close to the original corners
    old = locvit.seq2img(fx['state_dict']['pos_embed'], (8, 8))
    new = locvit.seq2img(model.pos_embed.detach(), (12, 12))
    assert (new[..., 0, 0] - old[..., 0, 0]).abs().max() < 0.5 * old.abs().max()
    y = model.eval()(torch.randn(2, 3, 48, 48))
    assert torch.isfinite(y).all() and model.blocks[0].attn.positional_attention(model.grid).shape == (4, 144, 144)
    # DeiT keeps its class slot in front
    fx, _ = fixture_model('deit')
    deit = locvit.create_model('deit_t', num_classes=10, img_size=(32, 48), patch_size=4,
                               embed_dim=24, depth=3)
    locvit.load_checkpoint(deit, fx['state_dict'])
    assert torch.equal(deit.pos_embed[0, 0], fx['state_dict']['pos_embed'][0, 0])
    assert deit.pos_embed.shape == (1, 1 + 8 * 12, 24)


def test_another_class_count_is_explained_and_can_be_skipped():
    fx, _ = fixture_model('deit')
    model = locvit.create_model('deit_t', num_classes=100, img_size=32, patch_size=4,
                                embed_dim=24, depth=3)
    with pytest.raises(ValueError, match='classifies 10 classes, model deit_t has 100; build it '
                                         'with num_classes=10, or load with skip_head=True'):
        locvit.load_checkpoint(model, fx['state_dict'])
    locvit.load_checkpoint(model, fx['state_dict'], skip_head=True)
    assert torch.equal(model.blocks[0].attn.qkv.weight, fx['state_dict']['blocks.0.attn.qkv.weight'])


def test_another_architecture_is_explained():
    fx, _ = fixture_model('convit')
    model = locvit.create_model('deit_t', num_classes=10, img_size=32, patch_size=4, embed_dim=32,
                                depth=3, num_heads=4)
    with pytest.raises(ValueError, match=r'the checkpoint \(GPSA blocks \(ConViT\)\) does not fit '
                                         r'model deit_t \(plain ViT blocks\): missing 5 \(e.g. '
                                         r'blocks.0.attn.qkv.weight'):
        locvit.load_checkpoint(model, fx['state_dict'])
    fx, _ = fixture_model('localvit')
    with pytest.raises(ValueError, match=r'locality FFN \(LocalViT\)\) does not fit model deit_t'):
        locvit.load_checkpoint(model, fx['state_dict'])


def test_missing_and_corrupt_files_are_explained(tmp_path):
    model = locvit.create_model('deit_t', img_size=32, patch_size=4, depth=1)
    with pytest.raises(ValueError, match="checkpoint '.*nope.pth' not found"):
        locvit.load_checkpoint(model, tmp_path / 'nope.pth')
    torch.save(model.state_dict(), tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match='unreadable .not a PyTorch file, truncated or corrupt.'):
        locvit.load_checkpoint(model, tmp_path / 'cut.pth')
    (tmp_path / 'text.pth').write_text('not a checkpoint')
    with pytest.raises(ValueError, match="is not a PyTorch file .it begins b'not a checkpoint'"):
        locvit.load_checkpoint(model, tmp_path / 'text.pth')


def test_a_checkpoint_holding_code_objects_is_refused(tmp_path):
    model = locvit.create_model('deit_t', img_size=32, patch_size=4, depth=1)
    torch.save({'model': model.state_dict(), 'extra': torch.nn.ReLU()}, tmp_path / 'obj.pth')
    with pytest.raises(ValueError, match=r'is refused: it holds a torch.nn.modules.activation.ReLU'):
        locvit.load_checkpoint(model, tmp_path / 'obj.pth')


# --------------------------------------------------------------------------------------------------
# Released weights by name: create_model(name, pretrained=True), offline (file:// URLs)
# --------------------------------------------------------------------------------------------------

def release(tmp_path, monkeypatch, name='deit', filename=None, digest=True):
    """Serve fixture `name` as the 'official release' of deit_t from a file:// URL (DeiT's file
    names carry a sha256 prefix) and point the hub cache at tmp_path."""
    import hashlib
    fx, _ = fixture_model(name)
    raw = tmp_path / 'raw.pth'
    torch.save({'model': fx['state_dict']}, raw)
    prefix = hashlib.sha256(raw.read_bytes()).hexdigest()[:8] if digest is True else digest
    served = tmp_path / 'server' / (filename or f'deit_tiny_patch16_224-{prefix}.pth')
    served.parent.mkdir(exist_ok=True)
    raw.rename(served)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    monkeypatch.setitem(locvit.PRETRAINED, 'deit_t', served.as_uri())
    return fx, tmp_path / 'hub' / 'hub' / 'checkpoints' / served.name


SMALL_DEIT = dict(img_size=32, patch_size=4, embed_dim=24, depth=3, num_heads=3)


def test_pretrained_downloads_checks_and_loads_the_release(tmp_path, monkeypatch):
    fx, cached = release(tmp_path, monkeypatch)
    model = locvit.create_model('deit_tiny_patch16_224', pretrained=True, num_classes=10, **SMALL_DEIT)
    assert cached.exists()                                       # cached in torch hub's folder
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(fx['input']), fx['logits'], atol=1e-5, rtol=1e-4)
    (tmp_path / 'server').rename(tmp_path / 'gone')              # the cache serves it offline now
    assert torch.equal(locvit.create_model('deit_t', pretrained=True, num_classes=10,
                                           **SMALL_DEIT).head.weight, model.head.weight)


def test_pretrained_at_another_size_and_class_count(tmp_path, monkeypatch, capsys):
    fx, _ = release(tmp_path, monkeypatch)
    model = locvit.create_model('deit_t', pretrained=True, num_classes=5, **{**SMALL_DEIT, 'img_size': 48})
    assert 'classify 10 classes; a new classifier for 5' in capsys.readouterr().out
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 24) and model.head.weight.shape == (5, 24)
    assert torch.equal(model.blocks[0].attn.qkv.weight, fx['state_dict']['blocks.0.attn.qkv.weight'])


def test_a_download_that_fails_its_checksum_is_refused_and_not_kept(tmp_path, monkeypatch):
    _, cached = release(tmp_path, monkeypatch, digest='00000000')
    with pytest.raises(ValueError, match='does not match its checksum'):
        locvit.create_model('deit_t', pretrained=True, num_classes=10, **SMALL_DEIT)
    assert not cached.exists()


def test_a_corrupt_download_is_explained_and_not_kept(tmp_path, monkeypatch):
    _, cached = release(tmp_path, monkeypatch, filename='deit_tiny.pth')
    served = tmp_path / 'server' / 'deit_tiny.pth'
    served.write_bytes(served.read_bytes()[:1000])               # truncated on the server
    with pytest.raises(ValueError, match='unreadable'):
        locvit.create_model('deit_t', pretrained=True, num_classes=10, **SMALL_DEIT)
    assert not cached.exists()


def test_no_network_and_no_weights_get_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setitem(locvit.PRETRAINED, 'deit_t', 'http://127.0.0.1:9/deit_tiny_patch16_224-a1311bcf.pth')
    with pytest.raises(ValueError, match=r'could not download .* put it at .*hub/checkpoints/'
                                         r'deit_tiny_patch16_224-a1311bcf.pth'):
        locvit.create_model('deit_t', pretrained=True)
    with pytest.raises(ValueError, match='deit_s24 has no released weights; these models have them: '
                                         'deit_t, deit_s'):
        locvit.create_model('deit_s24', pretrained=True)
