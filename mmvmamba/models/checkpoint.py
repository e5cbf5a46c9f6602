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
]
# The classifier's norm is the last stage's output norm, named after it.
_FINAL_NORM_RULE = r'^(?:classifier\.)?norm\.'
_HEAD_RULE = r'^(?:classifier\.)?head\.(weight|bias)$'


def convert_authors_state_dict(
        state_dict: Dict[str, torch.Tensor]) -> Tuple[OrderedDict, OrderedDict]:
    """Map an authors' VSSM state dict to mmvmamba names.

    Args:
        state_dict (dict): The authors' ``model`` (or ``model_ema``) dict.

    Returns:
        tuple[OrderedDict, OrderedDict]: The backbone's state dict (keys of
        :class:`VMamba`, the final norm as the last stage's output norm,
        ``norm3`` for four stages) and the head's (``weight``, ``bias`` of
        the classifier's linear layer).

    Raises:
        KeyError: If a key matches none of the known names.
    """
    backbone, head, unknown = OrderedDict(), OrderedDict(), []
    stages = [re.match(r'^layers\.(\d+)\.', key) for key in state_dict]
    last_stage = max((int(m.group(1)) for m in stages if m), default=0)
    rules = _BACKBONE_RULES + [(_FINAL_NORM_RULE, f'norm{last_stage}.')]
    for key, value in state_dict.items():
        head_match = re.match(_HEAD_RULE, key)
        if head_match:
            head[head_match.group(1)] = value
            continue
        for pattern, replacement in rules:
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
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(
            f'pretrained VMamba weights not found at {checkpoint!r}. Make '
            f'them from the authors\' ImageNet checkpoint with\n  python '
            f'{CONVERTER} AUTHORS_CKPT.pth {checkpoint}\nor train from '
            f'scratch with --cfg-options model.backbone.init_cfg=None')
    ckpt = load_user_checkpoint(checkpoint)
    if 'state_dict' in ckpt:
        state_dict = ckpt['state_dict']
    elif 'model' in ckpt:
        state_dict, _ = convert_authors_state_dict(ckpt['model'])
        prefix = None
    else:
        state_dict = ckpt
    if prefix:
        state_dict = OrderedDict((k[len(prefix):], v)
                                 for k, v in state_dict.items()
                                 if k.startswith(prefix))
    if not state_dict:
        raise KeyError(f'no weights with prefix {prefix!r} in {checkpoint}')

    own = model.state_dict()
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
        if bad_missing:
            lines.append(f'  missing keys: {bad_missing}')
        if bad_unexpected:
            lines.append(f'  unexpected keys: {bad_unexpected}')
        for key, got, want in mismatched:
            lines.append(f'  {key}: checkpoint {got}, model {want}')
        raise RuntimeError('\n'.join(lines))
    model.load_state_dict(
        {k: v
         for k, v in state_dict.items() if k in own}, strict=False)
