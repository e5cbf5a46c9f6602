"""Benchmarks (``benchmarks/``): scaling sweep, throughput and detector
tables, timing helpers, on the CPU, on tiny models or small inputs."""
import builtins
import csv
import glob
import math
import os.path as osp
import symtable
import time
import types

import benchmark
import detectors
import pytest
import scaling
import timing
import torch
from mmengine.config import Config
from timing import (device_kernels, gpu_time, host_and_wall_ms,
                    module_settings, relative_to)

from mmvmamba.ops import _ext, selective_scan
from mmvmamba.ops.backend import LABELS

# what a VMamba's scans run on here (the rows name what actually ran)
VMAMBA_SCAN = LABELS['fused-cpu' if _ext.has_cross_kernel('cpu') else
                     'reference']

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_scaling_tool_writes_csv_and_plots(tmp_path, tiny_config,
                                           resnet_config):
    scaling.main([
        '--models', tiny_config, resnet_config, '--sizes', '32', '64',
        '--device', 'cpu', '--batch', '1', '--max-batch', '1', '--warmup',
        '0', '--repeat', '1', '--out-dir',
        str(tmp_path)
    ])
    with open(tmp_path / 'scaling.csv') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == scaling.COLUMNS
    assert [(r['model'], r['size']) for r in rows] == [
        ('tiny_vmamba', '32'), ('resnet18', '32'), ('tiny_vmamba', '64'),
        ('resnet18', '64')
    ]
    assert all(r['status'] == 'ok' and float(r['img_per_s']) > 0
               for r in rows)
    vmamba = rows[2]
    assert float(vmamba['gflops_later']) > float(vmamba['gflops_paper'])
    assert [r['scan'] for r in rows[:2]] == [VMAMBA_SCAN, 'none']
    for png in ('scaling_flops.png', 'scaling_throughput.png'):
        assert (tmp_path / png).stat().st_size > 1000


def test_benchmark_throughput_and_models_on_cpu(capsys, tiny_config):
    rows = benchmark.main([
        'throughput', '--device', 'cpu', '--models', tiny_config, '--modes',
        'infer-fp32', 'infer-bf16', 'train-bf16', '--size', '32', '--batch',
        '2', '--warmup', '0', '--repeat', '1'
    ])
    assert [r['mode'] for r in rows] == [
        'infer-fp32', 'infer-bf16', 'train-bf16'
    ]
    assert all(r['size'] == 32 and r['img_per_s'] > 0 for r in rows)
    assert all(r['scan'] == VMAMBA_SCAN for r in rows)
    benchmark.main([
        'models', '--archs', 'tiny', '--size', '64', '--warmup', '0',
        '--repeat', '1'
    ])
    out = capsys.readouterr().out
    assert 'Classifier throughput' in out and 'CPU' in out
    assert 'VMamba-T' in out and 'Swin-T' in out


def table_rows(out: str, title: str):
    """Header and rows (by first cell) of the printed table under ``title``.

    Columns are cut where the dashes under the header are.
    """
    lines = out[out.index(title):].splitlines()
    spans, start = [], 0
    for dashes in lines[2].split('  '):
        spans.append((start, start + len(dashes)))
        start += len(dashes) + 2

    def cells(line):
        return [line[a:b].strip() for a, b in spans]

    rows = {}
    for line in lines[3:]:
        if not line.strip():
            break
        rows[cells(line)[0]] = cells(line)
    return cells(lines[1]), rows


