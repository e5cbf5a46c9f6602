"""benchmarks/layer_norm.py: the bytes of its floor, its tables on the CPU
(times made up), and a small run on the GPU (skipped without one)."""
import argparse
import itertools
from unittest.mock import patch

import layer_norm as bench
import pytest
import torch

from mmvmamba.models.backbones import common, vmamba
from mmvmamba.ops import layer_norm as ln

NEEDS_GPU = pytest.mark.skipif(
    not torch.cuda.is_available() or ln.TRITON_IMPORT_ERROR is not None,
    reason='needs a GPU and Triton')


def small_run(*flags):
    """``layer_norm.py`` with ``flags`` at batch 2, one warm-up call and two
    timed ones."""
    return bench.main([*flags, '--batch', '2', '--warmup', '1',
                       '--repeat', '2'])


def test_floor_bytes():
    # forward: the map read, a float32 output written; backward: the map
    # and a float32 output gradient read, the map's gradient written
    elements = 2 * 7 * 7 * 768
    assert bench.floor_bytes(2, 7, 7, 768, torch.bfloat16) == {
        'fwd': elements * (2 + 4),
        'fwd+bwd': elements * (2 + 4) + elements * (2 + 4 + 2)}
    assert bench.floor_bytes(2, 7, 7, 768, torch.float32)['fwd'] == \
        elements * 8


def test_set_norms():
    """The benchmark's settings keep the modules, their parameters and
    state keys, and change how they run."""
    norms = [ln.LayerNorm(8), ln.LayerNorm(16, triton_when_recorded=True)]
    weights = [m.weight for m in norms]
    keys = [list(m.state_dict()) for m in norms]
    for setting, (cls, when_recorded) in bench.NORM_SETTINGS.items():
        bench.set_norms(norms, setting)
        assert all(type(m) is cls for m in norms)
        assert all(m.triton_when_recorded is when_recorded for m in norms)
        assert [m.weight for m in norms] == weights
        assert [list(m.state_dict()) for m in norms] == keys
    x = torch.randn(2, 8, requires_grad=True)
    with patch.object(ln, 'layer_norm', side_effect=ln.layer_norm) as op:
        for setting, runs_op in (('aten', 0), ('forward', 0), ('both', 1)):
            op.reset_mock()
            bench.set_norms(norms[:1], setting)
            norms[0](x)  # recorded: on the op with 'both' alone
            assert op.call_count == runs_op, setting


@pytest.mark.skipif(ln.TRITON_IMPORT_ERROR is not None,
                    reason=str(ln.TRITON_IMPORT_ERROR))
def test_check_triton_path_under_the_steps_autocast(monkeypatch):
    """The check runs under the autocast of the timed steps: a bfloat16
    map with float32 parameters passes (CPU autocast taken for CUDA's, as
    the op tests do); float64 does not, nor mixed dtypes where autocast
    does not upcast."""
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
    x = torch.randn(2, 7, 7, 96).bfloat16()
    weight, bias = torch.randn(96), torch.randn(96)
    monkeypatch.setattr(ln, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))
    bench.check_triton_path(x, weight, bias)
    with pytest.raises(RuntimeError, match='float64'):
        bench.check_triton_path(x.double(), weight.double(), None)
    monkeypatch.setattr(ln, 'AUTOCAST_DEVICE_TYPES', ('cuda', ))
    with pytest.raises(RuntimeError, match=r'autocast off\) are not cov'):
        bench.check_triton_path(x, weight, bias)


