"""benchmarks/ab_step.py: settings parsed, applied and undone, alternated
round by round, and the command line end to end on the CPU."""
import os

import ab_step
import pytest
import torch
import torch.nn as nn

from mmvmamba.ops import layer_norm as ln

ENV = 'MMVMAMBA_AB_STEP_TEST'


def test_a_label_alone_changes_nothing():
    assert ab_step.parse_setting(' main ') == ab_step.Setting('main', ())


def test_changes_parse_as_targets_names_and_literals():
    setting = ab_step.parse_setting(
        "tuned=mmvmamba.ops.layer_norm:TRITON_DEVICE_TYPES=();"
        "model:recompute_gate=False; env:MMVMAMBA_SCAN_SEGMENT_CHUNKS=08")
    assert setting == ab_step.Setting('tuned', (
        ('mmvmamba.ops.layer_norm', 'TRITON_DEVICE_TYPES', ()),
        ('model', 'recompute_gate', False),
        ('env', 'MMVMAMBA_SCAN_SEGMENT_CHUNKS', '08'),  # text, as it is
    ))


@pytest.mark.parametrize('text, message', [
    ('=env:X=1', 'has no label'),
    ('a=env', "change 'env' of setting 'a' is not TARGET:NAME=VALUE"),
    ('a=:X=1', "change ':X=1' of setting 'a' is not TARGET:NAME=VALUE"),
    ('a=m:X', "change 'm:X' of setting 'a' is not TARGET:NAME=VALUE"),
    ('a=m:X=on', "value 'on' of m:X in setting 'a' is not a Python literal"),
])
def test_a_malformed_setting_names_its_part(text, message):
    with pytest.raises(ValueError, match=message):
        ab_step.parse_setting(text)


class Block(nn.Module):

    def __init__(self):
        super().__init__()
        self.recompute_gate = True


def two_blocks():
    return nn.Sequential(Block(), nn.Linear(2, 2), Block())


def state(model):
    gates = [m.recompute_gate for m in model.modules()
             if isinstance(m, Block)]
    return ln.TRITON_DEVICE_TYPES, os.environ.get(ENV), gates


