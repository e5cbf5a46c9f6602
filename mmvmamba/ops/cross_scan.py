"""The four-direction scan of SS2D: cross scan, cross merge and the core."""
from typing import Optional

import torch
import torch.nn.functional as F

from . import _ext
from .backend import fused_unsupported_reason
from .checks import FLOAT, HALF_AND_FLOAT, check_same_device, check_tensor
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


def _cross_selective_scan_fused(x, x_proj_weight, dt_projs_weight,
                                dt_projs_bias, A_logs, Ds, scan_dtype):
    """The fused path on a channels-last map ``(batch, H, W, D)``.

    The kernel computes in float32 from whatever it reads. A bfloat16 map
    (autocast, or a bfloat16 model) is therefore passed as it is even for a
    float32 scan: its upcast is exact, and so are those of its projections
    and of the gradients coming back (rounded to bfloat16 once, as the
    backward of an upcast does). The numerics are those of float32 inputs,
    with half the bytes read and kept for the backward.
    """
    batch, H, W, d_inner = x.shape
    if x.dtype == torch.bfloat16 and scan_dtype == torch.float32:
        scan_dtype = torch.bfloat16
    # x_dbl as the authors compute it: in x's dtype (or autocast's), then
    # cast for the scan.
    x_flat = x.reshape(batch, H * W, d_inner)
    x_dbl = F.linear(x_flat, x_proj_weight.reshape(-1, d_inner).to(x.dtype))
    x_dbl = x_dbl.view(batch, H * W, NUM_DIRECTIONS, -1).to(scan_dtype)
    y = _ext.cross_scan_kernel(
        x_flat.to(scan_dtype).contiguous(), x_dbl.contiguous(),
        dt_projs_weight.float(), dt_projs_bias.float(),
        -torch.exp(A_logs.float()), Ds.float(), H, W)
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
        xs.reshape(batch, -1, length).to(scan_dtype),
        dts.reshape(batch, -1, length).to(scan_dtype),
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
                         fused: Optional[bool] = None) -> torch.Tensor:
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
        x (Tensor): Map after the depthwise conv and SiLU, ``(batch, D, H,
            W)``, or ``(batch, H, W, D)`` with ``channels_last``.
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

    Returns:
        Tensor: Same layout as ``x``, float32 (float64 for float64 input).
    """
    if not isinstance(channels_last, bool):
        raise ValueError(f'channels_last must be a bool, got {channels_last!r}')
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        check_tensor('x', x, (None, None, None, None), HALF_AND_FLOAT,
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
                                      A_logs.shape[1], scan_dtype)
    if fused and reason is not None:
        raise ValueError(f'fused=True, but the fused kernel cannot run: '
                         f'{reason}')
    if fused is not False and reason is None:
        x_hwc = x if channels_last else x.permute(0, 2, 3, 1)
        y = _cross_selective_scan_fused(x_hwc, x_proj_weight,
                                        dt_projs_weight, dt_projs_bias,
                                        A_logs, Ds, scan_dtype)
        return y if channels_last else y.permute(0, 3, 1, 2)
    y = _cross_selective_scan_unfused(x_chw, x_proj_weight, dt_projs_weight,
                                      dt_projs_bias, A_logs, Ds, scan_dtype)
    return y.permute(0, 2, 3, 1) if channels_last else y
