#!/usr/bin/env python
"""Test (and evaluate) a checkpoint with an OpenMMLab config.

Examples::

    python tools/test.py configs/mask_rcnn_vmamba_t_1x_coco.py CKPT
    python tools/test.py configs/upernet_vmamba_t_512x512_160k_ade20k.py \\
        CKPT --tta                                  # multi-scale + flip
    bash tools/dist_test.sh CONFIG CKPT 8           # 8 GPUs

The checkpoint is unpickled in full (it may be one mmengine wrote, with
training state), so only pass files you trust.
"""
import argparse
import sys
import warnings

# mmengine and mmcv import pkg_resources, which setuptools >= 80 warns about
# (four lines per run): nothing a user can act on.
warnings.filterwarnings('ignore', 'pkg_resources is deprecated', UserWarning)

from runner_utils import (InputError, add_common_args,  # noqa: E402
                          build_runner, check_checkpoint, check_data,
                          enable_show_dir, enable_tta, load_config,
                          set_local_rank)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file to test')
    parser.add_argument(
        '--tta',
        action='store_true',
        help="test-time augmentation: the config's tta_model and "
        'tta_pipeline')
    parser.add_argument(
        '--show-dir',
        help='save drawn predictions there (a relative path: under the '
        "run's folder in the work dir for mmdet, else the current folder)")
    add_common_args(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    set_local_rank(args.local_rank)
    try:
        cfg = load_config(args.config, args.cfg_options, args.work_dir,
                          args.launcher)
        check_checkpoint('checkpoint', args.checkpoint)
        # before the runner, which makes the work dir and logs
        check_data(cfg, ['test_dataloader'], args.config)
        if args.show_dir:
            enable_show_dir(cfg, args.show_dir)
        if args.tta:
            enable_tta(cfg)
    except InputError as error:
        sys.exit(f'{sys.argv[0]}: {error}')
    cfg.load_from = args.checkpoint
    runner = build_runner(cfg)
    runner.test()


if __name__ == '__main__':
    main()