def test_benchmark_throughput_over_sizes_against_swin(capsys, tiny_config):
    rows = benchmark.main([
        'throughput', '--device', 'cpu', '--models', tiny_config, 'vmamba-t',
        'swin-t', '--modes', 'infer-fp32', '--sizes', '32', '64', '--batch',
        '2', '--warmup', '0', '--repeat', '1'
    ])
    # grouped by size, the models in their order within a size
    assert [(r['model'], r['size']) for r in rows] == [
        ('tiny_vmamba', 32), ('vmamba-t', 32), ('swin-t', 32),
        ('tiny_vmamba', 64), ('vmamba-t', 64), ('swin-t', 64)
    ]
    assert all(r['batch'] == 2 and r['img_per_s'] > 0 for r in rows)
    for size in (32, 64):
        by_name = {r['model']: r for r in rows if r['size'] == size}
        assert by_name['swin-t']['x_swin'] == 1
        assert by_name['vmamba-t']['x_swin'] == pytest.approx(
            by_name['vmamba-t']['img_per_s'] / by_name['swin-t']['img_per_s'])
        assert by_name['tiny_vmamba']['x_swin'] is None  # no size class
    out = capsys.readouterr().out
    header, table = table_rows(out, 'Classifier throughput, 32x32, 64x64')
    assert header[:2] == ['model', 'size'] and 'x Swin' in header
    assert table['swin-t'][header.index('x Swin')] == '1.00'  # size 64

    # batch per size: scaled down by area above 224, or given
    rows = benchmark.main([
        'throughput', '--device', 'cpu', '--models', tiny_config, '--modes',
        'infer-fp32', '--sizes', '32', '448', '--batch', '4', '--warmup', '0',
        '--repeat', '1'
    ])
    assert [r['batch'] for r in rows] == [4, 1]
    rows = benchmark.main([
        'throughput', '--device', 'cpu', '--models', tiny_config, '--modes',
        'infer-fp32', '--sizes', '32', '64', '--batch-per-size', '3', '1',
        '--warmup', '0', '--repeat', '1'
    ])
    assert [r['batch'] for r in rows] == [3, 1]
    with pytest.raises(SystemExit):
        benchmark.main(['throughput', '--sizes', '32', '64',
                        '--batch-per-size', '3'])


@pytest.mark.parametrize('config, shape', [
    ('configs/demo/mask_rcnn_vmamba_demo_synthetic.py', (96, 128)),
    ('configs/demo/upernet_vmamba_demo_synthetic.py', (64, 96)),
])
def test_synthetic_batches_train_with_finite_losses(config, shape):
    cfg = detectors.load_detector_config(
        osp.join(REPO, config), dict(mmdet=shape, mmseg=shape))
    assert cfg.model.backbone.init_cfg is None
    model = detectors.build_detector(cfg, torch.device('cpu'))
    classes = detectors.num_classes(model)
    data = detectors.synthetic_batch(model, cfg.default_scope, 2, shape)
    assert len(data['inputs']) == 2
    for image, sample in zip(data['inputs'], data['data_samples']):
        assert image.dtype == torch.uint8 and image.shape == (3, *shape)
        assert sample.img_shape == sample.ori_shape == shape
        if cfg.default_scope == 'mmdet':
            gt = sample.gt_instances
            boxes = gt.bboxes.tensor
            assert len(boxes) == 5 and gt.masks.masks.shape == (5, *shape)
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            assert (boxes[:, 2] <= shape[1]).all()
            assert (boxes[:, 3] <= shape[0]).all()
            assert ((0 <= gt.labels) & (gt.labels < classes)).all()
            # each mask is the ellipse in its box: inside it, not empty
            for box, mask in zip(boxes.tolist(), gt.masks.masks):
                ys, xs = mask.nonzero()
                assert len(ys) > 0
                assert xs.min() >= math.floor(box[0])
                assert xs.max() < math.ceil(box[2])
            assert sample.batch_input_shape == shape
        else:
            labels = sample.gt_sem_seg.data
            assert labels.shape == (1, *shape)
            assert labels.min() >= 0 and labels.max() < classes
            assert len(labels.unique()) > 1

    optim_wrapper = detectors.build_train_optim_wrapper(model, cfg, 'fp32')
    before = [p.detach().clone() for p in model.parameters()]
    log_vars = model.train_step(data, optim_wrapper)
    expected = (('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox',
                 'loss_mask') if cfg.default_scope == 'mmdet' else
                ('decode.loss_ce', 'aux.loss_ce'))
    for key in expected + ('loss', ):
        assert math.isfinite(log_vars[key].item()), key
        assert log_vars[key].item() > 0, key  # masks / labels were used
    changed = [not torch.equal(a, p) for a, p in zip(before,
                                                     model.parameters())]
    assert sum(changed) > len(changed) // 2  # the optimizer stepped


