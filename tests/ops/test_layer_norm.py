"""mmvmamba.ops.layer_norm: the Triton LayerNorm against float64
``F.layer_norm``, the choice between it and ``F.layer_norm``, the module.

The kernels run here on the CPU in Triton's interpreter, which must be on
when Triton is imported: :func:`test_kernels_in_triton_interpreter` runs
:class:`TestInterpreted` of this file in a fresh process with
``TRITON_INTERPRET=1`` (run it so directly:
``TRITON_INTERPRET=1 python -m pytest tests/ops/test_layer_norm.py``).
The GPU tests (real stage shapes, autocast, ``torch.compile``) skip without
CUDA.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mmvmamba.ops import layer_norm as ln
from triton_marks import (INTERPRETED, interpreted, interpreter_test,
                          needs_cuda, needs_triton)


class RecordFallbacks(TorchFunctionMode):
    """Counts the calls of ``F.layer_norm`` in a block: the fallback path
    calls it, the Triton path never does."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.layer_norm:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def triton_when_recorded(*args, **kwargs) -> ln.LayerNorm:
    """The module on :func:`layer_norm` for recorded calls too."""
    return ln.LayerNorm(*args, triton_when_recorded=True, **kwargs)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Let CPU tensors take the Triton path (in the interpreter)."""
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))


@pytest.fixture
def cpu_autocast_as_cuda(monkeypatch):
    """Take CPU autocast for CUDA's: ``layer_norm`` then returns float32
    under ``torch.autocast('cpu')`` (``F.layer_norm`` there does not)."""
    monkeypatch.setattr(ln, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))


@pytest.fixture
def gate_backward_calls(monkeypatch):
    """The ``needs`` of each call of ``gated_layer_norm_backward`` (the
    gate's Triton backward) in the test."""
    calls = []
    gated_backward = ln.gated_layer_norm_backward

    def spy(*args):
        calls.append(args[-1])
        return gated_backward(*args)

    monkeypatch.setattr(ln, 'gated_layer_norm_backward', spy)
    return calls


def reference(x, weight, bias, eps, dy):
    """Float64 ``F.layer_norm`` of the same values: output and the
    gradients of x, weight and bias (None where the input is None)."""
    leaves = [None if t is None else t.detach().double().requires_grad_()
              for t in (x, weight, bias)]
    y = F.layer_norm(leaves[0], x.shape[-1:], leaves[1], leaves[2], eps)
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, dy.double()))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def sum_scale(x, eps, dy):
    """Sums over rows of |dy * x_hat| and |dy|: the scale of the rounding
    error of the weight and bias gradients (a float32 sum of n terms is
    off by at most about (its depth) * 2^-24 * the sum of their sizes)."""
    x64 = x.detach().double()
    x_hat = (x64 - x64.mean(-1, keepdim=True)) * torch.rsqrt(
        x64.var(-1, unbiased=False, keepdim=True) + eps)
    dy64 = dy.double().reshape(-1, x.shape[-1])
    return ((dy64 * x_hat.reshape(dy64.shape)).abs().sum(0),
            dy64.abs().sum(0))


#: Relative error of a float32 result rounded to bfloat16: half a unit in
#: the last place, at most 2^-8 of the value. Triton's interpreter truncates
#: instead (its float32 to bfloat16 conversion drops the low bits), up to a
#: whole unit: 2^-7. The GPU rounds to nearest.
BF16_RTOL = 2**-7 if INTERPRETED else 2**-8


def assert_close_to(actual, expected, dtype, scale=None):
    """``actual`` (its dtype as expected) against a float64 ``expected``:
    float32 arithmetic (rtol 1e-5 and 1e-5 of the largest value), plus a
    rounding of the result to bfloat16 (:data:`BF16_RTOL`) or float16
    (2^-11, half a unit of 10 bits); sums over rows within 1e-5 of their
    ``scale``."""
    assert actual.dtype == dtype
    rtol = {torch.float32: 1e-5, torch.bfloat16: BF16_RTOL,
            torch.float16: 2**-11 + 1e-5}[dtype]
    atol = 1e-5 * float(expected.abs().max()) + 1e-6
    if scale is not None:
        atol = atol + 1e-5 * scale
    error = (actual.double() - expected).abs()
    bound = atol + rtol * expected.abs()
    assert bool((error <= bound).all()), (
        f'max error {float(error.max()):.3g}, worst error / bound '
        f'{float((error / bound).max()):.3g}')


def make_inputs(shape, dtype, param_dtype=torch.float32, device='cpu',
                weight=True, bias=True, grads=(True, True, True)):
    channels = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.5 * torch.randn(channels, device=device)).to(param_dtype)
    b = (0.5 * torch.randn(channels, device=device)).to(param_dtype)
    w = w.requires_grad_(grads[1]) if weight else None
    b = b.requires_grad_(grads[2]) if bias else None
    return x.requires_grad_(grads[0]), w, b


def check_against_float64(y, x, w, b, eps, out_dtype):
    """Backpropagate a random gradient through ``y`` and compare output and
    gradients with the float64 reference; dtypes those of the inputs."""
    dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, leaves, dy))
    y64, refs = reference(x, w, b, eps, dy)
    assert_close_to(y, y64, out_dtype)
    dw_scale, db_scale = sum_scale(x, eps, dy)
    for t, ref, scale in zip((x, w, b), refs, (None, dw_scale, db_scale)):
        if t is None or not t.requires_grad:
            continue
        assert_close_to(next(grads), ref, t.dtype, scale)


#: Relative rounding of a result in each dtype, as :func:`assert_close_to`
#: takes it (float32's: its arithmetic).
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: BF16_RTOL,
            torch.float16: 2**-11}


def gate_reference(y, z, w, b, eps, grad):
    """Float64 autograd of ``F.layer_norm(y) * F.silu(z)`` (w, b may be
    None): the gradients of y, z, w and b for ``grad``, and the sizes that
    bound each one's rounding error: a relative error r of SiLU(z) (its
    rounding to z's dtype) moves the norm's gradient ``dn = grad * SiLU(z)``
    by at most r |dn|, hence y's gradient by r times ``rstd (|w dn| +
    |x_hat| mean(|w dn x_hat|) + mean(|w dn|))``, w's by r sum |dn x_hat|
    and b's by r sum |dn|; z's gradient is a product, rounded relatively."""
    channels = y.shape[-1]
    leaves = [None if t is None else t.detach().double().requires_grad_()
              for t in (y, z, w, b)]
    out = F.layer_norm(leaves[0], (channels, ), leaves[2], leaves[3],
                       eps) * F.silu(leaves[1])
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, wanted, grad.double()))
    refs = [None if t is None else next(grads) for t in leaves]
    y64, z64, g64 = y.double(), z.double(), grad.double()
    rstd = torch.rsqrt(y64.var(-1, unbiased=False, keepdim=True) + eps)
    x_hat = (y64 - y64.mean(-1, keepdim=True)) * rstd
    dn = (g64 * F.silu(z64)).abs()
    w_dn = dn if w is None else dn * w.double().abs()
    dy_scale = rstd * (w_dn + x_hat.abs() * (w_dn * x_hat.abs()).mean(
        -1, keepdim=True) + w_dn.mean(-1, keepdim=True))
    rows = (-1, channels)
    sums = ((dn * x_hat.abs()).reshape(rows).sum(0),
            dn.reshape(rows).sum(0))
    return refs, (dy_scale, refs[1].abs(), *sums)


