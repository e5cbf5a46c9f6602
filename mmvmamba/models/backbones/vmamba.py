"""VMamba backbone (paper version 1, January 2024)."""
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch.nn.modules import module as nn_module

from mmvmamba.ops import (LayerNorm, cross_selective_scan,
                          depthwise_conv_nhwc)
from mmvmamba.ops.checks import autograd_records
from mmvmamba.ops.layer_norm import add_layer_norm
from .common import (BlockStage, CheckpointedBlock, DropPath, VSSBackbone,
                     add_ssm_parameters, check_block_settings,
                     init_linear_and_norm, init_ssm_parameters, parse_arch,
                     ss2d_output)

#: Whether :class:`VSSStage` runs each block's residual add and the next
#: block's norm in one pass (:func:`~mmvmamba.ops.layer_norm.add_layer_norm`)
#: where autograd does not record. On: VMamba-T's bf16 inference measured
#: 1.008x faster on an H200 (``python benchmarks/layer_norm.py --add-norm
#: --models vmamba-t``; docs/ops.md).
ADD_NORM_ON_TRITON = True

#: Whether :class:`VMamba`'s LayerNorms (``out_norm`` aside) run the Triton
#: kernels in training too (``LayerNorm.triton_when_recorded``), read when
#: the backbone is built. On: VMamba-T's bf16 training step measured
#: 1.04-1.05x faster on an H200, VMamba2-T's 0.89x (docs/ops.md), so VMamba2
#: keeps ``F.layer_norm`` there.
NORMS_TRAIN_ON_TRITON = True

#: Whether SS2D's ``in_proj`` runs as two products, one per half of its
#: weight (x and z), where autograd records: each half is then dense, so
#: cuDNN's depthwise conv reads x without copying it (twice a step: its
#: forward and its weight gradient) and the halves' gradients need no
#: ``cat``. Read at every forward. The product runs whole where
#: ``in_proj`` has forward hooks (or global ones are set) or is not a plain
#: ``nn.Linear``. On: VMamba-T's bf16 training step measured 1.5% less GPU
#: time and 0.8% faster on an H200 (docs/benchmarks.md); ``switch_model_rows
#: (['vmamba-t'], ['train-bf16'], 128, 5, 30, vmamba, 'SPLIT_IN_PROJ')`` in
#: ``benchmarks/timing.py`` times it.
SPLIT_IN_PROJ = True


