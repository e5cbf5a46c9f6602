"""The four-direction scan of SS2D: cross scan, cross merge and the core."""
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from .backend import fused_unsupported_reason
from .checks import (FLOAT, HALF, HALF_AND_FLOAT, check_bool,
                     check_same_device, check_tensor)
from .selective_scan import selective_scan

#: The scan orders of SS2D (rows, columns, and both reversed); the fused
#: kernel's ``kDirections`` (``mmvmamba._C.directions``) is the same number.
NUM_DIRECTIONS = 4


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Unfold a feature map into the four scan orders.

    Args:
        x (Tensor): ``(batch, C, H, W)``.

    Returns:
        Tensor: ``(batch, 4, C, H*W)``: row-major (``l = h*W + w``),
        column-major (``l = w*H + h``), and the two reversed.
    """
    check_tensor('x', x, (None, None, None, None), labels='(batch, C, H, W)')
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    forward = torch.stack([rows, cols], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Sum the four scan orders back at their row-major positions.

    Args:
        y (Tensor): ``(batch, 4, C, H*W)`` in the order of :func:`cross_scan`.
        H (int): Height of the map.
        W (int): Width of the map.

    Returns:
        Tensor: ``(batch, C, H*W)`` in row-major order.
    """
    # (sizes may be traced: tensors under jit, SymInts under compile)
    for name, size in (('H', H), ('W', W)):
        if isinstance(size, bool) or not isinstance(
                size, (numbers.Integral, torch.SymInt, torch.Tensor)):
            raise ValueError(f'{name} must be an int, got {size!r}')
        if isinstance(size, numbers.Integral) and size < 0:
            raise ValueError(f'{name} must be >= 0, got {size}')
    check_tensor('y', y, (None, NUM_DIRECTIONS, None, H * W),
                 labels='(batch, 4, C, H*W)')
    batch, _, channels, _ = y.shape
    y = y[:, :2] + y[:, 2:].flip(-1)
    cols = y[:, 1].reshape(batch, channels, W, H).transpose(2, 3)
    return y[:, 0] + cols.reshape(batch, channels, H * W)


def check_cross_selective_scan_args(x, x_proj_weight, dt_projs_weight,
                                    dt_projs_bias, A_logs, Ds) -> None:
    """Raise ``ValueError`` unless the arguments fit SS2D's core."""
    check_tensor('x', x, (None, None, None, None), HALF_AND_FLOAT,
                 '(batch, D, H, W)')
    d_inner = x.shape[1]
    check_tensor('A_logs', A_logs, (NUM_DIRECTIONS * d_inner, None), FLOAT,
                 '(4*D, N)')
    d_state = A_logs.shape[1]
    check_tensor('dt_projs_weight', dt_projs_weight,
                 (NUM_DIRECTIONS, d_inner, None), labels='(4, D, R)')
    dt_rank = dt_projs_weight.shape[2]
    check_tensor('x_proj_weight', x_proj_weight,
                 (NUM_DIRECTIONS, dt_rank + 2 * d_state, d_inner),
                 labels='(4, R + 2N, D)')
    check_tensor('dt_projs_bias', dt_projs_bias, (NUM_DIRECTIONS, d_inner),
                 FLOAT, '(4, D)')
    check_tensor('Ds', Ds, (NUM_DIRECTIONS * d_inner, ), FLOAT, '(4*D,)')
    check_same_device(x=x, x_proj_weight=x_proj_weight,
                      dt_projs_weight=dt_projs_weight,
                      dt_projs_bias=dt_projs_bias, A_logs=A_logs, Ds=Ds)