def assert_gate_grads_close(grads, y, z, w, b, eps, grad):
    """Gradients of y, z, w, b (None where not computed) against
    :func:`gate_reference`: float32 arithmetic plus the SiLU's rounding to
    z's dtype (y's, w's, b's gradients) or two roundings to z's dtype (z's:
    the product's gradient, then the result)."""
    refs, scales = gate_reference(y, z, w, b, eps, grad)
    act_rtol = 0. if z.dtype == torch.float32 else ROUNDING[z.dtype]
    for name, got, ref, scale, tensor in zip('yzwb', grads, refs, scales,
                                             (y, z, w, b)):
        if got is None:
            continue
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        rtol = 2 * act_rtol if name == 'z' else act_rtol
        bound = ((rtol + 1e-5) * scale + 1e-5 * ref.abs() +
                 1e-5 * float(ref.abs().max()) + 1e-6)
        error = (got.double() - ref).abs()
        assert bool((error <= bound).all()), (
            f'd{name}: max error {float(error.max()):.3g}, worst error / '
            f'bound {float((error / bound).max()):.3g}')


def run_recomputed_output(common, shape, out_channels, device, autocast):
    """SS2D's output stage by RecomputedOutput (``ss2d_output`` with
    recompute) under bf16 autocast or not, its backward on the ATen ops and
    on the gate's Triton kernels (``common.GATE_BACKWARD_ON_TRITON``): y
    float32, z the second half of a (..., 2E) map (bfloat16 under
    autocast), out_proj E -> ``out_channels``.

    Returns:
        tuple: The inputs (y, z, out_norm, out_proj), the output gradient,
        and for each of ATen and Triton the output and the gradients of y,
        z, the norm's weight and bias and out_proj's weight.
    """
    channels = shape[-1]
    y = torch.randn(shape, device=device)
    z = torch.randn(shape[:-1] + (2 * channels, ), device=device).to(
        torch.bfloat16 if autocast else torch.float32)[..., channels:]
    norm = nn.LayerNorm(channels).to(device)
    proj = nn.Linear(channels, out_channels, bias=False).to(device)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_(0, 0.5)
        proj.weight.normal_(0, channels**-0.5)
    grad = torch.randn(shape[:-1] + (out_channels, ), device=device)
    if autocast:
        grad = grad.bfloat16()
    # z keeps its strides, as in_proj's output chunk
    inputs = [y.requires_grad_(), z.requires_grad_()]
    wrt = (*inputs, norm.weight, norm.bias, proj.weight)
    results = []
    default = common.GATE_BACKWARD_ON_TRITON
    try:
        for on_triton in (False, True):
            common.GATE_BACKWARD_ON_TRITON = on_triton
            with torch.autocast(device, dtype=torch.bfloat16,
                                enabled=autocast):
                out = common.ss2d_output(*inputs, norm, proj, recompute=True)
            results.append((out, ) + torch.autograd.grad(out, wrt, grad))
    finally:
        common.GATE_BACKWARD_ON_TRITON = default
    return (y, z, norm, proj), grad, results[0], results[1]


def check_recomputed_output(modules_and_inputs, grad, aten, triton_,
                            autocast):
    """:func:`run_recomputed_output`'s results: the same output and
    gradient dtypes on both paths; the gate's gradients (of y, z, the
    norm's weight and bias) within :func:`assert_gate_grads_close` of
    float64 on both; out_proj's weight gradient of Triton within the
    gated map's rounding (to bfloat16 under autocast: a unit in the last
    place each side) of ATen's."""
    y, z, norm, proj = modules_and_inputs
    assert torch.equal(aten[0], triton_[0])  # the same forward
    assert [t.dtype for t in aten] == [t.dtype for t in triton_]
    linear_dtype = aten[0].dtype
    grad_2d = grad.reshape(-1, grad.shape[-1])
    grad_gated = (grad_2d @ proj.weight.detach().to(linear_dtype)).view(
        y.shape)
    parameters = (norm.weight.detach(), norm.bias.detach())
    for result in (aten, triton_):
        assert_gate_grads_close(result[1:5], y, z, *parameters, norm.eps,
                                grad_gated)
    gated64 = F.layer_norm(y.double(), y.shape[-1:], *[
        p.double() for p in parameters], norm.eps) * F.silu(z.double())
    size = grad_2d.double().abs().t() @ gated64.reshape(
        grad_2d.shape[0], -1).abs()
    rtol = 2 * ROUNDING[linear_dtype] if autocast else 1e-5
    error = (triton_[5].double() - aten[5].double()).abs()
    bound = 2 * rtol * size + 1e-6
    assert bool((error <= bound).all()), float((error / bound).max())


# ---------------------------------------------------------------------------
# In Triton's interpreter (CPU tensors)


