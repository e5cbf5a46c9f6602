"""Depthwise 2-D convolution of a channels-last map, on a Triton kernel for
CUDA tensors.

SS2D convolves the first half of ``in_proj``'s output: a ``(B, H, W, E)``
view whose positions are ``2E`` elements apart. ``nn.Conv2d`` on its NCHW
permutation first copies it into a dense channels-last tensor, and cuDNN
adds the bias in a pass of its own (under autocast, to the sum already
rounded to bfloat16). :func:`depthwise_conv_nhwc` reads the view as it is
and writes ``conv(x) + bias`` in one pass, summing the ``k x k`` taps and
the bias in float32 and rounding once.

It runs the kernel for calls autograd does not record (inference,
``torch.no_grad``) when :func:`unsupported_reason` finds nothing against it,
else the module itself (cuDNN) on the permuted view; both return the
channels-last map in the dtype ``nn.Conv2d`` returns (autocast's, if on),
with the same values up to float32 rounding.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import (HALF_AND_FLOAT, autocast_dtype, check_bool, check_tensor,
                     forward_only_reason)
from .layer_norm import TRITON_IMPORT_ERROR, padded_channels, tl, triton

#: Device types whose tensors take the kernel (tests add 'cpu' to run it in
#: Triton's interpreter).
TRITON_DEVICE_TYPES = ('cuda', )
#: Device types whose autocast runs convolutions in its lower precision
#: (tests add 'cpu' to take CPU autocast for CUDA's).
AUTOCAST_DEVICE_TYPES = ('cuda', )
#: Dtypes the kernel computes with (inputs and weights in it, float32 sums).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Elements of a program's tile: BLOCK_W positions x BLOCK_C channels.
TILE_ELEMENTS = 2048
#: Widest channel block of a program.
MAX_BLOCK_C = 128

if triton is not None:

    @triton.jit
    def _depthwise_conv_kernel(X, Wt, Bias, Y, height, width, channels,
                               x_batch_stride, x_row_stride, x_col_stride,
                               K: tl.constexpr, HAS_BIAS: tl.constexpr,
                               SILU: tl.constexpr, BLOCK_W: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        """One row ``(b, h)``, BLOCK_W positions x BLOCK_C channels of Y
        (contiguous ``(B, H, W, C)``): the K x K taps of X (zero outside the
        map; unit stride along C) times Wt (``(C, K * K)``), plus Bias,
        summed in float32; its SiLU with SILU."""
        row = tl.program_id(0)
        b = row // height
        h = row % height
        cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        chan_mask = chans < channels
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        x_batch = X + b.to(tl.int64) * x_batch_stride
        for dy in tl.static_range(K):
            src_row = h + dy - K // 2
            row_ok = (src_row >= 0) & (src_row < height)
            x_row = x_batch + src_row.to(tl.int64) * x_row_stride
            for dx in tl.static_range(K):
                src_cols = cols + dx - K // 2
                col_ok = (src_cols >= 0) & (src_cols < width)
                mask = row_ok & col_ok[:, None] & chan_mask[None, :]
                x = tl.load(x_row + src_cols.to(tl.int64)[:, None] *
                            x_col_stride + chans[None, :],
                            mask=mask, other=0.).to(tl.float32)
                w = tl.load(Wt + chans * (K * K) + (dy * K + dx),
                            mask=chan_mask, other=0.).to(tl.float32)
                acc += x * w[None, :]
        if HAS_BIAS:
            bias = tl.load(Bias + chans, mask=chan_mask,
                           other=0.).to(tl.float32)
            acc += bias[None, :]
        if SILU:
            acc = acc / (1. + tl.exp(-acc))
        out_mask = (cols < width)[:, None] & chan_mask[None, :]
        out = Y + (row.to(tl.int64) * width + cols[:, None]) * channels
        tl.store(out + chans[None, :], acc.to(Y.dtype.element_ty),
                 mask=out_mask)


def unsupported_reason(conv: nn.Conv2d, x: torch.Tensor) -> Optional[str]:
    """Why :func:`depthwise_conv_nhwc` would not run the kernel for
    ``conv`` on the channels-last map ``x``, or None if it would."""
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    if x.device.type not in TRITON_DEVICE_TYPES:
        return (f'x is on {x.device.type}; the kernel takes tensors on '
                f'{", ".join(TRITON_DEVICE_TYPES)}')
    k = conv.kernel_size[0]
    channels = conv.in_channels
    if not (conv.groups == channels == conv.out_channels
            and conv.kernel_size == (k, k) and k % 2 == 1
            and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.padding == (k // 2, k // 2)
            and conv.padding_mode == 'zeros'):
        return (f'{conv} is not a depthwise convolution with an odd square '
                'kernel, stride 1 and "same" zero padding')
    if x.dim() != 4 or x.shape[-1] != channels or x.numel() == 0:
        return (f'x of shape {tuple(x.shape)} is not a non-empty (B, H, W, '
                f'{channels}) map')
    if x.stride(-1) != 1:
        return f'x is not contiguous along C (stride {x.stride(-1)})'
    cast_dtype = autocast_dtype(x, AUTOCAST_DEVICE_TYPES)
    dtype = cast_dtype or x.dtype
    if dtype not in TRITON_DTYPES or x.dtype not in TRITON_DTYPES:
        return f'x of {x.dtype} computed in {dtype} is not covered'
    if cast_dtype is None and conv.weight.dtype != x.dtype:
        return (f'x is {x.dtype} and the weight {conv.weight.dtype} outside '
                'autocast')
    return forward_only_reason(x, conv.weight, conv.bias)


class _ChannelBias(torch.autograd.Function):
    """``x + bias`` over the last dimension of a channels-last map, in
    ``x``'s dtype (as autocast's conv adds it); the bias's gradient as one
    product of the gradient's ``(rows, C)`` view with a vector of ones
    (ATen's column reduction read a stage-0 map about 4x slower on an H200;
    docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, x, bias):
        ctx.bias_dtype = bias.dtype
        return x + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        grad_bias = None
        if ctx.needs_input_grad[1]:
            rows = grad.reshape(-1, grad.shape[-1])
            grad_bias = (rows.new_ones(1, rows.shape[0]) @ rows).view(-1)
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad, grad_bias


