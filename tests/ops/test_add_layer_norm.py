"""mmvmamba.ops.layer_norm.add_layer_norm: a residual add and the LayerNorm
of its sum in one Triton kernel, against torch's add and float64
``F.layer_norm``; its fallbacks; VMamba's stages with the add and the next
block's norm fused (``vmamba.ADD_NORM_ON_TRITON``) and not.

The kernel runs here on the CPU in Triton's interpreter:
:func:`test_kernel_in_triton_interpreter` runs :class:`TestInterpreted` in a
fresh process with ``TRITON_INTERPRET=1``. The GPU tests skip without CUDA.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_layer_norm import RecordFallbacks, assert_close_to
from torch.overrides import TorchFunctionMode

from mmvmamba.models import VMamba
from mmvmamba.models.backbones import vmamba
from mmvmamba.ops import layer_norm as ln
from triton_marks import (INTERPRETED, interpreted, interpreter_test,
                          needs_cuda, needs_triton)

#: A VMamba with stages of 2, 1, 3 and 1 blocks: 3 fused add + norm pairs.
ARCH = dict(embed_dims=16, depths=[2, 1, 3, 1])
FUSED_PAIRS = sum(d - 1 for d in ARCH['depths'])
ADD_FUNCTIONS = (torch.add, torch.Tensor.add, torch.Tensor.__add__,
                 torch.Tensor.__radd__)


class CountAdds(TorchFunctionMode):
    """Counts the tensor additions in a block: the plain path adds
    ``x + update`` with torch, the fused kernel does not."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ADD_FUNCTIONS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Let CPU tensors take the Triton kernels (in the interpreter), CPU
    autocast taken for CUDA's."""
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
    monkeypatch.setattr(ln, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))


def truncated_to_bfloat16(t: torch.Tensor) -> torch.Tensor:
    """float32 ``t`` rounded toward zero to bfloat16 (the low 16 bits
    dropped), as Triton's interpreter converts it."""
    return (t.view(torch.int32) & -65536).view(torch.float32).bfloat16()


