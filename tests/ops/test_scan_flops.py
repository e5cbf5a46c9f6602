"""The scan's cost model (``mmvmamba.ops.flops``): conventions, the probe
mode, and the handle of the fused op."""
import threading

import pytest
import torch
import torch.nn.functional as F

from mmvmamba.ops import _ext, cross_selective_scan, selective_scan_reference
from mmvmamba.ops.flops import ScanAsOneOp, scan_flops


def test_scan_flops_conventions():
    assert scan_flops(1, 10, 8, 16, True, 'paper') == 3.5 * 1280 + 80
    assert scan_flops(1, 10, 8, 16, False, 'later') == 9 * 1280
    with pytest.raises(ValueError, match='convention'):
        scan_flops(1, 1, 1, 1, convention='fvcore')
    assert scan_flops(0, 10, 8, 16) == 0  # an empty batch costs nothing


@pytest.mark.parametrize('index,value', [(0, -1), (1, 2.5), (2, '8'),
                                         (3, True), (4, 1)])
def test_scan_flops_refuses_bad_sizes(index, value):
    args = [2, 10, 8, 16, True]
    args[index] = value
    name = ['batch', 'length', 'channels', 'd_state', 'with_D'][index]
    with pytest.raises(ValueError, match=f'^{name} must be'):
        scan_flops(*args)


def probe_ran() -> bool:
    """Whether the reference scan gave the probe's ``D * u``."""
    u = torch.randn(1, 4, 9)
    B = torch.randn(1, 1, 3, 9)
    D = torch.rand(4) + 1
    y = selective_scan_reference(u, torch.rand(1, 4, 9), -torch.rand(4, 3),
                                 B, B, D=D)
    return torch.equal(y, u * D[:, None])


def test_probe_mode_nests_and_stays_in_its_thread():
    other_thread = []
    with ScanAsOneOp():
        assert probe_ran()
        with ScanAsOneOp():
            assert probe_ran()
        assert probe_ran()  # the outer block holds after the inner one
        thread = threading.Thread(
            target=lambda: other_thread.append(probe_ran()))
        thread.start()
        thread.join()
    assert other_thread == [False]
    assert not probe_ran()


class FusedCore(torch.nn.Module):
    """SS2D's core as the fused path calls the kernel (x_dbl by a linear)."""

    def forward(self, x, x_proj_weight, dt_projs_weight, dt_projs_bias,
                A_logs, Ds):
        batch, H, W, d_inner = x.shape
        x_flat = x.reshape(batch, H * W, d_inner)
        x_dbl = F.linear(x_flat, x_proj_weight.reshape(-1, d_inner))
        y, _ = torch.ops.mmvmamba.cross_scan_fwd(
            x_flat, x_dbl.view(batch, H * W, 4, -1), dt_projs_weight,
            dt_projs_bias, -torch.exp(A_logs), Ds, H, W)
        return y


class UnfusedCore(torch.nn.Module):

    def forward(self, *args):
        return cross_selective_scan(*args, channels_last=True, fused=False)


@pytest.mark.skipif(not _ext.ext_status()[0],
                    reason='needs mmvmamba._C (the fused op\'s schema)')
def test_fused_op_counts_as_the_unfused_path():
    # traced on the meta device: the fused op's fake kernel gives shapes
    from mmengine.analysis import FlopAnalyzer

    from mmvmamba.ops.flops import ScanFlopHandle
    batch, H, W, d_inner, d_state, rank = 2, 3, 5, 8, 4, 2
    args = [
        torch.randn(*shape, device='meta')
        for shape in ((batch, H, W, d_inner), (4, rank + 2 * d_state,
                                               d_inner), (4, d_inner, rank),
                      (4, d_inner), (4 * d_inner, d_state), (4 * d_inner, ))
    ]
    counts = []
    for core in (FusedCore(), UnfusedCore()):
        handle = ScanFlopHandle()
        analyzer = FlopAnalyzer(core, tuple(args))
        handle.register(analyzer)
        analyzer.unsupported_ops_warnings(False)
        with ScanAsOneOp():
            total = analyzer.total()
        counts.append((total, handle.calls))
    (fused, fused_calls), (unfused, unfused_calls) = counts
    assert fused_calls == unfused_calls == [(batch, H * W, 4 * d_inner,
                                             d_state, True)]
    # the unfused path's einsums: x_proj and the step sizes' projection
    scan = scan_flops(batch, H * W, 4 * d_inner, d_state)
    x_proj = batch * H * W * 4 * (rank + 2 * d_state) * d_inner
    dt_proj = batch * H * W * 4 * d_inner * rank
    assert fused == unfused == scan + x_proj + dt_proj