def test_optim_wrapper_modes():
    cfg = detectors.load_detector_config('upernet-vmamba-t')
    base = cfg.optim_wrapper
    fp32 = detectors.optim_wrapper_cfg(cfg, 'fp32')
    amp = detectors.optim_wrapper_cfg(cfg, 'amp', 'float16')
    assert fp32['type'] == 'OptimWrapper'
    assert amp['type'] == 'AmpOptimWrapper' and amp['dtype'] == 'float16'
    assert fp32['optimizer'] == amp['optimizer'] == base.optimizer
    assert amp['paramwise_cfg'] == base.paramwise_cfg
    assert detectors.mode_label('amp') == 'amp-bf16'
    with pytest.raises(ValueError, match='GPU'):
        detectors.time_train_step(None, cfg, 'amp', {}, torch.device('cpu'))


def test_merge_param_groups_for_every_model():
    """mmvmamba's configs merge their param groups; with merge_groups the
    Swin baseline's (one group per parameter in mmseg's config) are merged
    too, with the same options per parameter."""
    cfg = detectors.load_detector_config('upernet-vmamba-t')
    assert cfg.optim_wrapper.constructor == (
        'MergedGroupsOptimWrapperConstructor')
    swin = detectors.load_detector_config('upernet-swin-t')
    assert 'constructor' not in swin.optim_wrapper
    merged = detectors.optim_wrapper_cfg(swin, 'amp', 'float16', True)
    assert merged['constructor'] == 'MergedGroupsOptimWrapperConstructor'
    assert merged['paramwise_cfg'] == swin.optim_wrapper.paramwise_cfg
    model = detectors.build_detector(swin, torch.device('cpu')).backbone
    own, joined = (detectors.build_train_optim_wrapper(model, swin, 'fp32',
                                                       merge_groups=merge)
                   for merge in (False, True))
    params = list(model.parameters())
    assert len(own.optimizer.param_groups) == len(params)
    assert 1 < len(joined.optimizer.param_groups) <= 4

    def options(wrapper):
        return {id(p): (g['lr'], g['weight_decay'])
                for g in wrapper.optimizer.param_groups for p in g['params']}

    assert options(joined) == options(own)


def test_ratios_to_reference_rows():
    rows = [
        dict(model='a', mode='x', ms=6., status='ok'),
        dict(model='ref', mode='x', ms=3., status='ok'),
        dict(model='a', mode='y', ms=None, status='OOM'),
        dict(model='ref', mode='y', ms=2., status='ok'),
        dict(model='a', mode='z', ms=4., status='ok'),  # no reference row
        dict(model='ref', mode='w', ms=5., status='OOM'),
        dict(model='a', mode='w', ms=1., status='ok'),  # reference OOM
        dict(model='other', mode='x', ms=1., status='ok'),  # none named
    ]
    ratios = relative_to(rows, {'a': 'ref', 'ref': 'ref'}, 'ms')
    assert ratios == [2., 1., None, 1., None, None, None, None]


def test_a_failing_train_step_is_a_row_not_a_crash():

    class NoKernel(torch.nn.Linear):

        def train_step(self, data, optim_wrapper):
            raise NotImplementedError(
                '"roi_align_forward" not implemented for \'BFloat16\'')

    cfg = Config(dict(default_scope='mmdet', optim_wrapper=dict(
        type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4))))
    result = detectors.time_train_step(NoKernel(2, 2), cfg, 'fp32',
                                       dict(inputs=[None]),
                                       torch.device('cpu'), 0, 1)
    assert result['status'] == 'failed' and result['ms'] is None
    assert 'BFloat16' in result['error'] and result['loss'] is None


def test_rounds_merge_to_medians_and_the_largest_peak():
    ok = [
        dict(ms=ms, img_per_s=2e3 / ms, peak_gib=peak, gpu_ms=gpu,
             scan_ms=None, status='ok', loss=1., error=None,
             backbone_ms=gpu / 2, backbone_host_ms=gpu / 4,
             backbone_gpu_ms=gpu / 5)
        for ms, peak, gpu in ((30., 2., 10.), (10., 3., 30.), (20., 1., 20.))
    ]
    row = detectors.merge_rounds(ok, batch=2)
    assert row['ms'] == 20. and row['round_ms'] == [30., 10., 20.]
    assert row['img_per_s'] == pytest.approx(100.)
    assert row['peak_gib'] == 3. and row['gpu_ms'] == 20.
    assert (row['backbone_ms'], row['backbone_host_ms'],
            row['backbone_gpu_ms']) == (10., 5., 4.)
    assert row['scan_ms'] is None and row['status'] == 'ok'
    oom = dict(ok[0], ms=None, img_per_s=None, status='OOM')
    row = detectors.merge_rounds([ok[0], oom, ok[1]], batch=2)
    assert row['status'] == 'OOM' and row['ms'] is None
    assert row['round_ms'] == [30., None, 10.]
    with pytest.raises(ValueError, match='rounds'):
        detectors.benchmark(['upernet-vmamba-t'], ['fp32'],
                            torch.device('cpu'), rounds=0)


