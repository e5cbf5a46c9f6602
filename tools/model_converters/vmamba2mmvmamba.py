"""Convert an authors' VMamba checkpoint for mmvmamba.

    python tools/model_converters/vmamba2mmvmamba.py SRC DST [--ema]

SRC is recognised by its keys:

- an ImageNet classifier of the first version (January 2024; backbone
  ``VMamba``) or of the current models (VMamba-T[s1l8], S/B[s2l15]; backbone
  ``VMamba2``), weights under ``'model'`` (``'model_ema'`` with ``--ema``):
  DST holds ``backbone.*`` and ``head.fc.*`` keys for an mmpretrain
  ``ImageClassifier`` (the backbone with ``out_indices=(3, )``,
  ``GlobalAveragePooling``, ``LinearClsHead``). Detection and segmentation
  backbones load the same file with ``init_cfg=dict(type='Pretrained',
  checkpoint=DST, prefix='backbone.')``.
- a detector or segmentor of the current models (their mmdet / mmseg
  checkpoints, with ``backbone.outnorm{i}``; weights under ``'state_dict'``
  or ``'model'``): DST is the whole model with mmvmamba's backbone names, for
  ``tools/test.py`` with this repository's ``*_vmamba2_*`` configs.

DST is ``{'state_dict': ..., 'meta': ...}``, written to a temporary file
first and renamed, so that a failed run leaves no partial file.
"""
import argparse
import os
import os.path as osp
import re
import sys
from collections import OrderedDict
from typing import Dict, Tuple

import torch

from mmvmamba.models import VMamba2
from mmvmamba.models.checkpoint import (authors_version,
                                        convert_authors_state_dict,
                                        infer_vmamba2_arch,
                                        load_user_checkpoint)

BACKBONE = 'backbone.'


class ConversionError(Exception):
    """SRC cannot be converted; the message says why."""


def is_state_dict(value) -> bool:
    return (isinstance(value, dict) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                    for k, v in value.items()))


