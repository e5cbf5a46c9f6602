"""Analysis tools: FLOPs with the scan, ERF maps, scaling sweep, benchmark.

The tools run in-process (loaded from tools/analysis) on the CPU, on tiny
models or small inputs, except the FLOP count of VMamba-T at 224.
"""
import csv
import importlib.util
import os.path as osp

import numpy as np
import pytest
import torch

from mmvmamba.analysis.erf import log_scale, synthetic_images
from mmvmamba.analysis.flops import (SCAN_OPS, ScanFlopHandle, count_flops,
                                     scan_flops)
from mmvmamba.analysis.models import build, tensor_forward
from mmvmamba.analysis.scaling import COLUMNS
from mmvmamba.ops import _ext, selective_scan

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = dict(embed_dims=16, depths=[1, 1, 2, 1])


def load_tool(name: str):
    """Import tools/analysis/<name>.py as a module."""
    path = osp.join(REPO, 'tools', 'analysis', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'analysis_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_classifier_cfg() -> dict:
    return dict(
        type='ImageClassifier',
        backbone=dict(type='VMamba', arch=TINY, out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=128))


def test_get_flops_vmamba_t_matches_both_published_counts(capsys):
    totals = load_tool('get_flops').main(
        [osp.join(REPO, 'configs', 'vmamba_t_300e_in1k.py')])
    assert totals['paper'] / 1e9 == pytest.approx(4.46, rel=0.02)
    assert totals['later'] / 1e9 == pytest.approx(5.6, rel=0.02)
    out = capsys.readouterr().out
    assert 'paper' in out and 'later' in out and '22.89 M' in out


def test_scan_is_counted_from_shapes_and_the_front_door_restored():
    model = tensor_forward(build(tiny_classifier_cfg(), 'mmpretrain'),
                           'mmpretrain', 2, (32, 40))
    x = torch.randn(2, 3, 32, 40)
    flops = count_flops(model, (x, ))
    # one scan a block; (H, W) per stage 8x10, 4x5, 2x3, 1x2
    assert flops.scan_calls == 5
    lengths = [80, 20, 6, 6, 2]
    channels = [4 * 2 * c for c in (16, 32, 64, 64, 128)]
    for name in ('paper', 'later'):
        expected = sum(
            scan_flops(2, length, d, 16, True, name)
            for length, d in zip(lengths, channels))
        assert flops.scan[name] == expected
    assert flops.total('later') > flops.total('paper') > flops.non_scan > 0
    # the override is gone: the real scan runs again
    u = torch.randn(1, 4, 9)
    B = torch.randn(1, 1, 3, 9)
    y = selective_scan(u, torch.rand(1, 4, 9), -torch.rand(4, 3), B, B,
                       torch.ones(4))
    assert not torch.allclose(y, u)


@pytest.mark.skipif(not _ext.has_kernel('cpu'),
                    reason='mmvmamba._C has no CPU kernel here')
def test_compiled_scan_op_gets_the_same_count():
    from mmengine.analysis import FlopAnalyzer
    model = tensor_forward(build(tiny_classifier_cfg(), 'mmpretrain'),
                           'mmpretrain', 1, (32, 32))
    x = torch.randn(1, 3, 32, 32)
    handle = ScanFlopHandle()
    analyzer = FlopAnalyzer(model, (x, ))
    for op in SCAN_OPS:
        analyzer.set_op_handle(op, handle)
    analyzer.unsupported_ops_warnings(False)
    with torch.no_grad():  # the real scan, on the compiled op
        analyzer.total()
    assert handle.total('paper') == count_flops(model, (x, )).scan['paper']


def test_fused_attention_is_counted():

    class Attention(torch.nn.Module):

        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(2, 3, n, 8) for n in (5, 7, 7))
    flops = count_flops(Attention(), (q, k, v))
    assert flops.total() == 2 * 3 * 5 * 7 * (8 + 8)


def test_scan_flops_conventions():
    assert scan_flops(1, 10, 8, 16, True, 'paper') == 3.5 * 1280 + 80
    assert scan_flops(1, 10, 8, 16, False, 'later') == 9 * 1280
    with pytest.raises(ValueError, match='convention'):
        scan_flops(1, 1, 1, 1, convention='fvcore')


