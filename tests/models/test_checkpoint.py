"""The authors' weights: conversion, classifier logits, backbone loading."""
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

from mmvmamba.models import VMamba, convert_authors_state_dict
from mmvmamba.models.checkpoint import _arch_hint, load_pretrained_backbone

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
FIXTURE = osp.join(ROOT, 'tests', 'data',
                   'vmamba_v1_authors_small_random.pth')
CONVERTER = osp.join(ROOT, 'tools', 'model_converters', 'vmamba2mmvmamba.py')


@pytest.fixture(scope='module')
def fixture():
    return torch.load(FIXTURE, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def converted(tmp_path_factory, fixture):
    dst = tmp_path_factory.mktemp('ckpt') / 'vmamba_small.pth'
    subprocess.run([sys.executable, CONVERTER, FIXTURE, str(dst)], check=True,
                   cwd=ROOT)
    return str(dst)


def small_arch(fixture):
    cfg = fixture['config']
    return dict(embed_dims=cfg['dims'], depths=cfg['depths'])


def test_converted_classifier_reproduces_the_authors_logits(
        fixture, converted):
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg = fixture['config']
    # under mmpretrain's scope whatever an earlier runner left current
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        classifier = MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=dict(type='VMamba', arch=small_arch(fixture),
                              out_indices=(3, )),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(type='LinearClsHead',
                          num_classes=cfg['num_classes'],
                          in_channels=cfg['dims'] * 8))).eval()
    ckpt = torch.load(converted, map_location='cpu', weights_only=True)
    classifier.load_state_dict(ckpt['state_dict'], strict=True)
    with torch.no_grad():
        logits = classifier(fixture['input'], mode='tensor')
    torch.testing.assert_close(logits, fixture['logits'], rtol=1e-5,
                               atol=1e-5)


def test_later_key_names_convert_alike(fixture):
    renames = [('patch_embed.proj.', 'patch_embed.0.'),
               ('patch_embed.norm.', 'patch_embed.2.'), ('.ln_1.', '.norm.'),
               ('.self_attention.', '.op.')]
    later = {}
    for key, value in fixture['model'].items():
        for old, new in renames:
            key = key.replace(old, new)
        if key.startswith(('norm.', 'head.')):
            key = 'classifier.' + key
        later[key] = value
    assert convert_authors_state_dict(later) == convert_authors_state_dict(
        fixture['model'])


def test_unknown_key_is_an_error(fixture):
    state = dict(fixture['model'], pos_embed=torch.zeros(1))
    with pytest.raises(KeyError, match='pos_embed'):
        convert_authors_state_dict(state)


def test_ema_flag(tmp_path, fixture):
    result = subprocess.run(
        [sys.executable, CONVERTER, FIXTURE, str(tmp_path / 'x.pth'),
         '--ema'], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert "no 'model_ema' entry" in result.stderr
    src = tmp_path / 'with_ema.pth'
    ema = {k: v + 1 for k, v in fixture['model'].items()}
    torch.save(dict(model=fixture['model'], model_ema=ema), src)
    subprocess.run(
        [sys.executable, CONVERTER, str(src), str(tmp_path / 'ema.pth'),
         '--ema'], check=True, cwd=ROOT)
    out = torch.load(tmp_path / 'ema.pth', weights_only=True)['state_dict']
    torch.testing.assert_close(out['head.fc.bias'],
                               fixture['model']['head.bias'] + 1)


def test_detection_backbone_loads_with_fresh_output_norms(fixture, converted):
    model = VMamba(
        small_arch(fixture),
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=converted,
                      prefix='backbone.'))
    fresh_norm0 = model.norm0.weight.clone()
    model.init_weights()
    weights = fixture['model']
    torch.testing.assert_close(
        model.stages[2].blocks[1].ss2d.A_logs,
        weights['layers.2.blocks.1.self_attention.A_logs'])
    torch.testing.assert_close(model.norm3.bias, weights['norm.bias'])
    torch.testing.assert_close(model.norm0.weight, fresh_norm0)


def test_mismatch_is_an_error_naming_keys_and_shapes(fixture, converted):
    wrong = VMamba(dict(embed_dims=32, depths=[1, 1, 3, 1]),
                   init_cfg=dict(type='Pretrained', checkpoint=converted,
                                 prefix='backbone.'))
    with pytest.raises(RuntimeError, match=r'missing keys: '
                       r'\[\'stages\.2\.blocks\.2\.'):
        wrong.init_weights()
    narrow = VMamba(dict(embed_dims=32, depths=[1, 1, 2, 1], d_state=8),
                    init_cfg=dict(type='Pretrained', checkpoint=converted,
                                  prefix='backbone.'))
    with pytest.raises(RuntimeError, match=r'stages\.0\.blocks\.0\.ss2d\.'
                       r'A_logs: checkpoint \(256, 16\), model \(256, 8\)'):
        narrow.init_weights()