def test_applied_sets_every_change_and_undoes_it(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    model = two_blocks()
    before = state(model)
    setting = ab_step.parse_setting(
        f'x=mmvmamba.ops.layer_norm:TRITON_DEVICE_TYPES=("cpu",);'
        f'env:{ENV}=7;model:recompute_gate=False')
    with ab_step.applied(setting, model):
        assert state(model) == (('cpu', ), '7', [False, False])
    assert state(model) == before and ENV not in os.environ
    monkeypatch.setenv(ENV, 'old')
    with pytest.raises(RuntimeError, match='inside'):
        with ab_step.applied(setting, model):
            raise RuntimeError('inside')
    assert state(model) == (before[0], 'old', before[2])


def test_a_model_pattern_picks_modules_by_qualified_name():
    model = two_blocks()  # modules '0', '1', '2'
    setting = ab_step.parse_setting('last=model[2]:recompute_gate=False')
    assert setting.changes == (('model[2]', 'recompute_gate', False), )
    with ab_step.applied(setting, model):
        assert state(model)[2] == [True, False]
    assert state(model)[2] == [True, True]


@pytest.mark.parametrize('text, message', [
    ('x=model:no_such_switch=1', "no module of the model has an attribute "
     "'no_such_switch'"),
    ('x=model[1]:recompute_gate=1', "no module of the model named like '1' "
     "has an attribute 'recompute_gate'"),
    ('x=mmvmamba.ops.layer_norm:NO_SUCH=1', 'has no attribute'),
])
def test_a_change_with_nothing_to_set_is_an_error(text, message):
    model = two_blocks()
    with pytest.raises(AttributeError, match=message):
        with ab_step.applied(ab_step.parse_setting(text), model):
            pass


def test_compare_alternates_the_settings_each_round(monkeypatch):
    """Each timing sees its own setting, after ``warmup`` steps under it;
    the rounds go over all settings in order."""
    monkeypatch.delenv(ENV, raising=False)
    model = two_blocks()
    log = []
    settings = [ab_step.parse_setting(s) for s in (
        'main', f'env=env:{ENV}=1', 'kept=model:recompute_gate=False')]

    def step():
        log.append(('step', state(model)[1:]))

    def time_step():
        log.append(('time', state(model)[1:]))
        return float(len(log))

    times = ab_step.compare(step, model, settings, time_step, rounds=2,
                            warmup=1)
    main, env, kept = (None, [True, True]), ('1', [True, True]), \
        (None, [False, False])
    one_round = [('step', main), ('time', main), ('step', env), ('time', env),
                 ('step', kept), ('time', kept)]
    assert log == one_round * 2
    assert times == {'main': [2., 8.], 'env': [4., 10.], 'kept': [6., 12.]}
    assert state(model)[1:] == main


@pytest.mark.parametrize('argv, message', [
    (['vmamba-t', '--setting', 'a', '--setting', 'a'],
     "labels must differ, repeated: ['a']"),
    (['vmamba-t', '--setting', 'a=env'], '--setting: change'),
    (['vmamba-t', '--setting', 'a', '--rounds', '0'],
     '--rounds must be at least 1'),
    (['mask-rcnn-vmamba-t', '--setting', 'a', '--size', '64'],
     "--size is a classifier's"),
    (['vmamba-t'], 'the following arguments are required: --setting'),
    (['vmamba-t', '--setting', 'a=no_such_module_here:X=1'],
     "--setting 'a': cannot import 'no_such_module_here'"),
    (['vmamba-t', '--setting', 'a=mmvmamba.ops.layer_norm:NO_SUCH=1'],
     "--setting 'a': mmvmamba.ops.layer_norm has no attribute 'NO_SUCH'"),
])
def test_a_bad_command_line_is_an_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        ab_step.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU error')
def test_cuda_without_a_gpu_is_an_error(capsys):
    with pytest.raises(SystemExit):
        ab_step.parse_args(['vmamba-t', '--setting', 'a', '--device', 'cuda'])
    assert 'torch sees no GPU here' in capsys.readouterr().err


@pytest.mark.parametrize('name, index', [('cuda', None), ('cuda:1', 1),
                                          ('cpu', None)])
@pytest.mark.parametrize('detector', [True, False])
def test_prepare_device_sets_an_index_only_where_named(
        name, index, detector, monkeypatch):
    """``set_device`` takes no index-less device (the first GPU run of the
    script failed there); cuDNN's autotuner is off for detectors only."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'set_device', calls.append)
    # the opposite of what a GPU's step sets
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', detector)
    ab_step.prepare_device(torch.device(name), detector)
    assert [c.index for c in calls] == ([] if index is None else [index])
    assert torch.backends.cudnn.benchmark == (
        detector if name == 'cpu' else not detector)


def test_a_tiny_classifier_on_the_cpu(tiny_config, capsys):
    """The whole command: a table row a setting, every round's time."""
    times = ab_step.main([
        tiny_config, '--device', 'cpu', '--mode', 'infer-fp32', '--batch',
        '1', '--size', '32', '--rounds', '2', '--warmup', '0', '--repeat',
        '1', '--setting', 'main', '--setting',
        'kept gate=model:recompute_gate=False'
    ])
    assert list(times) == ['main', 'kept gate']
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    out = capsys.readouterr().out
    assert 'median wall ms of 1 steps, settings alternated, 2 rounds' in out
    rows = [line.split() for line in out.splitlines()[-2:]]
    assert rows[0][0] == 'main' and rows[0][-1] == '1.000'
    assert rows[1][:2] == ['kept', 'gate']


def test_a_model_attribute_the_model_lacks_stops_before_timing(tiny_config):
    argv = [tiny_config, '--device', 'cpu', '--mode', 'infer-fp32',
            '--batch', '1', '--size', '32', '--setting', 'main', '--setting',
            'typo=model:recompute_gates=False']
    with pytest.raises(SystemExit, match="--setting 'typo': no module of "
                       "the model has an attribute 'recompute_gates'"):
        ab_step.main(argv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('device', ['cuda', 'cuda:0'])
def test_a_tiny_classifier_on_the_gpu(tiny_config, device, capsys):
    """The GPU path: busy ms from the profiler, for a device with and
    without an index."""
    times = ab_step.main([
        tiny_config, '--device', device, '--mode', 'train-bf16', '--batch',
        '2', '--size', '32', '--rounds', '1', '--warmup', '1', '--setting',
        'main', '--setting', 'kept gate=model:recompute_gate=False'
    ])
    assert all(len(t) == 1 and t[0] > 0 for t in times.values())
    assert 'busy GPU ms' in capsys.readouterr().out
