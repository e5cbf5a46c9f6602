"""The authors' checkpoint keys, and strict loading of converted weights."""
import os
import os.path as osp
import pickle
import re
import types
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch

CONVERTER = 'tools/model_converters/vmamba2mmvmamba.py'

# (authors' pattern, mmvmamba replacement); the January 2024 names and the
# renames of the authors' later code (patch_embed.0/.2, blocks.N.norm/op,
# classifier.norm/head) both map here.
_BACKBONE_RULES = [
    (r'^patch_embed\.(?:proj|0)\.', 'patch_embed.proj.'),
    (r'^patch_embed\.(?:norm|2)\.', 'patch_embed.norm.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.(?:ln_1|norm)\.',
     r'stages.\1.blocks.\2.norm.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.(?:self_attention|op)\.',
     r'stages.\1.blocks.\2.ss2d.'),
    (r'^layers\.(\d+)\.downsample\.(norm|reduction)\.',
     r'stages.\1.downsample.\2.'),
]
# The classifier's norm is the last stage's output norm, named after it.
_FINAL_NORM_RULE = r'^(?:classifier\.)?norm\.'
_HEAD_RULE = r'^(?:classifier\.)?head\.(weight|bias)$'


def _rename(state_dict: Dict[str, torch.Tensor],
            rules: List[Tuple[str, str]],
            adapt: Optional[Callable] = None
            ) -> Tuple[OrderedDict, OrderedDict, List[str]]:
    """Split the authors' keys: the head's (``_HEAD_RULE``), the backbone's
    renamed by the first matching ``(pattern, replacement)`` of ``rules``
    (the value passed through ``adapt(key, value)`` if given), and the keys
    no rule matches."""
    backbone, head, unknown = OrderedDict(), OrderedDict(), []
    for key, value in state_dict.items():
        head_match = re.match(_HEAD_RULE, key)
        if head_match:
            head[head_match.group(1)] = value
            continue
        for pattern, replacement in rules:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                backbone[new_key] = value if adapt is None else adapt(
                    key, value)
                break
        else:
            unknown.append(key)
    return backbone, head, unknown


def convert_authors_state_dict(
    state_dict: Dict[str, torch.Tensor]
) -> Tuple[OrderedDict, OrderedDict]:
    """Map an authors' VSSM state dict to mmvmamba names.

    Their current models (:func:`authors_version` ``'v2'``) go to
    :func:`convert_authors_v2_state_dict`, the others are taken for the
    first version's.

    Args:
        state_dict (dict): The authors' ``model`` (or ``model_ema``) dict.

    Returns:
        tuple[OrderedDict, OrderedDict]: The backbone's state dict (keys of
        :class:`VMamba`, the final norm as the last stage's output norm,
        ``norm3`` for four stages) and the head's (``weight``, ``bias`` of
        the classifier's linear layer).

    Raises:
        KeyError: If a key matches none of the known names.
        TypeError: ``state_dict`` is not a dict of tensors by str keys.
    """
    if authors_version(state_dict) == 'v2':
        return convert_authors_v2_state_dict(state_dict)
    stages = [re.match(r'^layers\.(\d+)\.', key) for key in state_dict]
    last_stage = max((int(m.group(1)) for m in stages if m), default=0)
    rules = _BACKBONE_RULES + [(_FINAL_NORM_RULE, f'norm{last_stage}.')]
    backbone, head, unknown = _rename(state_dict, rules)
    if unknown:
        raise KeyError(f'unknown keys in the authors\' checkpoint: {unknown}')
    return backbone, head