def test_fastest_launch_searches_and_restores(monkeypatch, capsys):
    """Tiles (at least a row's block) x warps, then programs per SM at the
    fastest; a failing setting is printed, not timed; the module's launch
    settings are restored. The times are made up from the settings in
    force when the step ran."""
    config, programs = ln.gate_backward_launch_config, \
        ln.BACKWARD_PROGRAMS_PER_SM
    tried = []

    def step():
        block_c, rows, warps, per_sm = ln.gate_backward_launch_config(96)
        tried.append((block_c * rows, warps, per_sm))
        if warps == 16:
            raise RuntimeError('out of resources')

    def made_up_ms(step, device, warmup, repeat):
        step()
        tile, warps, per_sm = tried[-1]
        return abs(tile - 2048) / 1e3 + warps / 1e2 + (per_sm != 8)

    monkeypatch.setattr(bench, 'measure', made_up_ms)
    best = bench.fastest_launch(step, 'gate_backward_launch_config', 96,
                                (64, 2048, 4096), True, 'E=96', 'cpu', 0, 1)
    assert best == '0.040 ms: tile 2048, 4 warps, 8/SM'
    assert [t[:2] for t in tried[:9]] == [
        (tile, warps) for tile in (128, 2048, 4096) for warps in (4, 8, 16)]
    assert tried[9:] == [(2048, 4, 2), (2048, 4, 8)]
    assert 'E=96 tile 4096 warps 16: RuntimeError' in capsys.readouterr().out
    assert (ln.gate_backward_launch_config, ln.BACKWARD_PROGRAMS_PER_SM) == \
        (config, programs)
    del tried[:]
    assert bench.fastest_launch(step, 'gate_backward_launch_config', 96,
                                (2048, ), False, 'E=96', 'cpu', 0, 1) == \
        '1.040 ms: tile 2048, 4 warps'
    assert len(tried) == 3


def test_gate_floor_bytes():
    # forward: y (float32) and z read, the bf16 gated map written;
    # backward: y, z and the gated map's gradient read, the gated map
    # written again, y's (float32) and z's gradients written
    elements = 2 * 7 * 7 * 1536
    assert bench.gate_floor_bytes(2, 7, 7, 1536) == elements * (
        (4 + 2) + 2 + (4 + 2 + 2) + 2 + (4 + 2))


def test_gate_inputs_and_check(monkeypatch):
    """The check names why the Triton backward would not run (CPU tensors
    by default), passes where it would, and leaves the policy as it
    was."""
    default = common.GATE_BACKWARD_ON_TRITON
    inputs = bench.gate_inputs(2, 3, 3, 32, 16, 'cpu')
    assert inputs['z'].dtype == torch.bfloat16
    assert inputs['z'].stride(-2) == 64  # half of in_proj's output
    if ln.TRITON_IMPORT_ERROR is not None:
        return
    with pytest.raises(RuntimeError, match='x is on cpu'):
        bench.check_gate_triton_path(inputs['y'], inputs['z'],
                                     inputs['norm'])
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
    bench.check_gate_triton_path(inputs['y'], inputs['z'], inputs['norm'])
    assert common.GATE_BACKWARD_ON_TRITON is default


@pytest.fixture
def made_up_times(monkeypatch):
    """Time steps on the CPU without running them: 1, 2, 3... ms in call
    order, the copy bandwidth 2000 GB/s."""
    times = itertools.count(1)
    monkeypatch.setattr(bench, 'measure',
                        lambda step, device, warmup, repeat: next(times))
    monkeypatch.setattr(bench, 'copy_bandwidth', lambda device: 2e12)


def small_args(**kwargs):
    """The parsed options of a run at batch 1, without ``--models``."""
    return argparse.Namespace(**dict(
        dict(batch=1, warmup=0, repeat=1, sweep=False, models=[],
             dtypes=['float32', 'bfloat16'], modes=['infer-bf16']), **kwargs))


@pytest.mark.skipif(ln.TRITON_IMPORT_ERROR is not None,
                    reason=str(ln.TRITON_IMPORT_ERROR))
@pytest.mark.usefixtures('made_up_times')
def test_gate_rows_and_table(monkeypatch, capsys):
    """gate_rows: a row per gate map, then the copy bandwidth's; the
    ``--gate`` table prints each map with the device's name (the Triton
    path's check passing on CPU tensors)."""
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
    rows = bench.gate_rows(1, 0, 1, device='cpu')
    assert [r.get('shape') for r in rows] == [
        '1x56x56x192', '1x28x28x384', '1x14x14x768', '1x7x7x1536', None]
    assert rows[0]['aten'] == 1 and rows[0]['linear'] == 3
    assert rows[-1] == dict(copy_gb_per_s=2000.)
    printed = bench.print_gate_tables(small_args(), torch.device('cpu'))
    assert [r['shape'] for r in printed] == [r['shape'] for r in rows[:4]]
    out = capsys.readouterr().out
    assert 'CPU, ' in out and 'copy bandwidth 2000 GB/s' in out
    assert '1x7x7x1536' in out


