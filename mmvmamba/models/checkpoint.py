"""The authors' checkpoint keys, and strict loading of converted weights."""
import os.path as osp
import re
from collections import OrderedDict
from typing import Dict, Optional, Tuple

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
    (r'^(?:classifier\.)?norm\.', 'norm3.'),
]
_HEAD_RULE = r'^(?:classifier\.)?head\.(weight|bias)$'


def convert_authors_state_dict(
        state_dict: Dict[str, torch.Tensor]) -> Tuple[OrderedDict, OrderedDict]:
    """Map an authors' VSSM state dict to mmvmamba names.

    Args:
        state_dict (dict): The authors' ``model`` (or ``model_ema``) dict.

    Returns:
        tuple[OrderedDict, OrderedDict]: The backbone's state dict (keys of
        :class:`VMamba`, the final norm as ``norm3``) and the head's
        (``weight``, ``bias`` of the classifier's linear layer).

    Raises:
        KeyError: If a key matches none of the known names.
    """
    backbone, head, unknown = OrderedDict(), OrderedDict(), []
    for key, value in state_dict.items():
        head_match = re.match(_HEAD_RULE, key)
        if head_match:
            head[head_match.group(1)] = value
            continue
        for pattern, replacement in _BACKBONE_RULES:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                backbone[new_key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f'unknown keys in the authors\' checkpoint: {unknown}')
    return backbone, head


def load_user_checkpoint(path: str) -> dict:
    """Load a checkpoint file that the user named.

    Checkpoints of the authors and of mmengine runs hold Python objects that
    ``torch.load(weights_only=True)`` refuses, so files the user names are
    read with the full unpickler: only name files you trust.
    """
    return torch.load(path, map_location='cpu', weights_only=False)


def _some(keys, count: int = 8) -> str:
    """The first ``count`` keys, and how many more there are."""
    keys = list(keys)
    shown = ', '.join(keys[:count])
    return shown + (f', ... ({len(keys) - count} more)'
                    if len(keys) > count else '')


def _top_prefixes(keys) -> str:
    """The distinct first name parts of the keys, e.g. 'backbone., head.'."""
    return ', '.join(dict.fromkeys(k.split('.')[0] + '.' for k in keys))


def load_pretrained_backbone(model: torch.nn.Module,
                             checkpoint: str,
                             prefix: Optional[str] = None) -> None:
    """Load converted (or the authors' raw) weights into a VMamba, strictly.

    The only keys allowed to be missing are output norms other than
    ``norm3`` (the classifier's final norm), which keep their fresh
    initialisation; the only unexpected ones, the classifier head and output
    norms of stages the model does not output. Anything else, or a shape
    mismatch, is an error that names the keys and shapes.

    Args:
        model (VMamba): The backbone.
        checkpoint (str): Path of a converted checkpoint
            (``{'state_dict': ...}``) or of an authors' one (``{'model':
            ...}``).
        prefix (str, optional): Keep only keys with this prefix, stripped
            (``'backbone.'`` for converted classifier checkpoints).
    """
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
    elif 'model' in ckpt:
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
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape))
                  for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape]
    bad_missing = [k for k in missing if not re.match(r'^norm[012]\.', k)]
    unused_norms = tuple(f'norm{i}.' for i in range(4)
                         if i not in model.out_indices)
    bad_unexpected = [
        k for k in unexpected
        if not (k.startswith('head.') or k.startswith(unused_norms))
    ]
    if bad_missing or bad_unexpected or mismatched:
        lines = [f'{checkpoint} does not fit this VMamba:']
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