def expected_sum(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """What the kernel writes for ``x + update``: torch's sum; in the
    interpreter a bfloat16 sum is the float32 sum truncated."""
    total = x + update
    if INTERPRETED and total.dtype == torch.bfloat16:
        return truncated_to_bfloat16(x.float() + update.float())
    return total


def norm64(total, weight, bias, eps=1e-5):
    """float64 ``F.layer_norm`` of the sum's values."""
    return F.layer_norm(total.double(), total.shape[-1:],
                        None if weight is None else weight.double(),
                        None if bias is None else bias.double(), eps)


def make_pair(shape, x_dtype, update_dtype, param_dtype=torch.float32,
              device='cpu'):
    channels = shape[-1]
    x = torch.randn(shape, device=device).to(x_dtype)
    update = torch.randn(shape, device=device).to(update_dtype)
    weight = (1 + 0.5 * torch.randn(channels, device=device)).to(param_dtype)
    bias = (0.5 * torch.randn(channels, device=device)).to(param_dtype)
    return x, update, weight, bias


def check_fused(x, update, weight, bias, autocast, out_dtype, eps=1e-5):
    """Run :func:`add_layer_norm` (CPU autocast taken for CUDA's) and
    check that the kernel ran, the sum is torch's and the norm within
    float32 (and its rounding to ``out_dtype``) of float64."""
    with RecordFallbacks() as norms, CountAdds() as adds, torch.autocast(
            'cpu', dtype=torch.bfloat16, enabled=autocast):
        total, normed = ln.add_layer_norm(x, update, weight, bias, eps,
                                          out_dtype)
    assert norms.calls == 0 and adds.calls == 0  # the kernel ran
    expected = expected_sum(x, update)
    assert total.dtype == expected.dtype and total.shape == x.shape
    assert torch.equal(total, expected)
    if out_dtype is None:
        out_dtype = torch.float32 if autocast else total.dtype
    assert normed.shape == x.shape
    assert_close_to(normed, norm64(total, weight, bias, eps), out_dtype)


# ---------------------------------------------------------------------------
# In Triton's interpreter (CPU tensors)

#: (x, update, parameters, autocast, out_dtype): VMamba's first stage
#: under bf16 autocast (float32 residual, bf16 SS2D output, the norm in
#: bf16 for in_proj), the later stages (a bf16 residual after the patch
#: merging), autocast's float32 norm, and no autocast in each dtype, mixed.
CASES = {
    'f32+bf16 autocast': (torch.float32, torch.bfloat16, torch.float32, True,
                          torch.bfloat16),
    'bf16+bf16 autocast': (torch.bfloat16, torch.bfloat16, torch.float32,
                           True, torch.bfloat16),
    'bf16+bf16 autocast f32 norm': (torch.bfloat16, torch.bfloat16,
                                    torch.float32, True, None),
    'f32': (torch.float32, torch.float32, torch.float32, False, None),
    'bf16': (torch.bfloat16, torch.bfloat16, torch.bfloat16, False, None),
    'fp16': (torch.float16, torch.float16, torch.float16, False, None),
    'fp16+bf16 (float32 sum)': (torch.float16, torch.bfloat16, torch.float32,
                                False, None),
    'bf16+f32 (float32 sum)': (torch.bfloat16, torch.float32, torch.float32,
                               False, None),
}


@interpreted
@pytest.mark.usefixtures('kernel_on_cpu')
class TestInterpreted:
    """The kernel, run by Triton's interpreter on CPU tensors."""

    @pytest.mark.parametrize('channels', [7, 96, 100, 384])
    @pytest.mark.parametrize('case', list(CASES))
    def test_matches_torch_add_and_float64(self, channels, case,
                                           reported_seed):
        # 3 x 23 = 69 rows: not a multiple of the row block
        x_dtype, u_dtype, p_dtype, autocast, out_dtype = CASES[case]
        x, update, w, b = make_pair((3, 23, channels), x_dtype, u_dtype,
                                    p_dtype)
        check_fused(x, update, w, b, autocast, out_dtype)

    @pytest.mark.parametrize('shape', [(1, 96), (257, 100), (2, 3, 5, 1)])
    def test_odd_row_counts(self, shape, reported_seed):
        x, update, w, b = make_pair(shape, torch.float32, torch.bfloat16)
        check_fused(x, update, w, b, True, torch.bfloat16)

    @pytest.mark.parametrize('weight,bias', [(True, False), (False, True),
                                             (False, False)])
    def test_without_weight_or_bias(self, weight, bias, reported_seed):
        x, update, w, b = make_pair((5, 9, 100), torch.float32, torch.float32)
        check_fused(x, update, w if weight else None, b if bias else None,
                    False, None, eps=1e-3)

    def test_strided_rows(self, reported_seed):
        """x the first half of a wider tensor, the update the second half
        (rows 2C apart): the kernel reads them as they are."""
        wide = torch.randn(4, 6, 192)
        update = torch.randn(4, 6, 192).bfloat16()[..., 96:]
        _, _, w, b = make_pair((1, 96), torch.float32, torch.float32)
        check_fused(wide[..., :96], update, w, b, True, torch.bfloat16)

    def test_recorded_calls_run_the_plain_ops(self, reported_seed):
        """A call autograd records: ``x + update`` (torch's add) and
        :func:`layer_norm`, with gradients; the same values as the kernel's
        without autograd."""
        x, update, w, b = make_pair((3, 7, 96), torch.float32, torch.bfloat16)
        x.requires_grad_()
        with CountAdds() as adds:
            total, normed = ln.add_layer_norm(x, update, w, b)
        assert adds.calls == 1 and normed.requires_grad
        assert 'records' in ln.add_unsupported_reason(x, update, w, b)
        grad = torch.autograd.grad(normed.sum(), x)[0]
        expected = torch.autograd.grad(
            F.layer_norm(x + update, (96, ), w, b).sum(), x)[0]
        torch.testing.assert_close(grad, expected)
        with torch.no_grad(), CountAdds() as adds:
            fused = ln.add_layer_norm(x, update, w, b)
        assert adds.calls == 0
        assert torch.equal(fused[0], total)
        torch.testing.assert_close(fused[1], normed, rtol=1e-5, atol=1e-5)

    def test_compile_runs_the_plain_ops(self):
        """``torch.compile`` (fullgraph) traces ``x + update`` and the
        norm (here ``F.layer_norm``: interpreted kernels are not traced)."""
        x, update, w, b = make_pair((3, 96), torch.float32, torch.float32)
        compiled = torch.compile(ln.add_layer_norm, fullgraph=True,
                                 backend='eager')
        total, normed = compiled(x, update, w, b)
        assert torch.equal(total, x + update)
        assert torch.equal(normed, F.layer_norm(x + update, (96, ), w, b))

    @pytest.mark.parametrize('autocast', [False, True])
    def test_vmamba_stages_fused_match_unfused(self, autocast, monkeypatch,
                                               reported_seed):
        """A small VMamba in eval (stochastic depth set, so identity),
        every norm on the interpreted kernels: with the switch on, each
        stage's blocks hand on their normalised inputs (one torch add
        fewer per fused pair) and the features are those of the switch
        off, up to float32 rounding; under autocast (CPU's for CUDA's) up
        to bfloat16's (the interpreter truncates the bfloat16 sums of the
        later stages, where torch rounds them)."""
        model = VMamba(ARCH, out_indices=(0, 1, 2, 3),
                       drop_path_rate=0.3).eval()
        image = torch.randn(2, 3, 32, 28)
        results = []
        for switch in (False, True):
            monkeypatch.setattr(vmamba, 'ADD_NORM_ON_TRITON', switch)
            with torch.no_grad(), CountAdds() as adds, torch.autocast(
                    'cpu', dtype=torch.bfloat16, enabled=autocast):
                results.append((model(image), adds.calls))
        (plain, plain_adds), (fused, fused_adds) = results
        assert plain_adds - fused_adds == FUSED_PAIRS
        for a, b in zip(plain, fused):
            assert a.dtype == b.dtype
            scale = float(a.abs().max())
            if autocast:
                torch.testing.assert_close(b, a, rtol=2e-2,
                                           atol=2e-2 * scale)
            else:
                torch.testing.assert_close(b, a, rtol=1e-5,
                                           atol=1e-5 * scale)


test_kernel_in_triton_interpreter = interpreter_test(__file__, 43)


# ---------------------------------------------------------------------------
# Torch's add, the reasons, the fallbacks (no kernel runs here)


def add_pair(x_dtype, u_dtype, device='cpu', n=1 << 16):
    """Operands over a wide range of magnitudes, and exact ties of the
    result's rounding (1 + half a unit of bfloat16 and of float16)."""
    def draw():
        # float16 up to about 2^14 (a few overflow to inf)
        scale = torch.exp2(torch.randint(-12, 12, (n, ), device=device))
        return torch.randn(n, device=device) * scale

    x, u = draw().to(x_dtype), draw().to(u_dtype)
    x[:4] = 1.
    u[:4] = torch.tensor([2.**-8, 3 * 2.**-8, 2.**-11, 3 * 2.**-11])
    return x, u


@pytest.mark.parametrize('device', [
    'cpu', pytest.param('cuda', marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason='needs a CUDA GPU'))])
