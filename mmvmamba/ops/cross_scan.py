"""The four-direction scan of SS2D: cross scan, cross merge and the core."""
import torch

from .checks import FLOAT, HALF_AND_FLOAT, check_same_device, check_tensor
from .selective_scan import selective_scan

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


def cross_selective_scan(x: torch.Tensor, x_proj_weight: torch.Tensor,
                         dt_projs_weight: torch.Tensor,
                         dt_projs_bias: torch.Tensor, A_logs: torch.Tensor,
                         Ds: torch.Tensor) -> torch.Tensor:
    """SS2D's core: four directional selective scans of a map, merged.

    Per direction ``k`` the map, read in that scan order, is projected by
    ``x_proj_weight[k]`` to ``(dt_low, B, C)``; ``delta = dt_projs_weight[k]
    @ dt_low``; the scan uses ``softplus(delta + dt_projs_bias[k])`` and
    ``A = -exp(A_logs)``; the four outputs are summed back in place.
    As in the authors' model, the scan's inputs are float32 even under
    autocast, and so is the result.

    Args:
        x (Tensor): Map after the depthwise conv and SiLU, ``(batch, D, H, W)``.
        x_proj_weight (Tensor): ``(4, R + 2N, D)``.
        dt_projs_weight (Tensor): ``(4, D, R)``.
        dt_projs_bias (Tensor): ``(4, D)``.
        A_logs (Tensor): ``(4*D, N)``.
        Ds (Tensor): ``(4*D,)``.

    Returns:
        Tensor: ``(batch, D, H, W)``, float32 (float64 for float64 input).
    """
    check_cross_selective_scan_args(x, x_proj_weight, dt_projs_weight,
                                    dt_projs_bias, A_logs, Ds)
    batch, d_inner, H, W = x.shape
    d_state, dt_rank = A_logs.shape[1], dt_projs_weight.shape[2]
    length = H * W
    scan_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    xs = cross_scan(x)
    x_dbl = torch.einsum('bkdl,kcd->bkcl', xs, x_proj_weight)
    dt_low, Bs, Cs = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=2)
    dts = torch.einsum('bkrl,kdr->bkdl', dt_low, dt_projs_weight)
    y = selective_scan(
        xs.reshape(batch, -1, length).to(scan_dtype),
        dts.reshape(batch, -1, length).to(scan_dtype),
        -torch.exp(A_logs.to(scan_dtype)),
        Bs.to(scan_dtype).contiguous(),
        Cs.to(scan_dtype).contiguous(),
        Ds.to(scan_dtype),
        dt_projs_bias.reshape(-1).to(scan_dtype),
        delta_softplus=True)
    y = y.view(batch, NUM_DIRECTIONS, d_inner, length)
    return cross_merge(y, H, W).view(batch, d_inner, H, W)
