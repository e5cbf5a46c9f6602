"""mmvmamba.ops.depthwise_conv: the Triton depthwise convolution of a
channels-last map against float64 ``F.conv2d``, and the choice between it
and the module (cuDNN).

The kernels run here on the CPU in Triton's interpreter, which must be on
when Triton is imported: :func:`test_kernel_in_triton_interpreter` runs
:class:`TestInterpreted` in a fresh process with ``TRITON_INTERPRET=1``.
The training path (``CONV_BACKWARD_ON_TRITON``) is checked against float64
``F.conv2d`` with autograd. The GPU tests skip without CUDA.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmvmamba.ops import depthwise_conv as dw
from triton_marks import INTERPRETED, interpreted, needs_cuda, needs_triton



def make_conv(channels, k=3, bias=True, device='cpu'):
    conv = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels,
                     bias=bias).to(device)
    conv.requires_grad_(False)
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    return conv


def in_proj_half(shape, device='cpu', dtype=torch.float32):
    """The first half of a ``(B, H, W, 2C)`` tensor: positions 2C apart,
    as SS2D's conv input is."""
    batch, height, width, channels = shape
    wide = torch.randn(batch, height, width, 2 * channels, device=device)
    return wide.to(dtype)[..., :channels]


def reference(conv, x):
    """float64 ``F.conv2d`` of the channels-last map ``x``, channels-last."""
    bias = None if conv.bias is None else conv.bias.double()
    out = F.conv2d(x.double().permute(0, 3, 1, 2), conv.weight.double(), bias,
                   padding=conv.padding, groups=conv.groups)
    return out.permute(0, 2, 3, 1)


def assert_close_to(actual, expected, rtol, scale=None):
    """Within ``rtol`` of each value plus float32 sums (1e-5 of the largest
    value); sums of many terms within 1e-5 of ``scale`` (the sums of their
    sizes) too."""
    error = (actual.double() - expected).abs()
    bound = rtol * expected.abs() + 1e-5 * float(expected.abs().max()) + 1e-6
    if scale is not None:
        bound = bound + 1e-5 * scale
    assert bool((error <= bound).all()), float((error / bound).max())


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Let CPU tensors take the kernel, CPU autocast taken for CUDA's."""
    monkeypatch.setattr(dw, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
    monkeypatch.setattr(dw, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))


@pytest.fixture
def backward_on_triton(monkeypatch):
    """Turn the training path on (calls autograd records)."""
    monkeypatch.setattr(dw, 'CONV_BACKWARD_ON_TRITON', True)


def wide_input(shape, device='cpu', dtype=torch.float32):
    """A leaf ``(B, H, W, 2C)`` needing its gradient, and its first half
    (positions 2C apart), as SS2D takes it from ``in_proj``'s output."""
    batch, height, width, channels = shape
    wide = torch.randn(batch, height, width, 2 * channels, device=device)
    wide = wide.to(dtype).requires_grad_()
    return wide, wide[..., :channels]


def trainable(conv):
    """Make ``conv``'s parameters need gradients; returns them."""
    conv.requires_grad_(True)
    return list(conv.parameters())


def reference_training(conv, wide, dy, silu=False, round_to=None):
    """float64 ``F.conv2d`` (and SiLU) of the first half of ``wide`` with
    autograd: output, gradients of (wide, weight, bias: those of ``conv``
    needing one) from ``dy``, and the scales of the weight and bias
    gradients' sums (sums of the sizes of their terms). ``round_to``: the
    input and parameters rounded to that dtype first (as autocast hands
    them to the convolution)."""
    channels = conv.in_channels

    def leaf(t):
        if round_to is not None:
            t = t.detach().to(round_to)
        return t.detach().double().requires_grad_()

    wide64 = leaf(wide)
    params = [leaf(p) if p is not None else None
              for p in (conv.weight, conv.bias)]
    pre = F.conv2d(wide64[..., :channels].permute(0, 3, 1, 2), params[0],
                   params[1], padding=conv.padding,
                   groups=conv.groups).permute(0, 2, 3, 1)
    out = F.silu(pre) if silu else pre
    wrt = [wide64] if wide.requires_grad else []
    wrt += [p for p, q in zip(params, (conv.weight, conv.bias))
            if q is not None and q.requires_grad]
    grads = torch.autograd.grad(out, wrt, dy.double(), retain_graph=True)
    # the gradient before the SiLU, in sizes: |dy'| * |x| summed
    g = torch.autograd.grad(out, pre, dy.double())[0].abs()
    weight_abs = torch.ones_like(params[0], requires_grad=True)
    terms = F.conv2d(wide64[..., :channels].detach().abs().permute(
        0, 3, 1, 2), weight_abs, padding=conv.padding, groups=conv.groups)
    weight_scale = torch.autograd.grad(terms, weight_abs,
                                       g.permute(0, 3, 1, 2))[0]
    bias_scale = g.sum((0, 1, 2))
    return out.detach(), grads, (weight_scale, bias_scale)