def test_missing_file_says_how_to_make_it(tmp_path):
    model = VMamba(dict(embed_dims=8, depths=[1, 1, 1, 1]),
                   init_cfg=dict(type='Pretrained',
                                 checkpoint=str(tmp_path / 'none.pth'),
                                 prefix='backbone.'))
    with pytest.raises(FileNotFoundError, match='vmamba2mmvmamba.py'):
        model.init_weights()


def authors_names(state_dict):
    """Our VMamba keys under the authors' January 2024 names."""
    renames = [(r'^stages\.(\d+)\.blocks\.(\d+)\.norm\.',
                r'layers.\1.blocks.\2.ln_1.'),
               (r'^stages\.(\d+)\.blocks\.(\d+)\.ss2d\.',
                r'layers.\1.blocks.\2.self_attention.'),
               (r'^stages\.(\d+)\.downsample\.', r'layers.\1.downsample.')]
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def test_three_stages_convert_and_load(tmp_path):
    """The final norm is the last stage's, whatever the number of stages."""
    arch = dict(embed_dims=8, depths=[1, 1, 2])
    source = VMamba(arch, out_indices=(2, ))
    with torch.no_grad():  # not the norm's initial ones
        source.norm2.weight.uniform_()
    authors = authors_names(source.state_dict())
    authors = {('norm.' + k[6:] if k.startswith('norm2.') else k): v
               for k, v in authors.items()}
    authors.update({'head.weight': torch.zeros(5, 32),
                    'head.bias': torch.zeros(5)})
    backbone, head = convert_authors_state_dict(authors)
    assert set(backbone) == set(source.state_dict()) and set(head) == {
        'weight', 'bias'}
    torch.save({'model': authors}, tmp_path / 'authors.pth')

    model = VMamba(arch, out_indices=(0, 1, 2),
                   init_cfg=dict(type='Pretrained',
                                 checkpoint=str(tmp_path / 'authors.pth')))
    fresh_norm1 = model.norm1.weight.clone()
    model.init_weights()
    torch.testing.assert_close(model.norm2.weight, source.norm2.weight)
    torch.testing.assert_close(model.norm1.weight, fresh_norm1)

    # a converted file without the last stage's norm does not fit
    converted = {f'backbone.{k}': v for k, v in backbone.items()
                 if not k.startswith('norm2.')}
    torch.save({'state_dict': converted}, tmp_path / 'no_norm2.pth')
    model = VMamba(arch, out_indices=(2, ),
                   init_cfg=dict(type='Pretrained',
                                 checkpoint=str(tmp_path / 'no_norm2.pth'),
                                 prefix='backbone.'))
    with pytest.raises(RuntimeError,
                       match=r"missing keys: \['norm2\.weight', "
                       r"'norm2\.bias'\]"):
        model.init_weights()
    # the last stage's norm of a model that does not output that stage is
    # unused, not an error
    converted = {f'backbone.{k}': v for k, v in backbone.items()}
    torch.save({'state_dict': converted}, tmp_path / 'converted.pth')
    VMamba(arch, out_indices=(0, ),
           init_cfg=dict(type='Pretrained',
                         checkpoint=str(tmp_path / 'converted.pth'),
                         prefix='backbone.')).init_weights()


def pretrained(path, prefix='backbone.', arch=None, fixture=None, **kwargs):
    """A VMamba whose init_cfg loads ``path``."""
    return VMamba(arch or small_arch(fixture),
                  init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                prefix=prefix), **kwargs)


def test_authors_raw_checkpoint_through_init_cfg(fixture):
    """init_cfg takes the authors' file itself (converted on the fly, the
    prefix ignored) and loads what the converter would."""
    model = pretrained(FIXTURE, fixture=fixture)
    model.init_weights()
    weights = fixture['model']
    torch.testing.assert_close(model.patch_embed.proj.weight,
                               weights['patch_embed.proj.weight'], rtol=0,
                               atol=0)
    torch.testing.assert_close(
        model.stages[1].downsample.reduction.weight,
        weights['layers.1.downsample.reduction.weight'], rtol=0, atol=0)
    torch.testing.assert_close(model.norm3.weight, weights['norm.weight'],
                               rtol=0, atol=0)


