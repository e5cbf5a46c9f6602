"""LayerNorm over the last dimension on Triton kernels, for CUDA tensors.

Under CUDA autocast ``F.layer_norm`` runs in float32: a bfloat16 input is
first copied to float32, then normalised by ATen's float32 kernels. The
kernels here read the input in its own dtype (float32, bfloat16 or float16)
and compute in float32 (the upcast is exact, so the results are those of the
float32 copy without the copy), several rows per program when C is small.

- :func:`layer_norm` (``x, weight, bias, eps``) normalises over the last
  dimension of ``x``. It runs the Triton kernels when
  :func:`unsupported_reason` finds nothing against them (a CUDA tensor, Triton
  importable, ``1 <= C <=`` :data:`MAX_CHANNELS`, the last dimension
  contiguous, dtypes whose ``F.layer_norm`` result it reproduces), else
  ``F.layer_norm``; both give the same dtypes and the same values up to
  float32 rounding.
- :class:`LayerNorm` is ``nn.LayerNorm`` (same arguments, same state_dict)
  on :func:`layer_norm` for the calls autograd does not record (the
  backbones' norms); :func:`replace_layer_norms` swaps it in for the
  ``nn.LayerNorm`` modules of a model.
- :func:`gated_layer_norm` (SS2D's output gate) and :func:`add_layer_norm`
  (a residual add and the next norm) run the forward kernel with one more
  input, for calls autograd does not record.

Output dtype: float32 under CUDA autocast (whatever the input and parameter
dtypes, as autocast's float32 policy for ``layer_norm``); otherwise the
input's dtype, the parameters having that dtype too (mixed dtypes outside
autocast fall back). The forward keeps each row's mean and 1 / std
(float32) for the backward, as ATen does; the backward computes the requested
gradients in float32, the weight and bias gradients in two deterministic
stages (per-program partial sums over rows, then their sum). No double
backward.

``torch.compile`` (``fullgraph=True`` too) traces the same kernels through
``torch.library.triton_op`` custom ops (``mmvmamba::layer_norm_fwd``,
``mmvmamba::layer_norm_bwd``); eager calls go through an autograd Function
that launches them directly, which is lighter on the host. Where
``triton_op`` is missing (torch < 2.6), and under Triton's interpreter,
compiled code uses ``F.layer_norm``.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .checks import (autocast_dtype, autograd_records, check_bool,
                     check_float_dtype, check_same_device, check_tensor,
                     forward_only_reason)

try:
    import triton
    import triton.language as tl
except ImportError as error:  # CPU-only installs
    triton = tl = None
    TRITON_IMPORT_ERROR: Optional[str] = f'Triton is not importable: {error}'
else:
    TRITON_IMPORT_ERROR = None

#: Largest C the kernels take (one row is held in registers).
MAX_CHANNELS = 8192
#: Device types whose tensors take the Triton path (tests add 'cpu' to run
#: the kernels in Triton's interpreter).
TRITON_DEVICE_TYPES = ('cuda', )
#: Device types whose autocast runs ``layer_norm`` in float32 (CUDA's
#: policy; CPU autocast keeps bfloat16). Tests add 'cpu' to take CPU
#: autocast for CUDA's in Triton's interpreter.
AUTOCAST_DEVICE_TYPES = ('cuda', )
#: Input dtypes the kernels read.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Elements of a program's tile (rows x C padded to a power of two) when C
#: is small: the row block is TILE_ELEMENTS // padded C.
TILE_ELEMENTS = 4096
#: The same for the backward without the gate: half the forward's tile (4
#: warps a program where C <= 2048, the same elements a thread) measured
#: faster in VMamba-T's training steps (docs/ops.md).
BACKWARD_TILE_ELEMENTS = 2048
#: Programs per SM of the backward, each looping over row blocks and writing
#: one partial sum of the weight and bias gradients.
BACKWARD_PROGRAMS_PER_SM = 4
#: Backward programs off CUDA (Triton's interpreter in tests).
BACKWARD_PROGRAMS_OFF_CUDA = 2
#: The gate's backward launch by C padded to a power of two: (elements of a
#: program's tile, warps, programs per SM), a sweep's fastest (``python
#: benchmarks/layer_norm.py --gate --sweep``, one H200), kept since
#: VMamba-T's training step is faster with it (docs/ops.md). Widths not
#: listed take :func:`launch_config`'s.
GATE_BACKWARD_LAUNCH = {
    256: (2048, 8, 4),
    512: (4096, 4, 4),
    1024: (4096, 16, 2),
    2048: (4096, 16, 2),
}

if triton is not None:

    @triton.jit
    def _normalise(x, mask, n_cols, eps):
        """Rows of ``x`` (float32, zeros where ``mask`` is off) normalised:
        ``(x - mean) / std`` (zeros off the mask), each row's mean and
        1 / std."""
        mean = tl.sum(x, axis=1) / n_cols
        centred = tl.where(mask, x - mean[:, None], 0.)
        var = tl.sum(centred * centred, axis=1) / n_cols
        rstd = 1. / tl.sqrt(var + eps)
        return centred * rstd[:, None], mean, rstd

    @triton.jit
    def _affine(x_hat, W, B, cols, col_mask, HAS_WEIGHT: tl.constexpr,
                HAS_BIAS: tl.constexpr):
        """``x_hat * weight + bias`` (float32), either left out."""
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.).to(tl.float32)
            x_hat = x_hat * w[None, :]
        if HAS_BIAS:
            b = tl.load(B + cols, mask=col_mask, other=0.).to(tl.float32)
            x_hat = x_hat + b[None, :]
        return x_hat

    @triton.jit
    def _silu_and_sigmoid(z):
        """``SiLU(z)`` rounded to z's dtype (as ATen's ``silu`` returns it)
        and ``sigmoid(z)``, both as float32, from one exponential."""
        zf = z.to(tl.float32)
        denominator = 1. + tl.exp(-zf)
        silu = (zf / denominator).to(z.dtype).to(tl.float32)
        return silu, 1. / denominator

    @triton.jit
    def _layer_norm_fwd_kernel(X, Y, W, B, Mean, Rstd, Z, U, S, n_rows,
                               n_cols, x_row_stride, z_row_stride,
                               u_row_stride, eps,
                               HAS_WEIGHT: tl.constexpr,
                               HAS_BIAS: tl.constexpr,
                               HAS_GATE: tl.constexpr,
                               ADD_UPDATE: tl.constexpr,
                               STORE_STATS: tl.constexpr,
                               BLOCK_ROWS: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        """Normalise BLOCK_ROWS rows of X into Y (contiguous), keeping each
        row's mean and 1 / std with STORE_STATS; float32 arithmetic. With
        HAS_GATE, Y is the norm times ``SiLU(Z)``, the SiLU rounded to Z's
        dtype first (as ATen's ``silu`` returns it). With ADD_UPDATE, the
        rows normalised are ``X + U``, summed in float32 and rounded once to
        S's dtype (as ATen's add does), and written to S (contiguous)."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_C)
        row_mask = rows < n_rows
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * x_row_stride + cols[None, :],
                    mask=mask, other=0.).to(tl.float32)
        if ADD_UPDATE:
            u = tl.load(U + rows64[:, None] * u_row_stride + cols[None, :],
                        mask=mask, other=0.).to(tl.float32)
            total = (x + u).to(S.dtype.element_ty)
            tl.store(S + rows64[:, None] * n_cols + cols[None, :], total,
                     mask=mask)
            x = total.to(tl.float32)
        y, mean, rstd = _normalise(x, mask, n_cols, eps)
        y = _affine(y, W, B, cols, col_mask, HAS_WEIGHT, HAS_BIAS)
        if HAS_GATE:
            z = tl.load(Z + rows64[:, None] * z_row_stride + cols[None, :],
                        mask=mask, other=0.)
            silu, _ = _silu_and_sigmoid(z)
            y = y * silu
        tl.store(Y + rows64[:, None] * n_cols + cols[None, :],
                 y.to(Y.dtype.element_ty), mask=mask)
        if STORE_STATS:
            tl.store(Mean + rows, mean, mask=row_mask)
            tl.store(Rstd + rows, rstd, mask=row_mask)

    @triton.jit
    def _layer_norm_bwd_kernel(X, DY, DX, W, B, Mean, Rstd, Z, DZ,
                               Partial, db_row, n_rows, n_cols,
                               x_row_stride, dy_row_stride, z_row_stride,
                               eps, HAS_WEIGHT: tl.constexpr,
                               HAS_BIAS: tl.constexpr,
                               HAS_GATE: tl.constexpr,
                               STORE_DX: tl.constexpr, STORE_DZ: tl.constexpr,
                               STORE_DW: tl.constexpr,
                               STORE_DB: tl.constexpr,
                               BLOCK_ROWS: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        """Gradients of the norm: DX (contiguous) row by row; each program
        loops over the row blocks ``pid, pid + programs, ...`` and writes
        its partial sums of the weight and bias gradients to column ``pid``
        of Partial (float32, a row of ``programs`` a channel: the weight's
        from row 0, the bias's from row ``db_row``), which one sum along its
        rows finishes.

        With HAS_GATE, DY is the gradient of the forward's gated output
        ``norm * SiLU(Z)``: each row's mean and 1 / std are recomputed from
        X (Mean and Rstd are not read), the norm's gradient is ``DY *
        SiLU(Z)`` (the SiLU rounded to Z's dtype) and STORE_DZ writes Z's
        (contiguous, DZ's dtype) as ATen's ``silu_backward`` of ``DY *
        norm`` rounded to Z's dtype."""
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        n_blocks = tl.cdiv(n_rows, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(B + cols, mask=col_mask, other=0.).to(tl.float32)
        dw_sum = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
        db_sum = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
        # a while loop: Triton 3.6's interpreter takes a bound of ``range``
        # through int() of a one-element array, which NumPy >= 2.4 refuses
        # (the compiled loop is the same: its loads are not pipelined)
        block = pid
        while block < n_blocks:
            rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(X + rows64[:, None] * x_row_stride + cols[None, :],
                        mask=mask, other=0.).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * dy_row_stride + cols[None, :],
                         mask=mask, other=0.).to(tl.float32)
            if HAS_GATE:
                x_hat, _, rstd = _normalise(x, mask, n_cols, eps)
                z = tl.load(Z + rows64[:, None] * z_row_stride +
                            cols[None, :], mask=mask, other=0.)
                silu, sigmoid = _silu_and_sigmoid(z)
                if STORE_DZ:
                    normed = x_hat
                    if HAS_WEIGHT:
                        normed = normed * w[None, :]
                    if HAS_BIAS:
                        normed = normed + b[None, :]
                    # the product's gradient in SiLU's dtype, then SiLU's
                    d_silu = (dy * normed).to(z.dtype).to(tl.float32)
                    zf = z.to(tl.float32)
                    dz = d_silu * sigmoid * (1. + zf * (1. - sigmoid))
                    tl.store(DZ + rows64[:, None] * n_cols + cols[None, :],
                             dz.to(DZ.dtype.element_ty), mask=mask)
                dy = dy * silu  # now the norm's gradient
            else:
                mean = tl.load(Mean + rows, mask=row_mask, other=0.)
                rstd = tl.load(Rstd + rows, mask=row_mask, other=0.)
                x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None],
                                 0.)
            if STORE_DW:
                dw_sum += dy * x_hat
            if STORE_DB:
                db_sum += dy
            if STORE_DX:
                g = dy
                if HAS_WEIGHT:
                    g = dy * w[None, :]
                mean_g_x_hat = tl.sum(g * x_hat, axis=1) / n_cols
                mean_g = tl.sum(g, axis=1) / n_cols
                dx = (g - x_hat * mean_g_x_hat[:, None] -
                      mean_g[:, None]) * rstd[:, None]
                tl.store(DX + rows64[:, None] * n_cols + cols[None, :],
                         dx.to(DX.dtype.element_ty), mask=mask)
            block += n_programs
        if STORE_DW:
            tl.store(Partial + cols * n_programs + pid,
                     tl.sum(dw_sum, axis=0), mask=col_mask)
        if STORE_DB:
            tl.store(Partial + (db_row + cols) * n_programs + pid,
                     tl.sum(db_sum, axis=0), mask=col_mask)