@pytest.mark.usefixtures('made_up_times')
def test_add_norm_table(monkeypatch, capsys):
    """``--add-norm`` on the CPU (both paths on ATen there, the kernels'
    check skipped): a row per stage and residual dtype, the same sum, the
    table with the device's name."""
    checked = []
    monkeypatch.setattr(bench, 'check_add_norm_paths',
                        lambda *args: checked.append(args))
    rows = bench.print_add_norm(small_args(), torch.device('cpu'))
    assert len(rows) == len(checked) == 4 * 2
    assert all(r['same_sum'] and r['norm_diff'] == 0 for r in rows)
    assert [r['dtype'] for r in rows[:2]] == ['float32', 'bfloat16']
    out = capsys.readouterr().out
    assert 'CPU, ' in out and 'copy bandwidth 2000 GB/s' in out


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU path')
def test_refuses_to_run_without_a_gpu():
    with pytest.raises(SystemExit):
        bench.main(['--batch', '1'])


@NEEDS_GPU
def test_small_run_on_the_gpu(capsys):
    rows = small_run()
    assert len(rows) == 4 * 2 * 2
    assert all(r['aten_ms'] > 0 and r['triton_ms'] > 0 for r in rows)
    assert 'ATen / Triton' in capsys.readouterr().out


def test_gate_model_table(switch_table):
    title, header, rows = switch_table(bench.print_gate_model_table)
    assert "gate's backward on ATen / on Triton" in title
    assert header == ['model', 'ATen', 'ms', 'Triton', 'ms', 'img/s', 'ATen',
                      'img/s', 'Triton', 'speed-up']
    assert rows == [['vmamba-t', '2.0', '1.0', '1000', '2000', '2.00'],
                    ['vmamba-t', '2.0', '-', '1000', '-', '-']]


@NEEDS_GPU
def test_small_gate_run_on_the_gpu(capsys, tiny_config):
    default = common.GATE_BACKWARD_ON_TRITON
    rows = small_run('--gate', '--models', tiny_config)
    assert len(rows) == 4 + 1
    assert all(r['aten'] > 0 and r['triton'] > 0 and r['linear'] > 0
               for r in rows[:4])
    assert rows[4]['mode'] == 'train-bf16'
    assert rows[4]['off']['ms'] > 0 and rows[4]['on']['ms'] > 0
    out = capsys.readouterr().out
    assert 'gate ATen / Triton' in out and 'Classifier train-bf16' in out
    assert common.GATE_BACKWARD_ON_TRITON is default


def test_add_norm_floor_bytes():
    # a float32 residual and a bfloat16 update read, a float32 sum and a
    # bfloat16 norm written; a bfloat16 residual gives a bfloat16 sum
    elements = 2 * 7 * 7 * 768
    assert bench.add_norm_floor_bytes(2, 7, 7, 768, torch.float32) == \
        elements * (4 + 2 + 4 + 2)
    assert bench.add_norm_floor_bytes(2, 7, 7, 768, torch.bfloat16) == \
        elements * 4 * 2


@pytest.mark.skipif(ln.TRITON_IMPORT_ERROR is not None,
                    reason=str(ln.TRITON_IMPORT_ERROR))
def test_check_add_norm_paths(monkeypatch):
    """Both kernels take a stage's maps under the steps' autocast (CPU's
    taken for CUDA's); a float64 residual is refused with the reason."""
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
    monkeypatch.setattr(ln, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))
    x = torch.randn(2, 7, 7, 96)
    update = torch.randn(2, 7, 7, 96).bfloat16()
    norm = ln.LayerNorm(96, linear_input=True)
    bench.check_add_norm_paths(x, update, norm)
    with pytest.raises(RuntimeError, match='add_layer_norm kernel would not '
                       'run: x is torch.float64'):
        bench.check_add_norm_paths(x.double(), update, norm)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU path')
def test_add_norm_refuses_to_run_without_a_gpu():
    with pytest.raises(SystemExit):
        bench.main(['--add-norm', '--batch', '1'])


def test_add_norm_model_table(switch_table):
    title, header, rows = switch_table(bench.print_add_norm_model_table)
    assert 'ADD_NORM_ON_TRITON off and on' in title
    assert header[-4:] == ['img/s', 'on', 'on', 'speed-up']
    assert rows == [
        ['vmamba-t', 'train-bf16', '2.0', '1.0', '1000', '2000', '2.000'],
        ['vmamba-t', 'infer-bf16', '2.0', '-', '1000', '-', '-']]


