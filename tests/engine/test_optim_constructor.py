"""MergedGroupsOptimWrapperConstructor: mmengine's paramwise rules, one
param group per setting, the same learning rates, decays and updates."""
import copy
import glob
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import (DefaultOptimWrapperConstructor,
                            build_optim_wrapper)
from mmengine.optim.scheduler import LinearLR
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as ROOT_CONSTRUCTORS

import mmvmamba  # noqa: F401  (registers the constructor)
from mmvmamba.engine import (MergedGroupsOptimWrapperConstructor,
                             merge_param_groups)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

OPTIM_WRAPPER = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05))
PARAMWISE = dict(
    norm_decay_mult=0.,
    bias_decay_mult=0.,
    custom_keys={
        'head': dict(lr_mult=0.1),
        'scale': dict(decay_mult=0.)
    })


class _Net(nn.Module):
    """Weights, biases, norms, a custom key and a head with its own lr."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(),
                                  nn.Linear(16, 8), nn.LayerNorm(8))
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 4)


def _options(wrapper):
    """lr and weight decay of each parameter, by id."""
    return {
        id(p): (group['lr'], group['weight_decay'])
        for group in wrapper.optimizer.param_groups for p in group['params']
    }


def _build(model, constructor, optimizer=None):
    cfg = dict(OPTIM_WRAPPER, constructor=constructor, paramwise_cfg=PARAMWISE)
    if optimizer is not None:
        cfg['optimizer'] = dict(cfg['optimizer'], **optimizer)
    return build_optim_wrapper(model, cfg)


def test_merge_joins_equal_options_in_order():
    a, b, c, d = (nn.Parameter(torch.zeros(1)) for _ in range(4))
    groups = [
        dict(params=[a], lr=0.1),
        dict(params=[b]),
        dict(params=[c], lr=0.1),
        dict(params=[d], lr=0.1, weight_decay=0.)
    ]
    merged = merge_param_groups(groups)
    assert [g['params'] for g in merged] == [[a, c], [b], [d]]
    assert [{k: v for k, v in g.items() if k != 'params'}
            for g in merged] == [dict(lr=0.1), {}, dict(lr=0.1,
                                                        weight_decay=0.)]
    # the inputs are left as they were
    assert groups[0]['params'] == [a] and len(groups) == 4


def test_merge_keeps_a_named_default_apart():
    """A group naming the default lr is not joined with one that does not:
    the optimizer would give both the same lr, but a scheduler or a user
    reading the groups may not."""
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    merged = merge_param_groups([dict(params=[a]), dict(params=[b], lr=1e-3)])
    assert len(merged) == 2


@pytest.mark.parametrize('bad', [[a] for a in ([1], dict(lr=0.1), 'params')])
def test_merge_rejects_non_groups(bad):
    with pytest.raises(TypeError, match='"params" list'):
        merge_param_groups(bad)


def test_registered_for_every_scope():
    from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS as DET
    from mmpretrain.registry import OPTIM_WRAPPER_CONSTRUCTORS as PRETRAIN
    from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS as SEG
    for registry in (ROOT_CONSTRUCTORS, DET, SEG, PRETRAIN):
        assert registry.get('MergedGroupsOptimWrapperConstructor') is (
            MergedGroupsOptimWrapperConstructor)


def test_same_options_as_the_default_constructor():
    model = _Net()
    default = _build(model, 'DefaultOptimWrapperConstructor')
    merged = _build(model, 'MergedGroupsOptimWrapperConstructor')
    params = list(model.parameters())
    assert len(default.optimizer.param_groups) == len(params)
    # scale (a custom key: no decay, lr named); the other weights; biases
    # and norms (no decay); the head (a custom key: lr x 0.1, which
    # overrides the bias rule)
    assert len(merged.optimizer.param_groups) == 4
    assert sorted(id(p) for g in merged.optimizer.param_groups
                  for p in g['params']) == sorted(id(p) for p in params)
    assert _options(merged) == _options(default)
    assert _options(merged)[id(model.head.bias)] == (1e-4, 0.05)


def test_without_paramwise_cfg_one_group():
    model = _Net()
    wrapper = build_optim_wrapper(
        model, dict(OPTIM_WRAPPER,
                    constructor='MergedGroupsOptimWrapperConstructor'))
    groups = wrapper.optimizer.param_groups
    assert len(groups) == 1 and len(groups[0]['params']) == len(
        list(model.parameters()))


@pytest.mark.parametrize('foreach', [False, True])
def test_same_updates_and_schedule(foreach):
    """AdamW under a warm-up gives bit-identical parameters and learning
    rates with merged and per-parameter groups."""
    torch.manual_seed(0)
    models = [_Net(), _Net()]
    models[1].load_state_dict(models[0].state_dict())
    wrappers = [
        _build(models[0], 'DefaultOptimWrapperConstructor',
               dict(foreach=foreach)),
        _build(models[1], 'MergedGroupsOptimWrapperConstructor',
               dict(foreach=foreach))
    ]
    schedulers = [
        LinearLR(w.optimizer, start_factor=0.1, by_epoch=False, end=3)
        for w in wrappers
    ]
    for _ in range(4):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, wrapper, scheduler in zip(models, wrappers, schedulers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            wrapper.step()
            wrapper.zero_grad()
            scheduler.step()
    for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p0, p1)
    assert _options(wrappers[1]) == {
        id(p1): options
        for p0, p1 in zip(models[0].parameters(), models[1].parameters())
        for options in [_options(wrappers[0])[id(p0)]]
    }


def test_is_the_default_constructor_below_the_top_level():
    """add_params called for a submodule (a prefix) adds one group per
    parameter, as mmengine's does; only the top level merges."""
    model = _Net()
    constructor = MergedGroupsOptimWrapperConstructor(
        dict(OPTIM_WRAPPER), PARAMWISE)
    params = []
    constructor.add_params(params, model.body, prefix='body')
    reference = []
    DefaultOptimWrapperConstructor(dict(OPTIM_WRAPPER),
                                   PARAMWISE).add_params(
                                       reference, model.body, prefix='body')
    assert len(params) == len(reference) == 6