def _project_and_scan(u, weight, params, H, W, scan_dtype):
    """x_proj and the fused kernel on ``u`` ``(batch, H*W, D)``.

    Returns:
        tuple: The kernel's output and checkpoints, ``x_dbl`` as the kernel
        read it, and the dtype x_proj ran in (autocast's, if on).
    """
    batch, length, d_inner = u.shape
    # x_dbl as the authors compute it: in u's dtype (or autocast's), then
    # cast for the scan.
    x_dbl = F.linear(u, weight)
    linear_dtype = x_dbl.dtype
    x_dbl = x_dbl.view(batch, length, NUM_DIRECTIONS,
                       weight.shape[0] // NUM_DIRECTIONS).to(scan_dtype)
    x_dbl = x_dbl.contiguous()
    y, checkpoints = torch.ops.mmvmamba.cross_scan_fwd(
        u.to(scan_dtype).contiguous(), x_dbl, *params, H, W)
    return y, checkpoints, x_dbl, linear_dtype


class _SiLUCrossScan(torch.autograd.Function):
    """``SiLU``, x_proj and the fused kernel, keeping the map before the
    SiLU instead of after it for the backward.

    Only the pre-activation ``v`` (which the SiLU's own backward keeps
    anyway) is kept, not ``u = SiLU(v)`` (read by x_proj's and the kernel's
    backward); the backward recomputes ``u``. It calls the kernels autograd
    calls for the plain graph (``F.silu``, ``F.linear``, the op), in the
    same dtypes (autocast's included), so outputs and gradients equal the
    plain graph's (bit for bit on the CPU, where it is tested; a GPU's
    matrix products may round differently). Takes a channels-last ``v``
    whose reshape to ``(batch, H*W, D)`` is a contiguous view (as the
    conv's output is).
    """

    @staticmethod
    def forward(ctx, v, weight, dt_weight, dt_bias, A, D, scan_dtype):
        batch, H, W, d_inner = v.shape
        u = F.silu(v).view(batch, H * W, d_inner)
        params = (dt_weight, dt_bias, A, D)
        y, checkpoints, x_dbl, ctx.linear_dtype = _project_and_scan(
            u, weight, params, H, W, scan_dtype)
        ctx.scan_dtype, ctx.weight_dtype = scan_dtype, weight.dtype
        # the weight only for the map's gradient, as linear's autograd
        ctx.save_for_backward(v, weight if ctx.needs_input_grad[0] else None,
                              x_dbl, *params, checkpoints)
        return y

    @staticmethod
    def backward(ctx, grad):
        v, weight, x_dbl, *params, checkpoints = ctx.saved_tensors
        batch, H, W, d_inner = v.shape
        u = F.silu(v).view(batch, H * W, d_inner)
        du_scan, dx_dbl, *dparams = torch.ops.mmvmamba.cross_scan_bwd(
            grad, u.to(ctx.scan_dtype).contiguous(), x_dbl, *params, H, W,
            checkpoints)
        need_v, need_weight = ctx.needs_input_grad[:2]
        # x_proj's backward as linear's autograd computes it: mm on the
        # 2-D views, each gradient cast back to its input's dtype
        linear_dtype = ctx.linear_dtype
        grad_2d = dx_dbl.to(linear_dtype).view(batch * H * W, -1)
        grad_v = grad_weight = None
        if need_v:
            du = torch.mm(grad_2d, weight.to(linear_dtype)).view(u.shape)
            du = du_scan.to(u.dtype) + du.to(u.dtype)
            grad_v = torch.ops.aten.silu_backward(du.view(v.shape), v)
        if need_weight:
            grad_weight = torch.mm(grad_2d.t(),
                                   u.view(-1, d_inner).to(linear_dtype))
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return (grad_v, grad_weight, *(
            grad if need else None
            for grad, need in zip(dparams, ctx.needs_input_grad[2:6])), None)


def _cross_selective_scan_fused(x, x_proj_weight, dt_projs_weight,
                                dt_projs_bias, A_logs, Ds, scan_dtype,
                                silu=False):
    """The fused path on a channels-last map ``(batch, H, W, D)``.

    The kernel computes in float32 from whatever it reads. A bfloat16 or
    float16 map (autocast, or a half-precision model) is therefore passed as
    it is even for a float32 scan: its upcast is exact, and so are those of
    its projections and of the gradients coming back (rounded to the map's
    dtype once, as the backward of an upcast does). The numerics are those
    of float32 inputs, with half the bytes read and kept for the backward,
    and no float32 copies. With ``silu``, the SiLU of ``x`` is taken first,
    by :class:`_SiLUCrossScan` when autograd records.
    """
    batch, H, W, d_inner = x.shape
    if x.dtype in HALF and scan_dtype == torch.float32:
        scan_dtype = x.dtype
    weight = x_proj_weight.reshape(-1, d_inner).to(x.dtype)
    params = (dt_projs_weight.float(), dt_projs_bias.float(),
              -torch.exp(A_logs.float()), Ds.float())
    if silu and torch.is_grad_enabled() and x.is_contiguous():
        y = _SiLUCrossScan.apply(x, weight, *params, scan_dtype)
    else:
        if silu:
            x = F.silu(x)
        y = _project_and_scan(x.reshape(batch, H * W, d_inner), weight,
                              params, H, W, scan_dtype)[0]
    return y.view(batch, H, W, d_inner)


def _cross_selective_scan_unfused(x, x_proj_weight, dt_projs_weight,
                                  dt_projs_bias, A_logs, Ds, scan_dtype):
    """Cross scan, projections, :func:`selective_scan`, cross merge, on a
    ``(batch, D, H, W)`` map."""
    batch, d_inner, H, W = x.shape
    d_state, dt_rank = A_logs.shape[1], dt_projs_weight.shape[2]
    length = H * W
    xs = cross_scan(x)
    x_dbl = torch.einsum('bkdl,kcd->bkcl', xs, x_proj_weight.to(x.dtype))
    dt_low, Bs, Cs = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=2)
    dts = torch.einsum('bkrl,kdr->bkdl', dt_low,
                       dt_projs_weight.to(x.dtype))
    # A, D and the bias stay float32 (float64 for a float64 scan).
    param_dtype = torch.float64 if scan_dtype == torch.float64 else \
        torch.float32
    y = selective_scan(
        xs.reshape(batch, NUM_DIRECTIONS * d_inner, length).to(scan_dtype),
        dts.reshape(batch, NUM_DIRECTIONS * d_inner, length).to(scan_dtype),
        -torch.exp(A_logs.to(param_dtype)),
        Bs.to(scan_dtype).contiguous(),
        Cs.to(scan_dtype).contiguous(),
        Ds.to(param_dtype),
        dt_projs_bias.reshape(-1).to(param_dtype),
        delta_softplus=True)
    y = y.view(batch, NUM_DIRECTIONS, d_inner, length)
    y = cross_merge(y, H, W).view(batch, d_inner, H, W)
    return y.to(param_dtype)