@pytest.mark.parametrize('x_dtype', ln.TRITON_DTYPES)
@pytest.mark.parametrize('u_dtype', ln.TRITON_DTYPES)
def test_torch_add_rounds_the_float32_sum_once(x_dtype, u_dtype, device,
                                               reported_seed):
    """The kernel's sum, float32 then one rounding to the promoted dtype,
    is torch's ``x + update`` bit for bit for these dtypes."""
    x, u = add_pair(x_dtype, u_dtype, device)
    total = x + u
    assert total.dtype == torch.promote_types(x_dtype, u_dtype)
    torch.testing.assert_close(total, (x.float() + u.float()).to(total.dtype),
                               rtol=0, atol=0, equal_nan=True)


@needs_triton
def test_add_unsupported_reasons(kernel_on_cpu, monkeypatch):
    x, update, w, b = make_pair((4, 6, 96), torch.float32, torch.bfloat16)
    reason = ln.add_unsupported_reason
    assert reason(x, update, w, b) is None
    assert reason(x, update, None, None) is None
    assert reason(x.bfloat16(), update.float(), w, b) is None  # float32 sum
    # outside autocast the parameters must have the sum's dtype
    assert 'are not covered' in reason(x.bfloat16(), update, w, b)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert reason(x.bfloat16(), update, w, b) is None
    assert reason(x.double(), update, w, b) == (
        'x is torch.float64, not one of (torch.float32, torch.bfloat16, '
        'torch.float16)')
    assert reason(x, update.double(), w, b).startswith('update is torch.fl')
    assert reason(x, update.int(), w, b).startswith('update is torch.int32')
    assert reason(x, update, w, b, torch.float64).startswith(
        'out_dtype torch.float64')
    assert reason(torch.randn(4, 96, 6).transpose(1, 2), update, w,
                  b).startswith('x is not contiguous in its last')
    assert reason(x, torch.randn(4, 96, 6).transpose(1, 2), w, b) == (
        'update is not contiguous in its last dimension (stride 6)')
    assert reason(x[:0], update[:0]).endswith('has no rows to normalise')
    w.requires_grad_()
    assert 'records' in reason(x, update, w, b)
    with torch.no_grad():
        assert reason(x, update, w, b) is None
    monkeypatch.setattr(ln, 'TRITON_DEVICE_TYPES', ('cuda', ))
    assert reason(x, update, w, b) == (
        'x is on cpu; the kernels take tensors on cuda')


