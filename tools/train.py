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
import sys
import warnings

# mmengine and mmcv import pkg_resources, which setuptools >= 80 warns about
# (four lines per run): nothing a user can act on.
warnings.filterwarnings('ignore', 'pkg_resources is deprecated', UserWarning)

from runner_utils import (InputError, add_common_args,  # noqa: E402
                          build_runner, check_data, enable_amp, load_config,
                          set_local_rank, set_resume)


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
    try:
        cfg = load_config(args.config, args.cfg_options, args.work_dir,
                          args.launcher)
        set_resume(cfg, args.resume)
        # before the runner, which makes the work dir and logs
        validating = cfg.get('val_cfg') is not None and cfg.get(
            'val_dataloader') is not None
        check_data(cfg, ['train_dataloader'] +
                   (['val_dataloader'] if validating else []), args.config)
    except InputError as error:
        sys.exit(f'{sys.argv[0]}: {error}')
    if args.amp:
        enable_amp(cfg)
    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