@interpreted
@pytest.mark.usefixtures('triton_on_cpu', 'index_as_in_triton_3_6')
class TestInterpreted:
    """The kernels, run by Triton's interpreter on CPU tensors (a runtime
    value never taken as a Python int, which Triton 3.6's interpreter
    cannot do under NumPy >= 2.4)."""

    @pytest.mark.parametrize('channels', [1, 3, 96, 100, 384, 768])
    @pytest.mark.parametrize('case', ['float32', 'bfloat16', 'autocast'])
    def test_matches_float64(self, channels, case, monkeypatch,
                             reported_seed):
        # 3 x 23 = 69 rows: not a multiple of the row block (at most 256),
        # and for C >= 96 more blocks than the 2 backward programs here, so
        # that each program loops over several
        shape = (3, 23, channels)
        if case == 'autocast':
            # a bfloat16 map and float32 parameters under autocast (CPU's,
            # taken for CUDA's): read as it is, computed and returned in
            # float32
            x, w, b = make_inputs(shape, torch.bfloat16)
            monkeypatch.setattr(ln, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))
            with RecordFallbacks() as record, torch.autocast(
                    'cpu', dtype=torch.bfloat16):
                y = ln.layer_norm(x, w, b, 1e-5)
            check_against_float64(y, x, w, b, 1e-5, torch.float32)
        else:
            dtype = getattr(torch, case)
            x, w, b = make_inputs(shape, dtype, dtype)
            with RecordFallbacks() as record:
                y = ln.layer_norm(x, w, b, 1e-5)
            check_against_float64(y, x, w, b, 1e-5, dtype)
        assert record.calls == 0  # the Triton path ran

    @pytest.mark.parametrize('tile', [256, 8192])
    def test_backward_tile_of_its_own(self, tile, monkeypatch, reported_seed):
        # the backward's row blocks (2 or 64 rows of C = 96 padded to 128)
        # differ from the forward's (32): each pass covers every row once
        monkeypatch.setattr(ln, 'BACKWARD_TILE_ELEMENTS', tile)
        configs = []
        config = ln.backward_launch_config
        monkeypatch.setattr(ln, 'backward_launch_config',
                            lambda c: configs.append(config(c)) or configs[-1])
        x, w, b = make_inputs((3, 23, 96), torch.float32, torch.float32)
        check_against_float64(ln.layer_norm(x, w, b, 1e-5), x, w, b, 1e-5,
                              torch.float32)
        assert [rows for _, rows, _, _ in configs] == [tile // 128]

    @pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
    def test_unrecorded_calls_skip_the_function(self, dtype, monkeypatch,
                                                reported_seed):
        # where autograd does not record, the kernel runs alone (no
        # statistics, no autograd Function: lighter on the host), with the
        # recorded call's values
        x, w, b = make_inputs((3, 23, 100), dtype, dtype)
        recorded = ln.layer_norm(x, w, b, 1e-5)

        def no_function(*args):
            raise AssertionError('the Function ran for an unrecorded call')

        monkeypatch.setattr(ln._LayerNormFunction, 'apply', no_function)
        with RecordFallbacks() as record, torch.no_grad():
            y = ln.layer_norm(x, w, b, 1e-5)
        assert record.calls == 0  # the Triton path ran
        assert y.grad_fn is None and y.dtype == dtype
        assert y.shape == x.shape and y.is_contiguous()
        torch.testing.assert_close(y, recorded.detach(), rtol=0, atol=0)
        y64, _ = reference(x, w, b, 1e-5, torch.zeros_like(recorded))
        assert_close_to(y, y64, dtype)

    def test_float16(self, reported_seed):
        x, w, b = make_inputs((5, 13, 96), torch.float16, torch.float16)
        check_against_float64(ln.layer_norm(x, w, b), x, w, b, 1e-5,
                              torch.float16)

    @pytest.mark.parametrize('weight,bias', [(True, True), (True, False),
                                             (False, True), (False, False)])
    @pytest.mark.parametrize('grads', [(True, False, False),
                                       (False, True, True),
                                       (False, False, True)])
    def test_parameters_and_requested_gradients(self, weight, bias, grads,
                                                reported_seed):
        if not any(g for g, has in zip(grads, (True, weight, bias)) if has):
            pytest.skip('no gradient requested')
        x, w, b = make_inputs((2, 9, 100), torch.float32, weight=weight,
                              bias=bias, grads=grads)
        y = ln.layer_norm(x, w, b, 1e-5)
        check_against_float64(y, x, w, b, 1e-5, torch.float32)

    def test_without_autograd(self, reported_seed):
        x, w, b = make_inputs((4, 96), torch.float32,
                              grads=(False, False, False))
        y = ln.layer_norm(x, w, b)
        assert not y.requires_grad
        assert_close_to(y, reference(x, w, b, 1e-5, torch.zeros(4, 96))[0],
                        torch.float32)
        x.requires_grad_()
        with torch.no_grad():
            assert torch.equal(ln.layer_norm(x, w, b), y)
        with torch.inference_mode():
            assert torch.equal(ln.layer_norm(x, w, b), y)

    @pytest.mark.parametrize('eps', [1e-6, 0.1])
    def test_eps(self, eps, reported_seed):
        # a small variance, so that eps matters
        x = (5 + 0.05 * torch.randn(7, 96)).requires_grad_()
        _, w, b = make_inputs((7, 96), torch.float32)
        check_against_float64(ln.layer_norm(x, w, b, eps), x, w, b, eps,
                              torch.float32)

    def test_strided_rows_and_gradients(self, reported_seed):
        """Rows of a wider tensor (row stride 2C), rows no single stride
        apart (every other row of a map): still the Triton path, as they
        are contiguous in C; gradients of any layout."""
        _, w, b = make_inputs((1, 96), torch.float32)
        for pick in (lambda t: t[..., :96], lambda t: t[:, ::2, :96]):
            leaf = torch.randn(6, 5, 192, requires_grad=True)
            x = pick(leaf)
            with RecordFallbacks() as record:
                y = ln.layer_norm(x, w, b)
            assert record.calls == 0
            assert_close_to(y, reference(x, w, b, 1e-5, y.detach())[0],
                            torch.float32)
            inside = torch.zeros(leaf.shape, dtype=torch.bool)
            pick(inside).fill_(True)
            wide = torch.randn(y.shape[:-1] + (192, ))
            for dy in (
                    wide[..., 96:],  # row stride 2C
                    torch.randn(y.shape).transpose(0, 1).contiguous()
                    .transpose(0, 1),  # rows in another order in memory
                    torch.randn(96).expand(y.shape),  # rows of stride 0
                    torch.randn(y.shape[::-1]).permute(2, 1, 0)):  # C strided
                grads = torch.autograd.grad(y, (leaf, w, b), dy,
                                            retain_graph=True)
                _, refs = reference(x, w, b, 1e-5, dy)
                dw_scale, db_scale = sum_scale(x, 1e-5, dy)
                assert not grads[0][~inside].any()
                assert_close_to(pick(grads[0]), refs[0], torch.float32)
                assert_close_to(grads[1], refs[1], torch.float32, dw_scale)
                assert_close_to(grads[2], refs[2], torch.float32, db_scale)

    def test_layer_norm_module(self, reported_seed):
        """The kernels for calls autograd does not record, F.layer_norm for
        recorded ones (both with triton_when_recorded)."""
        for make, recorded_calls in ((ln.LayerNorm, 1),
                                     (triton_when_recorded, 0)):
            norm = make(100)
            with torch.no_grad():
                norm.weight.normal_()
                norm.bias.normal_()
            x = torch.randn(2, 3, 100, requires_grad=True)
            with RecordFallbacks() as record, torch.no_grad():
                y = norm(x)
            assert record.calls == 0
            assert_close_to(y, reference(x, norm.weight, norm.bias, norm.eps,
                                         torch.ones_like(x))[0],
                            torch.float32)
            norm.requires_grad_(False)  # x alone makes the call recorded
            with RecordFallbacks() as record:
                norm(x)
            assert record.calls == recorded_calls
            norm.requires_grad_(True)
            x.requires_grad_(False)  # the parameters alone, too
            with RecordFallbacks() as record:
                y = norm(x)
            assert record.calls == recorded_calls
            check_against_float64(y, x, norm.weight, norm.bias, norm.eps,
                                  torch.float32)

    @pytest.mark.usefixtures('cpu_autocast_as_cuda')
    def test_autocast_as_the_gpu_stage_test_runs_it(self, reported_seed):
        """:func:`run_both` under autocast (CPU's for CUDA's): no fallback
        in ``layer_norm``, float32 output, gradients in the inputs'
        dtypes."""
        x, w, b = make_inputs((2, 5, 5, 96), torch.bfloat16)
        (ours, _), (y64, refs), dy, fallbacks = run_both(x, w, b,
                                                         autocast=True)
        assert fallbacks == 0
        assert [t.dtype for t in ours] == [torch.float32, torch.bfloat16,
                                           torch.float32, torch.float32]
        dw_scale, db_scale = sum_scale(x, 1e-5, dy)
        assert_close_to(ours[0], y64, torch.float32)
        assert_close_to(ours[1], refs[0], torch.bfloat16)
        assert_close_to(ours[2], refs[1], torch.float32, dw_scale)
        assert_close_to(ours[3], refs[2], torch.float32, db_scale)

    @pytest.mark.usefixtures('cpu_autocast_as_cuda')
    def test_linear_input_norm_writes_autocast_dtype(self, reported_seed):
        """Under autocast (CPU's for CUDA's) the kernel writes the norm of
        a linear layer's input in bfloat16, a float32 map outside."""
        norm = ln.LayerNorm(96, linear_input=True)
        x = torch.randn(2, 7, 96)
        expected = reference(x, norm.weight, norm.bias, norm.eps, x)[0]
        with torch.no_grad(), RecordFallbacks() as record:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                y = norm(x)
            assert_close_to(y, expected, torch.bfloat16)
            assert_close_to(norm(x), expected, torch.float32)
        assert record.calls == 0

    @pytest.mark.parametrize('channels', [3, 100, 384])
    @pytest.mark.parametrize('autocast', [True, False])
    def test_gated_matches_float64(self, channels, autocast, monkeypatch,
                                   reported_seed):
        """``LayerNorm(x) * SiLU(z)`` in one kernel, z the second half of a
        wider tensor (row stride 2C) as SS2D's gate is: under autocast
        (CPU's for CUDA's) a bfloat16 z and a bfloat16 product, else
        float32."""
        monkeypatch.setattr(ln, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))
        x, w, b = make_inputs((3, 23, channels), torch.float32,
                              grads=(False, False, False))
        wide = torch.randn(3, 23, 2 * channels)
        z = wide[..., channels:].to(
            torch.bfloat16 if autocast else torch.float32)
        with RecordFallbacks() as record, torch.autocast(
                'cpu', dtype=torch.bfloat16, enabled=autocast):
            out = ln.gated_layer_norm(x, z, w, b, 1e-5)
        assert record.calls == 0  # the Triton path ran
        expected = reference(x, w, b, 1e-5, torch.zeros(x.shape))[0] * F.silu(
            z.double())
        dtype = torch.bfloat16 if autocast else torch.float32
        assert out.dtype == dtype and out.shape == x.shape
        # under autocast a bfloat16 product, of a bfloat16 SiLU: two
        # roundings
        rtol = 2 * BF16_RTOL if autocast else 0
        error = (out.double() - expected).abs()
        bound = (rtol + 1e-5) * expected.abs() + 1e-5 * float(
            expected.abs().max()) + 1e-6
        assert bool((error <= bound).all()), float((error / bound).max())

    @pytest.mark.parametrize('channels', [1, 3, 100, 384])
    @pytest.mark.parametrize('z_dtype',
                             [torch.float32, torch.bfloat16, torch.float16])
    def test_gated_backward_matches_float64(self, channels, z_dtype,
                                            reported_seed):
        """The gate's backward kernel, z the second half of a wider tensor
        (row stride 2C) as SS2D's gate is, the gradient in out_proj's
        dtype (z's here), 69 rows (not a multiple of the row block, more
        blocks than programs for C >= 100)."""
        y, w, b = make_inputs((3, 23, channels), torch.float32,
                              grads=(False, False, False))
        z = torch.randn(3, 23, 2 * channels).to(z_dtype)[..., channels:]
        grad = torch.randn(y.shape).to(z_dtype)
        assert z.stride(-2) == 2 * channels
        grads = ln.gated_layer_norm_backward(grad, y, z, w, b, 1e-5,
                                             (True, True, True, True))
        assert_gate_grads_close(grads, y, z, w, b, 1e-5, grad)

    @pytest.mark.parametrize('weight,bias', [(True, True), (True, False),
                                             (False, True), (False, False)])
    @pytest.mark.parametrize('needs', [(True, False, False, False),
                                       (False, True, False, False),
                                       (False, False, True, True),
                                       (True, True, False, True)])
    def test_gated_backward_requested_gradients(self, weight, bias, needs,
                                                reported_seed):
        """Each subset of gradients, with and without weight and bias: None
        for those not requested (or without their parameter); a float32
        gradient of a bfloat16 z (no autocast); a gradient with rows
        apart in memory; eps that matters."""
        y, w, b = make_inputs((2, 9, 100), torch.float32, weight=weight,
                              bias=bias, grads=(False, False, False))
        y = 5 + 0.05 * y  # a small variance
        z = torch.randn(2, 9, 100).bfloat16()
        grad = torch.randn(9, 2, 100).transpose(0, 1)
        grads = ln.gated_layer_norm_backward(grad, y, z, w, b, 1e-3, needs)
        expected = [need and t is not None
                    for need, t in zip(needs, (y, z, w, b))]
        assert [g is not None for g in grads] == expected
        assert_gate_grads_close(grads, y, z, w, b, 1e-3, grad)

    @pytest.mark.usefixtures('cpu_autocast_as_cuda')
    @pytest.mark.parametrize('autocast', [True, False])
    def test_recomputed_output_on_the_gate_kernels(self, autocast,
                                                   gate_backward_calls,
                                                   reported_seed):
        """RecomputedOutput with GATE_BACKWARD_ON_TRITON: the backward runs
        the kernels (the forward's, for out_proj's input, and the gate's
        backward), with ATen's dtypes and its gradients up to float32 and
        the SiLU's and the gated map's roundings to bfloat16; under
        autocast (CPU's for CUDA's) z is bfloat16, as in_proj's output."""
        from mmvmamba.models.backbones import common
        results = run_recomputed_output(common, (2, 5, 7, 48), 24,
                                        'cpu', autocast)
        assert gate_backward_calls == [(True, True, True, True)]
        check_recomputed_output(*results, autocast)

    def test_compile_falls_back_under_the_interpreter(self, reported_seed):
        # interpreted kernels cannot be traced: compiled code runs
        # F.layer_norm, with fullgraph=True too
        norm = ln.LayerNorm(96)
        compiled = torch.compile(norm, fullgraph=True, backend='eager')
        x = torch.randn(3, 96)
        assert torch.equal(compiled(x), F.layer_norm(x, (96, ), norm.weight,
                                                     norm.bias))