def write_config(path, model: dict) -> str:
    path.write_text("custom_imports = dict(imports=['mmvmamba'])\n"
                    "default_scope = 'mmpretrain'\n"
                    f'model = {model!r}\n')
    return str(path)


@pytest.fixture
def tiny_config(tmp_path):
    """A config file of a tiny VMamba classifier."""
    return write_config(tmp_path / 'tiny_vmamba.py', tiny_classifier_cfg())


@pytest.fixture
def resnet_config(tmp_path):
    """A config file of mmpretrain's ResNet-18 classifier."""
    return write_config(
        tmp_path / 'resnet18.py',
        dict(type='ImageClassifier',
             backbone=dict(type='ResNet', depth=18),
             neck=dict(type='GlobalAveragePooling'),
             head=dict(type='LinearClsHead', num_classes=10,
                       in_channels=512)))


def test_erf_tool_writes_a_png_with_init_and_trained_maps(
        tmp_path, tiny_config, resnet_config):
    classifier = build(tiny_classifier_cfg(), 'mmpretrain')
    ckpt = tmp_path / 'tiny.pth'
    torch.save({'state_dict': classifier.state_dict()}, ckpt)
    out = tmp_path / 'erf.png'
    maps = load_tool('erf').main([
        tiny_config, resnet_config, '--checkpoint',
        str(ckpt), '-', '--num-images', '2', '--size', '32', '--out',
        str(out)
    ])
    assert [title for title, _ in maps] == [
        'tiny_vmamba (init)', 'tiny_vmamba (trained)', 'resnet18 (init)'
    ]
    for _, erf in maps:
        assert erf.shape == (32, 32) and erf.max() > 0
    assert out.stat().st_size > 1000


def test_erf_helpers():
    images = synthetic_images(3, 24, seed=1)
    assert images.shape == (3, 3, 24, 24)
    assert images.std().item() == pytest.approx(1, rel=1e-3)
    scaled = log_scale(np.array([[1e-6, 1e-2], [0.5, 1.]]))
    assert scaled.min() == 0 and scaled.max() == 1
    assert scaled[0, 1] == pytest.approx(0.5)


def test_scaling_tool_writes_csv_and_plots(tmp_path, tiny_config,
                                           resnet_config):
    load_tool('scaling').main([
        '--models', tiny_config, resnet_config, '--sizes', '32', '64',
        '--device', 'cpu', '--batch', '1', '--max-batch', '1', '--warmup',
        '0', '--repeat', '1', '--out-dir',
        str(tmp_path)
    ])
    with open(tmp_path / 'scaling.csv') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert [(r['model'], r['size']) for r in rows] == [
        ('tiny_vmamba', '32'), ('resnet18', '32'), ('tiny_vmamba', '64'),
        ('resnet18', '64')
    ]
    assert all(r['status'] == 'ok' and float(r['img_per_s']) > 0
               for r in rows)
    vmamba = rows[2]
    assert float(vmamba['gflops_later']) > float(vmamba['gflops_paper'])
    for png in ('scaling_flops.png', 'scaling_throughput.png'):
        assert (tmp_path / png).stat().st_size > 1000


def test_benchmark_throughput_and_models_on_cpu(capsys, tiny_config):
    benchmark = load_tool('benchmark')
    rows = benchmark.main([
        'throughput', '--device', 'cpu', '--models', tiny_config, '--modes',
        'infer-fp32', 'infer-bf16', 'train-bf16', '--size', '32', '--batch',
        '2', '--warmup', '0', '--repeat', '1'
    ])
    assert [r[2] for r in rows] == ['infer-fp32', 'infer-bf16', 'train-bf16']
    assert all(float(r[5]) > 0 for r in rows)
    benchmark.main([
        'models', '--archs', 'tiny', '--size', '64', '--warmup', '0',
        '--repeat', '1'
    ])
    out = capsys.readouterr().out
    assert 'Classifier throughput' in out and 'CPU' in out
    assert 'VMamba-T' in out and 'Swin-T' in out
