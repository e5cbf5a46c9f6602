"""VMamba2: the authors' current VMamba models (VMamba-T[s1l8], S/B[s2l15])."""
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS

from mmvmamba.ops import LayerNorm, cross_selective_scan
from .common import (BlockStage, CheckpointedBlock, DropPath, VSSBackbone,
                     add_ssm_parameters, check_block_settings,
                     init_linear_and_norm, init_ssm_parameters,
                     linear_backward, parse_arch, parse_scan_dtype,
                     ss2d_output)


class SS2DV2(nn.Module):
    """The token mixer of a VMamba2 block (the authors' ``v05_noz`` SS2D).

    ``in_proj`` -> depthwise 3x3 conv -> SiLU -> four-direction selective
    scan (:func:`mmvmamba.ops.cross_selective_scan`, ``D * u`` included,
    directions summed) -> ``out_norm`` -> ``out_proj``. No gate and no bias
    but ``dt_projs_bias``. Works on channels-last maps. On the fused kernel
    the SiLU is taken inside the scan's op, whose backward keeps the conv's
    output only and recomputes the SiLU (same results).

    Args:
        embed_dims (int): Channels C of the block.
        d_state (int): State size N. Defaults to 1.
        ssm_ratio (float): Inner width ``d_inner = int(ssm_ratio * C)``.
            Defaults to 1.0.
        dt_rank (int | str): Rank R of the step-size projection; ``'auto'``
            is ``ceil(C / 16)`` (of the block's C, not of ``d_inner``).
            Defaults to 'auto'.
        scan_dtype (str): Dtype of the scan's inputs, ``'float32'`` or
            ``'bfloat16'`` (the state and sums stay float32). Defaults to
            'float32'.
        recompute_norm (bool): Recompute ``out_norm`` and ``out_proj``'s
            input in the backward instead of keeping the latter (bf16 under
            autocast) and the norm's statistics for it
            (:class:`~.common.RecomputedOutput`). Same results.
            Defaults to True.
    """

    def __init__(self,
                 embed_dims: int,
                 d_state: int = 1,
                 ssm_ratio: float = 1.0,
                 dt_rank: Union[int, str] = 'auto',
                 scan_dtype: str = 'float32',
                 recompute_norm: bool = True):
        super().__init__()
        self.scan_dtype = parse_scan_dtype(scan_dtype)
        self.recompute_norm = recompute_norm
        d_inner = int(ssm_ratio * embed_dims)
        self.in_proj = nn.Linear(embed_dims, d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, 3, padding=1, groups=d_inner, bias=False)
        add_ssm_parameters(self, embed_dims, d_inner, d_state, dt_rank)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, embed_dims, bias=False)
        init_ssm_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        x = self.in_proj(x)
        x = self.conv2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = cross_selective_scan(
            x,
            self.x_proj_weight,
            self.dt_projs_weight,
            self.dt_projs_bias,
            self.A_logs,
            self.Ds,
            channels_last=True,
            # a float64 model (tests) scans in float64
            scan_dtype=None if x.dtype == torch.float64 else self.scan_dtype,
            silu=True)
        # float32 from the scan; a half-precision model gets its own dtype.
        y = y.to(self.out_norm.weight.dtype)
        return ss2d_output(y, None, self.out_norm, self.out_proj,
                           self.recompute_norm)