class CountConvs:
    """Counts the module's forward calls (the fallback path)."""

    def __init__(self, conv):
        self.calls = 0
        conv.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


@interpreted
@pytest.mark.usefixtures('kernel_on_cpu', 'index_as_in_triton_3_6')
class TestInterpreted:
    """The kernels, run by Triton's interpreter on CPU tensors (a runtime
    value never taken as a Python int, which Triton 3.6's interpreter
    cannot do under NumPy >= 2.4)."""

    @pytest.mark.parametrize('shape,k,bias,silu', [
        ((2, 5, 7, 37), 3, True, False),  # odd, non-square, under a block
        ((2, 5, 7, 37), 3, True, True),
        ((1, 9, 4, 200), 3, False, True),  # two channel blocks, one partial
        ((2, 1, 3, 16), 3, True, False),  # one row: the rows around are 0
        ((1, 6, 5, 24), 5, True, False),
        ((3, 4, 4, 8), 1, False, False),
    ])
    def test_matches_float64(self, shape, k, bias, silu, reported_seed):
        conv = make_conv(shape[-1], k, bias)
        x = in_proj_half(shape)
        counter = CountConvs(conv)
        out = dw.depthwise_conv_nhwc(conv, x, silu=silu)
        assert counter.calls == 0  # the kernel ran
        assert out.shape == shape and out.dtype == torch.float32
        assert out.is_contiguous()
        expected = reference(conv, x)
        assert_close_to(out, F.silu(expected) if silu else expected, 1e-5)

    def test_autocast(self, reported_seed):
        """Under autocast (CPU's for CUDA's) a bfloat16 map: the weight and
        bias rounded to bfloat16 as autocast hands them to cuDNN, float32
        sums, one rounding of the result to bfloat16."""
        conv = make_conv(48)
        x = in_proj_half((2, 6, 5, 48), dtype=torch.bfloat16)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = dw.depthwise_conv_nhwc(conv, x)
        assert out.dtype == torch.bfloat16
        rounded = make_conv(48)
        rounded.load_state_dict({k: v.bfloat16().float()
                                 for k, v in conv.state_dict().items()})
        # the interpreter truncates to bfloat16: up to 2^-7
        assert_close_to(out, reference(rounded, x), 2**-7)

    @pytest.mark.parametrize('shape,k,bias,silu', [
        ((2, 5, 7, 37), 3, True, False),  # SS2D's call: no SiLU
        ((1, 1, 9, 20), 3, True, False),  # one row
        ((2, 13, 4, 70), 5, False, False),  # two weight-gradient blocks of C
        ((3, 13, 4, 24), 1, True, False),
        ((1, 9, 4, 200), 3, False, True),  # four, one of them partial
        ((2, 5, 7, 37), 5, True, True),
    ])
    @pytest.mark.usefixtures('backward_on_triton')
    def test_training_matches_float64(self, shape, k, bias, silu,
                                      reported_seed):
        """Recorded calls: output and gradients of the wide input, weight
        and bias, in their dtypes, against float64 with autograd."""
        conv = make_conv(shape[-1], k, bias)
        params = trainable(conv)
        wide, x = wide_input(shape)
        counter = CountConvs(conv)
        out = dw.depthwise_conv_nhwc(conv, x, silu=silu)
        assert counter.calls == 0  # the kernels ran
        assert out.shape == shape and out.dtype == torch.float32
        assert out.is_contiguous()
        dy = torch.randn(shape)
        grads = torch.autograd.grad(out, [wide] + params, dy)
        expected, refs, (weight_scale, bias_scale) = reference_training(
            conv, wide, dy, silu)
        assert [g.dtype for g in grads] == [torch.float32] * len(grads)
        assert_close_to(out, expected, 1e-5)
        assert_close_to(grads[0], refs[0], 1e-5)
        assert not grads[0][..., shape[-1]:].any()  # the other half
        assert_close_to(grads[1], refs[1], 1e-5, weight_scale)
        if bias:
            assert_close_to(grads[2], refs[2], 1e-5, bias_scale)

    @pytest.mark.parametrize('frozen', ['x', 'weight', 'bias', 'params'])
    @pytest.mark.usefixtures('backward_on_triton')
    def test_training_gradients_asked_for(self, frozen, reported_seed):
        """Only the gradients autograd asks for, each right."""
        shape = (2, 5, 7, 24)
        conv = make_conv(24)
        if frozen != 'params':
            conv.weight.requires_grad_(frozen != 'weight')
            conv.bias.requires_grad_(frozen != 'bias')
        wide, x = wide_input(shape)
        wide.requires_grad_(frozen != 'x')
        counter = CountConvs(conv)
        out = dw.depthwise_conv_nhwc(conv, x)
        assert counter.calls == 0
        wrt = [t for t in (wide, conv.weight, conv.bias) if t.requires_grad]
        dy = torch.randn(shape)
        grads = torch.autograd.grad(out, wrt, dy)
        _, refs, (weight_scale, bias_scale) = reference_training(
            conv, wide, dy)
        assert len(grads) == len(refs) == (1 if frozen == 'params' else 2)
        for grad, ref, t in zip(grads, refs, wrt):
            scale = {id(conv.weight): weight_scale,
                     id(conv.bias): bias_scale}.get(id(t))
            assert grad.shape == t.shape
            assert_close_to(grad, ref, 1e-5, scale)

    @pytest.mark.usefixtures('backward_on_triton')
    def test_training_from_an_expanded_gradient(self, reported_seed):
        """``out.sum()``: the output gradient has stride 0 everywhere."""
        conv = make_conv(20)
        params = trainable(conv)
        wide, x = wide_input((2, 4, 6, 20))
        out = dw.depthwise_conv_nhwc(conv, x)
        grads = torch.autograd.grad(out.sum(), [wide] + params)
        _, refs, (weight_scale, bias_scale) = reference_training(
            conv, wide, torch.ones(out.shape))
        for grad, ref, scale in zip(grads, refs,
                                    (None, weight_scale, bias_scale)):
            assert_close_to(grad, ref, 1e-5, scale)

    @pytest.mark.parametrize('x_dtype', [torch.bfloat16, torch.float32])
    @pytest.mark.usefixtures('backward_on_triton')
    def test_training_under_autocast(self, x_dtype, reported_seed):
        """Under autocast (CPU's for CUDA's): the dtypes of the module's
        result and gradients; x, weight and bias rounded to bfloat16 as
        autocast hands them to the convolution, float32 sums, the output
        and a bfloat16 x's gradient rounded once (the interpreter
        truncates: up to 2^-7), the parameters' gradients float32 sums of
        exact products."""
        shape = (2, 6, 5, 48)
        conv = make_conv(48)
        params = trainable(conv)
        wide, x = wide_input(shape, dtype=x_dtype)
        dy = torch.randn(shape).bfloat16()
        counter = CountConvs(conv)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = dw.depthwise_conv_nhwc(conv, x)
            assert counter.calls == 0
            module = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        grads = torch.autograd.grad(out, [wide] + params, dy)
        module_grads = torch.autograd.grad(module, [wide] + params, dy)
        assert out.dtype == module.dtype == torch.bfloat16
        assert [g.dtype for g in grads] == [g.dtype for g in module_grads]
        expected, refs, (weight_scale, bias_scale) = reference_training(
            conv, wide, dy, round_to=torch.bfloat16)
        assert_close_to(out, expected, 2**-7)
        assert_close_to(grads[0], refs[0],
                        2**-7 if x_dtype == torch.bfloat16 else 1e-5)
        assert_close_to(grads[1], refs[1], 1e-5, weight_scale)
        assert_close_to(grads[2], refs[2], 1e-5, bias_scale)

    @pytest.mark.parametrize('silu', [False, True])
    def test_switch(self, silu, monkeypatch, reported_seed):
        """Off (the default), recorded calls run the module: its very
        values and gradients. On, they run the kernels, whose output is
        the inference kernel's bit for bit."""
        assert dw.CONV_BACKWARD_ON_TRITON is False
        conv = make_conv(24)
        params = trainable(conv)
        wide, x = wide_input((2, 5, 7, 24))
        dy = torch.randn(2, 5, 7, 24)
        counter = CountConvs(conv)
        out = dw.depthwise_conv_nhwc(conv, x, silu=silu)
        assert counter.calls == 1
        module = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        module = F.silu(module) if silu else module
        assert torch.equal(out, module)
        for a, b in zip(torch.autograd.grad(out, [wide] + params, dy),
                        torch.autograd.grad(module, [wide] + params, dy)):
            assert torch.equal(a, b)
        with torch.no_grad():
            inference = dw.depthwise_conv_nhwc(conv, x, silu=silu)
        assert counter.calls == 2  # (and the module's call above)
        monkeypatch.setattr(dw, 'CONV_BACKWARD_ON_TRITON', True)
        trained = dw.depthwise_conv_nhwc(conv, x, silu=silu)
        assert counter.calls == 2 and trained.requires_grad
        assert torch.equal(trained, inference)
        with torch.no_grad():
            assert torch.equal(dw.depthwise_conv_nhwc(conv, x, silu=silu),
                               inference)

    @pytest.mark.usefixtures('backward_on_triton')
    def test_compiled_model_runs_the_module(self, monkeypatch,
                                            reported_seed):
        """``torch.compile(fullgraph=True)`` of a VMamba with the switch
        on: the compiled graph runs the module (cuDNN on a GPU), eager
        calls the kernels; outputs and parameter gradients agree."""
        from mmvmamba.models import VMamba
        torch._dynamo.reset()
        model = VMamba(dict(embed_dims=16, depths=[1, 1, 2, 1]),
                       out_indices=(0, 1, 2, 3), drop_path_rate=0.)
        calls = []
        apply = dw._DepthwiseConvFunction.apply

        def counted_apply(*args):
            calls.append(args[0].shape)
            return apply(*args)

        monkeypatch.setattr(dw._DepthwiseConvFunction, 'apply',
                            counted_apply)
        compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
        x = torch.randn(2, 3, 37, 53)
        results, weights = [], None
        for run, expected_calls in ((model, 5), (compiled, 0)):
            calls.clear()
            outs = run(x)
            assert len(calls) == expected_calls  # one an SS2D
            weights = weights or [torch.randn_like(o) for o in outs]
            loss = sum((o * w).sum() for o, w in zip(outs, weights))
            results.append(list(outs) + list(
                torch.autograd.grad(loss, list(model.parameters()))))
        # float32 sums in other orders: relative to each tensor's norm
        errors = [float((c - e).detach().norm() / e.detach().norm())
                  for e, c in zip(*results)]
        print('largest relative error:', max(errors))
        assert max(errors) < 1e-5  # measured: at most 9e-7


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason='already in the interpreter')
def test_kernel_in_triton_interpreter(run_interpreted):
    """Run :class:`TestInterpreted` in a process with TRITON_INTERPRET=1."""
    run_interpreted(__file__, 'TestInterpreted', 23)