def test_unexpected_keys_are_an_error(tmp_path, fixture, converted):
    state = torch.load(converted, weights_only=True)['state_dict']
    state['backbone.stages.0.blocks.0.extra'] = torch.zeros(1)
    path = tmp_path / 'extra.pth'
    torch.save(dict(state_dict=state), path)
    with pytest.raises(RuntimeError, match=r"unexpected keys: \['stages\.0\."
                       r"blocks\.0\.extra'\]"):
        pretrained(path, fixture=fixture).init_weights()
    # the classifier head and unused output norms are allowed
    state.pop('backbone.stages.0.blocks.0.extra')
    state['backbone.head.fc.weight'] = torch.zeros(1)
    torch.save(dict(state_dict=state), path)
    pretrained(path, fixture=fixture).init_weights()


def test_missing_final_norm_is_an_error(tmp_path, fixture, converted):
    state = torch.load(converted, weights_only=True)['state_dict']
    del state['backbone.norm3.weight'], state['backbone.norm3.bias']
    path = tmp_path / 'no_norm3.pth'
    torch.save(dict(state_dict=state), path)
    with pytest.raises(RuntimeError, match=r"missing keys: \['norm3\.weight',"
                       r" 'norm3\.bias'\]"):
        pretrained(path, fixture=fixture).init_weights()
    # norms 0-2 are fresh output norms: missing is fine
    pretrained(path, fixture=fixture, out_indices=(0, 1, 2)).init_weights()


def test_no_weights_under_the_prefix(fixture, converted):
    with pytest.raises(ValueError, match=r"no weights under the prefix "
                       r"'model\.backbone\.' in .*vmamba_small\.pth "
                       r"\(init_cfg\.prefix\); its keys begin with: "
                       r"backbone\., head\.$"):
        pretrained(converted, prefix='model.backbone.',
                   fixture=fixture).init_weights()


def test_checkpoint_of_another_model(tmp_path, fixture):
    """A ResNet's mmdet checkpoint, a torchvision-style state dict, another
    model's 'model' entry: each named as not a VMamba's."""
    path = tmp_path / 'resnet.pth'
    torch.save(dict(state_dict={
        'backbone.conv1.weight': torch.zeros(64, 3, 7, 7),
        'backbone.layer1.0.conv1.weight': torch.zeros(64, 64, 1, 1),
        'neck.lateral_convs.0.conv.weight': torch.zeros(1)
    }), path)
    with pytest.raises(ValueError, match=r"resnet\.pth holds no VMamba "
                       r"weights under 'backbone\.': is it the checkpoint of "
                       r"another model\? Its keys: conv1\.weight, "
                       r"layer1\.0\.conv1\.weight; a VMamba's: "
                       r"patch_embed\.proj\.weight"):
        pretrained(path, fixture=fixture).init_weights()
    torch.save({'fc.weight': torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match=r'holds no VMamba weights: .* Its '
                       r'keys: fc\.weight;'):
        pretrained(path, prefix=None, fixture=fixture).init_weights()
    torch.save(dict(model={'pos_embed': torch.zeros(1),
                           'blocks.0.attn.qkv.weight': torch.zeros(1)}), path)
    with pytest.raises(ValueError, match=r"is not an authors' VMamba \(v1\) "
                       r'checkpoint: its "model" holds keys no VMamba has, '
                       r'such as pos_embed, blocks\.0\.attn\.qkv\.weight'):
        pretrained(path, fixture=fixture).init_weights()
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match='holds a Tensor, not a checkpoint'):
        pretrained(path, fixture=fixture).init_weights()


def test_malformed_checkpoint_or_arguments(tmp_path, fixture):
    """Each named (were a TypeError, AttributeError or KeyError from inside
    the loading)."""
    model = VMamba(dict(embed_dims=8, depths=[1, 1]), out_indices=(1, ))
    weights = model.state_dict()
    path = tmp_path / 'model.pth'
    torch.save({'state_dict': weights}, path)
    with pytest.raises(ValueError, match='prefix must be a str or None, '
                       'got 3'):
        pretrained(path, prefix=3, fixture=fixture).init_weights()
    with pytest.raises(ValueError, match='checkpoint must be a path, got '
                       'None'):
        VMamba(init_cfg=dict(type='Pretrained')).init_weights()
    for saved, what in ((dict(state_dict=[1, 2]), "its 'state_dict'"),
                        (dict(model=None), "its 'model'"),
                        ({1: torch.zeros(1)}, 'the checkpoint')):
        torch.save(saved, path)
        with pytest.raises(ValueError, match=f'model.pth: {what} must be a '
                           r'dict of weights by name \(str keys\)'):
            load_pretrained_backbone(model, str(path))
    torch.save(dict(weights, **{'patch_embed.proj.weight': 3}), path)
    with pytest.raises(ValueError, match=r'model.pth: the values of '
                       r'patch_embed\.proj\.weight are not tensors'):
        load_pretrained_backbone(model, str(path))