class _Unimportable(dict):
    """Stands in for an object whose class cannot be imported here."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self.__dict__['pickled_state'] = state


class _TolerantUnpickler(pickle.Unpickler):
    """Unpickles objects of classes that are not importable here (the
    authors' checkpoints hold their yacs ``config``) as :class:`_Unimportable`
    placeholders instead of failing."""

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Unimportable, ), {'__module__': module})


_tolerant_pickle = types.ModuleType('mmvmamba_tolerant_pickle')
_tolerant_pickle.Unpickler = _TolerantUnpickler
_tolerant_pickle.load = lambda f, **kwargs: _TolerantUnpickler(
    f, **kwargs).load()


def load_user_checkpoint(path: str) -> dict:
    """Load a checkpoint file that the user named.

    Checkpoints of the authors and of mmengine runs hold Python objects that
    ``torch.load(weights_only=True)`` refuses, so files the user names are
    read with the full unpickler: only name files you trust. Objects of
    classes that cannot be imported (the authors' yacs config) load as
    placeholders.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If it is not a file ``torch.load`` can read.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path}: no such file')
    try:
        return torch.load(
            path,
            map_location='cpu',
            weights_only=False,
            pickle_module=_tolerant_pickle)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError,
            TypeError, UnicodeDecodeError) as err:
        raise ValueError(f'{path} is not a PyTorch checkpoint: torch.load '
                         f'failed with {type(err).__name__}: {err}') from None


def _some(keys, count: int = 8) -> str:
    """The first ``count`` keys, and how many more there are."""
    keys = list(keys)
    shown = ', '.join(keys[:count])
    return shown + (f', ... ({len(keys) - count} more)'
                    if len(keys) > count else '')


def _top_prefixes(keys) -> str:
    """The distinct first name parts of the keys, e.g. 'backbone., head.'."""
    return ', '.join(dict.fromkeys(k.split('.')[0] + '.' for k in keys))


_BLOCK_NORM = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.norm\.weight$')


def _stage_layout(
        state_dict: Dict[str, torch.Tensor]) -> List[Tuple[int, int]]:
    """(blocks, width) of each stage, read from the blocks' norm weights;
    empty when there are none."""
    stages: Dict[int, Tuple[int, int]] = {}
    for key, value in state_dict.items():
        found = _BLOCK_NORM.match(key)
        if found and isinstance(value, torch.Tensor) and value.dim() == 1:
            stage, block = int(found[1]), int(found[2])
            blocks = max(stages.get(stage, (0, 0))[0], block + 1)
            stages[stage] = (blocks, int(value.shape[0]))
    return [stages[i] for i in sorted(stages)]