test_kernels_in_triton_interpreter = interpreter_test(__file__, 32)


# ---------------------------------------------------------------------------
# The choice of path, dtypes, the module (no kernel runs here)


def test_backward_launch_config(monkeypatch):
    """The backward without the gate tiles by BACKWARD_TILE_ELEMENTS, the
    forward by TILE_ELEMENTS; the gate's backward falls back to the
    former for widths GATE_BACKWARD_LAUNCH does not list."""
    monkeypatch.setattr(ln, 'TILE_ELEMENTS', 4096)
    monkeypatch.setattr(ln, 'BACKWARD_TILE_ELEMENTS', 2048)
    monkeypatch.setattr(ln, 'BACKWARD_PROGRAMS_PER_SM', 4)
    assert ln.launch_config(96) == (128, 32, 8)
    assert ln.backward_launch_config(96) == (128, 16, 4, 4)
    assert ln.backward_launch_config(768) == (1024, 2, 4, 4)
    assert ln.backward_launch_config(3000) == (4096, 1, 8, 4)
    monkeypatch.setattr(ln, 'GATE_BACKWARD_LAUNCH', {})
    assert ln.gate_backward_launch_config(96) == (128, 16, 4, 4)


def test_gate_backward_launch_config(monkeypatch):
    """The gate's backward takes its width's entry of GATE_BACKWARD_LAUNCH
    (C padded to a power of two), else the plain backward's setting;
    programs are per_sm a CUDA SM, at most one a row block."""
    monkeypatch.setattr(ln, 'GATE_BACKWARD_LAUNCH', {256: (2048, 16, 2)})
    assert ln.gate_backward_launch_config(192) == (256, 8, 16, 2)
    assert ln.gate_backward_launch_config(256) == (256, 8, 16, 2)
    assert ln.gate_backward_launch_config(384) == \
        ln.backward_launch_config(384)
    monkeypatch.setattr(ln, 'GATE_BACKWARD_LAUNCH', {512: (256, 4, 8)})
    assert ln.gate_backward_launch_config(384) == (512, 1, 4, 8)

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, 'get_device_properties',
                        lambda device: Props)
    cuda = torch.device('cuda')
    assert ln._backward_programs(10_000, 2, cuda) == 264
    assert ln._backward_programs(10_000, 4, cuda) == 528
    assert ln._backward_programs(100, 4, cuda) == 100
    assert ln._backward_programs(10_000, 4, torch.device('cpu')) == \
        ln.BACKWARD_PROGRAMS_OFF_CUDA


