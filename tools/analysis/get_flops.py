"""Count FLOPs and parameters of a model, the selective scan included.

    python tools/analysis/get_flops.py CONFIG [--shape H W] [--table]

CONFIG is a config file (classification, mmdet or mmseg), a package config
(``mmpretrain::resnet/resnet50_8xb32_in1k.py``) or a model name of
``MODEL_ZOO`` in ``benchmarks/models.py`` (``vmamba-t``, ``swin-t``, ...).
The default shape is the papers': 224x224 for classifiers, 800x1280 (H x W)
for detectors, 512x2048 for segmentors. Two totals are printed, differing
only in how the scan is counted (its cost model, ``mmvmamba/ops/flops.py``):
the VMamba v1 paper's (3.5*BLDN + BLD) and the later releases' (9*BLDN +
BLD).
"""
import argparse
import os.path as osp
import sys
import warnings

# mmengine and mmcv import pkg_resources, which setuptools >= 80 warns about
# (four lines per run): nothing a user can act on.
warnings.filterwarnings('ignore', 'pkg_resources is deprecated', UserWarning)

import torch  # noqa: E402

from mmvmamba.ops.flops import CONVENTIONS  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(REPO, 'benchmarks'))  # named models, FLOPs
from model_flops import count_flops  # noqa: E402
from models import (DEFAULT_SHAPES, build, load_config,  # noqa: E402
                    scope_of, tensor_forward)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file, pkg::config or name')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: by task)')
    parser.add_argument('--table', action='store_true',
                        help='also print mmengine\'s per-module table '
                        '(paper convention)')
    args = parser.parse_args(argv)
    if args.shape is not None and min(args.shape) < 1:
        parser.error('--shape H W must be at least 1 each, got '
                     f'{args.shape[0]} {args.shape[1]}')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
    except FileNotFoundError as error:
        sys.exit(f'get_flops.py: {error}')
    scope = scope_of(cfg)
    shape = tuple(args.shape or DEFAULT_SHAPES.get(scope, (224, 224)))
    model = tensor_forward(build(cfg.model, scope), scope, 1, shape)
    analyzers = []
    flops = count_flops(model, (torch.randn(1, 3, *shape), ), analyzers)

    if args.table:
        from mmengine.analysis.print_helper import complexity_stats_table
        print(complexity_stats_table(analyzers[0], max_depth=3))
    print(f'{args.config}  input 1x3x{shape[0]}x{shape[1]}  '
          f'({scope or "no scope"})')
    print(f'  params                      {flops.params / 1e6:10.2f} M')
    print(f'  FLOPs without the scan      {flops.non_scan / 1e9:10.2f} G')
    print(f'  selective scan calls        {flops.scan_calls:10d}')
    for name, meaning in CONVENTIONS.items():
        print(f'  FLOPs ({name:<5})           {flops.total(name) / 1e9:10.2f} G'
              f'   (scan {flops.scan[name] / 1e9:.2f} G; {meaning})')
    if flops.skipped:
        ops = ', '.join(sorted(op.replace('aten::', '')
                               for op in flops.skipped))
        print(f'  not counted (element-wise etc.): {ops}')
    return {name: flops.total(name) for name in CONVENTIONS}


if __name__ == '__main__':
    main()
