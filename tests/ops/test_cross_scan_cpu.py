"""The fused four-direction scan on the CPU (``cross_scan_fwd``, forward only).

Every case draws fresh random inputs, runs SS2D's core on the fused CPU
kernel without gradients and compares it with the unfused path in float64 on
the PyTorch reference. Skipped when ``mmvmamba._C`` has no CPU kernel of the
op (pure-Python install).
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from mmvmamba.models import VMamba
from mmvmamba.ops import _ext, cross_selective_scan

cross_scan = importlib.import_module('mmvmamba.ops.cross_scan')

pytestmark = pytest.mark.skipif(
    not _ext.has_cross_kernel('cpu'),
    reason='needs mmvmamba._C with the fused CPU kernel')

# (batch, D, H, W, R, N): odd and non-square maps, D not a multiple of the
# 8 or 16 channels of a vector, N from 1 to 16 (padded to 1, 2, 4, 8, 16),
# ranks 1 to 48.
CASES = [
    (1, 24, 5, 7, 3, 16),
    (3, 19, 1, 6, 5, 3),  # H = 1, three batch entries
    (1, 40, 6, 1, 48, 16),  # W = 1, VMamba-T stage-3 rank
    (2, 8, 1, 1, 1, 1),  # L = 1, N = 1, R = 1
    (1, 33, 11, 30, 48, 16),
    (3, 17, 4, 9, 2, 8),
    (1, 100, 3, 5, 12, 2),
    (2, 96, 14, 13, 6, 16),  # VMamba-T stage-0 width
    (1, 24, 40, 37, 4, 16),  # L = 1480: a biased exp would add up
]
# Relative error of the float32 kernel against float64: measured at most
# 3e-7 over these cases (its exp is within 2e-7); an exp 1 + 1.2e-7 at 0
# gave 1.2e-6 at L = 330 and more on longer maps.
TOLERANCE = 1e-6


def make_params(case, seed=None):
    """A channels-last map and SS2D parameters as the authors initialise
    them, float32."""
    batch, d_inner, H, W, rank, d_state = case
    g = torch.Generator().manual_seed(
        torch.seed() % 2**31 if seed is None else seed)
    params = dict(
        x_proj_weight=torch.randn(4, rank + 2 * d_state, d_inner,
                                  generator=g) * d_inner**-0.5,
        dt_projs_weight=(torch.rand(4, d_inner, rank, generator=g) * 2 - 1) *
        rank**-0.5,
        dt_projs_bias=torch.rand(4, d_inner, generator=g) * 4 - 5,
        A_logs=torch.log(torch.rand(4 * d_inner, d_state, generator=g) * 8 +
                         0.5),
        Ds=torch.randn(4 * d_inner, generator=g))
    return torch.randn(batch, H, W, d_inner, generator=g), params


def reference(x, params, channels_last=True):
    """The unfused path in float64 (PyTorch reference scan)."""
    return cross_selective_scan(
        x.double(), **{k: v.double()
                       for k, v in params.items()},
        channels_last=channels_last, fused=False)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() /
            ref.double().norm().clamp_min(1e-30)).item()


def op_args(x, params):
    """Arguments of ``cross_scan_fwd`` for a channels-last map."""
    batch, H, W, d_inner = x.shape
    u = x.reshape(batch, H * W, d_inner)
    x_dbl = torch.einsum('bld,kcd->blkc', u, params['x_proj_weight'])
    return (u, x_dbl, params['dt_projs_weight'], params['dt_projs_bias'],
            -torch.exp(params['A_logs']), params['Ds'], H, W)


@pytest.mark.parametrize('case', CASES)
def test_fused_cpu_matches_float64_reference(case):
    x, params = make_params(case)
    with torch.no_grad():
        y = cross_selective_scan(x, **params, channels_last=True, fused=True)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel_err(y, reference(x, params)) < TOLERANCE


ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
from test_cross_scan_cpu import CASES, make_params, reference, rel_err
from mmvmamba.ops import cross_selective_scan
for case in (CASES[0], CASES[1], CASES[4]):
    x, params = make_params(case, seed=1)
    with torch.no_grad():
        y = cross_selective_scan(x, **params, channels_last=True, fused=True)
    print(rel_err(y, reference(x, params)))
"""