def padded_channels(channels: int) -> int:
    """C padded to a power of two, at least 16: a program's row width."""
    return max(16, 1 << (channels - 1).bit_length())


def launch_config(channels: int,
                  tile_elements: Optional[int] = None) -> Tuple[int, int, int]:
    """Block shape and warps of the forward kernel for C = ``channels``.

    Args:
        channels (int): C.
        tile_elements (int, optional): Elements of a program's tile when C
            is small. Defaults to :data:`TILE_ELEMENTS`.

    Returns:
        tuple[int, int, int]: ``(block_c, block_rows, num_warps)``:
        :func:`padded_channels`, the rows of a program's tile
        (``tile_elements`` when C is small, one row from there up) and a
        warp for each 512 elements of the tile (16 elements a thread), 4 to
        16 warps.
    """
    if tile_elements is None:
        tile_elements = TILE_ELEMENTS
    block_c = padded_channels(channels)
    block_rows = max(1, tile_elements // block_c)
    num_warps = min(16, max(4, block_rows * block_c // 512))
    return block_c, block_rows, num_warps


def backward_launch_config(channels: int) -> Tuple[int, int, int, int]:
    """Launch setting of the backward kernel without the gate for C =
    ``channels``: :func:`launch_config`'s at :data:`BACKWARD_TILE_ELEMENTS`,
    and :data:`BACKWARD_PROGRAMS_PER_SM`.

    Returns:
        tuple[int, int, int, int]: ``(block_c, block_rows, num_warps,
        programs_per_sm)``.
    """
    return launch_config(channels, BACKWARD_TILE_ELEMENTS) + (
        BACKWARD_PROGRAMS_PER_SM, )


def gate_backward_launch_config(channels: int) -> Tuple[int, int, int, int]:
    """Launch setting of the backward kernel with the gate (more live values
    a row than without) for C = ``channels``: :data:`GATE_BACKWARD_LAUNCH`'s
    for C padded to a power of two, else :func:`backward_launch_config`'s.

    Returns:
        tuple[int, int, int, int]: ``(block_c, block_rows, num_warps,
        programs_per_sm)``.
    """
    block_c = padded_channels(channels)
    if block_c not in GATE_BACKWARD_LAUNCH:
        return backward_launch_config(channels)
    tile, num_warps, per_sm = GATE_BACKWARD_LAUNCH[block_c]
    return block_c, max(1, tile // block_c), num_warps, per_sm


def _launcher(kernel, traceable: bool):
    """The kernel itself (eager), or wrapped for tracing by
    ``torch.compile`` (inside the ``triton_op`` custom ops)."""
    return torch.library.wrap_triton(kernel) if traceable else kernel


def _backward_programs(n_blocks: int, per_sm: int,
                       device: torch.device) -> int:
    """Programs of the backward: ``per_sm`` per SM, at most one per row
    block."""
    if device.type == 'cuda':
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        cap = per_sm * sms
    else:
        cap = BACKWARD_PROGRAMS_OFF_CUDA
    return max(1, min(n_blocks, cap))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, C) with unit stride along C (a view when it can)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch_forward(x_rows: torch.Tensor, y: torch.Tensor,
                    weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], eps: float,
                    stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                    z_rows: Optional[torch.Tensor] = None,
                    update_rows: Optional[torch.Tensor] = None,
                    total: Optional[torch.Tensor] = None,
                    traceable: bool = False) -> None:
    """Launch the forward kernel on ``x_rows`` ((rows, C), unit stride along
    C) into ``y`` (contiguous rows): with ``stats``, each row's mean and
    1 / std written to that pair; with ``z_rows``, the norm gated by
    ``SiLU(z_rows)``; with ``update_rows``, ``x_rows + update_rows``
    normalised and written to ``total`` (contiguous rows)."""
    n_rows, channels = x_rows.shape
    block_c, block_rows, num_warps = launch_config(channels)
    # absent operands get ``y`` (never read or written)
    mean, rstd = (y, y) if stats is None else stats
    _launcher(_layer_norm_fwd_kernel, traceable)[(
        triton.cdiv(n_rows, block_rows), )](
            x_rows, y, y if weight is None else weight,
            y if bias is None else bias, mean, rstd,
            y if z_rows is None else z_rows,
            y if update_rows is None else update_rows,
            y if total is None else total, n_rows, channels,
            x_rows.stride(0), 0 if z_rows is None else z_rows.stride(0),
            0 if update_rows is None else update_rows.stride(0), eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_GATE=z_rows is not None,
            ADD_UPDATE=update_rows is not None, STORE_STATS=stats is not None,
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)


def _forward(x: torch.Tensor, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], eps: float,
             out_dtype: torch.dtype, traceable: bool = False,
             keep_stats: bool = True
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                        Optional[torch.Tensor]]:
    """Launch the forward on ``x`` (any leading shape).

    Returns:
        tuple[Tensor, Tensor, Tensor]: The output (``x``'s shape,
        ``out_dtype``), and each row's mean and 1 / std (float32; None
        without ``keep_stats``, for calls with no backward).
    """
    x_rows = _as_rows(x)
    n_rows, channels = x_rows.shape
    y = torch.empty((n_rows, channels), dtype=out_dtype, device=x.device)
    mean = rstd = None
    if keep_stats:
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _launch_forward(x_rows, y, weight, bias, eps,
                    stats=(mean, rstd) if keep_stats else None,
                    traceable=traceable)
    return y.view(x.shape), mean, rstd


def _launch_backward(grad_rows: torch.Tensor, x_rows: torch.Tensor,
                     z_rows: Optional[torch.Tensor],
                     weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor],
                     mean: Optional[torch.Tensor],
                     rstd: Optional[torch.Tensor], eps: float,
                     needs: Tuple[bool, bool, bool, bool],
                     traceable: bool = False) -> Tuple[torch.Tensor, ...]:
    """Launch the backward kernel on (rows, C) views with unit stride along
    C: of the norm (``z_rows`` None; the forward's ``mean`` and ``rstd``),
    or of the gated norm (``z_rows``; the statistics recomputed with
    ``eps``).

    Args:
        needs (tuple[bool]): Which of x, z, weight and bias need
            gradients (weight and bias only if given; z only with
            ``z_rows``).

    Returns:
        tuple[Tensor]: The gradients of x (contiguous, x's dtype), z
        (contiguous, z's dtype), weight and bias (theirs); an empty tensor
        for those not requested.
    """
    n_rows, channels = x_rows.shape
    need_x, need_z, need_weight, need_bias = needs
    gated = z_rows is not None
    need_z = need_z and gated
    need_weight = need_weight and weight is not None
    need_bias = need_bias and bias is not None
    config = (gate_backward_launch_config
              if gated else backward_launch_config)(channels)
    block_c, block_rows, num_warps, per_sm = config
    programs = _backward_programs(triton.cdiv(n_rows, block_rows), per_sm,
                                  x_rows.device)
    f32 = dict(dtype=torch.float32, device=x_rows.device)
    # unused pointers get ``unused`` (never read or written)
    unused = grad_rows if mean is None else mean
    dx = (torch.empty((n_rows, channels), dtype=x_rows.dtype,
                      device=x_rows.device) if need_x else unused)
    dz = (torch.empty((n_rows, channels), dtype=z_rows.dtype,
                      device=x_rows.device) if need_z else unused)
    # the weight's then the bias's partial sums, a row of ``programs`` a
    # channel: one sum along contiguous rows finishes both
    db_row = channels if need_weight else 0
    partial = (torch.empty((db_row + channels * need_bias, programs), **f32)
               if need_weight or need_bias else unused)
    _launcher(_layer_norm_bwd_kernel, traceable)[(programs, )](
        x_rows, grad_rows, dx, unused if weight is None else weight,
        unused if bias is None else bias, unused if mean is None else mean,
        unused if rstd is None else rstd, z_rows if gated else unused, dz,
        partial, db_row, n_rows, channels, x_rows.stride(0),
        grad_rows.stride(0), z_rows.stride(0) if gated else 0, eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=gated and bias is not None, HAS_GATE=gated,
        STORE_DX=need_x, STORE_DZ=need_z, STORE_DW=need_weight,
        STORE_DB=need_bias,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)
    # custom ops return tensors: an empty one for a gradient not requested
    empty = x_rows.new_empty(0)
    sums = partial.sum(1) if need_weight or need_bias else empty
    dw = sums[:db_row].to(weight.dtype) if need_weight else empty
    db = sums[db_row:].to(bias.dtype) if need_bias else empty
    return (dx if need_x else empty, dz if need_z else empty, dw, db)


