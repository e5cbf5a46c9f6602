"""Every config loads and builds its model; the paper's settings hold."""
import glob
import os.path as osp
import re

import pytest
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = osp.join(REPO, 'configs')
TOP = sorted(glob.glob(osp.join(CONFIGS, '*.py')))
DEMO = sorted(glob.glob(osp.join(CONFIGS, 'demo', '*.py')))
BASES = sorted(glob.glob(osp.join(CONFIGS, '_base_', '**', '*.py'),
                         recursive=True))


def name(path):
    return osp.relpath(path, CONFIGS)


def load(rel):
    return Config.fromfile(osp.join(CONFIGS, rel))


def test_expected_configs():
    names = {osp.basename(p) for p in TOP}
    expected = {f'mask_rcnn_vmamba_{s}_{sched}_coco.py'
                for s in 'tsb' for sched in ('1x', '3x_ms')}
    expected |= {f'upernet_vmamba_{s}_512x512_160k_ade20k.py' for s in 'tsb'}
    expected |= {f'upernet_vmamba_{s}_640x640_160k_ade20k.py' for s in 'sb'}
    assert expected <= names


@pytest.mark.parametrize('path', BASES, ids=name)
def test_base_loads(path):
    Config.fromfile(path)


@pytest.mark.parametrize('path', TOP + DEMO, ids=name)
def test_config_builds(path):
    cfg = Config.fromfile(path)
    assert cfg.custom_imports == dict(
        imports=['mmvmamba'], allow_failed_imports=False)
    assert cfg.model.backbone.type in ('VMamba', 'VMamba2')
    init_cfg = cfg.model.backbone.get('init_cfg')
    size = re.search(r'(mask_rcnn|upernet)_vmamba_([tsb])_', path)
    if size:  # the detection and segmentation configs of this project
        with open(path) as f:
            assert 'custom_imports' in f.read()
        assert init_cfg.checkpoint == (
            f'checkpoints/vmamba_{size.group(2)}_in1k.pth')
    cfg.model.backbone.init_cfg = None
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_missing_weights_say_how_to_make_them(tmp_path, monkeypatch):
    cfg = load('mask_rcnn_vmamba_t_1x_coco.py')
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    backbone = MODELS.build(cfg.model.backbone)
    with pytest.raises(FileNotFoundError, match='vmamba2mmvmamba'):
        backbone.init_weights()


@pytest.mark.parametrize('size, channels', [('t', 96), ('s', 96),
                                            ('b', 128)])
def test_mask_rcnn_settings(size, channels):
    for sched, epochs, steps in (('1x', 12, [8, 11]), ('3x_ms', 36, [27, 33])):
        cfg = load(f'mask_rcnn_vmamba_{size}_{sched}_coco.py')
        assert cfg.default_scope == 'mmdet'
        assert cfg.model.backbone.drop_path_rate == 0.2
        assert cfg.model.neck.in_channels == [channels * 2**i
                                              for i in range(4)]
        opt = cfg.optim_wrapper.optimizer
        assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 1e-4, 0.05)
        assert tuple(opt.betas) == (0.9, 0.999)
        assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0
        assert cfg.train_dataloader.batch_size == 2
        assert cfg.auto_scale_lr.base_batch_size == 16
        assert cfg.train_cfg.max_epochs == epochs
        warmup, steps_cfg = cfg.param_scheduler
        assert (warmup.start_factor, warmup.end) == (0.001, 1000)
        assert steps_cfg.milestones == steps
        types = [t['type'] for t in cfg.train_pipeline]
        if sched == '1x':
            assert cfg.train_pipeline[2].scale == (1333, 800)
        else:
            assert 'RandomChoice' in types
        assert cfg.val_evaluator.metric == ['bbox', 'segm']


@pytest.mark.parametrize('rel, channels, crop', [
    ('upernet_vmamba_t_512x512_160k_ade20k.py', 96, 512),
    ('upernet_vmamba_s_512x512_160k_ade20k.py', 96, 512),
    ('upernet_vmamba_b_512x512_160k_ade20k.py', 128, 512),
    ('upernet_vmamba_s_640x640_160k_ade20k.py', 96, 640),
    ('upernet_vmamba_b_640x640_160k_ade20k.py', 128, 640),
])
def test_upernet_settings(rel, channels, crop):
    cfg = load(rel)
    assert cfg.default_scope == 'mmseg'
    model = cfg.model
    assert model.backbone.drop_path_rate == 0.3
    assert model.decode_head.in_channels == [channels * 2**i
                                             for i in range(4)]
    assert model.decode_head.channels == 512
    assert tuple(model.decode_head.pool_scales) == (1, 2, 3, 6)
    assert model.decode_head.num_classes == 150
    assert model.auxiliary_head.in_index == 2
    assert model.auxiliary_head.in_channels == channels * 4
    assert model.auxiliary_head.loss_decode.loss_weight == 0.4
    assert model.decode_head.norm_cfg.type == 'SyncBN'
    assert tuple(model.data_preprocessor.size) == (crop, crop)
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 6e-5, 0.01)
    assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0
    warmup, poly = cfg.param_scheduler
    assert (warmup.start_factor, warmup.end) == (1e-6, 1500)
    assert (poly.type, poly.power, poly.end) == ('PolyLR', 1.0, 160000)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 2
    resize, crop_t = cfg.train_pipeline[2], cfg.train_pipeline[3]
    assert tuple(resize.scale) == (crop * 4, crop)
    assert tuple(resize.ratio_range) == (0.5, 2.0)
    assert (tuple(crop_t.crop_size), crop_t.cat_max_ratio) == ((crop, crop),
                                                               0.75)
    assert cfg.train_pipeline[-2].type == 'PhotoMetricDistortion'
    # multi-scale + flip test
    assert cfg.tta_model.type == 'SegTTAModel'
    resizes, flips = cfg.tta_pipeline[1].transforms[:2]
    assert [tuple(r.scale) for r in resizes] == [
        (int(crop * 4 * r), int(crop * r))
        for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    ]
    assert sorted(f.prob for f in flips) == [0., 1.]


def test_tta_model_builds():
    cfg = load('upernet_vmamba_t_512x512_160k_ade20k.py')
    cfg.model.backbone.init_cfg = None
    init_default_scope('mmseg')
    MODELS.build(dict(**cfg.tta_model, module=cfg.model))


def test_no_decay_groups():
    """Norms, A_logs and Ds get no weight decay; other weights do."""
    import torch.nn as nn
    from mmengine.optim import build_optim_wrapper
    cfg = load('demo/mask_rcnn_vmamba_demo_synthetic.py')
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {id(p): group['weight_decay']
             for group in wrapper.optimizer.param_groups
             for p in group['params']}
    backbone = model.backbone
    norms = {id(p) for m in backbone.modules()
             if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d))
             for p in m.parameters()}
    checked = 0
    for n, p in backbone.named_parameters():
        no_decay = id(p) in norms or n.endswith(('A_logs', 'Ds'))
        assert (decay[id(p)] == 0) == no_decay, n
        checked += no_decay
    assert checked > 0
