"""Convert an authors' VMamba (v1, January 2024) checkpoint for mmvmamba.

    python tools/model_converters/vmamba2mmvmamba.py SRC DST [--ema]

Writes ``{'state_dict': ..., 'meta': ...}`` with ``backbone.*`` and
``head.fc.*`` keys for an mmpretrain ``ImageClassifier`` (VMamba with
``out_indices=(3, )``, ``GlobalAveragePooling``, ``LinearClsHead``). Detection
and segmentation backbones load the same file with
``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``.
"""
import argparse
import os
import os.path as osp
import sys

import torch

from mmvmamba.models.checkpoint import (convert_authors_state_dict,
                                        load_user_checkpoint)


def convert(src: str, dst: str, ema: bool = False) -> dict:
    """Convert ``src`` to ``dst``; returns the written checkpoint."""
    print(f'loading {src} with torch.load(weights_only=False): the authors\' '
          f'files hold Python objects; only convert files you trust.')
    ckpt = load_user_checkpoint(src)
    key = 'model_ema' if ema else 'model'
    if key not in ckpt:
        raise KeyError(f'{src} has no {key!r} entry (it has '
                       f'{sorted(ckpt)})' + ('' if ema else '; is it already '
                                             'converted?'))
    backbone, head = convert_authors_state_dict(ckpt[key])
    state_dict = {f'backbone.{k}': v for k, v in backbone.items()}
    state_dict.update({f'head.fc.{k}': v for k, v in head.items()})
    converted = dict(
        state_dict=state_dict,
        meta=dict(source=osp.basename(src), weights=key,
                  converter='vmamba2mmvmamba'))
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(converted, dst)
    print(f'wrote {len(state_dict)} tensors to {dst}')
    return converted


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='the authors\' checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the converted file')
    parser.add_argument(
        '--ema', action='store_true',
        help='convert the EMA weights (\'model_ema\') instead of \'model\'')
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.ema)
    except (KeyError, FileNotFoundError) as err:
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
