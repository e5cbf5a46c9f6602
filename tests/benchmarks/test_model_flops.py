"""FLOPs of models with the scan (``benchmarks/model_flops.py``)."""
import pytest
import torch
from mmengine.analysis import FlopAnalyzer
from model_flops import count_flops
from models import build, tensor_forward

from mmvmamba.ops import _ext, selective_scan_reference
from mmvmamba.ops.backend import use_backend
from mmvmamba.ops.flops import ScanFlopHandle, scan_flops


def test_scan_is_counted_from_shapes_and_the_reference_restored(
        tiny_classifier_cfg):
    model = tensor_forward(build(tiny_classifier_cfg, 'mmpretrain'),
                           'mmpretrain', 2, (32, 40))
    x = torch.randn(2, 3, 32, 40)
    with use_backend('reference'):  # the reference runs as the probe op
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
    # the probe is gone: the reference scans again (the probe gives D * u)
    u = torch.randn(1, 4, 9)
    B = torch.randn(1, 1, 3, 9)
    y = selective_scan_reference(u, torch.rand(1, 4, 9), -torch.rand(4, 3),
                                 B, B, torch.ones(4))
    assert not torch.allclose(y, u)


@pytest.mark.skipif(not _ext.has_kernel('cpu'),
                    reason='mmvmamba._C has no CPU kernel here')
def test_compiled_scan_op_gets_the_probes_count(tiny_classifier_cfg):
    model = tensor_forward(build(tiny_classifier_cfg, 'mmpretrain'),
                           'mmpretrain', 1, (32, 32))
    x = torch.randn(1, 3, 32, 32)
    handle = ScanFlopHandle()
    analyzer = FlopAnalyzer(model, (x, ))
    handle.register(analyzer)
    analyzer.unsupported_ops_warnings(False)
    with torch.no_grad():  # the real scan, on the compiled op
        analyzer.total()
    assert len(handle.calls) == 5
    assert count_flops(model, (x, )).scan == {  # the kernel, counted again
        name: handle.total(name) for name in ('paper', 'later')}
    with use_backend('reference'):
        assert count_flops(model, (x, )).scan['paper'] == handle.total(
            'paper')


def test_fused_attention_is_counted():

    class Attention(torch.nn.Module):

        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(2, 3, n, 8) for n in (5, 7, 7))
    flops = count_flops(Attention(), (q, k, v))
    assert flops.total() == 2 * 3 * 5 * 7 * (8 + 8)
