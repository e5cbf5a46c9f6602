"""A residual sum with a per-sample scale of a half-precision branch, on a
Triton kernel for CUDA tensors.

Under autocast a block's branch ends in ``out_proj``'s half-precision output
while the residual stream stays float32. Stochastic depth's
``residual + scale[b] * branch`` then takes ATen a cast of the branch to
float32 and an ``addcmul`` forward, and the product with the scale and a
cast back to the branch's dtype backward (one kernel of mixed dtypes is
slower still: docs/benchmarks.md). :func:`scaled_add` reads the branch in
its own dtype and writes the float32 sum in one pass, and its backward
writes the branch's gradient, rounded to its dtype, in one more; the
residual's gradient is the incoming one, as for ATen's sum.

It runs the kernel where :func:`unsupported_reason` finds nothing against
it, else the ATen ops; both give the same values up to the rounding of one
float32 multiply-add.
"""
from typing import Optional

import torch

from .checks import HALF
from .layer_norm import TRITON_IMPORT_ERROR, tl, triton

#: Device types whose tensors take the kernel (tests add 'cpu' to run it in
#: Triton's interpreter).
TRITON_DEVICE_TYPES = ('cuda', )
#: Elements a program, and its warps.
BLOCK = 4096
NUM_WARPS = 8
#: Most programs a sample (the grid's second dimension, CUDA's limit).
MAX_BLOCKS_PER_SAMPLE = 65535

if triton is not None:

    @triton.jit
    def _scaled_add_kernel(R, X, S, Y, n_per_sample,
                           HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        """``Y = R + S[b] * X`` (``S[b] * X`` without HAS_RESIDUAL) over
        sample ``b = program_id(0)`` of contiguous tensors of
        ``n_per_sample`` elements a sample, in float32, rounded to Y's
        dtype."""
        sample = tl.program_id(0).to(tl.int64)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_per_sample
        at = sample * n_per_sample + offsets
        scale = tl.load(S + sample)
        y = scale * tl.load(X + at, mask=mask, other=0.).to(tl.float32)
        if HAS_RESIDUAL:
            y += tl.load(R + at, mask=mask, other=0.).to(tl.float32)
        tl.store(Y + at, y.to(Y.dtype.element_ty), mask=mask)


def _launch(residual: Optional[torch.Tensor], x: torch.Tensor,
            scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel on contiguous ``x`` (and ``residual``, its shape) with the
    float32 per-sample ``scale`` (``(B, )``); the result in ``dtype``."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    per_sample = x[0].numel()
    _scaled_add_kernel[(x.shape[0], triton.cdiv(per_sample, BLOCK))](
        x if residual is None else residual, x, scale, out, per_sample,
        HAS_RESIDUAL=residual is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


class _ScaledAdd(torch.autograd.Function):
    """:func:`_launch` forward; backward: the residual's gradient as it
    comes, the branch's ``scale[b] * grad`` in the branch's dtype."""

    @staticmethod
    def forward(ctx, residual, branch, scale):
        ctx.branch_dtype = branch.dtype
        ctx.save_for_backward(scale)
        return _launch(residual, branch, scale, residual.dtype)

    @staticmethod
    def backward(ctx, grad):
        scale, = ctx.saved_tensors
        grad_branch = None
        if ctx.needs_input_grad[1]:
            grad_branch = _launch(None, grad.contiguous(), scale,
                                  ctx.branch_dtype)
        return grad if ctx.needs_input_grad[0] else None, grad_branch, None


def unsupported_reason(residual: torch.Tensor, branch: torch.Tensor,
                       scale: torch.Tensor) -> Optional[str]:
    """Why :func:`scaled_add` would not run the kernel on these, or None if
    it would."""
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    if residual.device.type not in TRITON_DEVICE_TYPES:
        return (f'residual is on {residual.device.type}; the kernel takes '
                f'tensors on {", ".join(TRITON_DEVICE_TYPES)}')
    if torch.compiler.is_compiling():
        return 'torch.compile traces the call (the ATen ops run)'
    if residual.dtype != torch.float32 or branch.dtype not in HALF:
        return (f'residual of {residual.dtype} and branch of {branch.dtype}'
                ' are not a float32 sum of a half-precision branch')
    if (branch.shape != residual.shape or branch.dim() == 0
            or branch.numel() == 0):
        return (f'branch of shape {tuple(branch.shape)} is not a non-empty '
                f'batch of residual\'s shape {tuple(residual.shape)}')
    if not (residual.is_contiguous() and branch.is_contiguous()):
        return 'residual and branch are not both contiguous'
    if triton.cdiv(branch[0].numel(), BLOCK) > MAX_BLOCKS_PER_SAMPLE:
        return (f'a sample of {branch[0].numel()} elements needs more than '
                f'{MAX_BLOCKS_PER_SAMPLE} programs of {BLOCK}')
    if (scale.shape != (residual.shape[0], ) or scale.dtype != torch.float32
            or not scale.is_contiguous()):
        return (f'scale of shape {tuple(scale.shape)} and {scale.dtype} is '
                f'not a contiguous float32 ({residual.shape[0]}, )')
    if scale.device != residual.device or branch.device != residual.device:
        return 'residual, branch and scale are not on one device'
    return None


def scaled_add(residual: torch.Tensor, branch: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    """``residual + scale[b] * branch`` for each sample ``b``.

    Args:
        residual (Tensor): ``(B, ...)``.
        branch (Tensor): ``residual``'s shape.
        scale (Tensor): ``(B, )``, float32.

    Returns:
        Tensor: The sum, in the dtype ATen promotes the three to.
    """
    if unsupported_reason(residual, branch, scale) is None:
        return _ScaledAdd.apply(residual, branch, scale)
    dtype = torch.promote_types(residual.dtype, branch.dtype)
    return torch.addcmul(residual, branch.to(dtype),
                         scale.view((-1, ) + (1, ) * (branch.dim() - 1)))