def test_host_and_wall_ms_off_the_gpu():
    """Off the GPU both are the host's clock: equal medians, warm-up calls
    untimed."""
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002 * len(calls))

    host, wall = host_and_wall_ms(fn, torch.device('cpu'), 1, 3)
    assert len(calls) == 4 and host == wall
    assert 5.5 < host < 30  # the median of 4, 6 and 8 ms of sleep


def test_gpu_time_is_none_off_the_gpu():
    assert gpu_time(lambda: torch.ones(3).sum(), torch.device('cpu')) == \
        dict(gpu_ms=None, scan_ms=None)


def test_device_kernels_leave_out_annotations_and_host_events():
    """A record_function range on the GPU timeline (the optimizer's step)
    spans kernels listed already: not counted again."""
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(key, device_type, ms, annotation=False):
        return types.SimpleNamespace(key=key, device_type=device_type,
                                     self_device_time_total=ms * 1e3,
                                     is_user_annotation=annotation)

    events = [
        event('aten::mm', cpu, 2.0),  # the op, with its kernels' time
        event('gemm_kernel', cuda, 2.0),
        event('Optimizer.step#AdamW.step', cuda, 48.0, annotation=True),
        event('multi_tensor_apply_kernel', cuda, 1.0),
        event('Memset (Device)', cuda, 0.0),
    ]
    assert [e.key for e in device_kernels(events)] == [
        'gemm_kernel', 'multi_tensor_apply_kernel']


def test_module_settings_restore_and_refuse_unknown_names():
    switches = types.ModuleType('switches')
    switches.ON, switches.TILE = False, 64
    with pytest.raises(KeyError):
        with module_settings(switches, ON=True, TILE=128):
            assert (switches.ON, switches.TILE) == (True, 128)
            raise KeyError('inside')
    assert (switches.ON, switches.TILE) == (False, 64)
    with pytest.raises(AttributeError,
                       match=r"switches has no attribute\(s\) \['TIEL'\]"):
        with module_settings(switches, ON=True, TIEL=128):
            pass
    assert switches.ON is False  # nothing set


def test_switch_model_rows_time_each_mode_off_then_on(monkeypatch,
                                                      tiny_config):
    """Each classifier and mode is timed with the switch off, then on; the
    switch is restored, and a switch the module lacks is refused before a
    model is built."""
    switches = types.ModuleType('switches')
    switches.ON = 'as set'
    seen = []

    def spy(model, mode, *args):
        seen.append((mode, switches.ON))
        return real(model, mode, *args)

    real = timing.time_mode
    monkeypatch.setattr(timing, 'time_mode', spy)
    rows = timing.switch_model_rows([tiny_config],
                                    ['infer-fp32', 'infer-bf16'], 2, 0, 1,
                                    switches, 'ON', 'cpu', size=32)
    assert seen == [('infer-fp32', False), ('infer-fp32', True),
                    ('infer-bf16', False), ('infer-bf16', True)]
    assert switches.ON == 'as set'
    assert [(r['model'], r['mode']) for r in rows] == [
        ('tiny_vmamba', 'infer-fp32'), ('tiny_vmamba', 'infer-bf16')]
    assert all(r[key]['status'] == 'ok' and r[key]['img_per_s'] > 0
               for r in rows for key in ('off', 'on'))
    with pytest.raises(AttributeError, match="switches has no switch 'OFF'"):
        timing.switch_model_rows(['no-such-model'], ['infer-fp32'], 2, 0, 1,
                                 switches, 'OFF', 'cpu')


@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_kernel('cuda')),
                    reason='needs a GPU and the compiled CUDA kernels')