def depthwise_conv_nhwc(conv: nn.Conv2d,
                        x: torch.Tensor,
                        silu: bool = False,
                        module_call: bool = True) -> torch.Tensor:
    """``conv`` (a depthwise ``nn.Conv2d``) on the channels-last map ``x``.

    Args:
        conv (nn.Conv2d): Depthwise (``groups`` = channels), an odd square
            kernel, stride 1, "same" zero padding.
        x (Tensor): ``(B, H, W, C)``, any strides (the kernel needs unit
            stride along C).
        silu (bool): Return ``SiLU(conv(x))`` (taken in float32 before the
            rounding, where the kernel runs). Defaults to False.
        module_call (bool): Where the kernel does not run, call ``conv``
            (its hooks run). False: its parameters through ``F.conv2d``
            without the bias, which :class:`_ChannelBias` adds, so that the
            bias's gradient is one matrix-vector product instead of ATen's
            reduction. Defaults to True.

    Returns:
        Tensor: ``(B, H, W, C)``, in the dtype of ``conv``'s result
        (autocast's, if on); contiguous where the kernel ran.
    """
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(
            f'conv must be an nn.Conv2d, got {type(conv).__name__}')
    check_tensor('x', x, (None, None, None, conv.in_channels), HALF_AND_FLOAT,
                 '(B, H, W, in_channels)')
    check_bool('silu', silu)
    check_bool('module_call', module_call)
    if unsupported_reason(conv, x) is not None:
        x = x.permute(0, 3, 1, 2)
        if module_call or conv.bias is None:
            out = conv(x).permute(0, 2, 3, 1)
        else:
            out = _ChannelBias.apply(
                conv._conv_forward(x, conv.weight, None).permute(0, 2, 3, 1),
                conv.bias)
        return F.silu(out) if silu else out
    dtype = autocast_dtype(x, AUTOCAST_DEVICE_TYPES) or x.dtype
    batch, height, width, channels = x.shape
    k = conv.kernel_size[0]
    # the parameters as autocast hands them to cuDNN
    weight = conv.weight.detach().to(dtype).reshape(channels,
                                                    k * k).contiguous()
    bias = None if conv.bias is None else conv.bias.detach().to(dtype)
    x = x.to(dtype)
    out = torch.empty((batch, height, width, channels), dtype=dtype,
                      device=x.device)
    block_c = min(MAX_BLOCK_C, padded_channels(channels))
    block_w = min(max(1, TILE_ELEMENTS // block_c),
                  1 << (width - 1).bit_length())
    grid = (batch * height, triton.cdiv(width, block_w),
            triton.cdiv(channels, block_c))
    _depthwise_conv_kernel[grid](
        x, weight, weight if bias is None else bias, out, height,
        width, channels, x.stride(0), x.stride(1), x.stride(2),
        K=k, HAS_BIAS=bias is not None, SILU=silu, BLOCK_W=block_w,
        BLOCK_C=block_c, num_warps=4)
    return out