def _arch_hint(model: torch.nn.Module,
               state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """A line saying how the checkpoint's blocks and widths differ from the
    model's (and which named ``arch`` they are), or None if they agree."""
    theirs = _stage_layout(state_dict)
    ours = _stage_layout(model.state_dict())
    if not theirs or theirs == ours:
        return None

    def describe(layout):
        return (f'blocks per stage {[b for b, _ in layout]}, widths '
                f'{[w for _, w in layout]}')

    depths, embed_dims = [b for b, _ in theirs], theirs[0][1]
    names = [
        name for name, arch in getattr(model, 'arch_zoo', {}).items()
        if len(name) > 1 and arch['embed_dims'] == embed_dims
        and list(arch['depths']) == depths
    ]
    named = f" (arch='{names[0]}')" if names else ''
    return (f'  the checkpoint has {describe(theirs)}{named}; this model '
            f'has {describe(ours)}: build the model with the checkpoint\'s '
            'arch')


def _check_weights(checkpoint: str, what: str, weights) -> None:
    """``weights`` (``what`` of the file ``checkpoint``) must be a dict
    keyed by parameter names."""
    if not (isinstance(weights, dict)
            and all(isinstance(key, str) for key in weights)):
        raise ValueError(f'{checkpoint}: {what} must be a dict of weights '
                         f'by name (str keys), got {weights!r:.80}')


def load_pretrained_backbone(model: torch.nn.Module,
                             checkpoint: str,
                             prefix: Optional[str] = None) -> None:
    """Load converted (or the authors' raw) weights into a VMamba, strictly.

    The only keys allowed to be missing are output norms other than the last
    stage's (the classifier's final norm; ``norm3`` for four stages), which
    keep their fresh initialisation; the only unexpected ones, the
    classifier head and output norms of stages the model does not output.
    Anything else, or a shape mismatch, is an error that names the keys and
    shapes.

    Args:
        model (VMamba): The backbone.
        checkpoint (str): Path of a converted checkpoint
            (``{'state_dict': ...}``) or of an authors' one (``{'model':
            ...}``).
        prefix (str, optional): Keep only keys with this prefix, stripped
            (``'backbone.'`` for converted classifier checkpoints).
    """
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f'checkpoint must be a path, got {checkpoint!r}')
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError(f'prefix must be a str or None, got {prefix!r}')
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(
            f'pretrained VMamba weights not found at {checkpoint!r}. Make '
            f'them from the authors\' ImageNet checkpoint with\n  python '
            f'{CONVERTER} AUTHORS_CKPT.pth {checkpoint}\nor train from '
            f'scratch with --cfg-options model.backbone.init_cfg=None')
    ckpt = load_user_checkpoint(checkpoint)
    if not isinstance(ckpt, dict):
        raise ValueError(f'{checkpoint} holds a {type(ckpt).__name__}, not '
                         'a checkpoint dict (state_dict or model weights)')
    if 'state_dict' in ckpt:
        state_dict = ckpt['state_dict']
        _check_weights(checkpoint, "its 'state_dict'", state_dict)
    elif 'model' in ckpt:
        _check_weights(checkpoint, "its 'model'", ckpt['model'])
        try:
            state_dict, _ = convert_authors_state_dict(ckpt['model'])
        except KeyError:
            raise ValueError(
                f'{checkpoint} is not an authors\' VMamba (v1) checkpoint: '
                'its "model" holds keys no VMamba has, such as '
                f'{_some(ckpt["model"], 5)}') from None
        prefix = None
    else:
        state_dict = ckpt
        _check_weights(checkpoint, 'the checkpoint', state_dict)
    if prefix:
        all_keys = list(state_dict)
        state_dict = OrderedDict((k[len(prefix):], v)
                                 for k, v in state_dict.items()
                                 if k.startswith(prefix))
        if not state_dict:
            raise ValueError(
                f'no weights under the prefix {prefix!r} in {checkpoint} '
                f'(init_cfg.prefix); its keys begin with: '
                f'{_top_prefixes(all_keys)}')

    own = model.state_dict()
    if not any(k in own for k in state_dict):
        raise ValueError(
            f'{checkpoint} holds no VMamba weights'
            f'{f" under {prefix!r}" if prefix else ""}: is it the '
            'checkpoint of another model? Its keys: '
            f'{_some(state_dict, 5)}; a VMamba\'s: {_some(own, 3)}')
    not_tensors = [k for k, v in state_dict.items()
                   if k in own and not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f'{checkpoint}: the values of {_some(not_tensors)} '
                         'are not tensors')
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape))
                  for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape]
    side_norms = tuple(f'norm{i}.' for i in range(model.num_stages - 1))
    bad_missing = [k for k in missing if not k.startswith(side_norms)]
    unused_norms = tuple(f'norm{i}.' for i in range(model.num_stages)
                         if i not in model.out_indices)
    bad_unexpected = [
        k for k in unexpected
        if not (k.startswith('head.') or k.startswith(unused_norms))
    ]
    if bad_missing or bad_unexpected or mismatched:
        lines = [f'{checkpoint} does not fit this VMamba:']
        hint = _arch_hint(model, state_dict)
        if hint:
            lines.append(hint)
        if bad_missing:
            lines.append(f'  missing keys: {bad_missing[:20]}'
                         f'{" ..." if len(bad_missing) > 20 else ""}')
        if bad_unexpected:
            lines.append(f'  unexpected keys: {bad_unexpected[:20]}'
                         f'{" ..." if len(bad_unexpected) > 20 else ""}')
        for key, got, want in mismatched[:20]:
            lines.append(f'  {key}: checkpoint {got}, model {want}')
        raise RuntimeError('\n'.join(lines))
    model.load_state_dict(
        {k: v
         for k, v in state_dict.items() if k in own}, strict=False)