def test_gpu_time_counts_kernels_and_the_scan_among_them():
    device = torch.device('cuda')
    g = torch.Generator(device).manual_seed(0)
    b, d, n, length = 2, 64, 16, 4096
    u = torch.randn(b, d, length, device=device, generator=g)
    delta = torch.rand(b, d, length, device=device, generator=g)
    a = -torch.rand(d, n, device=device, generator=g)
    bc = torch.randn(b, 1, n, length, device=device, generator=g)
    x = torch.randn(2048, 2048, device=device, generator=g)
    matmul = gpu_time(lambda: x @ x, device)
    both = gpu_time(lambda: (x @ x, selective_scan(u, delta, a, bc, bc)),
                    device)
    assert matmul['gpu_ms'] > 0 and matmul['scan_ms'] == 0
    assert 0 < both['scan_ms'] < both['gpu_ms']
    assert both['gpu_ms'] == pytest.approx(
        matmul['gpu_ms'] + both['scan_ms'], rel=0.5)


@pytest.mark.parametrize('task, batch', [('mask-rcnn', 1), ('upernet', 2)])
def test_benchmark_detectors_on_cpu(capsys, task, batch):
    # one image for Mask R-CNN (mmcv's RoIAlign is slow on CPUs), two for
    # UperNet (its BN sees 1x1 pooled maps: one image has one value)
    names = [f'{task}-vmamba-t', f'{task}-swin-t']
    rows = benchmark.main([
        'detectors', '--device', 'cpu', '--models', *names, '--det-size',
        '64', '96', '--seg-size', '64', '--batch',
        str(batch), '--warmup', '0', '--repeat', '1'
    ])
    assert [(r['model'], r['mode']) for r in rows] == [(n, 'fp32')
                                                       for n in names]
    for row in rows:
        assert row['status'] == 'ok' and row['batch'] == batch
        assert math.isfinite(row['ms']) and row['ms'] > 0
        # the backbone alone (one cold step each, no warm-up: no order of
        # the two times is reliable on a busy CPU); the host's clock is
        # the wall clock off the GPU
        assert math.isfinite(row['backbone_ms']) and row['backbone_ms'] > 0
        assert row['backbone_host_ms'] == row['backbone_ms']
        assert row['backbone_gpu_ms'] is None  # not profiled off the GPU
        assert math.isfinite(row['loss']) and row['loss'] > 0
        assert row['error'] is None
        assert row['peak_gib'] is None and row['mem_vs_swin'] is None
        assert row['shape'] == ((64, 96) if task == 'mask-rcnn' else (64, 64))
    # VMamba against the Swin of its task; Swin against itself
    vmamba, swin = rows
    assert swin['time_vs_swin'] == 1
    assert vmamba['time_vs_swin'] == pytest.approx(vmamba['ms'] / swin['ms'])
    params = {'mask-rcnn': (42.4, 47.8), 'upernet': (54.5, 59.9)}[task]
    assert (vmamba['params_m'], swin['params_m']) == pytest.approx(params,
                                                                   abs=0.05)

    out = capsys.readouterr().out
    header, table = table_rows(out, 'Training step')
    assert sorted(table) == sorted(names)
    assert 'CPU' in out
    assert [r['scan'] for r in rows] == [VMAMBA_SCAN, 'none']
    for name, cells in table.items():
        assert cells[header.index('mode')] == 'fp32'
        assert cells[header.index('scan')] == rows[
            names.index(name)]['scan']
        ms = float(cells[header.index('ms/step')])
        assert math.isfinite(ms) and ms > 0
        row = rows[names.index(name)]
        assert float(cells[header.index('backbone ms')]) == pytest.approx(
            row['backbone_ms'], abs=0.06)
        assert cells[header.index('host ms')] == cells[header.index(
            'backbone ms')]
    assert table[names[1]][header.index('time / Swin')] == '1.00'
    for cells in table.values():  # no GPU: not profiled, one round
        assert cells[header.index('GPU ms')] == '-'
        assert cells[header.index('busy ms')] == '-'
        assert cells[header.index('ms range')] == '-'
    if task == 'upernet':
        with pytest.raises(SystemExit):  # AmpOptimWrapper needs a GPU
            benchmark.main(['detectors', '--device', 'cpu', '--modes', 'amp'])
        with pytest.raises(SystemExit):
            benchmark.main(['detectors', '--device', 'cpu', '--rounds', '0'])