def describe(state_dict: Dict[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    return f'{len(keys)} weights, the first {keys[:3]}'


def find_weights(ckpt, src: str, ema: bool) -> Tuple[str, Dict]:
    """The entry of ``ckpt`` that holds the weights, and those weights."""
    if not isinstance(ckpt, dict):
        raise ConversionError(f'{src} holds a {type(ckpt).__name__}, not a '
                              f'checkpoint dict')
    if ema:
        if not is_state_dict(ckpt.get('model_ema')):
            raise ConversionError(
                f'{src} has no \'model_ema\' entry (its entries: '
                f'{", ".join(map(str, ckpt))}); --ema is for the authors\' '
                f'classification checkpoints trained with EMA')
        return 'model_ema', ckpt['model_ema']
    for entry in ('model', 'state_dict'):
        if is_state_dict(ckpt.get(entry)):
            return entry, ckpt[entry]
    if is_state_dict(ckpt):
        return '(the file itself)', ckpt
    entries = ', '.join(map(str, ckpt))
    raise ConversionError(f'{src} has no model or state_dict entry of '
                          f'weights (its entries: {entries})')


def check_vmamba2(backbone: Dict[str, torch.Tensor],
                  out_indices: Tuple[int, ...]) -> Dict:
    """Infer the VMamba2 arch of converted backbone weights and check that
    they are exactly that model's (keys and shapes); returns the arch."""
    arch = infer_vmamba2_arch(backbone)
    with torch.device('meta'):
        model = VMamba2(arch, out_indices=out_indices)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in backbone]
    unexpected = [k for k in backbone if k not in own]
    mismatched = [f'{k}: {tuple(v.shape)}, VMamba2 {own[k]}'
                  for k, v in backbone.items()
                  if k in own and tuple(v.shape) != own[k]]
    if missing or unexpected or mismatched:
        raise ConversionError(
            f'the weights do not form a VMamba2 of arch {arch}: missing '
            f'{missing}, unexpected {unexpected}, shapes {mismatched}')
    return arch


def arch_name(arch: Dict) -> str:
    for name in ('tiny', 'small', 'base'):
        if VMamba2.arch_zoo[name] == arch:
            return repr(name)
    return str(arch)


def convert_classifier(state_dict: Dict, src: str) -> Tuple[Dict, Dict]:
    version = authors_version(state_dict)
    if version is None:
        if any(k.startswith(BACKBONE + 'stages.') and '.ss2d.' in k
               for k in state_dict):
            raise ConversionError(f'{src} has mmvmamba\'s own names: it is '
                                  f'converted already, use it as it is')
        raise ConversionError(
            f'{src} is not a checkpoint of the authors\' VMamba: none of '
            f'their keys (patch_embed.*, layers.N.blocks.M.*) in its '
            f'{describe(state_dict)}')
    backbone, head = convert_authors_state_dict(state_dict)
    meta = dict(version=version)
    if version == 'v2':
        last = max(int(k.split('.')[1]) for k in backbone
                   if k.startswith('stages.'))
        arch = check_vmamba2(backbone, (last, ))
        meta.update(backbone='VMamba2', arch=arch)
        print(f'VMamba2 classifier, arch {arch_name(arch)}')
    else:
        meta.update(backbone='VMamba')
        print('VMamba (first version) classifier')
    converted = OrderedDict((BACKBONE + k, v) for k, v in backbone.items())
    converted.update((f'head.fc.{k}', v) for k, v in head.items())
    if not head:
        print('no classifier head in the checkpoint: backbone weights only')
    return converted, meta


def convert_whole_model(state_dict: Dict, src: str) -> Tuple[Dict, Dict]:
    backbone = OrderedDict((k[len(BACKBONE):], v)
                           for k, v in state_dict.items()
                           if k.startswith(BACKBONE))
    version = authors_version(backbone)
    if version != 'v2':
        if any(k.startswith('stages.') and '.ss2d.' in k for k in backbone):
            raise ConversionError(f'{src} has mmvmamba\'s own backbone '
                                  f'names: it is converted already')
        what = ('the first version\'s; only the current models\' detection '
                'and segmentation checkpoints convert'
                if version == 'v1' else 'not the authors\' VMamba')
        raise ConversionError(f'the backbone of {src} is {what} (its '
                              f'{describe(backbone)})')
    converted_backbone, head = convert_authors_state_dict(backbone)
    if head:
        raise ConversionError(f'{src}: a classifier head inside the '
                              f'backbone of a detector / segmentor')
    out_indices = tuple(
        sorted(int(m.group(1)) for k in converted_backbone
               for m in [re.match(r'norm(\d+)\.weight$', k)] if m))
    arch = check_vmamba2(converted_backbone, out_indices)
    print(f'VMamba2 detector / segmentor, arch {arch_name(arch)}, '
          f'out_indices {out_indices}')
    converted = OrderedDict(
        (BACKBONE + k, v) for k, v in converted_backbone.items())
    converted.update(
        (k, v) for k, v in state_dict.items() if not k.startswith(BACKBONE))
    return converted, dict(
        version='v2', backbone='VMamba2', arch=arch, out_indices=out_indices)


def save_atomically(obj, dst: str) -> None:
    """``torch.save`` to a temporary file beside ``dst``, then rename."""
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    tmp = f'{dst}.{os.getpid()}.tmp'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise


def convert(src: str, dst: str, ema: bool = False) -> dict:
    """Convert ``src`` to ``dst``; returns the written checkpoint."""
    if not osp.isfile(src):
        raise ConversionError(f'{src}: no such file')
    if osp.isdir(dst):
        raise ConversionError(f'DST {dst} is a folder; give the path of the '
                              'file to write')
    if osp.exists(dst) and osp.samefile(src, dst):
        raise ConversionError(f'DST is SRC ({src}); write elsewhere')
    print(f'loading {src} with torch.load(weights_only=False): the '
          f'authors\' files hold Python objects, so only convert files you '
          f'trust')
    ckpt = load_user_checkpoint(src)
    entry, state_dict = find_weights(ckpt, src, ema)
    if any(k.startswith(BACKBONE) for k in state_dict):
        converted, meta = convert_whole_model(state_dict, src)
    else:
        converted, meta = convert_classifier(state_dict, src)
    result = dict(
        state_dict=converted,
        meta=dict(meta, source=osp.basename(src), weights=entry,
                  converter='vmamba2mmvmamba'))
    save_atomically(result, dst)
    print(f'wrote {len(converted)} tensors to {dst}')
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='the authors\' checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the converted file')
    parser.add_argument(
        '--ema', action='store_true',
        help='convert the EMA weights (model_ema) instead of model')
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.ema)
    except (ConversionError, KeyError, ValueError) as err:
        message = err.args[0] if err.args else repr(err)
        sys.exit(f'error: {message}')
    except OSError as err:  # the file system's, as it words them
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