@needs_triton
def test_unsupported_reasons(kernel_on_cpu, monkeypatch):
    conv = make_conv(16)
    x = in_proj_half((2, 4, 5, 16))
    reason = dw.unsupported_reason
    assert reason(conv, x) is None
    for bad in (nn.Conv2d(16, 16, 3, padding=1),  # not depthwise
                nn.Conv2d(16, 16, 3, padding=0, groups=16),
                nn.Conv2d(16, 16, 3, padding=1, stride=2, groups=16),
                nn.Conv2d(16, 16, (3, 5), padding=(1, 2), groups=16),
                nn.Conv2d(16, 16, 2, padding=1, groups=16),
                nn.Conv2d(16, 16, 3, padding=1, groups=16,
                          padding_mode='reflect')):
        bad.requires_grad_(False)
        assert 'is not a depthwise convolution' in reason(bad, x)
    assert reason(conv, x[..., :8]) == (
        'x of shape (2, 4, 5, 8) is not a non-empty (B, H, W, 16) map')
    assert reason(conv, x[0]).startswith('x of shape (4, 5, 16)')
    assert reason(conv, x[:0]).startswith('x of shape (0, 4, 5, 16)')
    assert reason(conv, torch.randn(2, 16, 4, 5).permute(0, 2, 3, 1)) == (
        'x is not contiguous along C (stride 20)')
    assert 'float64' in reason(conv.double(), x.double())
    assert reason(conv.float(), x.bfloat16()) == (
        'x is torch.bfloat16 and the weight torch.float32 outside autocast')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert reason(conv, x.bfloat16()) is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        # autocast leaves a float64 weight as it is
        assert reason(make_conv(16).double(), x.bfloat16()) == (
            'the weight of torch.float64 is not covered')
    assert 'records' in reason(conv, x.clone().requires_grad_())
    conv.requires_grad_(True)
    assert 'records' in reason(conv, x)
    with torch.no_grad():
        assert reason(conv, x) is None
    # the training path: recorded calls run the kernels, compiled code not
    monkeypatch.setattr(dw, 'CONV_BACKWARD_ON_TRITON', True)
    assert reason(conv, x) is None
    assert reason(conv, x.clone().requires_grad_()) is None
    assert 'is not a depthwise' in reason(
        nn.Conv2d(16, 16, 3, padding=1, stride=2, groups=16), x)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    assert reason(conv, x) == (
        'torch.compile traces the call (the ATen ops run)')


