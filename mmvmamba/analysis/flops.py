"""FLOPs of models with the selective scan, on mmengine's FlopAnalyzer.

mmengine's counter traces the model with the JIT tracer and counts the ops it
has handlers for (linear, conv, einsum, matmul, norms, ...), one fused
multiply-add as one FLOP. The selective scan has no such op: its reference is
a Python loop of element-wise ops that the counter skips, and a counter that
misses the scan reports about 3.7 GFLOPs for VMamba-T instead of 4.5.

Here the scan is made one traced op: within :func:`scan_as_one_op` every
:func:`mmvmamba.ops.selective_scan` call goes to the custom op
``mmvmamba::selective_scan_flops_probe``, whose handler reads ``(batch, D,
L)`` from ``u`` and ``N`` from ``A``. The compiled op
``mmvmamba::selective_scan_fwd`` gets the same handler. Everything else keeps
mmengine's handlers: the in/out projections (linear), the depthwise and patch
convolutions, the four-direction projections (einsum, through numpy's
einsum_path as fvcore does) and LayerNorm (5 FLOPs an element), plus a
handler for fused attention (``scaled_dot_product_attention``, which
mmengine skips: ViTs would lose their attention matmuls); element-wise
ops (SiLU, softplus, exp, adds) are not counted, as in the authors' counts.

Two conventions for the scan itself (``D`` = all four directions' channels):

- ``paper``: VMamba v1 (January 2024), the einsum path of the reference scan,
  ``3.5 * B*L*D*N + B*L*D`` (``dt*A`` 0.5, ``dt*B*u`` 1, the state update 1
  and ``<C, h>`` 1 per ``B*L*D*N``; the ``D*u`` skip term ``B*L*D``).
  VMamba-T/S/B at 224: 4.5 / 9.1 / 15.2 GFLOPs.
- ``later``: the authors' later releases (after Mamba's estimate),
  ``9 * B*L*D*N + B*L*D``. VMamba-T/S/B at 224: 5.6 / 11.2 / 18.0 GFLOPs.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape

from mmvmamba.ops.selective_scan import selective_scan_override

PROBE_OP = 'mmvmamba::selective_scan_flops_probe'
SCAN_OPS = (PROBE_OP, 'mmvmamba::selective_scan_fwd')
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


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of ``aten::scaled_dot_product_attention`` (mmengine has none):
    ``q @ k^T`` and ``attn @ v``, ``B*heads*Lq*Lk*(E + Ev)``; the softmax is
    element-wise and not counted."""
    q, v = get_shape(inputs[0]), get_shape(inputs[2])
    lk = get_shape(inputs[1])[-2]
    batch_heads = 1
    for n in q[:-2]:
        batch_heads *= n
    return batch_heads * q[-2] * lk * (q[-1] + v[-1])


def scan_as_one_op():
    """Context manager: every selective scan runs as the probe op."""
    return selective_scan_override(torch.ops.mmvmamba.
                                   selective_scan_flops_probe)


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
    bldn = batch * length * channels * d_state
    skip = batch * length * channels if with_D else 0
    if convention == 'paper':
        return int(3.5 * bldn) + skip
    if convention == 'later':
        return 9 * bldn + skip
    raise ValueError(f'convention must be one of {sorted(CONVENTIONS)}, '
                     f'got {convention!r}')


class ScanFlopHandle:
    """mmengine op handle for the scan ops; records every call's shape.

    It returns the ``paper`` count to the analyzer (so its per-module tables
    use that convention) and keeps ``(B, L, D, N, with_D)`` per call in
    :attr:`calls` for the other convention.
    """

    def __init__(self):
        self.calls: List[Tuple[int, int, int, int, bool]] = []

    def __call__(self, inputs: List[Any], outputs: List[Any]) -> int:
        batch, channels, length = get_shape(inputs[0])
        d_state = get_shape(inputs[2])[1]
        with_D = get_shape(inputs[5]) is not None
        self.calls.append((batch, length, channels, d_state, with_D))
        return scan_flops(batch, length, channels, d_state, with_D, 'paper')

    def total(self, convention: str) -> int:
        """Sum of the recorded calls under ``convention``."""
        return sum(
            scan_flops(b, l, d, n, with_d, convention)
            for b, l, d, n, with_d in self.calls)


@dataclass
class FlopCount:
    """FLOPs of one forward pass, with the scan under both conventions.

    Attributes:
        non_scan (int): Everything but the scan (mmengine's handlers).
        scan (dict): The scan's FLOPs per convention name.
        scan_calls (int): Number of selective scan calls traced.
        params (int): Parameters of the model.
        by_operator (Counter): ``paper`` FLOPs per operator name.
        skipped (Counter): Ops the counter has no handler for (not counted).
    """
    non_scan: int
    scan: Dict[str, int]
    scan_calls: int
    params: int
    by_operator: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def total(self, convention: str = 'paper') -> int:
        """All FLOPs under ``convention`` (``'paper'`` or ``'later'``)."""
        return self.non_scan + self.scan[convention]


def count_flops(model: torch.nn.Module,
                inputs: Sequence[Any],
                analyzer_out: Optional[list] = None) -> FlopCount:
    """Count a model's FLOPs with the scan visible as one op.

    The model runs once, traced, without gradients, with the scan replaced by
    the probe (see :func:`selective_scan_flops_probe`).

    Args:
        model (nn.Module): The model; ``model(*inputs)`` must return tensors
            (or tuples / lists / dicts of them).
        inputs (Sequence): Positional inputs.
        analyzer_out (list, optional): If given, the mmengine FlopAnalyzer
            is appended to it (for its per-module tables).

    Returns:
        FlopCount: The counts.
    """
    handle = ScanFlopHandle()
    analyzer = FlopAnalyzer(model, tuple(inputs))
    for op in SCAN_OPS:
        analyzer.set_op_handle(op, handle)
    analyzer.set_op_handle('aten::scaled_dot_product_attention',
                           sdpa_flop_jit)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad(), scan_as_one_op():
        total = analyzer.total()
        by_operator = analyzer.by_operator()
        skipped = analyzer.unsupported_ops()
    if analyzer_out is not None:
        analyzer_out.append(analyzer)
    scan = {name: handle.total(name) for name in CONVENTIONS}
    return FlopCount(
        non_scan=int(total) - scan['paper'],
        scan=scan,
        scan_calls=len(handle.calls),
        params=sum(p.numel() for p in model.parameters()),
        by_operator=by_operator,
        skipped=skipped)