def test_benchmark_detectors_rounds_take_turns(capsys):
    names = ['upernet-vmamba-t', 'upernet-swin-t']
    rows = benchmark.main([
        'detectors', '--device', 'cpu', '--models', *names, '--seg-size',
        '64', '--warmup', '0', '--repeat', '1', '--rounds', '2'
    ])
    out = capsys.readouterr().out
    log = [line.split()[:3] for line in out.splitlines()
           if line.startswith('round ')]
    assert log == [['round', f'{r}/2', n] for r in (1, 2) for n in names]
    header, table = table_rows(out, 'Training step')
    assert 'median of 2 rounds' in out
    for row in rows:
        assert len(row['round_ms']) == 2
        assert row['ms'] == pytest.approx(sum(row['round_ms']) / 2)
        low, high = table[row['model']][header.index('ms range')].split('-')
        assert float(low) == pytest.approx(min(row['round_ms']), abs=0.06)
        assert float(high) == pytest.approx(max(row['round_ms']), abs=0.06)


@pytest.mark.skipif(not _ext.has_cross_kernel('cpu'),
                    reason='needs the fused CPU kernel')
def test_benchmark_scan_on_cpu_has_the_fused_tables(monkeypatch, capsys):
    """``scan --device cpu`` times the fused CPU core against the unfused
    path too, without checkpoint bytes or an exponential rate (two small
    stages stand in for VMamba-T's four)."""
    import scan_timing
    monkeypatch.setattr(scan_timing, 'STAGES', ((8, 25), (16, 9)))
    rows = benchmark.main([
        'scan', '--device', 'cpu', '--batch', '1', '--no-reference',
        '--fused-models', 'vmamba-t', 'vmamba2-t', '--warmup', '0',
        '--repeat', '1'
    ])
    out = capsys.readouterr().out
    assert f'{LABELS["fused-cpu"]} vs the unfused path' in out
    fused = [r for r in rows if 'model' in r]
    assert [(r['model'], r['stage'], r['scan_dtype'], r['pass_'])
            for r in fused] == [
                (m, f'C={C} L={L}', dtype, name)
                for m in ('vmamba-t', 'vmamba2-t') for C, L in ((8, 25),
                                                                 (16, 9))
                for dtype in ('float32', 'bfloat16')
                for name in ('fwd', 'fwd+bwd')]
    for row in fused:
        assert row['fused_ms'] > 0 and row['unfused_ms'] > 0
        assert row['generic_ms'] is None and row['over_exp_floor'] is None
        C, L = map(int, row['stage'][2:].split(' L='))
        core = scan_timing.CORE_SHAPES[row['model']]
        assert row['bytes'] == scan_timing.fused_bytes(
            1, C, L, getattr(torch, row['scan_dtype']), core,
            checkpoints=False)[row['pass_']]