def test_training_configs_use_it():
    """Every config with paramwise settings builds its groups merged."""
    found = 0
    for path in sorted(glob.glob(osp.join(REPO, 'configs', '*.py'))):
        cfg = Config.fromfile(path)
        wrapper = cfg.get('optim_wrapper')
        if wrapper is None or not wrapper.get('paramwise_cfg'):
            continue
        found += 1
        assert wrapper.get('constructor') == (
            'MergedGroupsOptimWrapperConstructor'), path
    assert found >= 20


def test_a_state_of_other_groups_is_refused_with_the_remedy():
    """A run saved with one group per parameter resumes with the default
    constructor, which the error names; the merged optimizer's own state
    loads."""
    torch.manual_seed(0)
    model = _Net()
    per_param = _build(model, 'DefaultOptimWrapperConstructor')
    merged = _build(model, 'MergedGroupsOptimWrapperConstructor')
    for wrapper in (per_param, merged):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        wrapper.step()
    before = copy.deepcopy(merged.state_dict())
    with pytest.raises(ValueError, match='optim_wrapper.constructor='
                       'DefaultOptimWrapperConstructor'):
        merged.load_state_dict(per_param.state_dict())
    assert str(merged.state_dict()) == str(before)  # left as it was
    again = _build(_Net(), 'MergedGroupsOptimWrapperConstructor')
    again.load_state_dict(merged.state_dict())
    assert [len(g['params']) for g in again.optimizer.param_groups] == [
        len(g['params']) for g in merged.optimizer.param_groups
    ]
    assert all(s['step'] == 1 for s in again.optimizer.state.values())
