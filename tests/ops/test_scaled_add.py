"""mmvmamba.ops.scaled_add: the per-sample scaled residual sum on its Triton
kernel against float64 and ATen's ``addcmul``, and when the kernel runs.

The kernel runs here on the CPU in Triton's interpreter, which must be on
when Triton is imported: :func:`test_kernel_in_triton_interpreter` runs
:class:`TestInterpreted` in a fresh process with ``TRITON_INTERPRET=1``.
The GPU tests skip without CUDA.
"""
from unittest.mock import patch

import pytest
import torch

from mmvmamba.models.backbones.common import DropPath
from mmvmamba.ops import scaled_add as sa
from triton_marks import (interpreted, interpreter_test, needs_cuda,
                          needs_triton)


def inputs(shape, dtype, device='cpu', kept=(1., 0.)):
    """A float32 residual, a ``dtype`` branch (both needing gradients) and
    a float32 scale per sample, cycling through ``kept`` over the batch,
    over a keep probability of 0.7."""
    residual = torch.randn(shape, device=device).requires_grad_()
    branch = torch.randn(shape, device=device).to(dtype).requires_grad_()
    mask = torch.tensor([kept[i % len(kept)] for i in range(shape[0])],
                        device=device)
    return residual, branch, mask / 0.7


def check_against_float64(residual, branch, scale):
    """scaled_add's sum and gradients within one float32 rounding of
    float64's; the residual's gradient is the incoming one, the branch's in
    its dtype."""
    out = sa.scaled_add(residual, branch, scale)
    assert out.dtype == torch.float32 and out.shape == residual.shape
    view = (-1, ) + (1, ) * (branch.dim() - 1)
    expected = residual.double() + branch.double() * scale.double().view(view)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    d_residual, d_branch = torch.autograd.grad(out, (residual, branch), grad)
    assert torch.equal(d_residual, grad)
    assert d_branch.dtype == branch.dtype
    # one rounding of the float32 product to the branch's dtype
    torch.testing.assert_close(
        d_branch, (grad.double() * scale.double().view(view)).to(branch.dtype))
    return out, d_branch


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Let CPU tensors take the kernel."""
    monkeypatch.setattr(sa, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))


class CountLaunches:
    """Counts the kernel's launches."""

    def __init__(self, monkeypatch):
        self.calls = 0
        launch = sa._launch

        def counted(*args, **kwargs):
            self.calls += 1
            return launch(*args, **kwargs)

        monkeypatch.setattr(sa, '_launch', counted)


@interpreted
@pytest.mark.usefixtures('kernel_on_cpu')
class TestInterpreted:
    """The kernel, run by Triton's interpreter on CPU tensors."""

    @pytest.mark.parametrize('shape,dtype', [
        ((3, 5, 7, 37), torch.bfloat16),  # odd sizes, a partial block
        ((2, 4100), torch.float16),  # two blocks a sample
        ((1, 9), torch.bfloat16),
    ])
    def test_matches_float64(self, shape, dtype, monkeypatch,
                             reported_seed):
        counter = CountLaunches(monkeypatch)
        check_against_float64(*inputs(shape, dtype))
        assert counter.calls == 2  # forward and the branch's gradient

    def test_matches_addcmul(self, monkeypatch, reported_seed):
        """The sum and gradients ATen's addcmul of the cast branch gives,
        up to the rounding of one multiply-add."""
        residual, branch, scale = inputs((4, 6, 5, 16), torch.bfloat16,
                                         kept=(1., 0., 0., 1.))
        out = sa.scaled_add(residual, branch, scale)
        view = scale.view(-1, 1, 1, 1)
        expected = torch.addcmul(residual, branch.float(), view)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (residual, branch), grad)
        want = torch.autograd.grad(expected, (residual, branch), grad)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w)

    def test_only_the_gradients_asked_for(self, monkeypatch, reported_seed):
        counter = CountLaunches(monkeypatch)
        residual, branch, scale = inputs((2, 3, 8), torch.float16)
        out = sa.scaled_add(residual.detach(), branch, scale)
        torch.autograd.grad(out.sum(), branch)
        assert counter.calls == 2
        out = sa.scaled_add(residual, branch.detach(), scale)
        d_residual, = torch.autograd.grad(out.sum(), residual)
        assert counter.calls == 3  # no launch for the branch's gradient
        assert torch.equal(d_residual, torch.ones_like(residual))

    def test_drop_path_takes_it(self, monkeypatch, reported_seed):
        """DropPath.add on the kernel: the masks of its forward for the
        same seed, as on ATen's ops."""
        counter = CountLaunches(monkeypatch)
        drop = DropPath(0.3).train()
        residual, branch, _ = inputs((6, 5, 7, 8), torch.bfloat16)
        torch.manual_seed(3)
        out = drop.add(residual, branch)
        assert counter.calls == 1
        torch.manual_seed(3)
        kept = drop(torch.ones(6)) * 0.7  # the masks, 0 or 1
        expected = residual.double() + branch.double() * (
            kept.double() / 0.7).view(-1, 1, 1, 1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6,
                                   atol=1e-6)


test_kernel_in_triton_interpreter = interpreter_test(__file__, 6)


@needs_triton
def test_unsupported_reasons(kernel_on_cpu):
    residual, branch, scale = inputs((2, 3, 4), torch.bfloat16)
    reason = sa.unsupported_reason
    assert reason(residual, branch, scale) is None
    assert 'not a float32 sum' in reason(residual, branch.float(), scale)
    assert 'not a float32 sum' in reason(residual.double(), branch, scale)
    assert 'not a non-empty batch' in reason(residual, branch[:1], scale)
    assert 'not a non-empty batch' in reason(residual[:0], branch[:0],
                                             scale[:0])
    assert reason(residual.transpose(1, 2), branch.transpose(1, 2),
                  scale) == 'residual and branch are not both contiguous'
    assert 'not a contiguous float32 (2, )' in reason(residual, branch,
                                                      scale.double())
    assert 'not a contiguous float32 (2, )' in reason(residual, branch,
                                                      scale[:1])
    with patch.object(torch.compiler, 'is_compiling', lambda: True):
        assert 'torch.compile' in reason(residual, branch, scale)
    with patch.object(sa, 'MAX_BLOCKS_PER_SAMPLE', 2), \
            patch.object(sa, 'BLOCK', 4):
        assert reason(residual, branch, scale) == (
            'a sample of 12 elements needs more than 2 programs of 4')


def test_off_the_kernel_it_is_addcmul():
    """Where the kernel does not run (CPU tensors, by default; any dtypes)
    the cast branch and one addcmul, bit for bit."""
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        residual, branch, scale = inputs((3, 4, 5), dtype)
        scale = scale.to(torch.promote_types(dtype, torch.float32))
        out = sa.scaled_add(residual, branch, scale)
        promoted = torch.promote_types(residual.dtype, dtype)
        assert torch.equal(out, torch.addcmul(residual, branch.to(promoted),
                                              scale.view(-1, 1, 1)))


@needs_cuda
@pytest.mark.parametrize('shape', [(128, 56, 56, 96), (2, 200, 336, 96),
                                   (3, 37, 53, 100), (2, 7, 9, 768)])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_gpu_matches_float64(shape, dtype, monkeypatch, reported_seed):
    """VMamba-T's block shapes (a classifier's and Mask R-CNN's stage 0)
    and odd ones, on the GPU."""
    counter = CountLaunches(monkeypatch)
    check_against_float64(*inputs(shape, dtype, 'cuda', kept=(1., 0., 1.)))
    assert counter.calls == 2
