"""The VMamba2 configs: they build, hold the authors' settings and sizes,
and decay exactly the parameters the authors' configs decay."""
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope

from mmvmamba.models.checkpoint import convert_authors_v2_state_dict

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = osp.join(ROOT, 'configs')
FIXTURE = osp.join(ROOT, 'tests', 'data',
                   'vmamba_v2_authors_small_random.pth')
DET = [f'mask_rcnn_vmamba2_{s}_1x_coco.py' for s in 'tsb'] + [
    f'mask_rcnn_vmamba2_{s}_3x_ms_coco.py' for s in 'ts'
]
SEG = [f'upernet_vmamba2_{s}_512x512_160k_ade20k.py' for s in 'tsb']
CLS = [f'vmamba2_{s}_300e_in1k.py' for s in 'tsb']
DEMO = ['demo/mask_rcnn_vmamba2_demo_synthetic.py',
        'demo/upernet_vmamba2_demo_synthetic.py']
ARCH = {'t': ('tiny', 0.2, 96), 's': ('small', 0.3, 96),
        'b': ('base', 0.6, 128)}
V2_KEYS = {
    'norm': dict(decay_mult=0.),
    'patch_embed.norm': dict(decay_mult=1.),
    'downsample.norm': dict(decay_mult=1.),
}


def load(rel):
    return Config.fromfile(osp.join(CONFIGS, rel))


def size_of(rel):
    return re.search(r'vmamba2_([tsb])_', rel).group(1)


def build(cfg, meta=True):
    cfg.model.backbone.init_cfg = None
    init_default_scope(cfg.default_scope)
    if not meta:
        return MODELS.build(cfg.model)
    with torch.device('meta'):
        return MODELS.build(cfg.model)


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('rel', DET + SEG + CLS)
def test_backbone_settings(rel):
    cfg = load(rel)
    assert cfg.custom_imports == dict(
        imports=['mmvmamba'], allow_failed_imports=False)
    backbone = cfg.model.backbone
    arch, drop_path, width = ARCH[size_of(rel)]
    assert (backbone.type, backbone.arch) == ('VMamba2', arch)
    assert backbone.drop_path_rate == drop_path
    if rel in CLS:
        assert backbone.out_indices == (3, )
        assert cfg.model.head.in_channels == width * 8
        return
    assert backbone.out_indices == (0, 1, 2, 3)
    assert backbone.init_cfg == dict(
        type='Pretrained',
        checkpoint=f'checkpoints/vmamba2_{size_of(rel)}_in1k.pth',
        prefix='backbone.')
    assert cfg.optim_wrapper.paramwise_cfg == dict(custom_keys=V2_KEYS)


@pytest.mark.parametrize('rel', DET)
def test_mask_rcnn_settings(rel):
    cfg = load(rel)
    width = ARCH[size_of(rel)][2]
    assert cfg.default_scope == 'mmdet'
    assert cfg.model.neck.in_channels == [width * 2**i for i in range(4)]
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 1e-4, 0.05)
    assert tuple(opt.betas) == (0.9, 0.999)
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    assert 'clip_grad' not in cfg.optim_wrapper
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.auto_scale_lr.base_batch_size == 16
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR',
                                                              0.001, 1000)
    assert steps.gamma == 0.1
    types = [t['type'] for t in cfg.train_pipeline]
    if '_1x_' in rel:
        assert cfg.train_cfg.max_epochs == 12 and steps.milestones == [8, 11]
        assert cfg.train_pipeline[2].scale == (1333, 800)
        assert 'RandomChoice' not in types
    else:
        assert cfg.train_cfg.max_epochs == 36
        assert steps.milestones == [27, 33]
        choice = cfg.train_pipeline[types.index('RandomChoice')]
        single, crop = choice.transforms
        shorts = [min(s) for s in single[0].scales]
        assert shorts == list(range(480, 801, 32))
        assert [min(s) for s in crop[0].scales] == [400, 500, 600]
        assert tuple(crop[1].crop_size) == (384, 600)
    assert cfg.val_evaluator.metric == ['bbox', 'segm']


