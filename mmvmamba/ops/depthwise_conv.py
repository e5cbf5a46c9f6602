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

With :data:`CONV_BACKWARD_ON_TRITON` set, calls that autograd records run
on Triton too (:class:`_DepthwiseConvFunction`): the same forward kernel,
which keeps the view it read (not a dense copy) for the backward; the input
gradient is that kernel on the output gradient with the kernel rotated by
180 degrees (exact for an odd kernel, stride 1, "same" padding), the weight
and bias gradients float32 sums over ``(B, H, W)`` in two deterministic
stages (per-program partial sums, then their sum), returned in the
parameters' dtypes. Off by default: not yet timed against cuDNN on a GPU
(``benchmarks/depthwise_conv.py``). ``torch.compile`` runs the module
(cuDNN) either way: no custom op is registered for these kernels.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .checks import autograd_records, compiling_reason, forward_only_reason
from .layer_norm import TRITON_IMPORT_ERROR, tl, triton

#: Whether calls that autograd records (training) run the Triton forward and
#: backward; else the module (cuDNN). Off until measured on a GPU.
CONV_BACKWARD_ON_TRITON = False

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
#: Elements of a weight-gradient program's tile: positions x taps (padded
#: to a power of two) x channels.
WGRAD_TILE_ELEMENTS = 2048
#: Widest channel block of a weight-gradient program.
WGRAD_MAX_BLOCK_C = 64
#: Warps of a weight-gradient program.
WGRAD_NUM_WARPS = 4
#: Weight-gradient programs per SM (each sums a run of rows into one
#: partial sum).
WGRAD_PROGRAMS_PER_SM = 4
#: Weight-gradient programs along the rows off CUDA (Triton's interpreter).
WGRAD_PROGRAMS_OFF_CUDA = 2