# The authors' current models (VMamba2): a convolutional stem and
# downsampling, an MLP in every block, SS2D without gate or biases. Whole
# keys, so that a variant with other parameters (a gate's wider in_proj is
# caught by infer_vmamba2_arch) is reported, not half-converted.
_V2_SS2D_KEYS = (r'in_proj\.weight|conv2d\.weight|x_proj_weight|'
                 r'dt_projs_weight|dt_projs_bias|A_logs|Ds|'
                 r'out_norm\.(?:weight|bias)|out_proj\.weight')
_V2_BLOCK = r'^layers\.(\d+)\.blocks\.(\d+)\.'
_V2_BACKBONE_RULES = [
    (r'^patch_embed\.(?:0|proj)\.(weight|bias)$', r'patch_embed.conv1.\1'),
    (r'^patch_embed\.(?:2|norm)\.(weight|bias)$', r'patch_embed.norm1.\1'),
    (r'^patch_embed\.5\.(weight|bias)$', r'patch_embed.conv2.\1'),
    (r'^patch_embed\.7\.(weight|bias)$', r'patch_embed.norm2.\1'),
    (_V2_BLOCK + r'(?:norm|ln_1)\.(weight|bias)$',
     r'stages.\1.blocks.\2.norm.\3'),
    (_V2_BLOCK + r'(?:op|self_attention)\.(' + _V2_SS2D_KEYS + r')$',
     r'stages.\1.blocks.\2.ss2d.\3'),
    (_V2_BLOCK + r'norm2\.(weight|bias)$', r'stages.\1.blocks.\2.norm2.\3'),
    (_V2_BLOCK + r'mlp\.(fc[12]\.(?:weight|bias))$',
     r'stages.\1.blocks.\2.mlp.\3'),
    (r'^layers\.(\d+)\.downsample\.1\.(weight|bias)$',
     r'stages.\1.downsample.conv.\2'),
    (r'^layers\.(\d+)\.downsample\.3\.(weight|bias)$',
     r'stages.\1.downsample.norm.\2'),
    (r'^outnorm(\d+)\.(weight|bias)$', r'norm\1.\2'),
]  # yapf: disable
# The classifier's norm (legacy name ``norm``) is the last stage's output
# norm, named after that stage.
_V2_FINAL_NORM = r'^(?:classifier\.)?norm\.(weight|bias)$'
# Their Linear2d layers: (out, in) weights, or (out, in, 1, 1) in older files.
_V2_LINEAR2D = re.compile(r'\.(?:in_proj|out_proj|fc1|fc2)\.weight$')


def check_state_dict(state_dict) -> None:
    """Raise ``TypeError`` unless ``state_dict`` is a dict of tensors by
    str keys, naming the first key or value that is not."""
    if not isinstance(state_dict, dict):
        raise TypeError('state_dict must be a dict of tensors by name, got '
                        f'{type(state_dict).__name__}')
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f'state_dict keys must be str, got {key!r}')
        if not isinstance(value, torch.Tensor):
            raise TypeError(f'state_dict[{key!r}] must be a tensor, got '
                            f'{type(value).__name__}')


