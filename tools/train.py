#!/usr/bin/env python
"""Train a model from an OpenMMLab config (mmdet, mmseg or mmpretrain).

Examples::

    python tools/train.py configs/mask_rcnn_vmamba_t_1x_coco.py
    python tools/train.py CONFIG --resume                 # latest in work_dir
    python tools/train.py CONFIG --resume work_dirs/x/epoch_4.pth
    python tools/train.py CONFIG --cfg-options model.backbone.init_cfg=None
    bash tools/dist_train.sh CONFIG 8                     # 8 GPUs

The config's ``default_scope`` decides the task; any config that imports
mmvmamba (``custom_imports``) works.
"""
import argparse

from runner_utils import (add_common_args, build_runner, enable_amp,
                          load_config, set_local_rank, set_resume)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model.')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--resume',
        nargs='?',
        const='auto',
        metavar='CHECKPOINT',
        help='resume training: from CHECKPOINT, or without it from the '
        'latest checkpoint in the work dir')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='automatic mixed precision (GPU; on a CPU bfloat16 autocast '
        'breaks mmcv nms)')
    add_common_args(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    set_local_rank(args.local_rank)
    cfg = load_config(args.config, args.cfg_options, args.work_dir,
                      args.launcher)
    if args.amp:
        enable_amp(cfg)
    set_resume(cfg, args.resume)
    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
