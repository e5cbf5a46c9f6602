"""Selective scan: the pure-PyTorch reference and the front door.

``selective_scan`` checks its arguments, then runs the compiled kernel for the
tensor's device or the reference, as :mod:`mmvmamba.ops.backend` decides
(``MMVMAMBA_SCAN_BACKEND``, :func:`~mmvmamba.ops.backend.use_backend`).
The reference follows PyTorch's ``__torch_function__`` protocol, like
``torch.nn.functional``: a ``TorchFunctionMode`` sees each call (the FLOP
counter of :mod:`mmvmamba.ops.flops` replaces it by one traced op).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

from . import _ext
from .backend import choose_scan_backend
from .checks import (FLOAT, HALF_AND_FLOAT, check_bool, check_same_device,
                     check_tensor)


def check_selective_scan_args(u, delta, A, B, C, D=None,
                              delta_bias=None) -> None:
    """Raise ``ValueError`` unless the arguments fit ``selective_scan``."""
    check_tensor('u', u, (None, None, None), HALF_AND_FLOAT,
                 '(batch, channels, L)')
    batch, channels, length = u.shape
    check_tensor('delta', delta, (batch, channels, length), (u.dtype, ),
                 '(batch, channels, L) like u')
    check_tensor('A', A, (channels, None), FLOAT, '(channels, N)')
    d_state = A.shape[1]
    check_tensor('B', B, (batch, None, d_state, length), (u.dtype, ),
                 '(batch, groups, N, L)')
    groups = B.shape[1]
    if groups == 0 or channels % groups != 0:
        raise ValueError(f'B has {groups} groups, which must divide the '
                         f'{channels} channels of u')
    check_tensor('C', C, (batch, groups, d_state, length), (u.dtype, ),
                 '(batch, groups, N, L) like B')
    if D is not None:
        check_tensor('D', D, (channels, ), FLOAT, '(channels,)')
    if delta_bias is not None:
        check_tensor('delta_bias', delta_bias, (channels, ), FLOAT,
                     '(channels,)')
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D,
                      delta_bias=delta_bias)


def selective_scan_reference(u: torch.Tensor,
                             delta: torch.Tensor,
                             A: torch.Tensor,
                             B: torch.Tensor,
                             C: torch.Tensor,
                             D: Optional[torch.Tensor] = None,
                             delta_bias: Optional[torch.Tensor] = None,
                             delta_softplus: bool = False) -> torch.Tensor:
    """Selective scan in plain PyTorch, differentiable by autograd.

    A chunked scan: the sequence is cut into about ``sqrt(L)`` chunks of
    about ``sqrt(L)`` steps; one loop runs over the steps of all chunks at
    once, a second over the chunk ends to carry the states across, so there
    are ``O(sqrt(L))`` vectorised steps. The state is float32 (float64 for
    float64 inputs). Arguments as in :func:`selective_scan`.
    """
    tensors = (u, delta, A, B, C, D, delta_bias)
    if has_torch_function(tensors):
        return handle_torch_function(selective_scan_reference, tensors, u,
                                     delta, A, B, C, D, delta_bias,
                                     delta_softplus)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, channels, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = channels // groups

    dt = delta.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    u_c = u.to(compute)

    # (one step for L = 0: no chunks, an empty result)
    steps = max(1, math.ceil(math.sqrt(length)))
    chunks = math.ceil(length / steps)
    pad = chunks * steps - length

    def chunked(x: torch.Tensor) -> torch.Tensor:
        # (..., L) -> (..., chunks, steps) with zeros after the end
        return F.pad(x, (0, pad)).unflatten(-1, (chunks, steps))

    # Layout (batch, groups, per_group, chunks, steps, N); B and C are
    # shared by the channels of a group.
    dt6 = chunked(dt.view(batch, groups, per_group, length))[..., None]
    A6 = A.to(compute).view(groups, per_group, 1, 1, d_state)
    decay = torch.exp(dt6 * A6)
    u6 = chunked(u_c.view(batch, groups, per_group, length))[..., None]
    B6 = chunked(B.to(compute)).permute(0, 1, 3, 4, 2).unsqueeze(2)
    inputs = dt6 * u6 * B6

    state = torch.zeros_like(decay[..., 0, :])
    prod = torch.ones_like(state)
    states, prods = [], []
    for t in range(steps):
        state = decay[..., t, :] * state + inputs[..., t, :]
        prod = prod * decay[..., t, :]
        states.append(state)
        prods.append(prod)
    states = torch.stack(states, dim=-2)
    if chunks > 1:
        prods = torch.stack(prods, dim=-2)
        carry = torch.zeros_like(state[..., 0, :])
        carries = []
        for c in range(chunks):
            carries.append(carry)
            carry = prods[..., c, -1, :] * carry + states[..., c, -1, :]
        states = states + prods * torch.stack(carries, dim=-2).unsqueeze(-2)

    C6 = chunked(C.to(compute)).permute(0, 1, 3, 4, 2).unsqueeze(2)
    y = (states * C6).sum(-1).flatten(-2)[..., :length]
    y = y.reshape(batch, channels, length)
    if D is not None:
        y = y + D.to(compute)[:, None] * u_c
    return y.to(u.dtype)


def selective_scan(u: torch.Tensor,
                   delta: torch.Tensor,
                   A: torch.Tensor,
                   B: torch.Tensor,
                   C: torch.Tensor,
                   D: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None,
                   delta_softplus: bool = False) -> torch.Tensor:
    """Selective scan (Mamba's S6 recurrence) with grouped B and C.

    For channel ``d`` of group ``g = d // (channels // groups)``::

        dt_l = softplus?(delta[d, l] + delta_bias[d])
        h_l = exp(dt_l * A[d]) * h_{l-1} + dt_l * B[g, :, l] * u[d, l]
        y[d, l] = <C[g, :, l], h_l> + D[d] * u[d, l]

    Args:
        u (Tensor): Input, ``(batch, channels, L)``; float32, float16 or
            bfloat16 (float64 runs on the reference).
        delta (Tensor): Step sizes, like ``u``.
        A (Tensor): Float32 state matrix (diagonal), ``(channels, N)``.
        B (Tensor): Input matrix, ``(batch, groups, N, L)``, dtype of ``u``.
        C (Tensor): Output matrix, like ``B``.
        D (Tensor, optional): Float32 skip weights, ``(channels,)``.
        delta_bias (Tensor, optional): Float32 bias added to ``delta``
            before the softplus, ``(channels,)``.
        delta_softplus (bool): Apply softplus to the step sizes.

    Returns:
        Tensor: ``y``, ``(batch, channels, L)`` in the dtype of ``u``; the
        state and the sums are float32.
    """
    check_selective_scan_args(u, delta, A, B, C, D, delta_bias)
    check_bool('delta_softplus', delta_softplus)
    if choose_scan_backend(u, A) == 'kernel':
        return _ext.selective_scan_kernel(u, delta, A, B, C, D, delta_bias,
                                          delta_softplus)
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias,
                                    delta_softplus)
