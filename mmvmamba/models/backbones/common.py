"""What the VMamba (v1) and VMamba2 backbones share: stochastic depth, the
SSM parameters' initialisation, SS2D's output stage, linear's backward for
the recomputing Functions, argument checks, the weight init and the
backbone's frame (:class:`VSSBackbone`)."""
import math
import numbers
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from mmvmamba.ops import NUM_DIRECTIONS, LayerNorm
from mmvmamba.ops.checks import (HALF_AND_FLOAT, check_bool, check_tensor,
                                 dtype_name, is_int)
from mmvmamba.ops import layer_norm as ln
from mmvmamba.ops.layer_norm import gated_layer_norm, norm_dtype
from mmvmamba.ops.scaled_add import scaled_add
from ..checkpoint import load_pretrained_backbone

SCAN_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample.

    Args:
        drop_prob (float): Probability of dropping a sample's branch.
    """

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    @property
    def is_identity(self) -> bool:
        """Whether :meth:`forward` returns its input (eval, or rate 0)."""
        return self.drop_prob == 0. or not self.training

    def _mask(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A kept (1) or dropped (0) sample of ``like``'s batch, broadcast
        over its other dimensions, in ``dtype``."""
        mask = torch.empty((like.shape[0], ) + (1, ) * (like.dim() - 1),
                           dtype=dtype, device=like.device)
        return mask.bernoulli_(1 - self.drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return x
        return x * self._mask(x, x.dtype) / (1 - self.drop_prob)

    def add(self, residual: torch.Tensor,
            branch: torch.Tensor) -> torch.Tensor:
        """``residual + self(branch)``, up to rounding: the per-sample scale
        (in at least float32) and the sum in one pass over the map
        (:func:`~mmvmamba.ops.scaled_add.scaled_add`: a float32 residual
        and a half-precision branch on its kernel, else the branch cast to
        the sum's dtype and one ``addcmul``), where :meth:`forward` and an
        add take three."""
        if self.is_identity:
            return residual + branch
        dtype = torch.promote_types(residual.dtype, branch.dtype)
        mask = self._mask(branch, torch.promote_types(dtype, torch.float32))
        return scaled_add(residual, branch,
                          (mask / (1 - self.drop_prob)).view(-1))

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


class CheckpointedBlock(nn.Module):
    """A block whose ``_forward`` runs under gradient checkpointing when
    ``self.with_cp`` is set and the input requires gradients."""
    with_cp = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class BlockStage(nn.Module):
    """A stage: ``blocks`` in order; ``downsample`` (or None) follows it,
    applied by the backbone after the stage's output is taken."""

    def __init__(self, blocks: Sequence[nn.Module],
                 downsample: Optional[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def parse_scan_dtype(scan_dtype: str) -> torch.dtype:
    """``'float32'`` or ``'bfloat16'`` -> the torch dtype, else ValueError."""
    if scan_dtype not in SCAN_DTYPES:
        raise ValueError(f'scan_dtype must be one of {sorted(SCAN_DTYPES)}, '
                         f'got {scan_dtype!r}')
    return SCAN_DTYPES[scan_dtype]


def auto_dt_rank(embed_dims: int) -> int:
    """The rank R of the step-size projection that ``dt_rank='auto'``
    gives a block of ``embed_dims`` channels: ``ceil(embed_dims / 16)``."""
    return math.ceil(embed_dims / 16)


def add_ssm_parameters(ss2d: nn.Module, embed_dims: int, d_inner: int,
                       d_state: int, dt_rank: Union[int, str]) -> None:
    """Register an SS2D's per-direction SSM parameters (uninitialised).

    Sets ``ss2d.d_inner``, ``d_state`` and ``dt_rank`` (``'auto'``:
    :func:`auto_dt_rank`) and adds ``x_proj_weight`` (4, R + 2N, D),
    ``dt_projs_weight`` (4, D, R), ``dt_projs_bias`` (4, D), ``A_logs``
    (4D, N) and ``Ds`` (4D), in the authors' order; see
    :func:`init_ssm_parameters`.
    """
    if dt_rank == 'auto':
        dt_rank = auto_dt_rank(embed_dims)
    ss2d.d_inner, ss2d.d_state, ss2d.dt_rank = d_inner, d_state, dt_rank
    k = NUM_DIRECTIONS
    ss2d.x_proj_weight = nn.Parameter(
        torch.empty(k, dt_rank + 2 * d_state, d_inner))
    ss2d.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
    ss2d.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
    ss2d.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
    ss2d.Ds = nn.Parameter(torch.empty(k * d_inner))


@torch.no_grad()
def init_ssm_parameters(ss2d: nn.Module,
                        dt_min: float = 1e-3,
                        dt_max: float = 1e-1,
                        dt_floor: float = 1e-4) -> None:
    """Initialise an SS2D's SSM parameters as the authors do.

    ``x_proj_weight`` as ``nn.Linear``'s default; ``dt_projs_weight`` uniform
    in ``±R^-0.5``; ``dt_projs_bias`` the inverse softplus of a step drawn
    log-uniformly in ``[dt_min, dt_max]`` (at least ``dt_floor``);
    ``A_logs = log(1..N)``; ``Ds = 1``.

    Args:
        ss2d (nn.Module): Has ``x_proj_weight`` (4, R + 2N, D),
            ``dt_projs_weight`` (4, D, R), ``dt_projs_bias`` (4, D),
            ``A_logs`` (4D, N) and ``Ds`` (4D).
    """
    for weight in ss2d.x_proj_weight:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = ss2d.dt_projs_weight.shape[2]**-0.5
    nn.init.uniform_(ss2d.dt_projs_weight, -bound, bound)
    dt = torch.exp(
        torch.rand_like(ss2d.dt_projs_bias) *
        (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    ss2d.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    d_state = ss2d.A_logs.shape[1]
    states = torch.arange(
        1, d_state + 1, dtype=torch.float32, device=ss2d.A_logs.device)
    ss2d.A_logs.copy_(torch.log(states).expand_as(ss2d.A_logs))
    ss2d.Ds.fill_(1.)


def output_gate(y: torch.Tensor, z: Optional[torch.Tensor],
                weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> Tuple[torch.Tensor, torch.dtype]:
    """SS2D's output gate ``LayerNorm(y) * SiLU(z)`` (``out_norm``'s
    parameters), by :func:`mmvmamba.ops.layer_norm.gated_layer_norm` (one
    Triton kernel where autograd does not record); ``F.layer_norm(y)``
    alone when ``z`` is None (VMamba2).

    Returns:
        tuple[Tensor, torch.dtype]: The gated map (with z, in ``out_proj``'s
        input dtype: autocast's, if on), and the dtype the norm ran in
        (float32 under autocast), which :class:`RecomputedOutput`
        recomputes it in.
    """
    if z is None:
        normed = F.layer_norm(y, weight.shape, weight, bias, eps)
        return normed, normed.dtype
    return gated_layer_norm(y, z, weight, bias, eps), norm_dtype(y)


def linear_backward(
    grad_2d: torch.Tensor, input_2d: Optional[torch.Tensor],
    weight: torch.Tensor, bias: Optional[torch.Tensor],
    needs: Tuple[bool, bool, bool]
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """``F.linear``'s backward as autograd computes it, for the recomputing
    Functions: ``mm`` on the 2-D views, in the dtype the layer ran in (the
    gradient's: autocast's, if on), the bias gradient summed over the rows
    (``sum_to_size``, as autograd reduces a broadcast bias), each parameter
    gradient cast back to its parameter's dtype.

    Args:
        grad_2d (Tensor): Gradient of the output, ``(rows, out)``.
        input_2d (Tensor, optional): The input as the layer read it (in the
            gradient's dtype), ``(rows, in)``; needed for the weight's
            gradient only.
        weight (Tensor): ``(out, in)``, any dtype.
        bias (Tensor, optional): ``(out, )``.
        needs (tuple[bool]): Which of input, weight and bias need gradients.

    Returns:
        tuple[Tensor | None]: Gradients of the input (2-D, in the gradient's
        dtype), of the weight and of the bias; None where not needed.
    """
    need_input, need_weight, need_bias = needs
    grad_input = grad_weight = grad_bias = None
    if need_weight:
        grad_weight = torch.mm(grad_2d.t(), input_2d).to(weight.dtype)
    if need_bias:
        grad_bias = grad_2d.sum_to_size(bias.shape).to(bias.dtype)
    if need_input:
        grad_input = torch.mm(grad_2d, weight.to(grad_2d.dtype))
    return grad_input, grad_weight, grad_bias


#: Whether :class:`RecomputedOutput`'s backward runs the gate's Triton
#: backward (:func:`mmvmamba.ops.layer_norm.gated_layer_norm_backward`, and
#: the forward kernel for out_proj's input) where
#: :func:`gate_backward_reason` allows, instead of the ATen ops; read at
#: every backward. On: VMamba-T's bf16 training step measured 1.07x faster
#: on an H200 (at every gate width; leaving E >= 768 to ATen, faster there
#: by the op table, made it 1.04x), VMamba2-T's the same
#: (``python benchmarks/layer_norm.py --gate --models vmamba-t vmamba2-t``;
#: docs/ops.md).
GATE_BACKWARD_ON_TRITON = True


def gate_backward_reason(y: torch.Tensor, z: Optional[torch.Tensor],
                         norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                         linear_dtype: torch.dtype) -> Optional[str]:
    """Why :class:`RecomputedOutput`'s backward runs the ATen ops here
    rather than the gate's Triton kernels, or None if it runs them.

    Args:
        y, z, norm_weight, norm_bias: The saved inputs of the gate.
        linear_dtype (torch.dtype): The dtype ``out_proj`` ran in (that of
            the gated map's gradient).
    """
    if not GATE_BACKWARD_ON_TRITON:
        return 'GATE_BACKWARD_ON_TRITON is off'
    if z is None:
        return 'no gate (z is None)'
    if linear_dtype not in ln.TRITON_DTYPES:
        return f'out_proj ran in {linear_dtype}'
    return ln.gate_unsupported_reason(y, z, norm_weight, norm_bias)


class RecomputedOutput(torch.autograd.Function):
    """SS2D's output stage ``out_proj(output_gate(y, z))`` keeping only its
    inputs; the backward recomputes the norm's statistics, SiLU(z) and the
    gated map (``out_proj``'s input).

    Not kept, against the plain graph: the norm's output and its mean and
    1 / std per position, SiLU(z), and ``out_proj``'s input (the gated map,
    cast to bfloat16 under autocast) with autocast's copy of its weight.
    The backward calls the ATen kernels that autograd calls for the plain
    graph (``native_layer_norm`` and its backward, ``silu_backward``, and
    ``mm`` on the 2-D views as linear's backward does), in the dtypes the
    forward ran in (autocast included), so gradients equal the plain
    graph's (bit for bit on the CPU, where it is tested; a GPU's matrix
    products may round differently). Lighter on the host than
    ``torch.utils.checkpoint`` and traceable by ``torch.compile``.

    Where :func:`gate_backward_reason` allows (on by default:
    :data:`GATE_BACKWARD_ON_TRITON`), the backward runs Triton kernels
    instead: the gated forward kernel recomputes ``out_proj``'s input, and
    one kernel the gradients of y, z, and the norm's weight and bias, with
    the ATen composition's roundings (equal up to float32 rounding, and a
    bfloat16 result's rounding either way).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, z: Optional[torch.Tensor],
                norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                eps: float, proj_weight: torch.Tensor,
                proj_bias: Optional[torch.Tensor]) -> torch.Tensor:
        gated, ctx.norm_dtype = output_gate(y, z, norm_weight, norm_bias,
                                            eps)
        out = F.linear(gated, proj_weight, proj_bias)
        # the dtype out_proj ran in (autocast's, if on)
        ctx.linear_dtype = out.dtype
        ctx.eps = eps
        ctx.save_for_backward(y, z, norm_weight, norm_bias, proj_weight,
                              proj_bias)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, z, norm_weight, norm_bias, proj_weight, proj_bias = \
            ctx.saved_tensors
        need_y, need_z, need_nw, need_nb, _, need_pw, need_pb = \
            ctx.needs_input_grad
        if gate_backward_reason(y, z, norm_weight, norm_bias,
                                ctx.linear_dtype) is None:
            return RecomputedOutput._backward_on_triton(
                ctx, grad, ctx.needs_input_grad, y, z, norm_weight,
                norm_bias, proj_weight, proj_bias)
        norm_in = [t.to(ctx.norm_dtype) for t in (y, norm_weight, norm_bias)]
        normed, mean, rstd = torch.ops.aten.native_layer_norm(
            norm_in[0], norm_weight.shape, norm_in[1], norm_in[2], ctx.eps)
        act = None if z is None else F.silu(z)
        gated = normed if act is None else normed * act
        grad_2d = grad.reshape(-1, grad.shape[-1])
        gated_2d = gated.to(ctx.linear_dtype).view(
            -1, gated.shape[-1]) if need_pw else None
        need_gated = need_y or need_z or need_nw or need_nb
        grad_gated, grad_pw, grad_pb = linear_backward(
            grad_2d, gated_2d, proj_weight, proj_bias,
            (need_gated, need_pw, need_pb))
        grad_y = grad_z = grad_nw = grad_nb = None
        if need_gated:
            grad_gated = grad_gated.view(gated.shape).to(gated.dtype)
            grad_normed = grad_gated
            if act is not None:
                # the product's backward: each factor's gradient in its
                # own dtype
                grad_normed = (grad_gated * act).to(normed.dtype)
                if need_z:
                    grad_z = torch.ops.aten.silu_backward(
                        (grad_gated * normed).to(act.dtype), z)
            grad_y, grad_nw, grad_nb = \
                torch.ops.aten.native_layer_norm_backward(
                    grad_normed, norm_in[0], norm_weight.shape, mean, rstd,
                    norm_in[1], norm_in[2], [need_y, need_nw, need_nb])
            grad_y = grad_y.to(y.dtype) if need_y else None
            grad_nw = grad_nw.to(norm_weight.dtype) if need_nw else None
            grad_nb = grad_nb.to(norm_bias.dtype) if need_nb else None
        return grad_y, grad_z, grad_nw, grad_nb, None, grad_pw, grad_pb

    @staticmethod
    def _backward_on_triton(ctx, grad: torch.Tensor, needs_input_grad,
                            y, z, norm_weight, norm_bias, proj_weight,
                            proj_bias):
        """The backward on the gate's Triton kernels (the gated map
        recomputed by the forward kernel in ``out_proj``'s dtype; then
        ``gated_layer_norm_backward``), of the saved tensors that
        :meth:`backward` unpacked."""
        need_y, need_z, need_nw, need_nb, _, need_pw, need_pb = \
            needs_input_grad
        grad_2d = grad.reshape(-1, grad.shape[-1])
        gated_2d = None
        if need_pw:
            gated_2d = gated_layer_norm(
                y, z, norm_weight, norm_bias, ctx.eps,
                out_dtype=ctx.linear_dtype).view(-1, y.shape[-1])
        needs = (need_y, need_z, need_nw, need_nb)
        grad_gated, grad_pw, grad_pb = linear_backward(
            grad_2d, gated_2d, proj_weight, proj_bias,
            (any(needs), need_pw, need_pb))
        grad_y = grad_z = grad_nw = grad_nb = None
        if any(needs):
            grad_y, grad_z, grad_nw, grad_nb = ln.gated_layer_norm_backward(
                grad_gated.view(y.shape), y, z, norm_weight, norm_bias,
                ctx.eps, needs)
        return grad_y, grad_z, grad_nw, grad_nb, None, grad_pw, grad_pb


def ss2d_output(y: torch.Tensor, z: Optional[torch.Tensor],
                out_norm: nn.LayerNorm, out_proj: nn.Linear,
                recompute: bool) -> torch.Tensor:
    """``out_proj(out_norm(y) * SiLU(z))`` (no gate when ``z`` is None),
    by :class:`RecomputedOutput` with ``recompute`` when autograd records.
    """
    args = (y, z, out_norm.weight, out_norm.bias, out_norm.eps)
    if recompute and torch.is_grad_enabled():
        return RecomputedOutput.apply(*args, out_proj.weight, out_proj.bias)
    return out_proj(output_gate(*args)[0])


def init_linear_and_norm(m: nn.Module) -> None:
    """Linear: truncated normal (std 0.02), zero bias; LayerNorm: 1, 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def parse_arch(arch: Union[str, Dict], zoo: Dict[str, Dict],
               required: Sequence[str], optional: Sequence[str]) -> Dict:
    """An ``arch`` argument as a dict of settings.

    Args:
        arch (str | dict): A key of ``zoo`` (any case) or a dict.
        zoo (dict): Named settings.
        required (Sequence[str]): Keys a dict must have.
        optional (Sequence[str]): Keys a dict may have.

    Returns:
        dict: A copy of the settings.
    """
    if isinstance(arch, str):
        key = arch.lower()
        if key not in zoo:
            raise ValueError(f'arch must be one of {sorted(zoo)} or a dict, '
                             f'got {arch!r}')
        return dict(zoo[key])
    if not isinstance(arch, dict):
        raise ValueError(f'arch must be a str or a dict, got {arch!r}')
    missing = [k for k in required if k not in arch]
    unknown = set(arch) - set(required) - set(optional)
    if missing or unknown:
        raise ValueError(f'arch dict needs {tuple(required)} and may set '
                         f'{tuple(optional)}; missing {missing}, unknown '
                         f'{sorted(unknown)}')
    check_arch_values(arch)
    return dict(arch)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> None:
    """``value`` must be an int of at least 1."""
    if not (is_int(value) and value >= 1):
        raise ValueError(f'{name} must be a positive int, got {value!r}')


def check_arch_values(arch: Dict) -> None:
    """The values of an ``arch`` dict: ``embed_dims`` a positive int,
    ``depths`` a non-empty list of positive ints, and where given
    ``d_state`` a positive int, ``ssm_ratio`` a number giving at least one
    inner channel, ``dt_rank`` ``'auto'`` or a positive int, ``mlp_ratio``
    0 or a number giving at least one hidden channel (the ratios finite)."""
    check_positive_int("arch['embed_dims']", arch['embed_dims'])
    depths = arch['depths']
    if not (isinstance(depths, (list, tuple)) and depths
            and all(is_int(d) and d >= 1 for d in depths)):
        raise ValueError(f"arch['depths'] must be a non-empty list of "
                         f'positive ints (blocks per stage), got {depths!r}')
    if 'd_state' in arch:
        check_positive_int("arch['d_state']", arch['d_state'])
    ratio = arch.get('ssm_ratio', 1)
    if not (_is_real(ratio) and math.isfinite(ratio)
            and int(ratio * arch['embed_dims']) >= 1):
        raise ValueError(f"arch['ssm_ratio'] must be a number giving at "
                         f"least one inner channel (int(ssm_ratio * "
                         f"{arch['embed_dims']}) >= 1), got {ratio!r}")
    dt_rank = arch.get('dt_rank', 'auto')
    if dt_rank != 'auto' and not (is_int(dt_rank) and dt_rank >= 1):
        raise ValueError(f"arch['dt_rank'] must be 'auto' or a positive int, "
                         f'got {dt_rank!r}')
    mlp_ratio = arch.get('mlp_ratio', 0)
    if not (_is_real(mlp_ratio) and math.isfinite(mlp_ratio) and
            (mlp_ratio == 0 or int(mlp_ratio * arch['embed_dims']) >= 1)):
        raise ValueError(f"arch['mlp_ratio'] must be 0 (no MLP) or a number "
                         f"giving at least one hidden channel (int(mlp_ratio "
                         f"* {arch['embed_dims']}) >= 1), got {mlp_ratio!r}")


def stage_drop_paths(drop_path_rate: float,
                     depths: Sequence[int]) -> List[List[float]]:
    """The blocks' stochastic depth rates, rising linearly from 0 to
    ``drop_path_rate`` over all blocks, split by stage."""
    rates = torch.linspace(0, drop_path_rate, sum(depths),
                           device='cpu').tolist()
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[start:start + depth]
            for start, depth in zip(starts, depths)]


def check_block_settings(drop_path_rate: float, **flags) -> None:
    """``drop_path_rate`` must lie in ``[0, 1)`` and each of ``flags``
    (``with_cp``, ``recompute_gate``, ...) be a bool."""
    if not (_is_real(drop_path_rate) and 0 <= drop_path_rate < 1):
        raise ValueError(f'drop_path_rate must be a number in [0, 1), got '
                         f'{drop_path_rate!r}')
    for name, value in flags.items():
        check_bool(name, value)


def check_out_indices(out_indices: Union[int, Iterable[int]],
                      num_stages: int) -> Tuple[int, ...]:
    """``out_indices`` as a tuple of distinct stage indices, each given in
    ``[-num_stages, num_stages)`` (negative ones counted from the end) and
    returned in ``[0, num_stages)``."""
    if is_int(out_indices):
        out_indices = [out_indices]
    elif isinstance(out_indices, (list, tuple)):
        out_indices = list(out_indices)
    if not (isinstance(out_indices, list) and out_indices
            and all(is_int(i) for i in out_indices)):
        raise ValueError(f'out_indices must be a stage index or a non-empty '
                         f'sequence of them, got {out_indices!r}')
    for i in out_indices:
        if not -num_stages <= i < num_stages:
            raise ValueError(f'out_indices must lie in [0, {num_stages}) '
                             f'(or [-{num_stages}, 0) from the end), got {i}')
    stages = [i + num_stages if i < 0 else i for i in out_indices]
    if len(set(stages)) < len(stages):
        raise ValueError(f'out_indices must name each stage once (a stage '
                         f'has one output), got {tuple(out_indices)}')
    return tuple(stages)


def check_frozen_stages(frozen_stages: int, num_stages: int) -> None:
    """``frozen_stages`` must lie in ``[-1, num_stages]``."""
    if not (is_int(frozen_stages) and -1 <= frozen_stages <= num_stages):
        raise ValueError(f'frozen_stages must be an int in [-1, '
                         f'{num_stages}], got {frozen_stages!r}')


def freeze(modules: Iterable[nn.Module]) -> None:
    """Eval mode and no gradients for ``modules``."""
    for module in modules:
        module.eval()
        for param in module.parameters():
            param.requires_grad = False


def _init_entries(init_cfg) -> list:
    """``init_cfg`` as a list of its entries (none for None)."""
    if isinstance(init_cfg, (list, tuple)):
        return list(init_cfg)
    return [] if init_cfg is None else [init_cfg]


def _split_pretrained(entries: list) -> Tuple[list, list]:
    """``init_cfg``'s entries of type ``Pretrained``, and the others."""
    pretrained = [c for c in entries if c['type'] == 'Pretrained']
    return pretrained, [c for c in entries if c['type'] != 'Pretrained']


class VSSBackbone(BaseModule):
    """The frame of the VMamba and VMamba2 backbones around their stages:
    argument checks, output norms, frozen stages, ``norm_eval``, pretrained
    loading and the forward.

    A subclass calls :meth:`_set_outputs` first, then builds
    ``patch_embed`` (channels last out) and ``stages`` (each with a
    ``downsample``, None on the last stage: :meth:`_build_stages`), then
    calls :meth:`_add_output_norms` and :meth:`_freeze_stages`, in that
    order (the order of the state dict's keys).

    ``init_cfg``: None, a dict with a ``type`` or a list of them, at most one
    of type ``Pretrained`` (loaded strictly by
    :func:`~mmvmamba.models.checkpoint.load_pretrained_backbone`, after the
    others, as mmengine orders them).
    """

    def __init__(self, init_cfg: Union[dict, List[dict], None] = None):
        entries = _init_entries(init_cfg)
        if (not isinstance(init_cfg, (dict, list, tuple, type(None)))
                or not all(isinstance(c, dict) and 'type' in c
                           for c in entries)):
            raise ValueError('init_cfg must be a dict with a "type", a list '
                             f'of them or None, got {init_cfg!r}')
        pretrained, _ = _split_pretrained(entries)
        if len(pretrained) > 1:
            raise ValueError('init_cfg may hold one Pretrained entry, got '
                             f'{len(pretrained)}: {pretrained!r}')
        super().__init__(init_cfg=init_cfg)

    def _set_outputs(self, in_channels: int, embed_dims: int, num_stages: int,
                     out_indices: Union[int, Iterable[int]],
                     frozen_stages: int, norm_eval: bool) -> None:
        """Check and keep the settings of the stages' outputs.

        Args:
            in_channels (int): Input channels.
            embed_dims (int): Stage-0 width (stage i: ``embed_dims * 2**i``).
            num_stages (int): Number of stages.
            out_indices (Sequence[int] | int): Stages whose outputs are
                returned.
            frozen_stages (int): Stages to freeze, in ``[-1, num_stages]``.
            norm_eval (bool): Keep BatchNorms in eval mode while training.
        """
        check_positive_int('in_channels', in_channels)
        check_bool('norm_eval', norm_eval)
        self.in_channels = in_channels
        self.num_stages = num_stages
        self.embed_dims = embed_dims
        self.num_features = [embed_dims * 2**i for i in range(num_stages)]
        self.out_indices = check_out_indices(out_indices, num_stages)
        check_frozen_stages(frozen_stages, num_stages)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

    def _build_stages(self, stage_cls: type, depths: Sequence[int],
                      drop_path_rate: float, **stage_cfg) -> None:
        """``self.stages``: a ``stage_cls(width, depth, drop_paths,
        downsample=..., **stage_cfg)`` for each of ``depths``, each but the
        last downsampling, with :func:`stage_drop_paths`' rates."""
        rates = stage_drop_paths(drop_path_rate, depths)
        self.stages = nn.ModuleList(
            stage_cls(self.num_features[i], depth, rates[i],
                      downsample=i < self.num_stages - 1, **stage_cfg)
            for i, depth in enumerate(depths))

    def _add_output_norms(self) -> None:
        """A LayerNorm ``norm{i}`` for each stage ``i`` in ``out_indices``."""
        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNorm(self.num_features[i]))

    def init_weights(self) -> None:
        """Load ``init_cfg``'s pretrained weights strictly, if any, after
        mmengine's initialisation by its other entries (none: the loaded
        weights replace every parameter)."""
        cfg = self.init_cfg
        pretrained, others = _split_pretrained(_init_entries(cfg))
        if not pretrained:
            super().init_weights()
            return
        if others:
            self.init_cfg = others
            try:
                super().init_weights()
            finally:
                self.init_cfg = cfg
        load_pretrained_backbone(self, pretrained[0].get('checkpoint'),
                                 pretrained[0].get('prefix'))
        self._is_init = True

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.patch_embed]
        for i in range(self.frozen_stages):
            frozen.append(self.stages[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        freeze(frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        """Shape, dtype and device of the images, against the weights (any
        batch, empty too; any dtype under autocast)."""
        check_tensor(
            'x',
            x, (None, self.in_channels, None, None),
            HALF_AND_FLOAT,
            labels='(batch, in_channels, H, W)')
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError('x must have images of at least one pixel (H, '
                             f'W >= 1), got shape {tuple(x.shape)}')
        weight = next(self.patch_embed.parameters())
        if x.device != weight.device:
            raise ValueError(f'x is on {x.device} but the backbone\'s weights '
                             f'are on {weight.device}: move one to the other')
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(
                x.device.type):
            raise ValueError(
                f'x has dtype {dtype_name(x.dtype)} but the backbone\'s '
                f'weights {dtype_name(weight.dtype)}: cast one to the other, '
                'or run under torch.autocast')

    def forward(self, x: torch.Tensor) -> tuple:
        self._check_input(x)
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                outs.append(out.permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        return tuple(outs)
