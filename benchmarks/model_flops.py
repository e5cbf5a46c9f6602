"""FLOPs of models with the selective scan, on mmengine's FlopAnalyzer.

mmengine's counter traces the model with the JIT tracer and counts the ops it
has handlers for (linear, conv, einsum, matmul, norms, ...), one fused
multiply-add as one FLOP. The selective scan has no such op: its reference is
a Python loop of element-wise ops that the counter skips, and a counter that
misses the scan reports about 3.7 GFLOPs for VMamba-T instead of 4.5.

:func:`count_flops` counts the scan with its cost model
(:mod:`mmvmamba.ops.flops`: the scan traced as one op, counted from its
shapes, in two conventions). Everything else keeps mmengine's handlers: the
in/out projections (linear), the depthwise and patch convolutions, the
four-direction projections (einsum, through numpy's einsum_path as fvcore
does) and LayerNorm (5 FLOPs an element), plus a handler for fused attention
(``scaled_dot_product_attention``, which mmengine skips: ViTs would lose
their attention matmuls); element-wise ops (SiLU, softplus, exp, adds) are
not counted, as in the authors' counts. VMamba-T/S/B at 224: 4.5 / 9.1 /
15.2 GFLOPs under the v1 paper's convention, 5.6 / 11.2 / 18.0 under the
later releases'.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape

from mmvmamba.ops.flops import CONVENTIONS, ScanAsOneOp, ScanFlopHandle


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

    The model runs once, traced, without gradients, with the reference scan
    replaced by the probe op (:class:`mmvmamba.ops.flops.ScanAsOneOp`).

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
    handle.register(analyzer)
    analyzer.set_op_handle('aten::scaled_dot_product_attention',
                           sdpa_flop_jit)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad(), ScanAsOneOp():
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