@pytest.mark.parametrize('rel', SEG)
def test_upernet_settings(rel):
    cfg = load(rel)
    width = ARCH[size_of(rel)][2]
    model = cfg.model
    assert cfg.default_scope == 'mmseg'
    assert model.decode_head.in_channels == [width * 2**i for i in range(4)]
    assert model.decode_head.channels == 512
    assert tuple(model.decode_head.pool_scales) == (1, 2, 3, 6)
    assert model.decode_head.num_classes == 150
    assert model.auxiliary_head.in_index == 2
    assert model.auxiliary_head.in_channels == width * 4
    assert model.auxiliary_head.channels == 256
    assert model.auxiliary_head.loss_decode.loss_weight == 0.4
    assert model.decode_head.norm_cfg.type == 'SyncBN'
    assert tuple(model.data_preprocessor.size) == (512, 512)
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 6e-5, 0.01)
    assert tuple(opt.betas) == (0.9, 0.999)
    warmup, poly = cfg.param_scheduler
    assert (warmup.start_factor, warmup.end) == (1e-6, 1500)
    assert (poly.type, poly.power, poly.eta_min, poly.begin,
            poly.end) == ('PolyLR', 1.0, 0.0, 1500, 160000)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_cfg.val_interval == 16000
    assert cfg.train_dataloader.batch_size == 2
    resize, crop = cfg.train_pipeline[2], cfg.train_pipeline[3]
    assert tuple(resize.scale) == (2048, 512)
    assert tuple(resize.ratio_range) == (0.5, 2.0)
    assert (tuple(crop.crop_size), crop.cat_max_ratio) == ((512, 512), 0.75)
    assert cfg.train_pipeline[-2].type == 'PhotoMetricDistortion'
    assert cfg.tta_model.type == 'SegTTAModel'
    resizes, flips = cfg.tta_pipeline[1].transforms[:2]
    assert [tuple(r.scale) for r in resizes] == [
        (int(2048 * r), int(512 * r))
        for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    ]
    assert sorted(f.prob for f in flips) == [0., 1.]


@pytest.mark.parametrize('rel', CLS)
def test_classification_settings(rel):
    cfg = load(rel)
    assert cfg.default_scope == 'mmpretrain'
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay, opt.eps) == ('AdamW', 1e-3,
                                                             0.05, 1e-8)
    assert cfg.optim_wrapper.clip_grad.max_norm == 5.0
    assert cfg.optim_wrapper.paramwise_cfg == dict(
        norm_decay_mult=0., bias_decay_mult=0., flat_decay_mult=0.)
    assert cfg.train_dataloader.batch_size == 128  # x 8 GPUs
    assert cfg.auto_scale_lr.base_batch_size == 1024
    warmup, cosine = cfg.param_scheduler
    assert (warmup.start_factor, warmup.end) == (1e-3, 20)
    assert (cosine.type, cosine.eta_min, cosine.begin) == (
        'CosineAnnealingLR', 1e-5, 20)
    assert cfg.train_cfg.max_epochs == 300
    assert cfg.model.head.loss.label_smooth_val == 0.1
    assert [a['alpha'] for a in cfg.model.train_cfg.augments] == [0.8, 1.0]
    assert cfg.custom_hooks[0].type == 'EMAHook'
    assert cfg.custom_hooks[0].momentum == 1e-4
    types = [t['type'] for t in cfg.train_pipeline]
    assert 'RandAugment' in types
    erase = cfg.train_pipeline[types.index('RandomErasing')]
    assert erase.erase_prob == 0.25


@pytest.mark.parametrize('rel, params', [
    ('vmamba2_t_300e_in1k.py', 30_249_064),
    ('vmamba2_s_300e_in1k.py', 50_147_752),
    ('vmamba2_b_300e_in1k.py', 88_557_800),
    ('mask_rcnn_vmamba2_t_1x_coco.py', 49_755_312),
    ('mask_rcnn_vmamba2_s_1x_coco.py', 69_654_000),
    ('mask_rcnn_vmamba2_b_1x_coco.py', 107_931_376),
    ('upernet_vmamba2_t_512x512_160k_ade20k.py', 61_902_572),
    ('upernet_vmamba2_s_512x512_160k_ade20k.py', 81_801_260),
    ('upernet_vmamba2_b_512x512_160k_ade20k.py', 122_069_292),
])
def test_parameter_counts_equal_the_authors(rel, params):
    assert count(build(load(rel))) == params