class SS2D(nn.Module):
    """2D selective scan: the token mixer of a VSS block.

    ``in_proj`` -> (x, z); x -> depthwise 3x3 conv -> SiLU -> four-direction
    selective scan (:func:`mmvmamba.ops.cross_selective_scan`) -> ``out_norm``
    -> times SiLU(z) -> ``out_proj``. Works on channels-last maps. On the
    fused kernel the SiLU is taken inside the scan's op, whose backward
    keeps the conv's output only and recomputes the SiLU (same results).

    Args:
        embed_dims (int): Channels C of the block.
        d_state (int): State size N. Defaults to 16.
        ssm_ratio (float): Inner width ``d_inner = ssm_ratio * C``.
            Defaults to 2.0.
        dt_rank (int | str): Rank R of the step-size projection; ``'auto'``
            is ``ceil(C / 16)``. Defaults to 'auto'.
        scan_dtype (str): Dtype of the scan's inputs, ``'float32'`` (the
            authors' numerics) or ``'bfloat16'`` (half the bytes; the state
            and sums stay float32). Defaults to 'float32'.
        recompute_gate (bool): Recompute ``out_norm``, the SiLU gate and
            ``out_proj``'s input in the backward instead of keeping them for
            it (:class:`~.common.RecomputedOutput`: the float32 norm output,
            SiLU(z) and the bf16 gated map, 2 float32 maps of ``d_inner``
            channels under bf16 autocast). Same results; on a GPU also the
            faster setting (docs/memory.md). Defaults to True.
    """
    scan_dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16}

    def __init__(self,
                 embed_dims: int,
                 d_state: int = 16,
                 ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = 'auto',
                 scan_dtype: str = 'float32',
                 recompute_gate: bool = True):
        super().__init__()
        if scan_dtype not in self.scan_dtypes:
            raise ValueError(f'scan_dtype must be one of '
                             f'{sorted(self.scan_dtypes)}, got {scan_dtype!r}')
        self.scan_dtype = self.scan_dtypes[scan_dtype]
        self.recompute_gate = recompute_gate
        d_inner = int(ssm_ratio * embed_dims)
        self.in_proj = nn.Linear(embed_dims, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        add_ssm_parameters(self, embed_dims, d_inner, d_state, dt_rank)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, embed_dims, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self,
                             dt_min: float = 1e-3,
                             dt_max: float = 1e-1,
                             dt_floor: float = 1e-4) -> None:
        """Initialise the SSM parameters as the authors do.

        ``x_proj`` as ``nn.Linear``'s default; ``dt_projs_weight`` uniform in
        ``±R^-0.5``; ``dt_projs_bias`` the inverse softplus of a step drawn
        log-uniformly in ``[dt_min, dt_max]`` (at least ``dt_floor``);
        ``A_logs = log(1..N)``; ``Ds = 1``.
        """
        init_ssm_parameters(self, dt_min, dt_max, dt_floor)

    def _in_proj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``in_proj``'s halves (x, z): two products where
        :data:`SPLIT_IN_PROJ` applies, else halves of the whole one."""
        proj = self.in_proj
        if (SPLIT_IN_PROJ and type(proj) is nn.Linear
                and autograd_records(x, proj.weight, proj.bias)
                and _call_runs_forward_only(proj)):
            biases = (None, None) if proj.bias is None else proj.bias.chunk(2)
            return tuple(
                F.linear(x, weight, bias)
                for weight, bias in zip(proj.weight.chunk(2), biases))
        return tuple(proj(x).chunk(2, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        x, z = self._in_proj(x)
        # the SiLU in the convolution's pass where autograd does not record
        # it; else in the scan's op, which keeps the map before it
        silu_in_conv = not autograd_records(x, self.conv2d.weight,
                                            self.conv2d.bias)
        conv = self.conv2d
        # the conv's parameters without the module where calling it runs
        # nothing more (its bias's gradient is then a faster product)
        module_call = not (type(conv) is nn.Conv2d
                           and _call_runs_forward_only(conv))
        x = depthwise_conv_nhwc(conv, x, silu=silu_in_conv,
                                module_call=module_call)
        y = cross_selective_scan(
            x,
            self.x_proj_weight,
            self.dt_projs_weight,
            self.dt_projs_bias,
            self.A_logs,
            self.Ds,
            channels_last=True,
            scan_dtype=self.scan_dtype,
            silu=not silu_in_conv)
        # float32 from the scan; a half-precision model gets its own dtype.
        y = y.to(self.out_norm.weight.dtype)
        return ss2d_output(y, z, self.out_norm, self.out_proj,
                           self.recompute_gate)


class VSSBlock(CheckpointedBlock):
    """VSS block: ``x + DropPath(SS2D(LayerNorm(x)))`` on channels-last maps.

    Args:
        embed_dims (int): Channels of the block.
        drop_path (float): Stochastic depth rate. Defaults to 0.
        with_cp (bool): Use gradient checkpointing. Defaults to False.
        **ssm_cfg: ``d_state``, ``ssm_ratio``, ``dt_rank``, ``scan_dtype``
            and ``recompute_gate`` of :class:`SS2D`.
    """

    def __init__(self,
                 embed_dims: int,
                 drop_path: float = 0.,
                 with_cp: bool = False,
                 **ssm_cfg):
        super().__init__()
        self.norm = LayerNorm(embed_dims, linear_input=True)
        self.ss2d = SS2D(embed_dims, **ssm_cfg)
        self.drop_path = DropPath(drop_path)
        self.with_cp = with_cp

    def branch(self, normed: torch.Tensor) -> torch.Tensor:
        """The residual branch ``DropPath(SS2D(normed))`` of the normalised
        input."""
        return self.drop_path(self.ss2d(normed))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path.add(x, self.ss2d(self.norm(x)))


class PatchEmbed(nn.Module):
    """4x4 patch embedding: conv (stride 4) -> channels-last -> LayerNorm.

    The input is zero-padded at the bottom and right to a multiple of 4.
    Where ``proj`` is a plain ``nn.Conv2d`` without forward hooks (and no
    global ones are set), the conv runs as what it is, a matrix product of
    the flattened 4x4 patches with its weight: channels-last out, and on
    the GPU a fraction of cuDNN's time under autocast (its weight gradient
    with 3 input channels; docs/benchmarks.md). Same parameters, outputs up
    to float32 rounding (cuDNN's float32 convs may round to TF32, the
    product does not).
    """

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(
            in_channels, embed_dims, patch_size, stride=patch_size)
        self.norm = LayerNorm(embed_dims)

    def _is_patch_conv(self, proj: nn.Module) -> bool:
        """Whether ``proj`` is the conv this module built: one output a
        non-overlapping patch, nothing else (a plain ``nn.Conv2d``)."""
        p = self.patch_size
        return (type(proj) is nn.Conv2d and proj.kernel_size == (p, p)
                and proj.stride == (p, p) and proj.padding == (0, 0)
                and proj.dilation == (1, 1) and proj.groups == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, C_in, H, W)`` -> ``(B, ceil(H/4), ceil(W/4), C)``."""
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))
        proj = self.proj
        if self._is_patch_conv(proj) and _call_runs_forward_only(proj):
            batch, channels, height, width = x.shape
            patches = x.reshape(batch, channels, height // p, p, width // p,
                                p).permute(0, 2, 4, 1, 3, 5)
            patches = patches.reshape(batch, height // p, width // p,
                                      channels * p * p)
            # the weight's (out, in, kh, kw) order flattens as the patches
            weight = proj.weight.reshape(proj.out_channels, -1)
            return self.norm(F.linear(patches, weight, proj.bias))
        if x.is_cuda:
            # cuDNN then writes a channels-last map, whose permutation the
            # norm reads as contiguous rows (its Triton kernel)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.norm(proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 patch merging: ``C -> 2C`` channels, half the resolution.

    The four neighbours are concatenated in the order of (row, col) offsets
    (0, 0), (1, 0), (0, 1), (1, 1), then LayerNorm(4C) and a Linear to 2C
    without bias. Odd sizes are zero-padded at the bottom and right.
    """

    def __init__(self, embed_dims: int):
        super().__init__()
        self.norm = LayerNorm(4 * embed_dims, linear_input=True)
        self.reduction = nn.Linear(4 * embed_dims, 2 * embed_dims, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``."""
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([
            x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2,
                                                                    1::2]
        ], dim=-1)
        return self.reduction(self.norm(x))