def test_result_dtype():
    x32, x16 = torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bfloat16)
    p32, p16 = torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)
    p64 = torch.zeros(4, dtype=torch.float64)
    rd = ln.result_dtype
    # under CUDA autocast: float32 whatever comes in
    assert rd(x16, p32, p32, autocast=True) is torch.float32
    assert rd(x16, p16, None, autocast=True) is torch.float32
    assert rd(x32, None, None, autocast=True) is torch.float32
    # otherwise x's dtype, the parameters having it too
    assert rd(x16, p16, p16, autocast=False) is torch.bfloat16
    assert rd(x32, p32, None, autocast=False) is torch.float32
    assert rd(x16, None, None, autocast=False) is torch.bfloat16
    assert rd(x16, p32, p32, autocast=False) is None  # mixed
    assert rd(x32, p64, p64, autocast=True) is None  # float64
    assert rd(x32.double(), None, None, autocast=False) is None


@needs_triton
def test_unsupported_reasons(triton_on_cpu, monkeypatch):
    x = torch.randn(4, 6, 96)
    w = torch.randn(96)
    assert ln.unsupported_reason(x, w, w) is None
    assert ln.unsupported_reason(x.permute(0, 2, 1).contiguous()
                                 .permute(0, 2, 1)).startswith(
                                     'x is not contiguous in its last')
    assert ln.unsupported_reason(x[..., ::2]).startswith('x is not contig')
    assert ln.unsupported_reason(torch.randn(2, 8193)) == (
        'C = 8193 is above MAX_CHANNELS = 8192')
    assert ln.unsupported_reason(torch.randn(2, 8192)) is None
    assert ln.unsupported_reason(torch.randn(1, 4).t()) is None  # C = 1
    assert 'no rows' in ln.unsupported_reason(torch.randn(0, 96))
    assert 'no rows' in ln.unsupported_reason(torch.tensor(1.))
    assert ln.unsupported_reason(x, torch.randn(95)) == (
        'weight has shape (95,), not (96,)')
    assert 'bias is not a contiguous' in ln.unsupported_reason(
        x, w, torch.randn(192)[::2])
    assert 'float64' in ln.unsupported_reason(x.double())
    assert 'are not covered' in ln.unsupported_reason(x.bfloat16(), w, w)
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', ))
    assert ln.unsupported_reason(x) == (
        'x is on cpu; the kernels take tensors on cuda')
    monkeypatch.setattr(ln, 'TRITON_IMPORT_ERROR', 'Triton is not '
                        'importable: no module')
    assert ln.unsupported_reason(x) == 'Triton is not importable: no module'


@needs_triton
def test_gate_unsupported_reasons(triton_on_cpu):
    x, w = torch.randn(4, 6, 96), torch.randn(96)
    z = torch.randn(4, 6, 192)[..., 96:]
    reason = ln.gate_unsupported_reason
    assert reason(x, z, w, w) is None
    assert reason(x, z.bfloat16(), w, w) is None
    # dtypes the plain kernel takes but the gated one does not
    assert reason(x.bfloat16(), z, None, None) == (
        'x is torch.bfloat16; the gated kernel takes float32 x, weight and '
        'bias')
    assert reason(x.half(), z, w.half(), None).startswith('x is torch.fl')
    assert reason(x, z[:, :5], w, w) == (
        "z ((4, 5, 96) on cpu) is not of x's shape (4, 6, 96) on cpu")
    assert reason(x, z.double(), w, w).startswith('z is torch.float64')
    assert reason(x, torch.randn(4, 96, 6).transpose(1, 2), w, w) == (
        'z is not contiguous in its last dimension (stride 6)')
    w.requires_grad_()  # a recorded call never takes the kernel
    assert 'records' in reason(x, z, w, w)
    with torch.no_grad():
        assert reason(x, z, w, w) is None


@needs_triton
def test_gate_backward_reasons(monkeypatch):
    """RecomputedOutput's backward takes the Triton kernels only with
    GATE_BACKWARD_ON_TRITON (on by default) and where the gated kernel
    takes the inputs."""
    from mmvmamba.models.backbones import common
    y, w = torch.randn(4, 6, 96), torch.randn(96)
    z = torch.randn(4, 6, 192).bfloat16()[..., 96:]
    reason = common.gate_backward_reason
    assert common.GATE_BACKWARD_ON_TRITON
    monkeypatch.setattr(common, 'GATE_BACKWARD_ON_TRITON', False)
    assert reason(y, z, w, w, torch.bfloat16) == (
        'GATE_BACKWARD_ON_TRITON is off')
    monkeypatch.setattr(common, 'GATE_BACKWARD_ON_TRITON', True)
    assert reason(y, z, w, w, torch.bfloat16).startswith('x is on cpu')
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
    assert reason(y, z, w, w, torch.bfloat16) is None
    assert reason(y, None, w, w, torch.float32) == 'no gate (z is None)'
    assert reason(y, z, w, w, torch.float64) == (
        'out_proj ran in torch.float64')
    assert reason(y.bfloat16(), z, None, None, torch.bfloat16).startswith(
        'x is torch.bfloat16')
    w.requires_grad_()  # a double backward (create_graph) records
    assert 'records' in reason(y, z, w, w, torch.bfloat16)


@pytest.mark.parametrize('autocast', [False, True])
def test_recomputed_output_on_cpu_keeps_aten_with_the_policy_on(
        autocast, monkeypatch):
    """With GATE_BACKWARD_ON_TRITON on, CPU tensors (by default) still take
    the ATen backward: the plain graph's gradients, bit for bit."""
    from mmvmamba.models.backbones import common
    monkeypatch.setattr(common, 'GATE_BACKWARD_ON_TRITON', True)
    monkeypatch.setattr(ln, 'gated_layer_norm_backward', None)  # not called
    torch.manual_seed(0)
    norm, proj = nn.LayerNorm(24), nn.Linear(24, 10, bias=False)
    y = torch.randn(2, 5, 7, 24)
    z = torch.randn(2, 5, 7, 48)[..., 24:]
    grad = torch.randn(2, 5, 7, 10)
    results = []
    for recompute in (False, True):
        inputs = [t.clone().requires_grad_() for t in (y, z)]
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = common.ss2d_output(*inputs, norm, proj, recompute)
        results.append((out, ) + torch.autograd.grad(
            out, (*inputs, norm.weight, norm.bias, proj.weight),
            grad.to(out.dtype)))
    for plain, lean in zip(*results):
        assert plain.dtype == lean.dtype and torch.equal(plain, lean)


