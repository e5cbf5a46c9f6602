"""tools/model_converters/vmamba2mmvmamba.py on the authors' current models
(classifiers, detectors, segmentors) and on files it must refuse."""
import importlib.util
import os
import os.path as osp
import re
import subprocess
import sys
import types

import pytest
import torch

import mmvmamba  # noqa: F401  (registers VMamba2)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
FIXTURE = osp.join(ROOT, 'tests', 'data',
                   'vmamba_v2_authors_small_random.pth')
V1_FIXTURE = osp.join(ROOT, 'tests', 'data',
                      'vmamba_v1_authors_small_random.pth')
CONVERTER = osp.join(ROOT, 'tools', 'model_converters', 'vmamba2mmvmamba.py')

# Our backbone names -> the authors' (their Backbone_VSSM / VSSM keys),
# written from their code, independently of mmvmamba's conversion rules.
TO_AUTHORS = [
    (r'^patch_embed\.conv1\.', 'patch_embed.0.'),
    (r'^patch_embed\.norm1\.', 'patch_embed.2.'),
    (r'^patch_embed\.conv2\.', 'patch_embed.5.'),
    (r'^patch_embed\.norm2\.', 'patch_embed.7.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.ss2d\.', r'layers.\1.blocks.\2.op.'),
    (r'^stages\.(\d+)\.blocks\.', r'layers.\1.blocks.'),
    (r'^stages\.(\d+)\.downsample\.conv\.', r'layers.\1.downsample.1.'),
    (r'^stages\.(\d+)\.downsample\.norm\.', r'layers.\1.downsample.3.'),
    (r'^norm(\d)\.', r'outnorm\1.'),
]


def authors_name(key):
    for pattern, replacement in TO_AUTHORS:
        new, hits = re.subn(pattern, replacement, key)
        if hits:
            return new
    raise KeyError(key)


def run(*args):
    return subprocess.run([sys.executable, CONVERTER, *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope='module')
def fixture():
    return torch.load(FIXTURE, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def converter():
    spec = importlib.util.spec_from_file_location('vmamba2mmvmamba',
                                                  CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture_classifier(fixture):
    from mmpretrain.registry import MODELS
    cfg = fixture['config']
    arch = dict(embed_dims=cfg['dims'], depths=cfg['depths'],
                ssm_ratio=cfg['ssm_ratio'], d_state=cfg['ssm_d_state'],
                mlp_ratio=cfg['mlp_ratio'])
    return MODELS.build(
        dict(
            type='ImageClassifier',
            _scope_='mmpretrain',  # whatever scope earlier tests left
            backbone=dict(type='VMamba2', arch=arch, out_indices=(3, )),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=cfg['num_classes'],
                      in_channels=cfg['dims'] * 8))).eval()


def logits_error(classifier, fixture):
    with torch.no_grad():
        logits = classifier(fixture['input'], mode='tensor')
    ref = fixture['logits']
    return ((logits - ref).abs().max() / ref.abs().max()).item()


def test_classifier_reproduces_the_authors_logits(tmp_path, fixture):
    dst = tmp_path / 'vmamba2_small.pth'
    result = run(FIXTURE, dst)
    assert result.returncode == 0, result.stderr
    assert 'VMamba2 classifier' in result.stdout
    ckpt = torch.load(dst, map_location='cpu', weights_only=True)
    assert ckpt['meta']['backbone'] == 'VMamba2'
    assert ckpt['meta']['arch']['depths'] == [1, 1, 2, 1]
    classifier = fixture_classifier(fixture)
    classifier.load_state_dict(ckpt['state_dict'], strict=True)
    assert logits_error(classifier, fixture) < 1e-5


def test_ema_weights_and_legacy_linear_shapes(tmp_path, fixture):
    """--ema takes model_ema; (out, in, 1, 1) Linear2d weights (older
    files) load; unimportable objects (their yacs config) do not stop it."""
    module = types.ModuleType('authors_config_module')

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = module.__name__, 'CfgNode'
    module.CfgNode = CfgNode
    sys.modules[module.__name__] = module
    try:
        state = fixture['state_dict']
        ema = {k: (v[..., None, None] if k.endswith('.out_proj.weight') else
                   v) for k, v in state.items()}
        src = tmp_path / 'authors.pth'
        torch.save(
            dict(model={k: v + 1 for k, v in state.items()}, model_ema=ema,
                 config=CfgNode(MODEL=CfgNode(NAME='vssm1_tiny_0230s')),
                 epoch=263), src)
    finally:
        del sys.modules[module.__name__]
    result = run(src, tmp_path / 'ema.pth', '--ema')
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / 'ema.pth', weights_only=True)
    assert ckpt['meta']['weights'] == 'model_ema'
    classifier = fixture_classifier(fixture)
    classifier.load_state_dict(ckpt['state_dict'], strict=True)
    assert logits_error(classifier, fixture) < 1e-5


def test_first_version_still_converts(tmp_path):
    result = run(V1_FIXTURE, tmp_path / 'v1.pth')
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / 'v1.pth', weights_only=True)
    assert ckpt['meta']['backbone'] == 'VMamba'
    assert 'backbone.stages.0.blocks.0.ss2d.A_logs' in ckpt['state_dict']