def test_another_arch_is_named(tmp_path):
    """A checkpoint of other depths or widths: the error says what the
    checkpoint holds, by stage, and which named arch that is."""
    source = VMamba(dict(embed_dims=8, depths=[1, 1, 2, 1]))
    torch.save({'state_dict': source.state_dict()}, tmp_path / 'deeper.pth')
    model = VMamba(dict(embed_dims=8, depths=[1, 1, 1, 1]),
                   init_cfg=dict(type='Pretrained',
                                 checkpoint=str(tmp_path / 'deeper.pth')))
    with pytest.raises(RuntimeError,
                       match=r"the checkpoint has blocks per stage \[1, 1, "
                       r"2, 1\], widths \[8, 16, 32, 64\]; this model has "
                       r"blocks per stage \[1, 1, 1, 1\], widths \[8, 16, 32, "
                       r"64\]: build the model with the checkpoint's arch"):
        model.init_weights()
    # the layout of VMamba-S's blocks is named
    small = {f'stages.{i}.blocks.{j}.norm.weight': torch.empty(96 * 2**i)
             for i, depth in enumerate([2, 2, 27, 2]) for j in range(depth)}
    assert "(arch='small'); this model has" in _arch_hint(model, small)
    # the same layout: nothing to say
    assert _arch_hint(model, model.state_dict()) is None


def test_pretrained_in_an_init_cfg_list(fixture, tmp_path):
    """A Pretrained entry of a list loads strictly too, after the list's
    other initialisers; without it they apply as in mmengine."""
    ones = dict(type='Constant', val=1.0, layer='Linear')
    model = VMamba(small_arch(fixture), init_cfg=[
        ones, dict(type='Pretrained', checkpoint=FIXTURE)])
    model.init_weights()
    weights = fixture['model']
    torch.testing.assert_close(model.stages[1].downsample.reduction.weight,
                               weights['layers.1.downsample.reduction.weight'],
                               rtol=0, atol=0)
    # a strict load: an authors' key the model lacks is an error, not a
    # warning of mmengine's non-strict loader
    bad = dict(fixture, model=dict(fixture['model'], extra=torch.zeros(1)))
    extra = str(tmp_path / 'extra.pth')
    torch.save(bad, extra)
    with pytest.raises((KeyError, ValueError), match='extra'):
        VMamba(small_arch(fixture),
               init_cfg=[ones, dict(type='Pretrained',
                                    checkpoint=extra)]).init_weights()
    plain = VMamba(small_arch(fixture), init_cfg=[ones])
    plain.init_weights()
    assert (plain.stages[1].downsample.reduction.weight == 1).all()


@pytest.mark.parametrize('init_cfg', [
    'Pretrained', 5, dict(checkpoint='x.pth'), [dict(type='Constant', val=1),
                                                'x'],
    [dict(type='Pretrained', checkpoint='a.pth'),
     dict(type='Pretrained', checkpoint='b.pth')]
])
def test_bad_init_cfg_is_named(fixture, init_cfg):
    with pytest.raises(ValueError, match='init_cfg'):
        VMamba(small_arch(fixture), init_cfg=init_cfg)


@pytest.mark.parametrize('state_dict, message', [
    (None, 'state_dict must be a dict of tensors by name, got NoneType'),
    ([('patch_embed.proj.weight', torch.zeros(1))], 'got list'),
    ({1: torch.zeros(1)}, 'state_dict keys must be str, got 1'),
    ({'layers.0.blocks.0.ln_1.weight': 0.5},
     r"state_dict\['layers.0.blocks.0.ln_1.weight'\] must be a tensor, "
     'got float'),
])
def test_conversion_refuses_what_is_not_a_state_dict(state_dict, message):
    from mmvmamba.models.checkpoint import (authors_version,
                                            convert_authors_v2_state_dict)
    for convert in (convert_authors_state_dict, convert_authors_v2_state_dict,
                    authors_version):
        with pytest.raises(TypeError, match=message):
            convert(state_dict)

