"""The scan's cost model, for mmengine's ``FlopAnalyzer``.

mmengine's counter traces a model with the JIT tracer and counts the ops it
has handlers for. The selective scan is none of them: its reference is a
Python loop of element-wise ops that the counter skips. Here:

- :class:`ScanFlopHandle` is the op handle of the scan's ops: the compiled
  ``mmvmamba::selective_scan_fwd`` and the probe below (``(batch, D, L)``
  from ``u``, ``N`` from ``A``), and the fused ``mmvmamba::cross_scan_fwd``
  (its four scans, plus the low-rank step-size projection it computes
  inside, an einsum that the unfused path's trace shows);
- within :class:`ScanAsOneOp` (a ``TorchFunctionMode``: per thread, nests,
  nothing on the op's path changes) each call of the PyTorch reference scan
  runs as one cheap custom op, ``mmvmamba::selective_scan_flops_probe``, so
  the scan is one traced op whichever backend runs; the compiled kernels
  are traced as their own ops.

Two conventions for the scan itself (``D`` = all four directions' channels):

- ``paper``: VMamba v1 (January 2024), the einsum path of the reference scan,
  ``3.5 * B*L*D*N + B*L*D`` (``dt*A`` 0.5, ``dt*B*u`` 1, the state update 1
  and ``<C, h>`` 1 per ``B*L*D*N``; the ``D*u`` skip term ``B*L*D``).
- ``later``: the authors' later releases (after Mamba's estimate),
  ``9 * B*L*D*N + B*L*D``.
"""
import inspect
from typing import Any, List, Optional, Tuple

import torch
from mmengine.analysis.jit_handles import get_shape
from torch.overrides import TorchFunctionMode

from .checks import check_bool, is_int
from .selective_scan import selective_scan_reference

PROBE_OP = 'mmvmamba::selective_scan_flops_probe'
SCAN_OPS = (PROBE_OP, 'mmvmamba::selective_scan_fwd')
CROSS_OP = 'mmvmamba::cross_scan_fwd'
CONVENTIONS = {
    'paper': 'VMamba v1 paper, scan = 3.5*BLDN + BLD (einsum path)',
    'later': 'later VMamba releases, scan = 9*BLDN + BLD',
}


@torch.library.custom_op(PROBE_OP, mutates_args=())
def selective_scan_flops_probe(u: torch.Tensor, delta: torch.Tensor,
                               A: torch.Tensor, B: torch.Tensor,
                               C: torch.Tensor, D: Optional[torch.Tensor],
                               delta_bias: Optional[torch.Tensor],
                               delta_softplus: bool) -> torch.Tensor:
    """A stand-in for the scan that the tracer records as one op.

    Counting needs shapes only, so it returns the cheap skip term ``D * u``
    (``u`` without ``D``) instead of the recurrence: values downstream of a
    counted scan are not the model's (a detector's proposals, say), but have
    its shapes. Arguments as :func:`mmvmamba.ops.selective_scan`.
    """
    y = u.float() * D[:, None] if D is not None else u.float()
    return y.to(u.dtype)


@selective_scan_flops_probe.register_fake
def _probe_fake(u, delta, A, B, C, D, delta_bias, delta_softplus):
    return u.new_empty(u.shape)


_REFERENCE_SIGNATURE = inspect.signature(selective_scan_reference)


class ScanAsOneOp(TorchFunctionMode):
    """Within the block, the PyTorch reference scan runs as the probe op
    (:func:`selective_scan_flops_probe`); everything else runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is selective_scan_reference:
            bound = _REFERENCE_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            return selective_scan_flops_probe(**bound.arguments)
        return func(*args, **kwargs)


def scan_flops(batch: int, length: int, channels: int, d_state: int,
               with_D: bool = True,
               convention: str = 'paper') -> int:
    """FLOPs of one selective scan call under a convention.

    Args:
        batch (int): B.
        length (int): Sequence length L.
        channels (int): Channels D of ``u`` (all directions together).
        d_state (int): State size N.
        with_D (bool): Whether the ``D * u`` skip term is present.
        convention (str): ``'paper'`` or ``'later'`` (see the module doc).

    Returns:
        int: FLOPs (multiply-adds counted once).
    """
    sizes = dict(batch=batch, length=length, channels=channels,
                 d_state=d_state)
    for name, value in sizes.items():
        if not (is_int(value) and value >= 0):
            raise ValueError(f'{name} must be a non-negative int, got '
                             f'{value!r}')
    check_bool('with_D', with_D)
    bldn = batch * length * channels * d_state
    skip = batch * length * channels if with_D else 0
    if convention == 'paper':
        return int(3.5 * bldn) + skip
    if convention == 'later':
        return 9 * bldn + skip
    raise ValueError(f'convention must be one of {sorted(CONVENTIONS)}, '
                     f'got {convention!r}')


class ScanFlopHandle:
    """mmengine op handle of the scan ops; records every call's shape.

    It returns the ``paper`` count to the analyzer (so its per-module tables
    use that convention) and keeps ``(B, L, D, N, with_D)`` per scan in
    :attr:`calls` for the other convention. :meth:`register` installs it.
    """

    def __init__(self):
        self.calls: List[Tuple[int, int, int, int, bool]] = []

    def _scan(self, batch: int, length: int, channels: int, d_state: int,
              with_D: bool) -> int:
        self.calls.append((batch, length, channels, d_state, with_D))
        return scan_flops(batch, length, channels, d_state, with_D, 'paper')

    def __call__(self, inputs: List[Any], outputs: List[Any]) -> int:
        """``selective_scan_fwd`` / the probe: u, delta, A, B, C, D, ..."""
        batch, channels, length = get_shape(inputs[0])
        d_state = get_shape(inputs[2])[1]
        return self._scan(batch, length, channels, d_state,
                          get_shape(inputs[5]) is not None)

    def cross(self, inputs: List[Any], outputs: List[Any]) -> int:
        """``cross_scan_fwd``: u ``(B, L, D)``, x_dbl, dt_weight ``(4, D,
        R)``, dt_bias, A ``(4D, N)``, D: the four scans as one call, and the
        step sizes' projection ``B*L*4*D*R``."""
        batch, length, _ = get_shape(inputs[0])
        directions, d_inner, rank = get_shape(inputs[2])
        channels, d_state = get_shape(inputs[4])
        projection = batch * length * directions * d_inner * rank
        return self._scan(batch, length, channels, d_state,
                          True) + projection

    def register(self, analyzer) -> None:
        """Make this the handle of the scan ops in a ``FlopAnalyzer``."""
        for op in SCAN_OPS:
            analyzer.set_op_handle(op, self)
        analyzer.set_op_handle(CROSS_OP, self.cross)

    def total(self, convention: str) -> int:
        """Sum of the recorded calls under ``convention``."""
        return sum(
            scan_flops(b, l, d, n, with_d, convention)
            for b, l, d, n, with_d in self.calls)