@NEEDS_GPU
def test_small_add_norm_run_on_the_gpu(capsys, tiny_config):
    default = vmamba.ADD_NORM_ON_TRITON
    rows = small_run('--add-norm', '--models', tiny_config)
    assert len(rows) == 4 * 2
    assert all(r['unfused_ms'] > 0 and r['fused_ms'] > 0 and r['same_sum']
               for r in rows)
    out = capsys.readouterr().out
    assert 'add_layer_norm' in out and 'Inference steps' in out
    assert vmamba.ADD_NORM_ON_TRITON is default


def test_host_us_per_call_counts_each_call():
    calls = []
    us = bench.host_us_per_call(lambda: calls.append(1), torch.device('cpu'),
                                calls=3, rounds=2)
    assert len(calls) == 3 + 3 * 2  # warm-up, then two rounds
    assert us > 0


def test_host_table(monkeypatch, capsys):
    # made-up times by call (the bare launch stubbed: no kernel on the CPU)
    times = iter([10., 50., 80., 60., 55., 20.])
    launched = []
    monkeypatch.setattr(bench, 'host_us_per_call',
                        lambda fn, device, calls, rounds:
                        (fn(), next(times))[1])
    monkeypatch.setattr(ln, '_launch_forward',
                        lambda *args, **kwargs: launched.append(args))
    rows = bench.print_host_table(torch.device('cpu'), repeat=2)
    assert [r['call'] for r in rows] == [
        'F.layer_norm', 'layer_norm, not recorded',
        'layer_norm, recorded (Function)', 'gated_layer_norm',
        'add_layer_norm', 'bare launch (_launch_forward)']
    assert len(launched) == 1
    assert [r['vs_aten'] for r in rows] == [1., 5., 8., 6., 5.5, 2.]
    assert [r['vs_bare'] for r in rows] == [0.5, 2.5, 4., 3., 2.75, 1.]
    out = capsys.readouterr().out
    assert 'Host time of one LayerNorm call, 64 x 96 float32' in out
    assert 'x bare launch' in out


@NEEDS_GPU
def test_small_host_run_on_the_gpu(capsys):
    rows = bench.main(['--host', '--repeat', '2'])
    assert len(rows) == 6 and all(r['us'] > 0 for r in rows)
    assert 'x F.layer_norm' in capsys.readouterr().out


def test_detector_rows_switch_the_norms_in_turn(monkeypatch, capsys):
    """Each setting times the step with its norms on Triton in training
    (the early ones: the patch embedding's and stages 0-1's), the settings
    in turn each round; the norms are left as built."""
    import detectors
    seen = []

    def host_and_wall_ms(step, device, warmup, repeat):
        seen.append(sorted(n for n, m in norms.items()
                           if m.triton_when_recorded))
        return float(len(seen)), float(len(seen)) + 0.5

    built_step = detectors.backbone_step

    def backbone_step(model, mode, data, device):
        norms.update((n, m) for n, m in model.backbone.named_modules()
                     if isinstance(m, ln.LayerNorm))
        built.update((n, m.triton_when_recorded) for n, m in norms.items())
        return built_step(model, mode, data, device)

    norms, built = {}, {}
    monkeypatch.setattr(bench, 'host_and_wall_ms', host_and_wall_ms)
    monkeypatch.setattr(detectors, 'backbone_step', backbone_step)
    monkeypatch.setattr(detectors, 'TASKS',
                        dict(detectors.TASKS,
                             mmseg=(detectors.TASKS['mmseg'][0], (64, 64))))
    rows = bench.detector_rows(['upernet-vmamba-t'], torch.device('cpu'),
                               rounds=2, warmup=0, repeat=1)
    early = sorted(n for n in norms
                   if n.startswith(('patch_embed.', 'stages.0.', 'stages.1.')))
    assert 0 < len(early) < len(norms)
    assert seen == [[], sorted(norms), early] * 2
    assert [(r['norms'], r['triton']) for r in rows] == [
        ('aten', 0), ('triton', len(norms)), ('triton-early', len(early))]
    # medians over the rounds: calls 1 and 4, 2 and 5, 3 and 6
    assert [r['host_ms'] for r in rows] == [2.5, 3.5, 4.5]
    assert [r['wall_ms'] for r in rows] == [3.0, 4.0, 5.0]
    assert all(r['busy_ms'] is None for r in rows)  # no GPU
    assert {n: m.triton_when_recorded for n, m in norms.items()} == built
    bench.print_detector_table(rows, 2)
    out = capsys.readouterr().out
    assert 'triton-early' in out and 'medians of 2 rounds' in out