@needs_triton
@pytest.mark.usefixtures('kernel_on_cpu', 'backward_on_triton')
@pytest.mark.parametrize('case', [
    'stride', 'rectangular', 'even', 'dilated', 'reflect', 'not-depthwise',
    'float64', 'mixed-dtypes', 'strided-c'
])
def test_training_falls_back_to_the_module(case):
    """With the switch on, what the kernels do not cover runs the module
    on the permuted view: its very values and gradients."""
    shape = (2, 5, 7, 16)
    kwargs = dict(padding=1, groups=16)
    kwargs.update({
        'stride': dict(stride=2), 'rectangular': dict(kernel_size=(3, 5),
                                                      padding=(1, 2)),
        'even': dict(kernel_size=2), 'dilated': dict(dilation=2, padding=2),
        'reflect': dict(padding_mode='reflect'),
        'not-depthwise': dict(groups=4)}.get(case, {}))
    kwargs.setdefault('kernel_size', 3)
    conv = nn.Conv2d(16, 16, **kwargs)
    dtype = torch.float64 if case == 'float64' else torch.float32
    conv = conv.to(dtype)
    wide, x = wide_input(shape, dtype=dtype)
    if case == 'mixed-dtypes':  # outside autocast
        x = x.bfloat16()
    if case == 'strided-c':
        x = wide.view(2, 5, 7, 16, 2)[..., 0]
    assert dw.unsupported_reason(conv, x) is not None
    counter = CountConvs(conv)
    params = list(conv.parameters())

    def module():
        return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    if case == 'mixed-dtypes':  # the module's own error
        with pytest.raises(RuntimeError):
            module()
        with pytest.raises(RuntimeError):
            dw.depthwise_conv_nhwc(conv, x)
        return
    out = dw.depthwise_conv_nhwc(conv, x)
    assert counter.calls == 1
    expected = module()
    assert torch.equal(out, expected)
    for a, b in zip(torch.autograd.grad(out.sum(), [wide] + params),
                    torch.autograd.grad(expected.sum(), [wide] + params)):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.usefixtures('kernel_on_cpu', 'backward_on_triton')