@pytest.mark.parametrize('isa', ['avx2', 'generic'])
def test_narrower_instruction_sets_match_float64_reference(isa):
    """The kernel built for AVX2 and for the baseline instruction set (the
    widest the processor has runs by default), picked by MMVMAMBA_CPU_ISA in
    a fresh process."""
    script = ISA_SCRIPT.format(here=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MMVMAMBA_CPU_ISA=isa)
    out = subprocess.run([sys.executable, '-c', script], env=env, text=True,
                         capture_output=True, check=True).stdout
    errors = [float(line) for line in out.split()]
    assert len(errors) == 3 and max(errors) < TOLERANCE, errors


def test_unknown_instruction_set_raises():
    script = ('import torch, mmvmamba.ops._ext\n'
              'torch.ops.mmvmamba.cross_scan_fwd(torch.zeros(1, 1, 1), '
              'torch.zeros(1, 1, 4, 3), torch.zeros(4, 1, 1), '
              'torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4), 1, 1)')
    env = dict(os.environ, MMVMAMBA_CPU_ISA='sse9')
    result = subprocess.run([sys.executable, '-c', script], env=env,
                            text=True, capture_output=True)
    assert result.returncode != 0
    assert ("MMVMAMBA_CPU_ISA must be avx512, avx2 or generic (or unset), "
            "got 'sse9'") in result.stderr


def test_inference_takes_the_fused_path_training_the_unfused(monkeypatch):
    """Without gradients the default is the fused kernel; with them the
    unfused path (the CPU kernel has no backward), same values."""
    x, params = make_params(CASES[0])
    calls = []
    fused_path = cross_scan._cross_selective_scan_fused
    monkeypatch.setattr(
        cross_scan, '_cross_selective_scan_fused',
        lambda *args: calls.append('fused') or fused_path(*args))
    with torch.no_grad():
        y_infer = cross_selective_scan(x, **params, channels_last=True)
    assert calls == ['fused']
    # grad mode on, but no input requires grad: fused as well
    y_plain = cross_selective_scan(x, **params, channels_last=True)
    assert calls == ['fused', 'fused']
    assert torch.equal(y_plain, y_infer)
    calls.clear()
    x_grad = x.clone().requires_grad_()
    y_train = cross_selective_scan(x_grad, **params, channels_last=True)
    assert calls == [] and y_train.requires_grad
    assert rel_err(y_train.detach(), y_infer) < 1e-5
    (dx, ) = torch.autograd.grad(y_train.sum(), [x_grad])
    assert dx.shape == x.shape
    with pytest.raises(ValueError, match='fused=True, but the fused kernel '
                       'cannot run: the fused CPU kernel is forward only'):
        cross_selective_scan(x_grad, **params, channels_last=True,
                             fused=True)


def test_channels_first_layout():
    x, params = make_params(CASES[5])
    with torch.no_grad():
        y_last = cross_selective_scan(x, **params, channels_last=True)
        y_first = cross_selective_scan(x.permute(0, 3, 1, 2), **params)
    torch.testing.assert_close(y_first, y_last.permute(0, 3, 1, 2))


def test_non_contiguous_inputs():
    x, params = make_params(CASES[4])
    args = op_args(x, params)
    y, checkpoints = torch.ops.mmvmamba.cross_scan_fwd(*args)
    assert checkpoints.shape == (0, )
    u, x_dbl = args[:2]
    strided = (u.transpose(1, 2).contiguous().transpose(1, 2),
               x_dbl.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0))
    assert not strided[0].is_contiguous()
    assert not strided[1].is_contiguous()
    y_strided, _ = torch.ops.mmvmamba.cross_scan_fwd(*strided, *args[2:])
    assert torch.equal(y_strided, y)