def _call_runs_forward_only(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its ``forward`` and nothing more (no
    forward hooks of its own or global ones), so that a caller may compute
    what it computes another way."""
    return not (module._forward_hooks or module._forward_pre_hooks
                or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks)


class VSSStage(BlockStage):
    """A stage: VSS blocks, then an optional patch merging.

    With :data:`ADD_NORM_ON_TRITON`, where autograd does not record and
    DropPath is the identity (eval), each block hands the next one its
    normalised input: the residual add and the next block's norm run in one
    pass (:func:`~mmvmamba.ops.layer_norm.add_layer_norm`), with the same
    values up to float32 rounding. Otherwise (also where forward hooks are
    registered on the blocks, their norms or all modules, which that path
    would not call) the blocks run one by one.
    """

    def __init__(self, embed_dims: int, depth: int,
                 drop_paths: Sequence[float], downsample: bool, with_cp: bool,
                 **ssm_cfg):
        super().__init__(
            [VSSBlock(embed_dims, drop_paths[i], with_cp, **ssm_cfg)
             for i in range(depth)],
            PatchMerging(embed_dims) if downsample else None)

    def _fuses_add_norm(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` hands the blocks normalised inputs (the
        parameters are gathered only where gradients are on)."""
        return ADD_NORM_ON_TRITON and all(
            isinstance(block.norm, LayerNorm) and block.drop_path.is_identity
            and _call_runs_forward_only(block)
            and _call_runs_forward_only(block.norm)
            for block in self.blocks) and not (
                torch.is_grad_enabled()
                and (autograd_records(x)
                     or autograd_records(*self.blocks.parameters())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fuses_add_norm(x):
            return super().forward(x)
        normed = self.blocks[0].norm(x)
        for block, following in zip(self.blocks[:-1], self.blocks[1:]):
            norm = following.norm
            x, normed = add_layer_norm(x, block.branch(normed), norm.weight,
                                       norm.bias, norm.eps,
                                       norm.output_dtype(x))
        return x + self.blocks[-1].branch(normed)


@MODELS.register_module()
class VMamba(VSSBackbone):
    """VMamba: Visual State Space Model (paper version 1).

    A implementation of `VMamba: Visual State Space Model
    <https://arxiv.org/abs/2401.10166v1>`_ that loads the authors' weights
    (converted by ``tools/model_converters/vmamba2mmvmamba.py``).

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``,
            ``'s'``, ``'b'``), or a dict with ``embed_dims`` (stage-0 width),
            ``depths`` and optionally ``d_state`` (16), ``ssm_ratio`` (2.0)
            and ``dt_rank`` ('auto' = ceil(C / 16)). Defaults to 'tiny'.
        in_channels (int): Input channels. Defaults to 3.
        out_indices (Sequence[int] | int): Stages whose outputs are returned,
            each after its own LayerNorm, in stage order (distinct; -1 is
            the last). Defaults to (3, ).
        drop_path_rate (float): Stochastic depth, linear from 0 over all
            blocks. Defaults to 0.2.
        frozen_stages (int): Freeze the patch embedding and stages
            ``0 .. frozen_stages - 1`` (with their patch merging and output
            norms); 0 freezes the patch embedding only, -1 nothing.
            Defaults to -1.
        norm_eval (bool): Keep normalisation layers with running statistics
            in eval mode while training (VMamba itself has none; this
            reaches layers added by subclasses). Defaults to False.
        with_cp (bool): Gradient checkpointing of every block, saving memory
            at the cost of a second forward. Defaults to False.
        scan_dtype (str): Dtype of the selective scan's inputs: ``'float32'``
            as the authors (default), or ``'bfloat16'``, faster on the GPU
            with the state and sums still float32 (see :class:`SS2D`).
        recompute_gate (bool): Recompute each block's ``out_norm``, SiLU
            gate and ``out_proj`` input in the backward rather than keep
            them: less activation memory, the same results, much
            less recomputation than ``with_cp`` (see :class:`SS2D`).
            Defaults to True.
        init_cfg (dict | list[dict], optional): ``dict(type='Pretrained',
            checkpoint=..., prefix='backbone.')`` loads converted weights
            strictly (see
            :func:`mmvmamba.models.checkpoint.load_pretrained_backbone`);
            in a list, after mmengine's other initialisers.

    Returns (forward):
        tuple[Tensor]: ``(B, C_i, H_i, W_i)`` for each index in
        ``out_indices``, with ``C_i = C_0 * 2**i`` at stride ``4 * 2**i``.
    """
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], {'embed_dims': 96, 'depths': [2, 2, 9, 2]}),
        **dict.fromkeys(['s', 'small'], {'embed_dims': 96, 'depths': [2, 2, 27, 2]}),
        **dict.fromkeys(['b', 'base'], {'embed_dims': 128, 'depths': [2, 2, 27, 2]}),
    }  # yapf: disable
    ssm_keys = ('d_state', 'ssm_ratio', 'dt_rank')

    def __init__(self,
                 arch: Union[str, Dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (3, ),
                 drop_path_rate: float = 0.2,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 scan_dtype: str = 'float32',
                 recompute_gate: bool = True,
                 init_cfg: Optional[Dict] = None):
        super().__init__(init_cfg=init_cfg)
        check_block_settings(drop_path_rate, with_cp=with_cp,
                             recompute_gate=recompute_gate)
        arch = self._parse_arch(arch)
        embed_dims, depths = arch['embed_dims'], list(arch['depths'])
        ssm_cfg = {k: arch[k] for k in self.ssm_keys if k in arch}
        ssm_cfg.update(scan_dtype=scan_dtype, recompute_gate=recompute_gate)
        self._set_outputs(in_channels, embed_dims, len(depths), out_indices,
                          frozen_stages, norm_eval)

        self.patch_embed = PatchEmbed(in_channels, embed_dims)
        self._build_stages(VSSStage, depths, drop_path_rate, with_cp=with_cp,
                           **ssm_cfg)
        self._add_output_norms()
        for module in self.modules():
            if isinstance(module, LayerNorm):
                module.triton_when_recorded = NORMS_TRAIN_ON_TRITON

        self.apply(self._init_module)
        self._freeze_stages()

    def _parse_arch(self, arch: Union[str, Dict]) -> Dict:
        return parse_arch(arch, self.arch_zoo, ('embed_dims', 'depths'),
                          self.ssm_keys)

    _init_module = staticmethod(init_linear_and_norm)