@pytest.mark.parametrize('make,match', [
    (lambda x, u, w: (x, u[..., :95], w, w),
     r'update must have shape \(2, 3, 96\), got \(2, 3, 95\)'),
    (lambda x, u, w: (x, u[0], w, w), 'update must have shape'),
    (lambda x, u, w: (x, u.tolist(), w, w), 'update must be a torch.Tensor'),
    (lambda x, u, w: (x, u, w[:95], w),
     r'weight must have shape \(C\) = \(96\), got \(95,\)'),
    (lambda x, u, w: (x, u, w, w[None]), r'bias must have shape \(C\)'),
    (lambda x, u, w: (x.sum(), u, w, w), 'x must be a tensor'),
    (lambda x, u, w: (x, u.to('meta'), w, w),
     'all tensors must be on one device, got x on cpu, update on meta'),
])
def test_bad_arguments(make, match):
    x, update, w, _ = make_pair((2, 3, 96), torch.float32, torch.bfloat16)
    args = make(x, update, w)
    with pytest.raises(ValueError, match=match):
        ln.add_layer_norm(*args)
    with pytest.raises(ValueError, match=match):
        ln.add_unsupported_reason(*args)


@pytest.mark.parametrize('autocast', [False, True])
def test_falls_back_to_the_plain_ops_on_cpu(autocast):
    """CPU tensors (by default) run ``x + update`` and :func:`layer_norm`
    (``F.layer_norm``): their very values, the norm cast to ``out_dtype``."""
    x, update, w, b = make_pair((3, 5, 48), torch.float32, torch.bfloat16)
    out_dtype = torch.bfloat16 if autocast else None
    with RecordFallbacks() as norms, CountAdds() as adds, torch.autocast(
            'cpu', dtype=torch.bfloat16, enabled=autocast):
        total, normed = ln.add_layer_norm(x, update, w, b, 1e-4, out_dtype)
        expected = F.layer_norm(x + update, (48, ), w, b, 1e-4)
    assert norms.calls == 2 and adds.calls == 2  # ours, then the line above
    assert torch.equal(total, x + update)
    assert normed.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(normed, expected.to(normed.dtype))


def test_vmamba_switch_keeps_cpu_and_recorded_calls_as_they_are(
        monkeypatch, reported_seed):
    """With the switch on: CPU inference takes the stage's fused loop, whose
    add_layer_norm falls back (the very features of the switch off);
    training steps (stochastic depth on, autograd recording) and a no-grad
    forward in train mode run the blocks one by one, with the very outputs
    and gradients of the switch off; the state dict does not change."""
    model = VMamba(ARCH, out_indices=(1, 3), drop_path_rate=0.3)
    keys = list(model.state_dict())
    image = torch.randn(2, 3, 32, 28)
    calls = []
    real = vmamba.add_layer_norm
    monkeypatch.setattr(vmamba, 'add_layer_norm',
                        lambda *args: calls.append(1) or real(*args))

    def run(switch, train, grad):
        monkeypatch.setattr(vmamba, 'ADD_NORM_ON_TRITON', switch)
        model.train(train)
        model.zero_grad()
        torch.manual_seed(1)  # the same drop masks
        with torch.set_grad_enabled(grad):
            outs = model(image)
        if grad:
            sum(o.square().sum() for o in outs).backward()
        return outs, [p.grad for p in model.parameters()]

    for train, grad, fused_calls in ((False, False, FUSED_PAIRS),
                                     (True, True, 0), (False, True, 0),
                                     (True, False, 0)):
        plain = run(False, train, grad)
        del calls[:]
        fused = run(True, train, grad)
        assert len(calls) == fused_calls
        for a, b in zip([*plain[0], *plain[1]], [*fused[0], *fused[1]]):
            assert (a is None and b is None) or torch.equal(a, b)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize('hooked', ['block', 'norm', 'global'])