def test_gated_falls_back_to_aten_ops(monkeypatch):
    """Recorded calls (and CPU tensors by default) run the ATen ops: the
    plain graph's values and gradients, cast to the linear layer's dtype
    under autocast (CPU's taken for CUDA's)."""
    monkeypatch.setattr(ln, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))
    x = torch.randn(2, 5, 48, requires_grad=True)
    w, b = torch.randn(48, requires_grad=True), torch.randn(48)
    z = torch.randn(2, 5, 96)[..., 48:].bfloat16()
    for autocast in (False, True):
        with RecordFallbacks() as record, torch.autocast(
                'cpu', dtype=torch.bfloat16, enabled=autocast):
            out = ln.gated_layer_norm(x, z, w, b, 1e-4)
            plain = F.layer_norm(x, (48, ), w, b, 1e-4) * F.silu(z)
        assert record.calls == 2
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.equal(out, plain.to(out.dtype))
        grads = torch.autograd.grad(out.float().sum(), (x, w))
        expected = torch.autograd.grad(plain.to(out.dtype).float().sum(),
                                       (x, w))
        assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    # a given out_dtype (a recomputing backward's) wins over autocast's
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = ln.gated_layer_norm(x, z, w, b, 1e-4, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    assert torch.equal(out, (F.layer_norm(x, (48, ), w, b, 1e-4) *
                             F.silu(z)).half())


@pytest.mark.parametrize('z,match', [
    (torch.randn(48), r'z must have shape \(2, 5, 48\), got \(48,\)'),
    (torch.randn(3, 2, 5, 48), r'z must have shape \(2, 5, 48\)'),
    (None, 'z must be a torch.Tensor, got NoneType'),
])
def test_gated_refuses_a_z_not_of_x_shape(z, match):
    """A z that broadcasts against x gave a map of another shape, or x's
    shape from one gate row for all (was taken silently)."""
    x, w = torch.randn(2, 5, 48), torch.randn(48)
    with pytest.raises(ValueError, match=match):
        ln.gated_layer_norm(x, z, w, w)


@pytest.mark.parametrize('call', [
    lambda x, dtype: ln.layer_norm(x, out_dtype=dtype),
    lambda x, dtype: ln.gated_layer_norm(x, x, out_dtype=dtype),
    lambda x, dtype: ln.add_layer_norm(x, x, out_dtype=dtype),
])
@pytest.mark.parametrize('dtype', ['float16', torch.int32, torch.bool, 16])
def test_out_dtype_must_be_a_floating_dtype(call, dtype):
    """A string was read as a device ('Invalid device string'), an integer
    or bool dtype took the norm's values cast to it, silently."""
    with pytest.raises(ValueError, match=r'out_dtype must be None or a '
                       r'floating-point torch.dtype, got '):
        call(torch.randn(2, 5, 48), dtype)


@pytest.mark.parametrize('make', [
    lambda: (torch.randn(3, 5, 96), torch.randn(96), torch.randn(96)),
    lambda: (torch.randn(3, 96, 5).transpose(1, 2), torch.randn(96), None),
    lambda: (torch.randn(2, 8200), torch.randn(8200), torch.randn(8200)),
    lambda: (torch.randn(3, 16).double(), torch.randn(16).double(), None),
    lambda: (torch.randn(3, 16).bfloat16(), torch.randn(16), None),
])
def test_falls_back_to_f_layer_norm(make, monkeypatch):
    """CPU tensors (by default), a last dimension not contiguous, C above
    the limit, float64, mixed dtypes outside autocast: F.layer_norm, with
    its very results."""
    x, w, b = make()
    if x.dim() == 3 and x.stride(-1) == 1:
        assert 'x is on cpu' in ln.unsupported_reason(x, w, b)
    else:  # would be taken on the CPU if CPU tensors were allowed
        monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
        assert ln.unsupported_reason(x, w, b) is not None
    x.requires_grad_()
    with RecordFallbacks() as record:
        y = ln.layer_norm(x, w, b, 1e-3)
    assert record.calls == 1
    expected = F.layer_norm(x, x.shape[-1:], w, b, 1e-3)
    assert y.dtype == expected.dtype and torch.equal(y, expected)


def test_linear_input_norm_casts_recorded_calls():
    """Recorded calls (and CPU ones): ``F.layer_norm``'s result cast to
    autocast's dtype under autocast, as the linear layer after it would
    cast it; gradients through the cast; nothing changes outside."""
    norm = ln.LayerNorm(24, linear_input=True)
    assert norm.linear_input and not ln.LayerNorm(24).linear_input
    assert norm.state_dict().keys() == nn.LayerNorm(24).state_dict().keys()
    x = torch.randn(3, 5, 24, requires_grad=True)
    expected = F.layer_norm(x, (24, ), norm.weight, norm.bias)
    assert torch.equal(norm(x), expected)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected.bfloat16())
    dy = torch.randn(y.shape, dtype=torch.bfloat16)
    assert torch.equal(torch.autograd.grad(y, x, dy)[0],
                       torch.autograd.grad(expected.bfloat16(), x, dy)[0])


def test_layer_norm_module_is_nn_layer_norm():
    norm = ln.LayerNorm(96, eps=1e-6)
    plain = nn.LayerNorm(96, eps=1e-6)
    assert isinstance(norm, nn.LayerNorm)
    assert list(norm.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        plain.weight.normal_()
        plain.bias.normal_()
    norm.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 96)
    assert torch.equal(norm(x), plain(x))  # F.layer_norm on the CPU
    for kwargs in (dict(bias=False), dict(elementwise_affine=False)):
        a, b = ln.LayerNorm(8, **kwargs), nn.LayerNorm(8, **kwargs)
        assert list(a.state_dict()) == list(b.state_dict())
        assert torch.equal(a(x[..., :8]), b(x[..., :8]))
    wide = ln.LayerNorm((4, 96))  # two normalised dimensions
    assert torch.equal(wide(x), F.layer_norm(x, (4, 96), wide.weight,
                                             wide.bias))
    with pytest.raises(RuntimeError):
        ln.LayerNorm(95)(x)  # F.layer_norm's own error
    # 'no' was taken for True
    for flag in ('linear_input', 'triton_when_recorded'):
        with pytest.raises(ValueError, match=f"{flag} must be a bool, got "
                           "'no'"):
            ln.LayerNorm(96, **{flag: 'no'})


def test_replace_layer_norms():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8),
                          nn.Sequential(nn.LayerNorm(8, bias=False)),
                          ln.LayerNorm(8), nn.GroupNorm(2, 8))
    weight = model[1].weight
    keys = list(model.state_dict())
    assert ln.replace_layer_norms(model) == 2
    assert type(model[1]) is ln.LayerNorm
    assert type(model[2][0]) is ln.LayerNorm
    assert type(model[4]) is nn.GroupNorm
    assert model[1].weight is weight and list(model.state_dict()) == keys
    assert ln.replace_layer_norms(model) == 0