def authors_version(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """Which of the authors' VSSM families a state dict holds, by its keys.

    Returns:
        str | None: ``'v2'`` (their current models: a second stem conv
        ``patch_embed.5``), ``'v1'`` (the first version: a single
        ``patch_embed.proj`` or ``patch_embed.0`` conv), or None when the
        keys are not the authors' (no ``layers.N.blocks.M.`` keys).
    """
    check_state_dict(state_dict)
    keys = set(state_dict)
    if not any(re.match(r'layers\.\d+\.blocks\.\d+\.', k) for k in keys):
        return None
    if 'patch_embed.5.weight' in keys:
        return 'v2'
    if keys & {'patch_embed.proj.weight', 'patch_embed.0.weight'}:
        return 'v1'
    return None


def convert_authors_v2_state_dict(
    state_dict: Dict[str, torch.Tensor]
) -> Tuple[OrderedDict, OrderedDict]:
    """Map a state dict of the authors' current VSSM to :class:`VMamba2`.

    Args:
        state_dict (dict): Their classifier's ``model`` (or ``model_ema``),
            or the backbone part of their detector / segmentor
            (``outnorm{i}``), prefix removed.

    Returns:
        tuple[OrderedDict, OrderedDict]: The backbone's state dict (the
        classifier's norm as ``norm{last stage}``) and the head's (``weight``,
        ``bias`` of the classifier's linear layer; empty for a backbone).

    Raises:
        KeyError: If a key matches none of the names of VMamba2.
        TypeError: ``state_dict`` is not a dict of tensors by str keys.
    """
    check_state_dict(state_dict)
    stages = [int(m.group(1)) for k in state_dict
              for m in [re.match(r'layers\.(\d+)\.', k)] if m]
    final_norm = f'norm{max(stages, default=3)}.' + r'\1'
    rules = [(_V2_FINAL_NORM, final_norm)] + _V2_BACKBONE_RULES

    def linear_as_2d(key, value):  # their 1x1 convs are our Linears
        if _V2_LINEAR2D.search(key) and value.dim() == 4:
            return value.flatten(1)
        return value

    backbone, head, unknown = _rename(state_dict, rules, linear_as_2d)
    if unknown:
        raise KeyError(f'keys that VMamba2 does not have in the authors\' '
                       f'checkpoint (another variant of their model?): '
                       f'{unknown}')
    return backbone, head


def infer_vmamba2_arch(backbone: Dict[str, torch.Tensor]) -> Dict:
    """The ``arch`` dict of :class:`VMamba2` that fits converted weights.

    Args:
        backbone (dict): Output of :func:`convert_authors_v2_state_dict`.

    Returns:
        dict: ``embed_dims``, ``depths``, ``ssm_ratio``, ``d_state``,
        ``mlp_ratio``, and ``dt_rank`` unless it is ``'auto'``.

    Raises:
        ValueError: If the weights do not describe a VMamba2 (an SS2D with
            a gate, stage widths that do not double, ...).
    """
    try:
        embed_dims = backbone['patch_embed.conv2.weight'].shape[0]
        depths = []
        while any(k.startswith(f'stages.{len(depths)}.blocks.')
                  for k in backbone):
            depths.append(1 + max(
                int(k.split('.')[3]) for k in backbone
                if k.startswith(f'stages.{len(depths)}.blocks.')))
        first = 'stages.0.blocks.0.'
        d_inner = backbone[first + 'ss2d.x_proj_weight'].shape[2]
        in_proj_rows = backbone[first + 'ss2d.in_proj.weight'].shape[0]
        d_state = backbone[first + 'ss2d.A_logs'].shape[1]
        ranks = [
            backbone[f'stages.{i}.blocks.0.ss2d.dt_projs_weight'].shape[2]
            for i in range(len(depths))
        ]
    except KeyError as err:
        raise ValueError(f'not a VMamba2: no {err.args[0]} among its '
                         f'weights') from None
    if in_proj_rows != d_inner:
        raise ValueError(
            f'in_proj gives {in_proj_rows} channels to an SS2D of '
            f'{d_inner}: an SS2D with a gate (the authors\' forward types '
            f'without the _noz suffix), which VMamba2 does not implement')
    fc1 = backbone.get(first + 'mlp.fc1.weight')
    arch = dict(
        embed_dims=embed_dims,
        depths=depths,
        ssm_ratio=d_inner / embed_dims,
        d_state=d_state,
        mlp_ratio=0.0 if fc1 is None else fc1.shape[0] / embed_dims)
    # imported here: the backbones import this module
    from .backbones.common import auto_dt_rank
    auto = [auto_dt_rank(embed_dims * 2**i) for i in range(len(depths))]
    if ranks != auto:
        if len(set(ranks)) > 1:
            raise ValueError(f'dt ranks {ranks} per stage: neither ceil(C / '
                             f'16) = {auto} nor one rank for all stages')
        arch['dt_rank'] = ranks[0]
    return arch
