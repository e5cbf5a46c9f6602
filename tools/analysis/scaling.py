"""FLOPs and throughput of classifiers from 64 to 1024 pixels.

    python tools/analysis/scaling.py [--models vmamba-t ... deit-s]
        [--sizes 64 128 224 384 512 768 1024] [--device cuda]
        [--batch 64] [--max-batch 1024] [--mode infer-fp32] [--flops-only]
        [--from-csv] --out-dir DIR

Writes DIR/scaling.csv (columns: ``mmvmamba.analysis.scaling.COLUMNS``),
DIR/scaling_flops.png (GFLOPs against size; VMamba's paper and 9*BLDN scan
counts) and DIR/scaling_throughput.png (images per second against size).
The batch is ``--batch`` at 224 and scales with the inverse image area. The
CSV is rewritten after each measurement; ``--from-csv`` re-plots it.
"""
import argparse
import os.path as osp

import torch

from mmvmamba.analysis.models import MODEL_ZOO
from mmvmamba.analysis.scaling import plot, read_csv, sweep, write_csv
from mmvmamba.analysis.timing import MODES

DEFAULT_MODELS = ['vmamba-t', 'vmamba-s', 'vmamba-b', 'swin-t', 'convnext-t',
                  'resnet-50', 'deit-s']
DEFAULT_SIZES = [64, 128, 224, 384, 512, 768, 1024]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS,
                        help=f'names of {sorted(MODEL_ZOO)} or classifier '
                        'configs')
    parser.add_argument('--sizes', nargs='+', type=int,
                        default=DEFAULT_SIZES)
    parser.add_argument('--device', default='cuda' if
                        torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=int, default=64,
                        help='batch at 224 (scaled by area)')
    parser.add_argument('--max-batch', type=int, default=1024)
    parser.add_argument('--mode', default='infer-fp32', choices=MODES)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeat', type=int, default=10)
    parser.add_argument('--flops-only', action='store_true',
                        help='count FLOPs, time nothing')
    parser.add_argument('--from-csv', action='store_true',
                        help='only re-plot OUT_DIR/scaling.csv')
    parser.add_argument('--out-dir', required=True)
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    csv_path = osp.join(args.out_dir, 'scaling.csv')
    if args.from_csv:
        rows = read_csv(csv_path)
    else:
        # the CSV is rewritten after every row: a killed run keeps its rows
        rows = sweep(args.models, args.sizes, torch.device(args.device),
                     args.batch, args.max_batch, args.mode, args.warmup,
                     args.repeat, throughput=not args.flops_only,
                     on_row=lambda rows: write_csv(rows, csv_path))
    timed = any(r['img_per_s'] is not None for r in rows)
    flops_png = osp.join(args.out_dir, 'scaling_flops.png')
    speed_png = (osp.join(args.out_dir, 'scaling_throughput.png')
                 if timed else None)
    plot(rows, flops_png, speed_png)
    print(f'wrote {csv_path}, {flops_png}' +
          (f', {speed_png}' if speed_png else ''))
    return rows


if __name__ == '__main__':
    main()