def test_training_bad_input_raises_the_modules_error():
    """A map of other channels (or rank) is the module's: its error."""
    conv = make_conv(16)
    trainable(conv)
    for x in (torch.randn(2, 5, 7, 8), torch.randn(5, 7, 16, 3)):
        with pytest.raises(RuntimeError, match='channels|expected'):
            dw.depthwise_conv_nhwc(conv, x.requires_grad_())


def test_falls_back_to_the_module(monkeypatch):
    """CPU tensors (by default) and recorded calls run the module on the
    permuted view: its very values and gradients."""
    conv = make_conv(12)
    conv.requires_grad_(True)
    x = in_proj_half((2, 3, 4, 12)).requires_grad_()
    counter = CountConvs(conv)
    assert torch.equal(dw.depthwise_conv_nhwc(conv, x, silu=True),
                       F.silu(conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3,
                                                                  1)))
    out = dw.depthwise_conv_nhwc(conv, x)
    assert counter.calls == 3
    expected = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert torch.equal(out, expected)
    grads = torch.autograd.grad(out.sum(), (x, conv.weight))
    again = torch.autograd.grad(expected.sum(), (x, conv.weight))
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


@needs_cuda
@pytest.mark.parametrize('shape', [(128, 56, 56, 192), (128, 14, 14, 768),
                                   (3, 37, 53, 100), (2, 7, 9, 1536)])