@needs_triton
@pytest.mark.skipif(INTERPRETED or not ln.COMPILE_OPS,
                    reason='needs torch.library.triton_op and JIT kernels')
def test_custom_ops_trace_with_fake_tensors():
    """What torch.compile traces: the custom ops and their autograd on
    fake tensors (nothing runs), with the eager path's dtypes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, w, b, dy):
        y = torch.ops.mmvmamba.layer_norm_fwd(x, w, b, 1e-5,
                                              torch.float32)[0]
        return (y, ) + torch.autograd.grad(y, (x, w, b), dy)

    x = torch.randn(2, 37, 96, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    graph = make_fx(step, tracing_mode='fake')(x, w, b, torch.randn(2, 37,
                                                                     96))
    ops = [str(n.target) for n in graph.graph.nodes
           if n.op == 'call_function']
    assert 'mmvmamba.layer_norm_fwd.default' in ops
    assert 'mmvmamba.layer_norm_bwd.default' in ops
    out = [n for n in graph.graph.nodes if n.op == 'output'][0].args[0]
    assert [(tuple(o.meta['val'].shape), o.meta['val'].dtype)
            for o in out] == [((2, 37, 96), torch.float32),
                              ((2, 37, 96), torch.bfloat16),
                              ((96, ), torch.float32), ((96, ), torch.float32)]


@needs_triton
@pytest.mark.skipif(INTERPRETED or not ln.COMPILE_OPS,
                    reason='needs torch.library.triton_op and JIT kernels')
def test_dynamo_traces_layer_norm_into_the_custom_op(triton_on_cpu):
    """``torch.export`` (Dynamo, strict, fake tensors: no kernel runs) sees
    the custom op in one graph."""

    class Norm(nn.Module):

        def __init__(self):
            super().__init__()
            self.norm = triton_when_recorded(96)

        def forward(self, x):
            return self.norm(x)

    program = torch.export.export(Norm(), (torch.randn(2, 5, 96), ),
                                  strict=True)
    targets = [str(n.target) for n in program.graph.nodes
               if n.op == 'call_function']
    assert 'mmvmamba.layer_norm_fwd.default' in targets
    assert 'aten.layer_norm.default' not in targets


# ---------------------------------------------------------------------------
# On the GPU

#: Stage maps of VMamba-T / VMamba2-T at 224, batch 128.
STAGE_SHAPES = [(128, 56, 56, 96), (128, 28, 28, 192), (128, 14, 14, 384),
                (128, 7, 7, 768)]


def run_both(x, w, b, eps=1e-5, autocast=False, dy=None):
    """Output and gradients of ``layer_norm`` and of ``F.layer_norm`` under
    the same autocast setting (bf16, of ``x``'s device), the float64
    reference, the output gradient, and how many times ``layer_norm``
    called ``F.layer_norm`` (0: the Triton path ran)."""
    results, calls = [], []
    for fn in (ln.layer_norm,
               lambda *a: F.layer_norm(a[0], a[0].shape[-1:], *a[1:])):
        with torch.autocast(x.device.type, dtype=torch.bfloat16,
                            enabled=autocast), RecordFallbacks() as record:
            y = fn(x, w, b, eps)
        calls.append(record.calls)
        if dy is None:
            dy = torch.randn(y.shape, device=y.device, dtype=y.dtype)
        results.append((y, ) + torch.autograd.grad(y, (x, w, b), dy))
    assert calls[1] == 1  # the count sees F.layer_norm
    return results, reference(x, w, b, eps, dy), dy, calls[0]


@needs_cuda
@pytest.mark.parametrize('shape', STAGE_SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_gpu_stage_shapes_match_float64_and_dtypes_of_f_layer_norm(
        shape, dtype, reported_seed):
    """Under bf16 autocast (bf16 and fp32 maps, fp32 parameters) as the
    backbones run: same dtypes as F.layer_norm; values within the float32
    bounds of :func:`assert_close_to` of float64 (the gradient of a bf16 x
    within its rounding to bf16); F.layer_norm's errors are printed
    beside them."""
    x, w, b = make_inputs(shape, dtype, device='cuda')
    (ours, aten), (y64, refs), dy, fallbacks = run_both(x, w, b,
                                                        autocast=True)
    assert fallbacks == 0  # the Triton path ran
    assert [t.dtype for t in ours] == [t.dtype for t in aten]
    dw_scale, db_scale = sum_scale(x, 1e-5, dy)
    for name, result in (('F.layer_norm', aten), ('Triton', ours)):
        print(name, 'largest error of y, dx, dw, db:', [
            float((r.double() - e).abs().max())
            for r, e in zip(result, [y64] + refs)])
    assert_close_to(ours[0], y64, torch.float32)
    assert_close_to(ours[1], refs[0], dtype)
    assert_close_to(ours[2], refs[1], torch.float32, dw_scale)
    assert_close_to(ours[3], refs[2], torch.float32, db_scale)


@needs_cuda
@pytest.mark.parametrize('channels', [1, 3, 100, 768, 4100, 8192])
@pytest.mark.parametrize('dtype',
                         [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_odd_shapes_without_autocast(channels, dtype, reported_seed):
    x, w, b = make_inputs((3, 37, channels), dtype, dtype, device='cuda')
    (ours, aten), (y64, refs), dy, fallbacks = run_both(x, w, b, eps=1e-3)
    assert fallbacks == 0
    assert [t.dtype for t in ours] == [t.dtype for t in aten]
    dw_scale, db_scale = sum_scale(x, 1e-3, dy)
    assert_close_to(ours[0], y64, dtype)
    assert_close_to(ours[1], refs[0], dtype)
    assert_close_to(ours[2], refs[1], dtype, dw_scale)
    assert_close_to(ours[3], refs[2], dtype, db_scale)


@needs_cuda
def test_gpu_backward_is_deterministic(reported_seed):
    x, w, b = make_inputs((64, 28, 28, 192), torch.bfloat16, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y = ln.layer_norm(x, w, b)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    again = torch.autograd.grad(y, (x, w, b), dy)
    assert all(torch.equal(p, q) for p, q in zip(first, again))


@needs_cuda
def test_gpu_paths(reported_seed):
    x, w, b = make_inputs((4, 7, 96), torch.float32, device='cuda',
                          grads=(False, False, False))
    assert ln.unsupported_reason(x, w, b) is None
    cases = [(x, w, b, 0), (x.transpose(0, 1), w, b, 0),
             (x.transpose(1, 2).contiguous().transpose(1, 2), w, b, 1),
             (torch.randn(3, 8193, device='cuda'), None, None, 1),
             (x.double(), w.double(), b.double(), 1),
             (x.bfloat16(), w, b, 1)]  # mixed dtypes, no autocast
    for x_, w_, b_, calls in cases:
        try:
            expected = F.layer_norm(x_, x_.shape[-1:], w_, b_)
        except RuntimeError as error:  # mixed dtypes, if ATen refuses them
            with pytest.raises(type(error)):
                ln.layer_norm(x_, w_, b_)
            continue
        with RecordFallbacks() as record:
            y = ln.layer_norm(x_, w_, b_)
        assert record.calls == calls
        assert y.dtype == expected.dtype
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.skipif(not ln.COMPILE_OPS, reason='needs triton_op')
@pytest.mark.parametrize('autocast', [False, True])
def test_gpu_compile_fullgraph_matches_eager(autocast, reported_seed):
    """torch.compile (Inductor, fullgraph) runs the custom op, with the
    eager values up to float32 rounding (the weight and bias sums may be
    compiled otherwise) and dtypes."""
    from torch._inductor import compile as inductor_compile
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return inductor_compile(graph, example_inputs)

    norm = triton_when_recorded(192).cuda()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    dtype = torch.bfloat16 if autocast else torch.float32
    x = torch.randn(8, 14, 14, 192, device='cuda').to(dtype).requires_grad_()
    results, dy = [], None
    for module in (norm, torch.compile(norm, fullgraph=True,
                                       backend=backend)):
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
            y = module(x)
        dy = torch.randn_like(y) if dy is None else dy
        results.append((y, ) + torch.autograd.grad(
            y, (x, norm.weight, norm.bias), dy))
    assert any('mmvmamba.layer_norm_fwd' in str(node.target)
               for graph in graphs for node in graph.graph.nodes)
    for eager, compiled in zip(*results):
        assert eager.dtype == compiled.dtype
        # bfloat16: one unit in the last place (a float32 intermediate
        # compiled otherwise can round the other way)
        rtol = 2**-7 if eager.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(compiled, eager, rtol=rtol, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize('shape', STAGE_SHAPES)
@pytest.mark.parametrize('z_dtype', [torch.bfloat16, torch.float32])
def test_gpu_gated_layer_norm(shape, z_dtype, reported_seed):
    """SS2D's output gate at stage shapes (y float32, z the second half of
    in_proj's output) under bf16 autocast, and a float32 z without: within
    float32 and the product's roundings of float64, and of the ATen ops'
    result (one bf16 unit: a SiLU rounded the other way)."""
    y, w, b = make_inputs(shape, torch.float32, device='cuda',
                          grads=(False, False, False))
    z = torch.randn(shape[:-1] + (2 * shape[-1], ), device='cuda')[
        ..., shape[-1]:].to(z_dtype)
    autocast = z_dtype == torch.bfloat16
    assert ln.gate_unsupported_reason(y, z, w, b) is None
    with RecordFallbacks() as record, torch.autocast(
            'cuda', dtype=torch.bfloat16, enabled=autocast):
        out = ln.gated_layer_norm(y, z, w, b)
        aten = (F.layer_norm(y, shape[-1:], w, b) * F.silu(z)).to(out.dtype)
    assert record.calls == 1  # the ATen line alone
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    expected = reference(y, w, b, 1e-5, torch.zeros_like(y))[0] * F.silu(
        z.double())
    rtol = 2 * 2**-8 if autocast else 2e-6
    scale = float(expected.abs().max())
    for result in (out, aten):
        error = (result.double() - expected).abs()
        assert bool((error <= rtol * expected.abs() + 1e-5 * scale).all())
    torch.testing.assert_close(out, aten, rtol=2**-7 if autocast else 1e-5,
                               atol=1e-5 * scale)


#: SS2D's gate maps (B, H, W, E = 2C) of VMamba-T at 224, batch 128, and
#: out_proj's output width C.
GATE_SHAPES = [((128, 56, 56, 192), 96), ((128, 28, 28, 384), 192),
               ((128, 14, 14, 768), 384), ((128, 7, 7, 1536), 768)]


@needs_cuda
@pytest.mark.parametrize('shape,out_channels', GATE_SHAPES)
def test_gpu_recomputed_output_on_the_gate_kernels(shape, out_channels,
                                                   gate_backward_calls,
                                                   reported_seed):
    """RecomputedOutput under bf16 autocast at VMamba-T's gate shapes (y
    float32, z the bf16 second half of in_proj's output): the Triton
    backward against ATen's, both within float32 and bf16 roundings of
    float64 (:func:`check_recomputed_output`)."""
    from mmvmamba.models.backbones import common
    results = run_recomputed_output(common, shape, out_channels, 'cuda',
                                    True)
    assert gate_backward_calls == [(True, True, True, True)]
    check_recomputed_output(*results, True)


@needs_cuda
def test_gpu_recomputed_output_on_the_gate_kernels_float32(
        gate_backward_calls, reported_seed):
    """The same without autocast: float32 throughout."""
    from mmvmamba.models.backbones import common
    results = run_recomputed_output(common, (8, 28, 28, 384), 192, 'cuda',
                                    False)
    assert gate_backward_calls == [(True, True, True, True)]
    check_recomputed_output(*results, False)


@needs_cuda
def test_gpu_backbone_norms(reported_seed, monkeypatch):
    """A small VMamba's norms are the Triton LayerNorm, its out_norms the
    gated kernel: under bf16 autocast, inference runs the kernels (where
    the map is contiguous in C) with the ATen ops' features up to bf16
    rounding; a training step runs the module norms on the kernels too
    (vmamba.NORMS_TRAIN_ON_TRITON), with ATen's gradients up to bf16
    rounding, and the gated kernel inside the recomputing Function's
    forward."""
    from mmvmamba.models import VMamba
    from mmvmamba.models.backbones import vmamba
    from mmvmamba.ops import depthwise_conv
    assert vmamba.NORMS_TRAIN_ON_TRITON
    model = VMamba(dict(embed_dims=32, depths=[1, 1, 2, 1]),
                   drop_path_rate=0.).cuda().eval()
    norms = [m for m in model.modules() if type(m) is ln.LayerNorm]
    assert len(norms) == 1 + 5 + 3 + 1  # embed, blocks, merges, out
    x = torch.randn(2, 3, 64, 64, device='cuda')

    def step(record):
        """A training step's gradients, the forward's calls in record."""
        model.zero_grad()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            with record:
                outs = model(x)
            sum(out.float().square().mean() for out in outs).backward()
        return [p.grad.clone() for p in model.parameters()]

    with torch.autocast('cuda', dtype=torch.bfloat16):
        with torch.no_grad(), RecordFallbacks() as inference:
            got = model(x)[-1]
    # the patch embedding's conv writes a channels-last map, so its norm
    # reads contiguous rows too
    assert inference.calls == 0
    training = RecordFallbacks()
    grads = step(training)
    assert training.calls == 0
    # the reference: ATen's norms, gate and convolutions (cuDNN)
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ())
    monkeypatch.setattr(depthwise_conv, 'TRITON_DEVICE_TYPES', ())
    with torch.autocast('cuda', dtype=torch.bfloat16):
        with torch.no_grad(), RecordFallbacks() as aten:
            expected = model(x)[-1]
    assert aten.calls == len(norms) + 5  # and the five out_norms
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    aten_training = RecordFallbacks()
    expected_grads = step(aten_training)
    assert aten_training.calls == len(norms) + 5
    for grad, ref in zip(grads, expected_grads):
        scale = ref.abs().max().clamp_min(1e-6)
        assert (grad - ref).abs().max() <= 3e-2 * scale