def test_vmamba_switch_runs_the_blocks_where_hooks_are_registered(
        hooked, monkeypatch):
    """A forward hook on a block, on a block's norm or on all modules turns
    the fused loop off: every hook sees its calls (the fused loop would
    skip the blocks' calls and the later norms')."""
    monkeypatch.setattr(vmamba, 'ADD_NORM_ON_TRITON', True)
    model = VMamba(ARCH, out_indices=(3, )).eval()
    calls = []
    real = vmamba.add_layer_norm
    monkeypatch.setattr(vmamba, 'add_layer_norm',
                        lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 28))
    assert len(calls) == FUSED_PAIRS  # fused without hooks
    del calls[:]
    seen = []
    blocks = [b for stage in model.stages for b in stage.blocks]
    hook = lambda module, args, out: seen.append(module)  # noqa: E731
    if hooked == 'block':
        handles = [b.register_forward_hook(hook) for b in blocks]
    elif hooked == 'norm':
        handles = [b.norm.register_forward_hook(hook) for b in blocks]
    else:
        handles = [nn.modules.module.register_module_forward_hook(hook)]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 28))
    finally:
        for handle in handles:
            handle.remove()
    assert not calls
    if hooked != 'global':
        assert len(seen) == len(blocks)


# ---------------------------------------------------------------------------
# On the GPU

#: Stage maps of VMamba-T at 224, batch 128.
STAGE_SHAPES = [(128, 56, 56, 96), (128, 28, 28, 192), (128, 14, 14, 384),
                (128, 7, 7, 768)]


@needs_cuda
@pytest.mark.parametrize('shape', STAGE_SHAPES)
@pytest.mark.parametrize('x_dtype', [torch.float32, torch.bfloat16])
def test_gpu_stage_shapes_match_the_unfused_ops(shape, x_dtype,
                                                reported_seed):
    """VMamba-T's maps under bf16 autocast as the stages run (a float32 or
    bfloat16 residual, a bfloat16 update, the norm in bfloat16 for
    in_proj): the sum is torch's bit for bit; the norm within float32 and
    its rounding of float64 and of the unfused norm's (one bf16 unit)."""
    x, update, w, b = make_pair(shape, x_dtype, torch.bfloat16,
                                device='cuda')
    norm = ln.LayerNorm(shape[-1], linear_input=True).cuda()
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        assert ln.add_unsupported_reason(x, update, w, b) is None
        with CountAdds() as adds:
            total, normed = ln.add_layer_norm(x, update, w, b, 1e-5,
                                              norm.output_dtype(x))
        assert adds.calls == 0
        plain_total = x + update
        plain = norm(plain_total)
    assert torch.equal(total, plain_total)
    assert normed.dtype == plain.dtype == torch.bfloat16
    assert_close_to(normed, norm64(total, w, b), torch.bfloat16)
    torch.testing.assert_close(normed, plain, rtol=2**-7, atol=1e-5)


@needs_cuda
def test_gpu_vmamba_fused_matches_unfused(monkeypatch, reported_seed):
    """A small VMamba's bf16 inference with the switch on and off: one
    torch add fewer per fused pair, the same features up to bf16 rounding
    (the scan's float32 atomics vary in the last bit from run to run)."""
    model = VMamba(ARCH, out_indices=(0, 1, 2, 3),
                   drop_path_rate=0.2).cuda().eval()
    image = torch.randn(4, 3, 64, 64, device='cuda')
    results = []
    for switch in (False, True):
        monkeypatch.setattr(vmamba, 'ADD_NORM_ON_TRITON', switch)
        with torch.no_grad(), CountAdds() as adds, torch.autocast(
                'cuda', dtype=torch.bfloat16):
            results.append((model(image), adds.calls))
    (plain, plain_adds), (fused, fused_adds) = results
    assert plain_adds - fused_adds == FUSED_PAIRS
    for a, b in zip(plain, fused):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=2e-2,
                                   atol=2e-2 * float(a.abs().max()))