@pytest.mark.parametrize('rel', DEMO + ['mask_rcnn_vmamba2_t_3x_ms_coco.py'])
def test_builds_and_runs(rel):
    cfg = load(rel)
    meta = not rel.startswith('demo')
    model = build(cfg, meta=meta)
    assert type(model.backbone).__name__ == 'VMamba2'
    if not meta:
        with torch.no_grad():
            outs = model.eval().extract_feat(torch.randn(1, 3, 96, 72))
        assert outs[0].shape[2:] == (24, 18)  # stride 4


def authors_no_decay(model_keys, fixture):
    """The parameters the authors' 'norm' rule exempts, in our names: the
    fixture's (authors') keys that hold 'norm', converted. The fixture's
    model is the demo's backbone; its classifier norm stands in for
    outnorm3 and outnorm0-2 are added, as their detectors have them."""
    state = {k: v for k, v in fixture['state_dict'].items()
             if not k.startswith('classifier.head.')}
    state = {k.replace('classifier.norm.', 'outnorm3.'): v
             for k, v in state.items()}
    for i, width in enumerate([32, 64, 128]):
        state[f'outnorm{i}.weight'] = torch.ones(width)
        state[f'outnorm{i}.bias'] = torch.zeros(width)
    exempt = set()
    for key in state:
        converted, _ = convert_authors_v2_state_dict({key: state[key]})
        if 'norm' in key:
            exempt |= {'backbone.' + k for k in converted}
    others = {k for k in model_keys if not k.startswith('backbone.')}
    # the heads' own parameters named 'norm' (none in mmdet's Mask R-CNN
    # and mmseg's UperNet: their BatchNorms are named 'bn')
    return exempt | {k for k in others if 'norm' in k}


@pytest.mark.parametrize('rel', DEMO)
def test_weight_decay_is_the_authors(rel):
    fixture = torch.load(FIXTURE, map_location='cpu', weights_only=False)
    cfg = load(rel)
    model = build(cfg, meta=False)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    decay = {id(p): group['weight_decay']
             for group in wrapper.optimizer.param_groups
             for p in group['params']}
    names = dict(model.named_parameters())
    no_decay = {n for n, p in names.items() if decay[id(p)] == 0}
    assert all(decay[id(p)] == base_wd for n, p in names.items()
               if n not in no_decay)
    expected = authors_no_decay(names, fixture)
    assert expected <= set(names)
    assert no_decay == expected
    # what the rule decays although ours is a norm, and what it exempts
    assert 'backbone.patch_embed.norm1.weight' not in no_decay
    assert 'backbone.stages.0.downsample.norm.bias' not in no_decay
    assert 'backbone.stages.0.blocks.0.ss2d.A_logs' not in no_decay
    assert 'backbone.stages.0.blocks.0.ss2d.out_norm.weight' in no_decay
    assert 'backbone.norm2.bias' in no_decay
    heads_bn = [n for n in names if '.bn.' in n]
    assert all(n not in no_decay for n in heads_bn)
    assert bool(heads_bn) == ('upernet' in rel)


def test_classification_decays_exactly_the_authors_set():
    """The authors' rule: no decay for 1-D parameters and names ending in
    '.bias' (norms, biases, Ds); A_logs, dt_projs_bias and the weights
    decay."""
    cfg = load('vmamba2_t_300e_in1k.py')
    cfg.model.backbone.arch = dict(embed_dims=32, depths=[1, 1, 2, 1],
                                   ssm_ratio=1.0, d_state=1, mlp_ratio=4.0)
    cfg.model.head.in_channels = 256
    model = build(cfg, meta=False)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {id(p): group['weight_decay']
             for group in wrapper.optimizer.param_groups
             for p in group['params']}
    for name, param in model.named_parameters():
        authors = not (param.dim() == 1 or name.endswith('.bias'))
        assert (decay[id(param)] > 0) == authors, name
    decayed = {n for n, p in model.named_parameters() if decay[id(p)] > 0}
    assert 'backbone.stages.0.blocks.0.ss2d.A_logs' in decayed
    assert 'backbone.stages.0.blocks.0.ss2d.dt_projs_bias' in decayed
    assert 'backbone.stages.0.blocks.0.ss2d.Ds' not in decayed