def test_fused_bytes_follow_the_core_shapes():
    """VMamba2-T's core: d_inner = C, N = 1; VMamba-T's: 2C, N = 16."""
    import scan_timing
    batch, C, L, chunk = 2, 96, 3136, _ext.LIMITS.chunk
    for model, d_inner, N in (('vmamba-t', 192, 16), ('vmamba2-t', 96, 1)):
        core = scan_timing.CORE_SHAPES[model]
        plane = batch * L * d_inner
        x_dbl = batch * L * 4 * (6 + 2 * N) * 4
        checkpoints = batch * 4 * d_inner * -(-L // chunk) * N * 4
        forward = 2 * plane * 4 + x_dbl + checkpoints
        got = scan_timing.fused_bytes(batch, C, L, torch.float32, core)
        assert got == {'fwd': forward,
                       'fwd+bwd': 2 * forward + 2 * plane * 4 + x_dbl}
    assert scan_timing.EXP_PASSES == {'fwd': 1, 'fwd+bwd': 2}


def test_every_swin_t_sized_model_is_compared_with_timm_swin_t():
    from models import MODEL_ZOO, TIMM_MODELS, TIMM_SWIN_REFERENCE
    tiny = {'vmamba-t', 'vmamba2-t', 'swin-t', 'convnext-t', 'resnet-50',
            'deit-s', *TIMM_MODELS}
    assert set(TIMM_SWIN_REFERENCE) == tiny
    assert set(TIMM_SWIN_REFERENCE.values()) == {'timm-swin-t'}
    for name in ('vmamba2-t', 'vmamba2-s', 'vmamba2-b'):
        assert osp.isfile(MODEL_ZOO[name].config), name


def undefined_names(path: str):
    """``(scope, name)`` of each global name that a module's code reads but
    neither the module (assignments, imports, defs, ``global``) nor the
    builtins define (what pyflakes calls an undefined name)."""
    with open(path) as f:
        top = symtable.symtable(f.read(), path, 'exec')
    defined = set(dir(builtins)) | {'__file__', '__name__', '__doc__'}
    read = set()

    def visit(table):
        for symbol in table.get_symbols():
            name = symbol.get_name()
            if table is top or symbol.is_declared_global():
                if symbol.is_assigned() or symbol.is_imported():
                    defined.add(name)
            if symbol.is_referenced() and (table is top or symbol.is_global()):
                read.add((table.get_name(), name))
        for child in table.get_children():
            visit(child)

    visit(top)
    return sorted((scope, name) for scope, name in read
                  if name not in defined)


def test_undefined_names_are_found(tmp_path):
    module = tmp_path / 'module.py'
    module.write_text('import os\nSIZE = 2\n\n\ndef f(x):\n'
                      '    global LATER\n    LATER = len(x)\n'
                      '    return os.sep, SIZE, LATER, missing(x)\n')
    assert undefined_names(str(module)) == [('f', 'missing')]


@pytest.mark.parametrize('path', sorted(
    glob.glob(osp.join(REPO, 'benchmarks', '*.py'))),
                         ids=osp.basename)
def test_benchmark_has_no_undefined_names(path):
    """Code the CPU tests do not reach (GPU-only tables) reads no name its
    module lacks."""
    assert undefined_names(path) == []


@pytest.mark.parametrize('argv, message', [
    (['models', '--device', 'cpu', '--size', '0'],
     '--size must be at least 1, got 0'),
    (['models', '--device', 'cpu', '--batch', '-1'],
     '--batch must be at least 1, got -1'),
    (['models', '--device', 'cpu', '--repeat', '0'],
     '--repeat must be at least 1, got 0'),
    (['scan', '--device', 'cpu', '--warmup', '-1'],
     '--warmup must be at least 0, got -1'),
    (['throughput', '--device', 'cpu', '--sizes', '224', '0'],
     '--sizes must be at least 1, got 224 0'),
    (['throughput', '--device', 'cpu', '--sizes', '32', '64',
      '--batch-per-size', '2', '0'],
     '--batch-per-size must be at least 1, got 2 0'),
    (['detectors', '--device', 'cpu', '--det-size', '0', '32'],
     '--det-size must be at least 1, got 0 32'),
    (['detectors', '--device', 'cpu', '--seg-size', '0'],
     '--seg-size must be at least 1, got 0'),
    (['models', '--device', 'xpu'],
     "--device must be cpu or cuda[:N], got 'xpu'"),
    (['models', '--device', 'gpu0'],
     "--device must be cpu or cuda[:N], got 'gpu0'"),
    (['models', '--device', 'cuda:64'], '--device cuda:64: '),
])
def test_benchmark_refuses_bad_sizes_and_devices(argv, message, capsys):
    """Parser errors naming the option (before: tracebacks from the models,
    or the median of no timings for ``--repeat 0``)."""
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU error')
def test_benchmark_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(['scan'])  # its default device
    assert ('--device cuda: torch sees no GPU here (run with --device cpu)'
            in capsys.readouterr().err)


@pytest.mark.parametrize('flags, message', [
    (['--sizes', '224', '0'], '--sizes must be at least 1, got 224 0'),
    (['--batch', '0'], '--batch must be at least 1, got 0'),
    (['--max-batch', '0'], '--max-batch must be at least 1, got 0'),
    (['--device', 'tpu'], "--device must be cpu or cuda[:N], got 'tpu'"),
])
def test_scaling_refuses_bad_sizes_and_devices(flags, message, tmp_path,
                                               capsys):
    """Before: --sizes 0 divided by zero, --batch 0 ran at batch 1."""
    with pytest.raises(SystemExit) as exit_info:
        scaling.main(['--device', 'cpu', *flags, '--out-dir', str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