if triton is not None:

    @triton.jit
    def _depthwise_conv_kernel(X, Wt, Bias, Y, height, width, channels,
                               x_batch_stride, x_row_stride, x_col_stride,
                               K: tl.constexpr, HAS_BIAS: tl.constexpr,
                               SILU: tl.constexpr, BLOCK_W: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        """One row ``(b, h)``, BLOCK_W positions x BLOCK_C channels of Y
        (contiguous ``(B, H, W, C)``): the K x K taps of X (zero outside the
        map; unit stride along C) times Wt (``(C, K, K)``), plus Bias,
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

    @triton.jit
    def _depthwise_conv_wgrad_kernel(X, DY, DW_partial, DB_partial, height,
                                     width, channels, n_tiles,
                                     tiles_per_program, x_batch_stride,
                                     x_row_stride, x_col_stride,
                                     dy_batch_stride, dy_row_stride,
                                     dy_col_stride, K: tl.constexpr,
                                     TAPS: tl.constexpr,
                                     STORE_DW: tl.constexpr,
                                     STORE_DB: tl.constexpr,
                                     BLOCK_W: tl.constexpr,
                                     BLOCK_C: tl.constexpr):
        """Partial sums of the weight and bias gradients over ``(B, H, W)``.

        Program ``(pid, c)`` takes the tiles (one row ``(b, h)``, BLOCK_W
        positions) ``pid * tiles_per_program`` up to the next program's,
        BLOCK_C channels. Per position, tap (``dy * K + dx``, TAPS padded to
        a power of two) and channel it adds DY times X at the tap (zero
        outside the map) in float32, and DY alone; the sums go to row
        ``pid`` of DW_partial (``(programs, C, K * K)``) and DB_partial
        (``(programs, C)``). X and DY have unit stride along C."""
        pid = tl.program_id(0)
        chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        chan_mask = chans < channels
        taps = tl.arange(0, TAPS)
        tap_ok = taps < K * K
        tap_rows = taps // K - K // 2
        tap_cols = taps % K - K // 2
        col_blocks = tl.cdiv(width, BLOCK_W)
        dw_sum = tl.zeros((BLOCK_W, TAPS, BLOCK_C), dtype=tl.float32)
        db_sum = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        tile = pid * tiles_per_program
        end = tl.minimum(tile + tiles_per_program, n_tiles)
        # a while loop: see _layer_norm_bwd_kernel (Triton's interpreter)
        while tile < end:
            row = tile // col_blocks
            b = (row // height).to(tl.int64)
            h = row % height
            cols = (tile % col_blocks) * BLOCK_W + tl.arange(0, BLOCK_W)
            col_ok = cols < width
            dy_mask = col_ok[:, None] & chan_mask[None, :]
            dy = tl.load(DY + b * dy_batch_stride + h.to(tl.int64) *
                         dy_row_stride + cols.to(tl.int64)[:, None] *
                         dy_col_stride + chans[None, :],
                         mask=dy_mask, other=0.).to(tl.float32)
            if STORE_DB:
                db_sum += dy
            if STORE_DW:
                src_rows = h + tap_rows
                src_cols = cols[:, None] + tap_cols[None, :]
                src_ok = (tap_ok & (src_rows >= 0) &
                          (src_rows < height))[None, :] & (
                              (src_cols >= 0) & (src_cols < width)
                              & col_ok[:, None])
                offsets = (src_rows.to(tl.int64)[None, :] * x_row_stride +
                           src_cols.to(tl.int64) * x_col_stride)
                x = tl.load(X + b * x_batch_stride + offsets[:, :, None] +
                            chans[None, None, :],
                            mask=src_ok[:, :, None] &
                            chan_mask[None, None, :],
                            other=0.).to(tl.float32)
                dw_sum += x * dy[:, None, :]
            tile += 1
        if STORE_DW:
            out = DW_partial + (pid * channels + chans[None, :]).to(
                tl.int64) * (K * K) + taps[:, None]
            tl.store(out, tl.sum(dw_sum, axis=0),
                     mask=tap_ok[:, None] & chan_mask[None, :])
        if STORE_DB:
            tl.store(DB_partial + pid * channels + chans,
                     tl.sum(db_sum, axis=0), mask=chan_mask)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """Autocast's dtype for ``x``'s device where it is on (one of
    :data:`AUTOCAST_DEVICE_TYPES`), else None."""
    device_type = x.device.type
    if (device_type in AUTOCAST_DEVICE_TYPES
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return None


def unsupported_reason(conv: nn.Conv2d, x: torch.Tensor) -> Optional[str]:
    """Why :func:`depthwise_conv_nhwc` would not run the kernels for
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
    autocast_dtype = _autocast_dtype(x)
    dtype = autocast_dtype or x.dtype
    if dtype not in TRITON_DTYPES or x.dtype not in TRITON_DTYPES:
        return f'x of {x.dtype} computed in {dtype} is not covered'
    if conv.weight.dtype not in TRITON_DTYPES:
        # autocast leaves float64 as it is: the module's own error
        return f'the weight of {conv.weight.dtype} is not covered'
    if autocast_dtype is None and conv.weight.dtype != x.dtype:
        return (f'x is {x.dtype} and the weight {conv.weight.dtype} outside '
                'autocast')
    if CONV_BACKWARD_ON_TRITON:
        return compiling_reason()
    return forward_only_reason(x, conv.weight, conv.bias)


def _taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``(C, 1, K, K)`` weight as the kernels read it: ``(C, K, K)``,
    contiguous, in ``dtype`` (rounded as autocast hands it to cuDNN)."""
    return weight.to(dtype).flatten(0, 1).contiguous()


def _conv(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor],
          silu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """Launch the forward kernel: ``x`` (``(B, H, W, C)``, unit stride
    along C) convolved with ``taps`` (``(C, K, K)``, contiguous), plus
    ``bias``, its SiLU with ``silu``, into a contiguous map of
    ``out_dtype``."""
    batch, height, width, channels = x.shape
    k = taps.shape[-1]
    out = torch.empty((batch, height, width, channels), dtype=out_dtype,
                      device=x.device)
    block_c = min(MAX_BLOCK_C, max(16, 1 << (channels - 1).bit_length()))
    block_w = min(max(1, TILE_ELEMENTS // block_c),
                  1 << (width - 1).bit_length())
    grid = (batch * height, triton.cdiv(width, block_w),
            triton.cdiv(channels, block_c))
    _depthwise_conv_kernel[grid](
        x, taps, taps if bias is None else bias, out, height, width,
        channels, x.stride(0), x.stride(1), x.stride(2),
        K=k, HAS_BIAS=bias is not None, SILU=silu, BLOCK_W=block_w,
        BLOCK_C=block_c, num_warps=4)
    return out


def wgrad_config(channels: int, width: int, k: int) -> Tuple[int, int, int]:
    """Tile of the weight-gradient kernel for C = ``channels``, W =
    ``width`` and a ``k x k`` kernel.

    Returns:
        tuple[int, int, int]: ``(taps, block_w, block_c)``: the K * K taps
        padded to a power of two, the positions and the channels of a tile
        (at most :data:`WGRAD_MAX_BLOCK_C`; :data:`WGRAD_TILE_ELEMENTS` in
        all where W allows).
    """
    taps = 1 << (k * k - 1).bit_length()
    block_c = min(WGRAD_MAX_BLOCK_C,
                  max(16, 1 << (channels - 1).bit_length()))
    block_w = min(max(1, WGRAD_TILE_ELEMENTS // (taps * block_c)),
                  1 << (width - 1).bit_length())
    return taps, block_w, block_c


def _weight_grads(x: torch.Tensor, grad: torch.Tensor, k: int,
                  need_weight: bool, need_bias: bool
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The weight (``(C, K * K)``) and bias (``(C,)``) gradients, float32,
    from the map ``x`` and the output gradient ``grad`` (both
    ``(B, H, W, C)`` with unit stride along C); None where not asked."""
    batch, height, width, channels = x.shape
    taps, block_w, block_c = wgrad_config(channels, width, k)
    chan_blocks = triton.cdiv(channels, block_c)
    n_tiles = batch * height * triton.cdiv(width, block_w)
    if x.device.type == 'cuda':
        sms = torch.cuda.get_device_properties(
            x.device).multi_processor_count
        cap = max(1, WGRAD_PROGRAMS_PER_SM * sms // chan_blocks)
    else:
        cap = WGRAD_PROGRAMS_OFF_CUDA
    tiles_per_program = triton.cdiv(n_tiles, min(n_tiles, cap))
    programs = triton.cdiv(n_tiles, tiles_per_program)
    f32 = dict(dtype=torch.float32, device=x.device)
    dw_partial = torch.empty((programs, channels, k * k), **f32)
    db_partial = torch.empty((programs, channels), **f32)
    _depthwise_conv_wgrad_kernel[(programs, chan_blocks)](
        x, grad, dw_partial, db_partial, height, width, channels, n_tiles,
        tiles_per_program, x.stride(0), x.stride(1), x.stride(2),
        grad.stride(0), grad.stride(1), grad.stride(2), K=k, TAPS=taps,
        STORE_DW=need_weight, STORE_DB=need_bias, BLOCK_W=block_w,
        BLOCK_C=block_c, num_warps=WGRAD_NUM_WARPS)
    return (dw_partial.sum(0) if need_weight else None,
            db_partial.sum(0) if need_bias else None)


class _DepthwiseConvFunction(torch.autograd.Function):
    """Autograd of the Triton depthwise convolution (kernels launched
    directly; no double backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, dtype):
        """``x`` (``(B, H, W, C)``, unit stride along C), ``weight``
        (``(C, 1, K, K)``), ``bias`` (or None) taken to ``dtype`` (autocast's
        or x's) as autocast hands them to cuDNN; the result in ``dtype``."""
        x_in = x.to(dtype)
        taps = _taps(weight, dtype)
        bias_in = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x_in, taps, bias_in)
        ctx.silu = silu
        ctx.dtypes = (x.dtype, weight.dtype,
                      None if bias is None else bias.dtype)
        ctx.weight_shape = weight.shape
        return _conv(x_in, taps, bias_in, silu, dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, taps, bias = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        if ctx.silu:  # through the SiLU, at the float32 sum recomputed
            pre = _conv(x, taps, bias, False, torch.float32)
            sigmoid = torch.sigmoid(pre)
            grad = grad.float() * sigmoid * (1 + pre * (1 - sigmoid))
        elif grad.stride(-1) != 1:
            grad = grad.contiguous()
        # the kernel rotated by 180 degrees
        dx = _conv(grad, taps.flip(1, 2).contiguous(), None, False,
                   x_dtype) if need_x else None
        dw = db = None
        if need_weight or need_bias:
            dw, db = _weight_grads(x, grad, taps.shape[-1], need_weight,
                                   need_bias)
        if dw is not None:
            dw = dw.view(ctx.weight_shape).to(weight_dtype)
        if db is not None:
            db = db.to(bias_dtype)
        return dx, dw, db, None, None


def depthwise_conv_nhwc(conv: nn.Conv2d,
                        x: torch.Tensor,
                        silu: bool = False) -> torch.Tensor:
    """``conv`` (a depthwise ``nn.Conv2d``) on the channels-last map ``x``.

    Args:
        conv (nn.Conv2d): Depthwise (``groups`` = channels), an odd square
            kernel, stride 1, "same" zero padding.
        x (Tensor): ``(B, H, W, C)``, any strides (the kernel needs unit
            stride along C).
        silu (bool): Return ``SiLU(conv(x))`` (taken in float32 before the
            rounding, where the kernel runs). Defaults to False.

    Returns:
        Tensor: ``(B, H, W, C)``, in the dtype of ``conv``'s result
        (autocast's, if on); contiguous where the kernel ran.
    """
    if unsupported_reason(conv, x) is not None:
        out = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return F.silu(out) if silu else out
    dtype = _autocast_dtype(x) or x.dtype
    if autograd_records(x, conv.weight, conv.bias):
        return _DepthwiseConvFunction.apply(x, conv.weight, conv.bias, silu,
                                            dtype)
    # the parameters as autocast hands them to cuDNN
    bias = None if conv.bias is None else conv.bias.detach().to(dtype)
    return _conv(x.to(dtype), _taps(conv.weight.detach(), dtype), bias, silu,
                 dtype)