def _backward(grad: torch.Tensor, x: torch.Tensor,
              weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              mean: torch.Tensor, rstd: torch.Tensor, need_x: bool,
              need_weight: bool, need_bias: bool, traceable: bool = False
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: the gradients of ``x`` (its dtype), ``weight``
    and ``bias`` (theirs); an empty tensor for those not requested."""
    dx, _, dw, db = _launch_backward(
        _as_rows(grad), _as_rows(x), None, weight, bias, mean, rstd, 0.,
        (need_x, False, need_weight, need_bias), traceable)
    return (dx.view(x.shape) if need_x else dx), dw, db


class _LayerNormFunction(torch.autograd.Function):
    """Eager autograd of the Triton LayerNorm (kernels launched directly)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, mean, rstd = _forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        dx, dw, db = _backward(grad, x, weight, bias, mean, rstd, need_x,
                               need_weight, need_bias)
        return (dx if need_x else None, dw if need_weight else None,
                db if need_bias else None, None, None)


_triton_op = getattr(torch.library, 'triton_op', None)
# Under Triton's interpreter (TRITON_INTERPRET=1 when Triton was imported)
# the kernels are not JIT functions and cannot be traced.
_INTERPRETED = triton is not None and not isinstance(
    _layer_norm_fwd_kernel, triton.runtime.jit.JITFunction)
#: Whether compiled code (torch.compile, torch.export) runs the kernels,
#: through the custom ops below; else it runs F.layer_norm.
COMPILE_OPS = triton is not None and _triton_op is not None

if COMPILE_OPS:

    @_triton_op('mmvmamba::layer_norm_fwd', mutates_args=())
    def _layer_norm_fwd_op(
            x: torch.Tensor, weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], eps: float, out_dtype: torch.dtype
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(x, weight, bias, eps, out_dtype, traceable=True)

    @_triton_op('mmvmamba::layer_norm_bwd', mutates_args=())
    def _layer_norm_bwd_op(
            grad: torch.Tensor, x: torch.Tensor,
            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            mean: torch.Tensor, rstd: torch.Tensor, need_x: bool,
            need_weight: bool, need_bias: bool
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(grad, x, weight, bias, mean, rstd, need_x,
                         need_weight, need_bias, traceable=True)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, _, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    def _op_backward(ctx, grad, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        dx, dw, db = torch.ops.mmvmamba.layer_norm_bwd(
            grad, x, weight, bias, mean, rstd, need_x, need_weight, need_bias)
        return (dx if need_x else None, dw if need_weight else None,
                db if need_bias else None, None, None)

    _layer_norm_fwd_op.register_autograd(_op_backward,
                                         setup_context=_setup_context)


def result_dtype(x: Union[torch.Tensor, torch.dtype],
                 weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor],
                 autocast: bool) -> Optional[torch.dtype]:
    """The dtype of ``F.layer_norm``'s result that the kernels reproduce.

    Args:
        x (Tensor | torch.dtype): The input, or its dtype.
        weight, bias (Tensor): The parameters (may be None).
        autocast (bool): Whether CUDA autocast is on (``layer_norm`` then
            runs in float32 on float32 copies of its inputs).

    Returns:
        torch.dtype | None: float32 under autocast, else ``x``'s dtype when
        the parameters have it too; None for dtypes the kernels do not take
        (float64, mixed dtypes outside autocast).
    """
    x_dtype = x if isinstance(x, torch.dtype) else x.dtype
    params = [p for p in (weight, bias) if p is not None]
    if x_dtype not in TRITON_DTYPES or any(p.dtype not in TRITON_DTYPES
                                           for p in params):
        return None
    if autocast:
        return torch.float32
    if any(p.dtype != x_dtype for p in params):
        return None
    return x_dtype


def _autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast of ``x``'s device (one of
    :data:`AUTOCAST_DEVICE_TYPES`) is on where this is called: the front
    function decides, before any dispatch, and hands the dtype down."""
    return autocast_dtype(x, AUTOCAST_DEVICE_TYPES) is not None


def norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.layer_norm`` computes in on ``x`` here: float32 under
    the autocast of :data:`AUTOCAST_DEVICE_TYPES`, else ``x``'s."""
    return torch.float32 if _autocast_on(x) else x.dtype


def unsupported_reason(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None,
                       x_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why :func:`layer_norm` would not run the Triton kernels on these
    inputs (normalised over ``x``'s last dimension), or None if it would;
    ``x_dtype`` is the dtype of the values normalised where it is not
    ``x``'s (:func:`add_layer_norm` normalises a sum)."""
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    if x.device.type not in TRITON_DEVICE_TYPES:
        return (f'x is on {x.device.type}; the kernels take tensors on '
                f'{", ".join(TRITON_DEVICE_TYPES)}')
    if x.dim() == 0 or x.numel() == 0:
        return f'x of shape {tuple(x.shape)} has no rows to normalise'
    channels = x.shape[-1]
    if channels > MAX_CHANNELS:
        return f'C = {channels} is above MAX_CHANNELS = {MAX_CHANNELS}'
    if channels > 1 and x.stride(-1) != 1:
        return (f'x is not contiguous in its last dimension (stride '
                f'{x.stride(-1)})')
    for name, param in (('weight', weight), ('bias', bias)):
        if param is None:
            continue
        if tuple(param.shape) != (channels, ):
            return (f'{name} has shape {tuple(param.shape)}, not '
                    f'({channels},)')
        if param.device != x.device or not param.is_contiguous():
            return f'{name} is not a contiguous tensor on {x.device}'
    x_dtype = x.dtype if x_dtype is None else x_dtype
    if result_dtype(x_dtype, weight, bias, _autocast_on(x)) is None:
        dtypes = [str(x_dtype)] + [str(t.dtype) for t in (weight, bias)
                                   if t is not None]
        return (f'dtypes {", ".join(dtypes)} (autocast '
                f'{"on" if _autocast_on(x) else "off"}) are not covered')
    return None


def layer_norm(x: torch.Tensor,
               weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last dimension
    of ``x``, on the Triton kernels when :func:`unsupported_reason` allows.

    Args:
        x (Tensor): ``(..., C)``.
        weight, bias (Tensor, optional): ``(C,)``.
        eps (float): Added to the variance. Defaults to 1e-5.
        out_dtype (torch.dtype, optional): The result's dtype, which the
            kernel writes (``F.layer_norm``'s result cast to it where the
            kernel does not run). Defaults to ``F.layer_norm``'s (float32
            under CUDA autocast).

    Returns:
        Tensor: ``x``'s shape.
    """
    check_float_dtype('out_dtype', out_dtype)
    if unsupported_reason(x, weight, bias) is not None or (
            torch.compiler.is_compiling()
            and (not COMPILE_OPS or _INTERPRETED)):
        y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
        return y if out_dtype is None else y.to(out_dtype)
    if out_dtype is None:
        out_dtype = result_dtype(x, weight, bias, _autocast_on(x))
    if torch.compiler.is_compiling():
        return torch.ops.mmvmamba.layer_norm_fwd(x, weight, bias, eps,
                                                 out_dtype)[0]
    if not autograd_records(x, weight, bias):
        # nothing kept for a backward: the kernel alone, without the
        # statistics or the Function (lighter on the host)
        return _forward(x, weight, bias, eps, out_dtype, keep_stats=False)[0]
    return _LayerNormFunction.apply(x, weight, bias, eps, out_dtype)


def _rows_reason(name: str, t: torch.Tensor) -> Optional[str]:
    """Why the forward kernel cannot read ``t`` (the argument ``name``) as
    rows: a dtype it does not take, a last dimension not contiguous; or
    None."""
    if t.dtype not in TRITON_DTYPES:
        return f'{name} is {t.dtype}, not one of {TRITON_DTYPES}'
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return (f'{name} is not contiguous in its last dimension (stride '
                f'{t.stride(-1)})')
    return None


def gate_unsupported_reason(x: torch.Tensor, z: torch.Tensor,
                            weight: Optional[torch.Tensor] = None,
                            bias: Optional[torch.Tensor] = None
                            ) -> Optional[str]:
    """Why :func:`gated_layer_norm` would not run its Triton kernel on these
    inputs, or None if it would."""
    reason = unsupported_reason(x, weight, bias)
    if reason is not None:
        return reason
    for name, t in (('x', x), ('weight', weight), ('bias', bias)):
        if t is not None and t.dtype != torch.float32:
            return (f'{name} is {t.dtype}; the gated kernel takes float32 '
                    'x, weight and bias')
    if tuple(z.shape) != tuple(x.shape) or z.device != x.device:
        return (f'z ({tuple(z.shape)} on {z.device}) is not of x\'s shape '
                f'{tuple(x.shape)} on {x.device}')
    return _rows_reason('z', z) or forward_only_reason(x, z, weight, bias)


def gated_layer_norm(x: torch.Tensor,
                     z: torch.Tensor,
                     weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None,
                     eps: float = 1e-5,
                     out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps) * F.silu(z)`` in one pass,
    as the input of a linear layer.

    One Triton kernel reads ``x`` and ``z`` and writes the product in the
    dtype that the linear layer reads (unless ``out_dtype`` is given):
    autocast's (for ``x``'s device) when CUDA autocast is on, else that of
    ``x`` times ``z``. It runs when
    :func:`gate_unsupported_reason` finds nothing against it (float32 ``x``
    and parameters; calls autograd does not record, no backward); else the
    ATen ops, cast so, give the same dtype and the same values up to float32
    rounding. SS2D's output gate (``out_norm``) calls this.

    Args:
        x (Tensor): ``(..., C)``, normalised over C.
        z (Tensor): ``x``'s shape, the gate's input.
        weight, bias (Tensor, optional): ``(C,)``.
        eps (float): Added to the variance. Defaults to 1e-5.
        out_dtype (torch.dtype, optional): The result's dtype (a
            recomputing backward's, where autocast is off). Defaults to the
            linear layer's input dtype, as above.

    Returns:
        Tensor: ``x``'s shape.

    Raises:
        ValueError: ``z`` is not a tensor of ``x``'s shape (it would
            broadcast).
    """
    check_tensor('z', z, tuple(x.shape))
    check_float_dtype('out_dtype', out_dtype)
    if out_dtype is None:
        out_dtype = autocast_dtype(x, AUTOCAST_DEVICE_TYPES)
    if out_dtype is None:
        out_dtype = torch.promote_types(x.dtype, z.dtype)
    if gate_unsupported_reason(x, z, weight, bias) is not None:
        gated = F.layer_norm(x, x.shape[-1:], weight, bias, eps) * F.silu(z)
        return gated.to(out_dtype)
    x_rows = _as_rows(x)
    out = torch.empty(x_rows.shape, dtype=out_dtype, device=x.device)
    _launch_forward(x_rows, out, weight, bias, eps,
                    z_rows=z.reshape(x_rows.shape))
    return out.view(x.shape)


def gated_layer_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    eps: float, needs: Tuple[bool, bool, bool, bool]
) -> Tuple[Optional[torch.Tensor], ...]:
    """The backward of ``F.layer_norm(x, (C,), weight, bias, eps) *
    F.silu(z)`` (float32 ``x``, weight and bias) on Triton kernels, for
    inputs that :func:`gate_unsupported_reason` passes, called where
    autograd does not record (a recomputing Function's backward).

    One kernel reads ``x``, ``z`` and ``grad`` and writes the gradients of
    ``x`` and ``z`` and per-program partial sums of those of the weight and
    bias (then summed), with the ATen composition's roundings: the SiLU
    rounded to z's dtype, the norm's gradient ``grad * SiLU(z)`` in float32,
    z's ``silu_backward(grad * norm rounded to z's dtype, z)``. The norm's
    statistics are recomputed, not read.

    Args:
        grad (Tensor): The gradient of the gated map, ``x``'s shape, any
            of float32, bfloat16 or float16, unit stride along C.
        x, z, weight, bias, eps: The forward's inputs.
        needs (tuple[bool]): Which of x, z, weight and bias need
            gradients.

    Returns:
        tuple[Tensor | None]: The gradients of x, z, weight and bias (their
        dtypes and shapes; x's and z's contiguous), None where not needed
        (or the parameter is None).
    """
    for name, t in (('x', x), ('z', z), ('grad', grad)):
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f'{name} must be one of {TRITON_DTYPES}, got '
                             f'{t.dtype}')
    if tuple(grad.shape) != tuple(x.shape):
        raise ValueError(f'grad must have x\'s shape {tuple(x.shape)}, got '
                         f'{tuple(grad.shape)}')
    needs = (needs[0], needs[1], needs[2] and weight is not None, needs[3]
             and bias is not None)
    x_rows = _as_rows(x)
    grads = _launch_backward(_as_rows(grad), x_rows,
                             z.reshape(x_rows.shape), weight, bias, None,
                             None, eps, needs)
    shapes = (x.shape, z.shape, None, None)
    return tuple((g if shape is None else g.view(shape)) if need else None
                 for g, shape, need in zip(grads, shapes, needs))


def add_unsupported_reason(x: torch.Tensor,
                           update: torch.Tensor,
                           weight: Optional[torch.Tensor] = None,
                           bias: Optional[torch.Tensor] = None,
                           out_dtype: Optional[torch.dtype] = None
                           ) -> Optional[str]:
    """Why :func:`add_layer_norm` would not run its Triton kernel on these
    inputs, or None if it would.

    Raises:
        ValueError: ``x`` is not a tensor of at least one dimension,
            ``update`` not of ``x``'s shape, ``weight`` or ``bias`` not
            ``(C,)``, or the tensors are not on one device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError('x must be a tensor (..., C) of at least one '
                         f'dimension, got {x!r:.60}')
    check_tensor('update', update, tuple(x.shape))
    for name, param in (('weight', weight), ('bias', bias)):
        if param is not None:
            check_tensor(name, param, (x.shape[-1], ), labels='(C)')
    check_same_device(x=x, update=update, weight=weight, bias=bias)
    if out_dtype is not None and out_dtype not in TRITON_DTYPES:
        return f'out_dtype {out_dtype} is not one of {TRITON_DTYPES}'
    # the norm's conditions, for the sum's dtype
    return (_rows_reason('x', x) or _rows_reason('update', update)
            or unsupported_reason(x, weight, bias,
                                  torch.promote_types(x.dtype, update.dtype))
            or forward_only_reason(x, update, weight, bias))


def add_layer_norm(x: torch.Tensor,
                   update: torch.Tensor,
                   weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None,
                   eps: float = 1e-5,
                   out_dtype: Optional[torch.dtype] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the LayerNorm of its sum over the last dimension,
    ``(x + update, layer_norm(x + update))``, in one pass.

    One Triton kernel reads ``x`` (the residual stream) and ``update`` (the
    branch's output, possibly of another dtype) and writes the sum in the
    dtype of ``x + update`` (type promotion; summed in float32 and rounded
    once, as ATen's add does, so the very values of ``x + update``) and its
    norm in ``out_dtype``. It runs when :func:`add_unsupported_reason`
    finds nothing against it (calls autograd does not record, no backward;
    the conditions of :func:`layer_norm`, the sum's dtype taken for the
    input's; ``update`` with unit stride along C; not under
    ``torch.compile``); else ``x + update``, then :func:`layer_norm`: the
    same dtypes and values up to float32 rounding. VMamba's stages call it
    between blocks (``mmvmamba.models.backbones.vmamba.ADD_NORM_ON_TRITON``).

    Args:
        x (Tensor): ``(..., C)``: float32, bfloat16 or float16 for the
            kernel.
        update (Tensor): ``x``'s shape.
        weight, bias (Tensor, optional): ``(C,)``.
        eps (float): Added to the variance. Defaults to 1e-5.
        out_dtype (torch.dtype, optional): The norm's dtype (autocast's for
            a linear layer's input, as :class:`LayerNorm` with
            ``linear_input`` writes it). Defaults to :func:`layer_norm`'s
            for the sum (float32 under CUDA autocast).

    Returns:
        tuple[Tensor, Tensor]: The sum and its norm, of ``x``'s shape
        (contiguous where the kernel ran).
    """
    check_float_dtype('out_dtype', out_dtype)
    if add_unsupported_reason(x, update, weight, bias, out_dtype) is not None:
        total = x + update
        return total, layer_norm(total, weight, bias, eps, out_dtype)
    total_dtype = torch.promote_types(x.dtype, update.dtype)
    if out_dtype is None:
        out_dtype = result_dtype(total_dtype, weight, bias, _autocast_on(x))
    x_rows = _as_rows(x)
    total = torch.empty(x_rows.shape, dtype=total_dtype, device=x.device)
    normed = torch.empty(x_rows.shape, dtype=out_dtype, device=x.device)
    _launch_forward(x_rows, normed, weight, bias, eps,
                    update_rows=_as_rows(update), total=total)
    return total.view(x.shape), normed.view(x.shape)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` on :func:`layer_norm`'s Triton forward where it
    measures faster.

    Calls that autograd does not record (inference, ``torch.no_grad``,
    frozen stages) run :func:`layer_norm`; recorded ones run
    ``F.layer_norm`` unless :attr:`triton_when_recorded` is set, which the
    backbone decides by measurement (docs/ops.md, ``benchmarks/layer_norm.py
    --models``). Same arguments, parameters and state_dict keys as
    ``nn.LayerNorm``; a ``normalized_shape`` of more than one dimension runs
    ``nn.LayerNorm``.

    Args:
        linear_input (bool): The output feeds linear layers alone: under
            autocast it comes in autocast's dtype, which they cast it to
            anyway (the kernel writes it so, instead of a float32 map and
            a copy). Defaults to False.
        triton_when_recorded (bool): Calls that autograd records run
            :func:`layer_norm` and its Triton backward too. Defaults to
            False.
        *args, **kwargs: Those of ``nn.LayerNorm``.
    """

    #: Whether calls that autograd records run :func:`layer_norm` too.
    triton_when_recorded = False
    #: Whether the output comes in autocast's dtype under autocast.
    linear_input = False

    def __init__(self,
                 *args,
                 linear_input: bool = False,
                 triton_when_recorded: bool = False,
                 **kwargs):
        check_bool('linear_input', linear_input)
        check_bool('triton_when_recorded', triton_when_recorded)
        super().__init__(*args, **kwargs)
        self.linear_input = linear_input
        self.triton_when_recorded = triton_when_recorded

    def output_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype :meth:`forward` casts its output of ``x`` to:
        autocast's under autocast with :attr:`linear_input`, else None
        (``F.layer_norm``'s)."""
        device_type = x.device.type
        if self.linear_input and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = self.output_dtype(x)
        if len(self.normalized_shape) != 1 or (
                not self.triton_when_recorded
                and autograd_records(x, self.weight, self.bias)):
            y = super().forward(x)
            return y if out_dtype is None else y.to(out_dtype)
        return layer_norm(x, self.weight, self.bias, self.eps, out_dtype)


def replace_layer_norms(model: nn.Module) -> int:
    """Make every ``nn.LayerNorm`` of ``model`` (exactly that class) a
    :class:`LayerNorm`, in place: same parameters, buffers and hooks.

    Norms called through ``F.layer_norm`` with a module's parameters (SS2D's
    ``out_norm`` in :func:`mmvmamba.models.backbones.common.output_gate`)
    are not affected.

    Returns:
        int: How many modules were converted.
    """
    converted = 0
    for module in model.modules():
        if type(module) is nn.LayerNorm:
            # LayerNorm adds no state to nn.LayerNorm: changing the class
            # keeps the module as it is
            module.__class__ = LayerNorm
            converted += 1
    return converted