def cross_selective_scan(x: torch.Tensor,
                         x_proj_weight: torch.Tensor,
                         dt_projs_weight: torch.Tensor,
                         dt_projs_bias: torch.Tensor,
                         A_logs: torch.Tensor,
                         Ds: torch.Tensor,
                         channels_last: bool = False,
                         scan_dtype: Optional[torch.dtype] = None,
                         fused: Optional[bool] = None,
                         silu: bool = False) -> torch.Tensor:
    """SS2D's core: four directional selective scans of a map, merged.

    Per direction ``k`` the map, read in that scan order, is projected by
    ``x_proj_weight[k]`` to ``(dt_low, B, C)``; ``delta = dt_projs_weight[k]
    @ dt_low``; the scan uses ``softplus(delta + dt_projs_bias[k])`` and
    ``A = -exp(A_logs)``; the four outputs are summed back in place.

    The fused kernel (CUDA and CPU) runs it in one pass: it reads the map in
    the four orders by index, computes the step sizes from ``dt_low`` itself
    and sums the four outputs into one map. Otherwise (N > 16, float64, the
    ``'reference'`` backend; :func:`mmvmamba.ops.backend.
    fused_unsupported_reason`) the four orders are copied out and scanned by
    :func:`selective_scan`.

    Args:
        x (Tensor): Map after the depthwise conv and SiLU (before the SiLU
            with ``silu``), ``(batch, D, H, W)``, or ``(batch, H, W, D)``
            with ``channels_last``.
        x_proj_weight (Tensor): ``(4, R + 2N, D)``.
        dt_projs_weight (Tensor): ``(4, D, R)``.
        dt_projs_bias (Tensor): ``(4, D)``.
        A_logs (Tensor): ``(4*D, N)``.
        Ds (Tensor): ``(4*D,)``.
        channels_last (bool): Layout of ``x`` and of the result.
            Defaults to False.
        scan_dtype (torch.dtype, optional): Dtype of the scan's inputs ``u``,
            ``delta``, ``B``, ``C``. ``None`` is float32, as in the authors'
            model even under autocast (float64 for float64 ``x``);
            ``torch.bfloat16`` halves the bytes read, the state and the sums
            staying float32.
        fused (bool, optional): ``None`` takes the fused kernel whenever it
            can run, ``False`` never, ``True`` always (``ValueError`` saying
            why when it cannot).
        silu (bool): Take ``SiLU(x)`` first. On the fused path with a
            contiguous channels-last ``x`` the backward then keeps ``x``
            alone, not also its SiLU, and recomputes that (same results).
            Defaults to False.

    Returns:
        Tensor: Same layout as ``x``, float32 (float64 for float64 input).
    """
    check_bool('channels_last', channels_last)
    check_bool('silu', silu)
    check_bool('fused', fused, optional=True)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        check_tensor(
            'x', x, (None, None, None, None), HALF_AND_FLOAT,
            '(batch, H, W, D)' if channels_last else '(batch, D, H, W)')
    x_chw = x.permute(0, 3, 1, 2) if channels_last else x
    check_cross_selective_scan_args(x_chw, x_proj_weight, dt_projs_weight,
                                    dt_projs_bias, A_logs, Ds)
    if scan_dtype is None:
        scan_dtype = torch.float64 if x.dtype == torch.float64 else \
            torch.float32
    if scan_dtype not in HALF_AND_FLOAT:
        raise ValueError(f'scan_dtype must be one of float32, bfloat16, '
                         f'float16, float64 or None, got {scan_dtype!r}')
    reason = fused_unsupported_reason(x, x_chw.shape[2] * x_chw.shape[3],
                                      A_logs.shape[1], scan_dtype,
                                      dt_projs_weight.shape[2])
    if fused and reason is not None:
        raise ValueError(f'fused=True, but the fused kernel cannot run: '
                         f'{reason}')
    if fused is not False and reason is None:
        x_hwc = x if channels_last else x.permute(0, 2, 3, 1)
        y = _cross_selective_scan_fused(x_hwc, x_proj_weight,
                                        dt_projs_weight, dt_projs_bias,
                                        A_logs, Ds, scan_dtype, silu)
        return y if channels_last else y.permute(0, 3, 1, 2)
    if silu:
        x_chw = F.silu(x_chw)
    y = _cross_selective_scan_unfused(x_chw, x_proj_weight, dt_projs_weight,
                                      dt_projs_bias, A_logs, Ds, scan_dtype)
    return y.permute(0, 2, 3, 1) if channels_last else y