@pytest.mark.parametrize('autocast', [False, True])
def test_gpu_matches_float64_and_cudnn(shape, autocast, reported_seed):
    """VMamba-T's stage shapes and odd ones, the input a half of in_proj's
    output: within float32 sums (and the bfloat16 rounding under autocast)
    of float64, and of cuDNN's result with its dtype."""
    conv = make_conv(shape[-1], device='cuda')
    dtype = torch.bfloat16 if autocast else torch.float32
    x = in_proj_half(shape, 'cuda', dtype)
    counter = CountConvs(conv)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16,
                                         enabled=autocast):
        out = dw.depthwise_conv_nhwc(conv, x)
        assert counter.calls == 0
        cudnn = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert out.dtype == cudnn.dtype and out.is_contiguous()
    if autocast:  # the parameters as autocast rounds them
        conv.load_state_dict({k: v.bfloat16().float()
                              for k, v in conv.state_dict().items()})
    expected = reference(conv, x)
    # one rounding of the result to bfloat16 under autocast
    rtol = 2**-8 if autocast else 1e-5
    assert_close_to(out, expected, rtol)
    # cuDNN rounds the taps' sum to bfloat16 before it adds the bias: an
    # error of the sum's size, not the result's
    taps = expected - conv.bias.double()
    error = (cudnn.double() - expected).abs()
    bound = rtol * (taps.abs() + expected.abs()) + 1e-5 * float(
        expected.abs().max()) + 1e-6
    assert bool((error <= bound).all()), float((error / bound).max())
    # the SiLU taken in float32 before the rounding
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16,
                                         enabled=autocast):
        activated = dw.depthwise_conv_nhwc(conv, x, silu=True)
    assert_close_to(activated, F.silu(expected), rtol)


@needs_cuda
@pytest.mark.usefixtures('backward_on_triton')
@pytest.mark.parametrize('shape', [(128, 56, 56, 192), (32, 14, 14, 768),
                                   (8, 7, 7, 1536), (3, 37, 53, 100)])
@pytest.mark.parametrize('autocast', [False, True])
def test_gpu_training_matches_float64_and_cudnn(shape, autocast, monkeypatch,
                                                reported_seed):
    """SS2D's training call (the input a half of in_proj's output, no SiLU)
    at VMamba-T's stage shapes and an odd one, with the switch on: output
    and gradients within float32 sums (and one bfloat16 rounding of the
    output and x's gradient under autocast) of float64, the same twice
    (deterministic), with the dtypes of cuDNN's path and close to its
    values."""
    conv = make_conv(shape[-1], device='cuda')
    params = trainable(conv)
    dtype = torch.bfloat16 if autocast else torch.float32
    wide, x = wide_input(shape, 'cuda', dtype)
    dy = torch.randn(shape, device='cuda').to(dtype)
    counter = CountConvs(conv)

    def run():
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
            out = dw.depthwise_conv_nhwc(conv, x)
        return (out, ) + torch.autograd.grad(out, [wide] + params, dy)

    ours = run()
    assert counter.calls == 0
    assert all(torch.equal(a, b) for a, b in zip(ours, run()))
    monkeypatch.setattr(dw, 'CONV_BACKWARD_ON_TRITON', False)
    cudnn = run()
    assert counter.calls == 1
    assert [t.dtype for t in ours] == [t.dtype for t in cudnn]
    expected, refs, (weight_scale, bias_scale) = reference_training(
        conv, wide, dy, round_to=torch.bfloat16 if autocast else None)
    rtol = 2**-8 if autocast else 1e-5
    assert_close_to(ours[0], expected, rtol)
    assert_close_to(ours[1], refs[0], rtol)
    assert_close_to(ours[2], refs[1], 1e-5, weight_scale)
    assert_close_to(ours[3], refs[2], 1e-5, bias_scale)
    # cuDNN's: bfloat16 results under autocast (the weight's gradient too,
    # the taps' sum rounded before the bias is added), float32 sums
    # (TF32 if cuDNN takes it) without
    loose = 2**-7 if autocast else 1e-3
    for mine, theirs in zip(ours, cudnn):
        torch.testing.assert_close(
            mine, theirs.to(mine.dtype), rtol=loose,
            atol=loose * float(theirs.abs().max()))