class RecomputedMlp(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` keeping fc1's output and its input (as fc1
    read it, when fc1's weight needs a gradient) only; the backward
    recomputes the GELU (``fc2``'s input).

    Not kept, against the plain graph: the GELU's output, and under
    autocast its copies of both weights. The backward calls the ATen kernels
    autograd calls for the plain graph (``gelu_backward``, and ``mm`` on the
    2-D views as linear's backward does, see
    :func:`~.common.linear_backward`), in the dtypes the forward ran in
    (autocast included), so gradients equal the plain graph's (bit for
    bit on the CPU, where it is tested).
    Traceable by ``torch.compile``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fc1_weight: torch.Tensor,
                fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
                fc2_bias: Optional[torch.Tensor]) -> torch.Tensor:
        hidden = F.linear(x, fc1_weight, fc1_bias)
        act = F.gelu(hidden)
        out = F.linear(act, fc2_weight, fc2_bias)
        # the dtypes fc1 and the GELU ran in (autocast's, if on); x kept as
        # fc1 read it (the same cast as autocast's, which is not kept), and
        # only for fc1's weight gradient
        ctx.input_dtype, ctx.gelu_dtype = x.dtype, act.dtype
        fc1_input = x.to(hidden.dtype) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(fc1_input, hidden, fc1_weight, fc1_bias,
                              fc2_weight, fc2_bias)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, hidden, fc1_weight, fc1_bias, fc2_weight, fc2_bias = \
            ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        need_hidden = need_x or need_w1 or need_b1
        gelu_in = hidden.to(ctx.gelu_dtype)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        act_2d = F.gelu(gelu_in).to(grad.dtype).view(
            -1, gelu_in.shape[-1]) if need_w2 else None
        grad_act, grad_w2, grad_b2 = linear_backward(
            grad_2d, act_2d, fc2_weight, fc2_bias,
            (need_hidden, need_w2, need_b2))
        grad_x = grad_w1 = grad_b1 = None
        if need_hidden:
            grad_act = grad_act.view(gelu_in.shape).to(ctx.gelu_dtype)
            grad_hidden = torch.ops.aten.gelu_backward(
                grad_act, gelu_in, approximate='none').to(hidden.dtype)
            x_2d = x.reshape(-1, x.shape[-1]) if need_w1 else None
            grad_x, grad_w1, grad_b1 = linear_backward(
                grad_hidden.view(-1, hidden.shape[-1]), x_2d, fc1_weight,
                fc1_bias, (need_x, need_w1, need_b1))
            if need_x:
                grad_x = grad_x.view(*hidden.shape[:-1],
                                     fc1_weight.shape[1]).to(ctx.input_dtype)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


class Mlp(nn.Module):
    """``fc1`` -> GELU -> ``fc2`` over the channels of a channels-last map.

    Args:
        embed_dims (int): Input and output channels.
        hidden_dims (int): Channels between ``fc1`` and ``fc2``.
        recompute (bool): Recompute the GELU in the backward instead of
            keeping its output, ``hidden_dims`` values per position (and
            under autocast its copies of the weights), by
            :class:`RecomputedMlp`. Same results. Defaults to
            True.
    """

    def __init__(self,
                 embed_dims: int,
                 hidden_dims: int,
                 recompute: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return RecomputedMlp.apply(x, self.fc1.weight, self.fc1.bias,
                                       self.fc2.weight, self.fc2.bias)
        return self.fc2(F.gelu(self.fc1(x)))


class VSSBlockV2(CheckpointedBlock):
    """VMamba2 block on channels-last maps, two pre-norm residuals::

        x = x + DropPath(SS2DV2(norm(x)))
        x = x + DropPath(Mlp(norm2(x)))      # when mlp_ratio > 0

    Args:
        embed_dims (int): Channels of the block.
        mlp_ratio (float): Hidden width of the MLP, ``int(mlp_ratio * C)``;
            0 leaves the MLP out. Defaults to 4.0.
        drop_path (float): Stochastic depth rate. Defaults to 0.
        with_cp (bool): Use gradient checkpointing. Defaults to False.
        recompute_mlp (bool): ``recompute`` of :class:`Mlp`. Defaults to
            True.
        **ssm_cfg: ``d_state``, ``ssm_ratio``, ``dt_rank``, ``scan_dtype``
            and ``recompute_norm`` of :class:`SS2DV2`.
    """

    def __init__(self,
                 embed_dims: int,
                 mlp_ratio: float = 4.0,
                 drop_path: float = 0.,
                 with_cp: bool = False,
                 recompute_mlp: bool = True,
                 **ssm_cfg):
        super().__init__()
        self.norm = LayerNorm(embed_dims, linear_input=True)
        self.ss2d = SS2DV2(embed_dims, **ssm_cfg)
        if mlp_ratio > 0:
            self.norm2 = LayerNorm(embed_dims)
            self.mlp = Mlp(embed_dims, int(embed_dims * mlp_ratio),
                           recompute_mlp)
        else:
            self.norm2 = self.mlp = None
        self.drop_path = DropPath(drop_path)
        self.with_cp = with_cp

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_path.add(x, self.ss2d(self.norm(x)))
        if self.mlp is not None:
            x = self.drop_path.add(x, self.mlp(self.norm2(x)))
        return x


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _to_channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    """Two 3x3 stride-2 convs (padding 1): ``conv1`` (to C/2) -> ``norm1``
    -> GELU -> ``conv2`` (to C) -> ``norm2``; an ``(B, C_in, H, W)`` image to
    a channels-last ``(B, ceil(ceil(H/2)/2), ..., C)`` map."""

    def __init__(self, in_channels: int, embed_dims: int):
        super().__init__()
        mid = embed_dims // 2
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=2, padding=1)
        self.norm1 = LayerNorm(mid)
        self.conv2 = nn.Conv2d(mid, embed_dims, 3, stride=2, padding=1)
        self.norm2 = LayerNorm(embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(_to_channels_last(self.conv1(x))))
        return self.norm2(_to_channels_last(self.conv2(_to_channels_first(x))))


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv (padding 1) from C to 2C channels, then LayerNorm;
    channels-last ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``."""

    def __init__(self, embed_dims: int):
        super().__init__()
        self.conv = nn.Conv2d(
            embed_dims, 2 * embed_dims, 3, stride=2, padding=1)
        self.norm = LayerNorm(2 * embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_to_channels_last(self.conv(_to_channels_first(x))))


class VSSStageV2(BlockStage):
    """A stage: VMamba2 blocks, then an optional downsample (applied by the
    backbone after it has taken the stage's output)."""

    def __init__(self, embed_dims: int, depth: int,
                 drop_paths: Sequence[float], downsample: bool,
                 with_cp: bool, mlp_ratio: float, recompute_mlp: bool,
                 **ssm_cfg):
        super().__init__(
            [VSSBlockV2(embed_dims, mlp_ratio, drop_paths[i], with_cp,
                        recompute_mlp, **ssm_cfg) for i in range(depth)],
            ConvDownsample(embed_dims) if downsample else None)


@MODELS.register_module()
class VMamba2(VSSBackbone):
    """VMamba2: the authors' current VMamba models.

    The `VMamba <https://arxiv.org/abs/2401.10166>`_ family of the paper's
    later versions and of the authors' released checkpoints: VMamba-T[s1l8],
    S[s2l15] and B[s2l15] (their ``vmambav2v_tiny_224``, ``vmambav2_small_224``
    and ``vmambav2_base_224``). Against :class:`VMamba` (the first version):
    a convolutional stem and downsampling, d_state 1, no gate and no biases
    in SS2D, an MLP in every block. Loads the authors' weights converted by
    ``tools/model_converters/vmamba2mmvmamba.py``.

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``,
            ``'s'``, ``'b'``), or a dict with ``embed_dims`` (stage-0 width),
            ``depths``, ``ssm_ratio``, ``d_state``, ``mlp_ratio`` and
            optionally ``dt_rank`` (default ``'auto'`` = ceil(C_i / 16)).
            Defaults to 'tiny'.
        in_channels (int): Input channels. Defaults to 3.
        out_indices (Sequence[int] | int): Stages whose outputs are returned,
            each after its own LayerNorm, taken before the stage's
            downsample, in stage order (distinct; -1 is the last). Defaults
            to (3, ).
        drop_path_rate (float): Stochastic depth, linear from 0 over all
            blocks. Defaults to 0.2.
        frozen_stages (int): Freeze the stem (0) and stages
            ``0 .. frozen_stages - 1`` with their downsamples and output
            norms. -1 freezes nothing. Defaults to -1.
        norm_eval (bool): Keep normalisation layers with running statistics
            in eval mode while training (VMamba2 itself has only
            LayerNorms). Defaults to False.
        with_cp (bool): Gradient checkpointing of every block. Defaults to
            False.
        scan_dtype (str): Dtype of the selective scan's inputs: ``'float32'``
            (default) or ``'bfloat16'`` (see :class:`SS2DV2`).
        recompute_norm (bool): Recompute each block's ``out_norm`` and
            ``out_proj`` input in the backward rather than keep them: less
            activation memory, the same results (see
            :class:`SS2DV2`). Defaults to True.
        recompute_mlp (bool): Recompute each block's MLP GELU in the
            backward rather than keep its output (``mlp_ratio * C`` values
            per position): less activation memory, the same results (see
            :class:`Mlp`). Defaults to True.
        init_cfg (dict | list[dict], optional): ``dict(type='Pretrained',
            checkpoint=..., prefix='backbone.')`` loads converted weights
            strictly (see
            :func:`mmvmamba.models.checkpoint.load_pretrained_backbone`);
            in a list, after mmengine's other initialisers.

    Returns (forward):
        tuple[Tensor]: ``(B, C_i, H_i, W_i)`` for each index in
        ``out_indices``, ``C_i = C_0 * 2**i`` at stride ``4 * 2**i``
        (``H_i = ceil(H / 2**(i + 2))``: no padding, no cropping).
    """
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], {
            'embed_dims': 96, 'depths': [2, 2, 8, 2], 'ssm_ratio': 1.0,
            'd_state': 1, 'mlp_ratio': 4.0}),
        **dict.fromkeys(['s', 'small'], {
            'embed_dims': 96, 'depths': [2, 2, 15, 2], 'ssm_ratio': 2.0,
            'd_state': 1, 'mlp_ratio': 4.0}),
        **dict.fromkeys(['b', 'base'], {
            'embed_dims': 128, 'depths': [2, 2, 15, 2], 'ssm_ratio': 2.0,
            'd_state': 1, 'mlp_ratio': 4.0}),
    }  # yapf: disable
    arch_keys = ('embed_dims', 'depths', 'ssm_ratio', 'd_state', 'mlp_ratio')

    def __init__(self,
                 arch: Union[str, Dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (3, ),
                 drop_path_rate: float = 0.2,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 scan_dtype: str = 'float32',
                 recompute_norm: bool = True,
                 recompute_mlp: bool = True,
                 init_cfg: Optional[Dict] = None):
        super().__init__(init_cfg=init_cfg)
        check_block_settings(drop_path_rate, with_cp=with_cp,
                             recompute_norm=recompute_norm,
                             recompute_mlp=recompute_mlp)
        arch = parse_arch(arch, self.arch_zoo, self.arch_keys, ('dt_rank', ))
        embed_dims, depths = arch['embed_dims'], list(arch['depths'])
        ssm_cfg = dict(
            d_state=arch['d_state'],
            ssm_ratio=arch['ssm_ratio'],
            dt_rank=arch.get('dt_rank', 'auto'),
            scan_dtype=scan_dtype,
            recompute_norm=recompute_norm)
        self.arch = arch
        self._set_outputs(in_channels, embed_dims, len(depths), out_indices,
                          frozen_stages, norm_eval)

        self.patch_embed = ConvStem(in_channels, embed_dims)
        self._build_stages(VSSStageV2, depths, drop_path_rate,
                           with_cp=with_cp, mlp_ratio=arch['mlp_ratio'],
                           recompute_mlp=recompute_mlp, **ssm_cfg)
        self._add_output_norms()

        self.apply(init_linear_and_norm)
        self._freeze_stages()