def whole_model_checkpoint(config, tmp_path, entry):
    """A detector / segmentor of a config, saved with the authors' backbone
    names as their mmdet / mmseg runs save it; returns (model, path)."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    cfg.model.backbone.init_cfg = None
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith('backbone.'):
            key = 'backbone.' + authors_name(key[len('backbone.'):])
        state[key] = value + torch.rand_like(value) if value.is_floating_point(
        ) else value
    assert 'backbone.outnorm3.weight' in state
    assert 'backbone.layers.2.blocks.7.op.A_logs' in state
    path = tmp_path / 'authors_model.pth'
    torch.save({entry: state, 'meta': dict(epoch=12)}, path)
    return cfg, state, path


@pytest.mark.parametrize('config, entry', [
    ('mask_rcnn_vmamba2_t_1x_coco.py', 'state_dict'),
    ('upernet_vmamba2_t_512x512_160k_ade20k.py', 'model'),
])
def test_detector_and_segmentor_load_strictly(tmp_path, config, entry):
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint
    cfg, state, src = whole_model_checkpoint(config, tmp_path, entry)
    dst = tmp_path / 'converted.pth'
    result = run(src, dst)
    assert result.returncode == 0, result.stderr
    assert "arch 'tiny', out_indices (0, 1, 2, 3)" in result.stdout
    fresh = MODELS.build(cfg.model)
    # what tools/test.py does, but strict
    load_checkpoint(fresh, str(dst), map_location='cpu', strict=True)
    for key, value in fresh.state_dict().items():
        if key.startswith('backbone.'):
            key = 'backbone.' + authors_name(key[len('backbone.'):])
        assert torch.equal(value, state[key]), key


def test_bad_inputs_are_clear_errors(tmp_path, fixture):
    dst = tmp_path / 'out.pth'

    def refused(src, *message):
        result = run(src, dst, *message[1:])
        assert result.returncode == 1
        assert 'Traceback' not in result.stderr, result.stderr
        assert result.stderr.startswith('error: ')
        assert '"' not in result.stderr  # no stray quotes (KeyError's)
        assert re.search(message[0], result.stderr), result.stderr
        assert not dst.exists()
        return result

    result = refused(tmp_path / 'missing.pth', r'missing\.pth: no such file')
    assert 'trust' not in result.stdout
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    result = refused(text, r'notes\.txt is not a PyTorch checkpoint')
    assert 'trust' in result.stdout  # the file exists: warned
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    refused(empty, r'empty\.pth is not a PyTorch checkpoint')
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    refused(tmp_path / 'tensor.pth', r'holds a Tensor, not a checkpoint')
    torch.save(dict(model={0: torch.zeros(3)}), tmp_path / 'int_keys.pth')
    refused(tmp_path / 'int_keys.pth', r'no model or state_dict entry')

    # another model's checkpoints
    other = tmp_path / 'deit.pth'
    torch.save(dict(model={'blocks.0.attn.qkv.weight': torch.zeros(3, 3)}),
               other)
    refused(other, r"not a checkpoint of the authors' VMamba")
    swin = tmp_path / 'swin_mmpretrain.pth'
    torch.save(dict(state_dict={
        'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight': torch.zeros(3),
        'head.fc.weight': torch.zeros(3)}), swin)
    refused(swin, r"backbone of .*swin_mmpretrain\.pth is not the authors'")
    refused(FIXTURE, r"no 'model_ema' entry", '--ema')

    # converted already
    converted = tmp_path / 'converted.pth'
    assert run(FIXTURE, converted).returncode == 0
    refused(converted, r'converted already')

    # a variant of their model with parameters VMamba2 lacks
    variant = dict(fixture['state_dict'])
    variant['layers.0.blocks.0.op.conv2d.bias'] = torch.zeros(32)
    torch.save(dict(model=variant), tmp_path / 'variant.pth')
    refused(tmp_path / 'variant.pth',
            r'layers\.0\.blocks\.0\.op\.conv2d\.bias')
    gated = dict(fixture['state_dict'])
    for key in [k for k in gated if k.endswith('op.in_proj.weight')]:
        gated[key] = torch.cat([gated[key]] * 2)
    torch.save(dict(model=gated), tmp_path / 'gated.pth')
    refused(tmp_path / 'gated.pth', r'with a gate')


def test_destination_must_be_a_writable_file_path(tmp_path):
    folder = tmp_path / 'weights'
    folder.mkdir()
    result = run(FIXTURE, folder)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.startswith(f'error: DST {folder} is a folder')
    assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == [
        'weights'
    ]
    # a file where a folder of DST should be: the OS's words, no traceback
    (tmp_path / 'file').write_text('')
    result = run(FIXTURE, tmp_path / 'file' / 'out.pth')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.startswith('error: [Errno'), result.stderr


def test_existing_destination_survives_a_failed_write(tmp_path, converter,
                                                     monkeypatch):
    dst = tmp_path / 'out.pth'
    dst.write_bytes(b'previous')

    def failing_save(obj, f, *args, **kwargs):
        with open(f, 'wb') as out:
            out.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(converter.torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        converter.convert(FIXTURE, str(dst))
    assert dst.read_bytes() == b'previous'
    assert os.listdir(tmp_path) == ['out.pth']
