"""Plot effective receptive fields of backbones, initialised and trained.

    python tools/analysis/erf.py CONFIG [CONFIG ...] [--checkpoint CKPT ...]
        --out erf.png [--images DIR] [--num-images 16] [--size 224]

Each CONFIG (a config file, ``pkg::config`` or a model name such as
``vmamba-t``, ``swin-t``, ``convnext-t``, ``resnet-50``, ``deit-s``) gives
its backbone's ERF as initialised (the config's init, no pretrained
weights); with ``--checkpoint`` (one per CONFIG, ``-`` for none) also as
loaded. All maps go side by side into one PNG, one row per CONFIG. Without
``--images`` the images are synthetic multi-scale noise (see
``mmvmamba/analysis/erf.py``).
"""
import argparse
import os.path as osp

import torch

from mmvmamba.analysis.erf import (effective_receptive_field,
                                   high_contribution_ratio, load_images,
                                   plot_erf_maps, synthetic_images)
from mmvmamba.analysis.models import (last_stage_backbone,
                                      load_backbone_weights, load_config)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('configs', nargs='+', metavar='CONFIG')
    parser.add_argument('--checkpoint', nargs='+', default=[],
                        help='one per CONFIG; "-" for none')
    parser.add_argument('--out', required=True, help='PNG to write')
    parser.add_argument('--images', help='folder of images (default: '
                        'synthetic)')
    parser.add_argument('--num-images', type=int, default=16)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.checkpoint and len(args.checkpoint) != len(args.configs):
        parser.error('give one --checkpoint per CONFIG ("-" for none)')
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.images:
        images = load_images(args.images, args.num_images, args.size)
        source = f'{len(images)} images of {args.images}'
    else:
        images = synthetic_images(args.num_images, args.size, args.seed)
        source = f'{len(images)} synthetic images'
    images = images.to(device)
    checkpoints = args.checkpoint or ['-'] * len(args.configs)
    maps = []
    for config, checkpoint in zip(args.configs, checkpoints):
        cfg = load_config(config)
        name = osp.splitext(osp.basename(config))[0]
        states = [('init', None)]
        if checkpoint != '-':
            states.append(('trained', checkpoint))
        for state, path in states:
            torch.manual_seed(args.seed)
            backbone = last_stage_backbone(cfg)
            if path:
                print(load_backbone_weights(backbone, path))
            erf = effective_receptive_field(backbone.to(device), images,
                                            args.batch_size)
            ratios = high_contribution_ratio(erf)
            print(f'{name} ({state}): side of the central square holding '
                  f'20/30/50% of the ERF: '
                  + ' / '.join(f'{r:.2f}' for r in ratios))
            maps.append((f'{name} ({state})', erf))
    plot_erf_maps(maps, args.out, columns=2 if args.checkpoint else None)
    print(f'ERF maps of {source} at {args.size}x{args.size} -> {args.out}')
    return maps


if __name__ == '__main__':
    main()