def test_bfloat16_inputs_read_as_their_float32_upcast():
    """The kernel computes in float32 from bf16 u and x_dbl: the result is
    that of their exact upcast, bit for bit."""
    for case in (CASES[0], CASES[1], CASES[6]):
        x, params = make_params(case)
        u, x_dbl, *rest = op_args(x, params)
        u16, x_dbl16 = u.bfloat16(), x_dbl.bfloat16()
        y16, _ = torch.ops.mmvmamba.cross_scan_fwd(u16, x_dbl16, *rest)
        y32, _ = torch.ops.mmvmamba.cross_scan_fwd(u16.float(),
                                                   x_dbl16.float(), *rest)
        assert y16.dtype == torch.float32
        assert torch.equal(y16, y32), case
    with torch.no_grad():
        y = cross_selective_scan(x, **params, channels_last=True,
                                 scan_dtype=torch.bfloat16)
    err = rel_err(y, reference(x, params))
    assert 0 < err < 3e-2  # rounded inputs, float32 state


def test_zero_batch():
    x, params = make_params((0, 8, 3, 4, 2, 4))
    y, checkpoints = torch.ops.mmvmamba.cross_scan_fwd(*op_args(x, params))
    assert y.shape == (0, 12, 8) and checkpoints.shape == (0, )


def test_opcheck():
    x, params = make_params(CASES[1])
    torch.library.opcheck(torch.ops.mmvmamba.cross_scan_fwd.default,
                          op_args(x, params))


def test_compiled_front_door_matches_eager():
    x, params = make_params(CASES[0])

    def core(x, *weights):
        return cross_selective_scan(x, *weights, channels_last=True)

    compiled = torch.compile(core, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        eager = core(x, *params.values())
        traced = compiled(x, *params.values())
    assert torch.equal(traced, eager)


def test_bad_inputs_raise_clear_errors():
    x, params = make_params(CASES[0])
    u, x_dbl, *rest = op_args(x, params)
    H, W = rest[-2:]
    fwd = torch.ops.mmvmamba.cross_scan_fwd
    with pytest.raises(RuntimeError, match='height x width'):
        fwd(u, x_dbl, *rest[:4], H + 1, W)
    with pytest.raises(RuntimeError, match='x_dbl must be'):
        fwd(u, x_dbl[..., :-1], *rest)
    with pytest.raises(RuntimeError, match='u must be float32 or bfloat16'):
        fwd(u.half(), x_dbl.half(), *rest)
    with pytest.raises(RuntimeError, match='x_dbl must be a Float tensor'):
        fwd(u, x_dbl.bfloat16(), *rest)
    with pytest.raises(RuntimeError, match='dt_bias must have shape'):
        fwd(u, x_dbl, rest[0], rest[1][:, :-1], *rest[2:])
    with pytest.raises(RuntimeError, match='covers 1 <= N <= 16'):
        A = torch.zeros(rest[2].shape[0], 17)
        fwd(u, torch.zeros(*x_dbl.shape[:3], 3 + 34), rest[0], rest[1], A,
            *rest[3:])
    with pytest.raises(RuntimeError, match='forward only'):
        _ext.cross_scan_kernel(u.detach().requires_grad_(), x_dbl, *rest)


@pytest.mark.parametrize('size', [(64, 64), (70, 45)])
def test_backbone_fused_on_and_off_agree(size):
    """VMamba's outputs in inference (fused CPU kernel) equal those of the
    unfused path (taken when parameters need gradients)."""
    torch.manual_seed(0)
    model = VMamba(dict(embed_dims=24, depths=[1, 2, 1, 1]),
                   out_indices=(0, 1, 2, 3), drop_path_rate=0.).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fused = model(x)
    unfused = model(x)  # the parameters require grad: the unfused path
    assert all(o.requires_grad for o in unfused)
    for a, b in zip(fused, unfused):
        assert rel_err(a, b.detach()) < 1e-5
