"""mmvmamba.ops.depthwise_conv: the Triton depthwise convolution of a
channels-last map against float64 ``F.conv2d``, and the choice between it
and the module (cuDNN).

The kernel runs here on the CPU in Triton's interpreter, which must be on
when Triton is imported: :func:`test_kernel_in_triton_interpreter` runs
:class:`TestInterpreted` in a fresh process with ``TRITON_INTERPRET=1``.
The GPU tests skip without CUDA.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmvmamba.ops import depthwise_conv as dw
from triton_marks import (interpreted, interpreter_test, needs_cuda,
                          needs_triton)


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


def assert_close_to(actual, expected, rtol):
    """Within ``rtol`` of each value plus float32 sums (1e-5 of the largest
    value)."""
    error = (actual.double() - expected).abs()
    bound = rtol * expected.abs() + 1e-5 * float(expected.abs().max()) + 1e-6
    assert bool((error <= bound).all()), float((error / bound).max())


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Let CPU tensors take the kernel, CPU autocast taken for CUDA's."""
    monkeypatch.setattr(dw, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
    monkeypatch.setattr(dw, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))


class CountConvs:
    """Counts the module's forward calls (the fallback path)."""

    def __init__(self, conv):
        self.calls = 0
        conv.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


@interpreted
@pytest.mark.usefixtures('kernel_on_cpu')
class TestInterpreted:
    """The kernel, run by Triton's interpreter on CPU tensors."""

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


test_kernel_in_triton_interpreter = interpreter_test(__file__, 7)


@needs_triton
def test_unsupported_reasons(kernel_on_cpu):
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
    assert 'records' in reason(conv, x.clone().requires_grad_())
    conv.requires_grad_(True)
    assert 'records' in reason(conv, x)
    with torch.no_grad():
        assert reason(conv, x) is None


def test_bad_input():
    conv = make_conv(8)
    with pytest.raises(ValueError, match=r'x must have shape \(B, H, W, '
                       r'in_channels\) = \(\*, \*, \*, 8\), got \(1, 5, 6, 7\)'):
        dw.depthwise_conv_nhwc(conv, torch.randn(1, 5, 6, 7))
    with pytest.raises(ValueError, match='x must have shape'):
        dw.depthwise_conv_nhwc(conv, torch.randn(5, 6, 8))
    with pytest.raises(ValueError, match='silu must be a bool'):
        dw.depthwise_conv_nhwc(conv, torch.randn(1, 5, 6, 8), silu='yes')
    with pytest.raises(ValueError, match='module_call must be a bool'):
        dw.depthwise_conv_nhwc(conv, torch.randn(1, 5, 6, 8), module_call=1)
    with pytest.raises(ValueError, match='conv must be an nn.Conv2d, got '
                       'Linear'):
        dw.depthwise_conv_nhwc(nn.Linear(8, 8), torch.randn(1, 5, 6, 8))


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


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('bias', [True, False])
def test_module_call_false_adds_the_bias_apart(dtype, bias):
    """module_call=False: F.conv2d without the bias, then the bias added
    and its gradient summed as a product with ones; the module's values and
    gradients (x, weight, bias) up to rounding, without calling it (no hook
    runs). Without a bias, the module runs."""
    torch.manual_seed(0)
    conv = make_conv(12, bias=bias).to(dtype).requires_grad_(True)
    x = in_proj_half((2, 5, 7, 12), dtype=dtype).requires_grad_()
    counter = CountConvs(conv)
    out = dw.depthwise_conv_nhwc(conv, x, silu=True, module_call=False)
    assert counter.calls == (0 if bias else 1)
    expected = F.silu(conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, expected, **tol)
    grad = torch.randn_like(out)
    wrt = (x, *conv.parameters())
    for got, want in zip(torch.autograd.grad(out, wrt, grad),
                         torch.autograd.grad(expected, wrt, grad)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)


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
