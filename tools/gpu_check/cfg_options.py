"""The ``--cfg-options`` of ``tools/gpu_check.sh``, built and checked here.

``tools/gpu_check.sh`` trains and tests the real Mask R-CNN and UperNet
VMamba-T configs on the synthetic data sets of
``python -m mmvmamba.datasets.synthetic``, through ``tools/train.py``,
``tools/test.py`` and ``tools/dist_*.sh``, changing the configs only by the
options this script prints, one per line::

    python tools/gpu_check/cfg_options.py train det --mode single \\
        --iters 200 --batch-size 2 --global-batch 2 --data-root DATA
    python tools/gpu_check/cfg_options.py test seg --data-root DATA
    python tools/gpu_check/cfg_options.py verify  # all sets, both configs
    python tools/gpu_check/cfg_options.py metrics TEST_WORK_DIR

Each option is checked against the loaded config before it is printed: its
path must exist (only the keys of ``NEW_KEYS`` may be new) and list indices
are looked up by transform type, so a changed base config stops the script
with a message instead of training something else.

What the options do:

- data: ``data_root`` of the train/val/test datasets and COCO's annotation
  file of the evaluators (a top-level ``data_root`` would not reach them: the
  configs resolve it when they are read); no ImageNet weights
  (``model.backbone.init_cfg=None``); a record of the losses every
  iteration, each that iteration's own (mmengine logs a loss as its mean
  over the last ``log_processor.window_size`` iterations: 50 in mmdet, 10 in
  mmseg; here 1); seed 0; ``workers`` data workers.
- schedule: Mask R-CNN's 1x loop is epoch-based, and ``--cfg-options``
  cannot turn it into an iteration loop (``max_epochs`` would stay), so it
  trains one epoch over the first ``iters * global batch`` training images
  (``train_dataloader.dataset.indices``), validating and saving at its end;
  UperNet's loop is iteration-based: ``max_iters``, ``val_interval`` and the
  checkpoint interval become ``iters``. The learning-rate schedules are the
  configs' own.
- ``--mode scaling`` (the throughput runs of ``tools/dist_train.sh`` on 1,
  2, 4... GPUs with batch 2 each): the options above and no validation (the
  runs are timed; the checkpoint at the end is saved after the last timed
  iteration); nothing else changes, so each run trains as its config does.
- ``--mode long`` (``gpu_check.sh long``: many AMP iterations on one GPU):
  as scaling mode, but Mask R-CNN trains ``--epochs`` epochs over
  ``iters * batch / epochs`` images (fewer synthetic images to write; a
  checkpoint each epoch, the config's) and UperNet saves a checkpoint every
  ``iters / epochs`` iterations, so a run cut short still leaves the loss
  scaler's state.
- ``--mode compare`` (one process with batch ``2 N`` against ``N`` with
  batch 2 each, for any ``N``, which must see the same images and the same
  randomness): no validation;
  ``MeanLossAcrossRanksHook``, so that rank 0 logs the whole batch's loss; the
  sampler's seed fixed; nothing drawn per process that changes the loss: no
  stochastic depth, no dropout in UperNet's heads, and in the train pipeline
  no flip, no random rescaling (ratio 1: a square image becomes exactly one
  512 crop, so the crop is not random either) and no photometric
  distortion (its slot becomes a flip of probability 0, since
  ``--cfg-options`` cannot remove a list item).
- the warm-up in compare mode (``--warmup``): by task unless given
  (:data:`DEFAULT_WARMUP`). UperNet: ``off``, so that the iterations train
  at the base rate from the first one and the losses move (under the
  config's warm-up, factor 1e-6 at the start, the weights hardly change in
  20 iterations, and a wrong gradient average would not show). Mask R-CNN:
  ``keep``, the config's own (factor 1e-3 over 500 iterations): at the base
  rate from the first iteration its losses fall from 6.7 to 0.9 in 20
  iterations, and the small differences between 1 and 2 GPUs below grow
  along that fall (on two H200s: up to 19% at single iterations, the
  20-iteration means 3.2% apart; with the warm-up at most 0.7%).

What to expect: UperNet's losses are means over fixed-size crops with
nothing sampled, and SyncBN over 2 x 2 images is BN over 4, so the two runs
compute the same thing up to rounding: on two H200s, 20 iterations at the
base rate, the total loss agreed within 0.01% at every iteration. Mask R-CNN
is not quite the same computation on 1 and 2 GPUs: each process averages its
mask loss over its own positive proposals (mmdet normalises per GPU), and
its RPN and R-CNN samplers draw from each process's random stream. On two
H200s with the config's warm-up the total loss agreed within 0.70% at every
iteration; single terms differ more where they are tiny (``loss_bbox``, about
0.0025 with few positive proposals, up to 46% at an iteration, its means
4.3% apart; ``loss_mask`` up to 6%). ``tools/analysis/compare_losses.py
--keys all`` shows each term and the means.
"""
import argparse
import copy
import glob
import json
import math
import os.path as osp
import sys
from typing import Dict, List, Optional

from mmengine.config import Config, DictAction

# this script lies in tools/gpu_check/ of the checkout whose configs it uses
REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = dict(
    det=osp.join(REPO, 'configs', 'mask_rcnn_vmamba_t_1x_coco.py'),
    seg=osp.join(REPO, 'configs', 'upernet_vmamba_t_512x512_160k_ade20k.py'))
# where each task's data lies under the output of mmvmamba.datasets.synthetic
DATA_SUBDIR = dict(det='coco/', seg='ADEChallengeData2016')
#: Compare mode's learning-rate warm-up by task (module docstring).
DEFAULT_WARMUP = dict(det='keep', seg='off')
# keys the options may add; every other key must already be in the config
NEW_KEYS = frozenset({
    'log_processor.window_size',  # mmseg's LogProcessor keeps its default
    'randomness.seed',
    'train_dataloader.sampler.seed',
    'train_dataloader.dataset.indices',
    'default_hooks.mean_loss.type',
})
MODES = ('single', 'compare', 'scaling', 'long')


def task_of(cfg: Config) -> str:
    """``'det'`` or ``'seg'`` from the config's ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        return 'det'
    if scope == 'mmseg':
        return 'seg'
    raise ValueError(f'gpu_check handles mmdet and mmseg configs, not '
                     f'default_scope {scope!r}')


def pipeline_index(cfg: Config, transform: str) -> int:
    """Index of the one ``transform`` in the train pipeline."""
    pipeline = cfg.train_dataloader.dataset.pipeline
    found = [i for i, t in enumerate(pipeline) if t['type'] == transform]
    if len(found) != 1:
        types = [t['type'] for t in pipeline]
        raise ValueError(f'expected one {transform} in the train pipeline, '
                         f'found {len(found)}: {types}')
    return found[0]


def data_options(cfg: Config, data_root: str) -> List[str]:
    """The synthetic data set's paths, for training and testing."""
    task = task_of(cfg)
    root = osp.join(data_root, DATA_SUBDIR[task])
    options = [
        f'{loader}.dataset.data_root={root}'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    ]
    if task == 'det':
        ann = osp.join(root, 'annotations', 'instances_val2017.json')
        options += [f'val_evaluator.ann_file={ann}',
                    f'test_evaluator.ann_file={ann}']
    return options + ['model.backbone.init_cfg=None']


def train_options(cfg: Config,
                  data_root: str,
                  mode: str = 'single',
                  iters: int = 200,
                  batch_size: int = 2,
                  global_batch: Optional[int] = None,
                  *,
                  workers: int = 2,
                  warmup: Optional[str] = None,
                  epochs: int = 1) -> List[str]:
    """Options of ``tools/train.py`` / ``dist_train.sh`` (module docstring).

    Args:
        cfg (Config): The loaded config (Mask R-CNN or UperNet).
        data_root (str): Output folder of ``mmvmamba.datasets.synthetic``.
        mode (str): ``'single'``, ``'compare'``, ``'scaling'`` or
            ``'long'``.
        iters (int): Training iterations.
        batch_size (int): Images per process.
        global_batch (int, optional): Images per iteration over all
            processes (default ``batch_size``); Mask R-CNN trains on
            ``iters * global_batch`` images.
        workers (int): Data workers per process.
        warmup (str, optional): Compare mode: turn the config's
            learning-rate warm-up ``'off'`` or ``'keep'`` it; None: the
            task's :data:`DEFAULT_WARMUP`.
        epochs (int): Long mode: Mask R-CNN trains ``epochs`` epochs over
            ``iters * global_batch / epochs`` images and UperNet saves a
            checkpoint every ``iters / epochs`` iterations (each must
            divide); other modes: 1.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if warmup not in ('keep', 'off', None):
        raise ValueError(
            f"warmup must be 'keep', 'off' or None, got {warmup!r}")
    task = task_of(cfg)
    warmup = warmup or DEFAULT_WARMUP[task]
    global_batch = global_batch or batch_size
    if mode != 'long' and epochs != 1:
        raise ValueError(f'epochs is for long mode, got {epochs} in {mode}')
    if epochs < 1 or iters % epochs:
        raise ValueError(f'epochs must be a positive divisor of iters '
                         f'({iters}), got {epochs}')
    options = data_options(cfg, data_root) + [
        f'train_dataloader.batch_size={batch_size}',
        f'train_dataloader.num_workers={workers}',
        f'train_dataloader.persistent_workers={workers > 0}',
        'default_hooks.logger.interval=1',
        'log_processor.window_size=1',
        'randomness.seed=0',
    ]
    if task == 'det':  # a checkpoint each epoch (the config's)
        options += [
            f'train_cfg.max_epochs={epochs}',
            f'train_cfg.val_interval={epochs}',
            'train_dataloader.dataset.indices='
            f'{iters * global_batch // epochs}',
        ]
    else:
        options += [
            f'train_cfg.max_iters={iters}',
            f'train_cfg.val_interval={iters}',
            f'default_hooks.checkpoint.interval={iters // epochs}',
        ]
    if mode == 'single':
        return options
    options += ['val_dataloader=None', 'val_cfg=None', 'val_evaluator=None']
    if mode in ('scaling', 'long'):
        return options
    pipe = 'train_dataloader.dataset.pipeline'
    options += [
        'default_hooks.mean_loss.type=MeanLossAcrossRanksHook',
        'train_dataloader.sampler.seed=0',
        'model.backbone.drop_path_rate=0.0',
        'env_cfg.cudnn_benchmark=False',
        f'{pipe}.{pipeline_index(cfg, "RandomFlip")}.prob=0.0',
    ]
    if task == 'seg':
        options += [
            'model.decode_head.dropout_ratio=0.0',
            'model.auxiliary_head.dropout_ratio=0.0',
            f'{pipe}.{pipeline_index(cfg, "RandomResize")}'
            '.ratio_range=(1.0,1.0)',
            f'{pipe}.{pipeline_index(cfg, "PhotoMetricDistortion")}'
            '.type=RandomFlip',
            f'{pipe}.{pipeline_index(cfg, "PhotoMetricDistortion")}'
            '.prob=0.0',
        ]
    if warmup == 'off':
        if cfg.param_scheduler[0]['type'] != 'LinearLR':
            raise ValueError('expected the warm-up (LinearLR) first in '
                             f'param_scheduler: {cfg.param_scheduler}')
        options.append('param_scheduler.0.start_factor=1.0')
    return options


def eval_options(cfg: Config,
                 data_root: str,
                 *,
                 workers: int = 2) -> List[str]:
    """Options of ``tools/test.py`` / ``dist_test.sh``."""
    return data_options(cfg, data_root) + [
        f'test_dataloader.num_workers={workers}',
        f'test_dataloader.persistent_workers={workers > 0}'
    ]


def parse_options(options: List[str]) -> Dict:
    """``key=value`` strings as ``tools/train.py --cfg-options`` reads
    them."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options', *options]).cfg_options


def _has_path(cfg: Config, key: str) -> bool:
    node = cfg.to_dict()
    for part in key.split('.'):
        if isinstance(node, (list, tuple)):
            if not part.isdigit() or int(part) >= len(node):
                return False
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        else:
            return False
    return True


def apply_options(cfg: Config, options: List[str]) -> Config:
    """Check that each option's key exists in ``cfg`` (or is one of
    ``NEW_KEYS``, or an argument of an item whose ``type`` the options
    change) and merge the options into ``cfg``, as ``tools/train.py``
    does; returns ``cfg``.

    Raises:
        KeyError: Keys the config lacks, all of them named.
    """
    parsed = parse_options(options)
    # an existing item whose type the options change may get new arguments
    retyped = {
        k.rsplit('.', 1)[0]
        for k in parsed if k.endswith('.type') and _has_path(cfg, k)
    }
    missing = [
        k for k in parsed if k not in NEW_KEYS and not _has_path(cfg, k)
        and k.rsplit('.', 1)[0] not in retyped
    ]
    if missing:
        raise KeyError(f'{cfg.filename}: no such key(s): {", ".join(missing)}')
    cfg.merge_from_dict(parsed)
    return cfg


def all_option_sets(cfg: Config, data_root: str = 'data/gpu_check'):
    """Every option set ``tools/gpu_check.sh`` uses for a config, by name."""
    return {
        'single': train_options(cfg, data_root, 'single', 200, 2, 2),
        'compare-1gpu': train_options(cfg, data_root, 'compare', 20, 4, 4),
        'compare-2gpu': train_options(cfg, data_root, 'compare', 20, 2, 4),
        'compare-warmup-keep': train_options(
            cfg, data_root, 'compare', 20, 2, 4, warmup='keep'),
        'compare-warmup-off': train_options(
            cfg, data_root, 'compare', 20, 2, 4, warmup='off'),
        'scaling': train_options(cfg, data_root, 'scaling', 150, 2, 4),
        'long': train_options(cfg, data_root, 'long', 1000, 2, epochs=5),
        'test': eval_options(cfg, data_root),
    }


METRIC_SUFFIXES = ('bbox_mAP', 'segm_mAP', 'mIoU', 'mAcc', 'aAcc')


def read_metrics(work_dir: str) -> Dict[str, float]:
    """The headline metrics ``tools/test.py`` saved in ``work_dir``
    (``<timestamp>/<timestamp>.json`` of its newest run): COCO bbox/segm
    mAP, mIoU, mAcc, aAcc.

    Raises:
        FileNotFoundError: No metrics file.
        ValueError: None of those metrics, or one that is not finite.
    """
    found = sorted(
        glob.glob(osp.join(glob.escape(work_dir), '*', '*.json')))
    if not found:
        raise FileNotFoundError(f'no metrics json in {work_dir}/<timestamp>/')
    with open(found[-1]) as f:
        saved = json.load(f)
    metrics = {k: float(v) for k, v in saved.items()
               if k.endswith(METRIC_SUFFIXES)}
    if not metrics:
        raise ValueError(f'{found[-1]} holds none of the metrics '
                         f'*{", *".join(METRIC_SUFFIXES)}: {sorted(saved)}')
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f'{found[-1]}: not finite: {bad}')
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python tools/gpu_check/cfg_options.py',
        description='Print (one per line) the checked --cfg-options of '
        'tools/gpu_check.sh, or check them all.')
    sub = parser.add_subparsers(dest='command', required=True)
    for name in ('train', 'test'):
        p = sub.add_parser(name)
        p.add_argument('task', choices=sorted(CONFIGS))
        p.add_argument('--config', help='config (default: the task\'s T '
                       'config)')
        p.add_argument('--data-root', required=True)
        p.add_argument('--workers', type=int, default=2)
        if name == 'train':
            p.add_argument('--mode', choices=MODES, default='single')
            p.add_argument('--iters', type=int, default=200)
            p.add_argument('--batch-size', type=int, default=2)
            p.add_argument('--global-batch', type=int)
            p.add_argument('--epochs', type=int, default=1,
                           help='long mode: Mask R-CNN\'s epochs over '
                           'iters x batch / epochs images; UperNet\'s '
                           'checkpoints')
            p.add_argument(
                '--warmup', choices=('keep', 'off'),
                help='compare mode: the learning-rate warm-up (default: '
                'keep for det, off for seg)')
    p = sub.add_parser('metrics')
    p.add_argument('work_dir', help='work dir of tools/test.py')
    p = sub.add_parser('verify')
    p.add_argument('--configs', nargs='+', default=sorted(CONFIGS.values()))
    p.add_argument('--data-root', default='data/gpu_check')
    args = parser.parse_args(argv)
    bounds = dict(workers=0, iters=1, batch_size=1, global_batch=1, epochs=1)
    for name, bound in bounds.items():
        value = getattr(args, name, None)
        if value is not None and value < bound:
            parser.error(f'--{name.replace("_", "-")} must be at least '
                         f'{bound}, got {value}')
    if args.command == 'train' and args.global_batch is not None and (
            args.global_batch % args.batch_size):
        parser.error(f'--global-batch ({args.global_batch}) must be a '
                     f'multiple of --batch-size ({args.batch_size})')
    verify = args.command == 'verify'
    option = '--configs' if verify else '--config'
    for path in args.configs if verify else [getattr(args, 'config', None)]:
        if path is not None and not osp.isfile(path):
            parser.error(f'{option}: no config file at {path!r}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == 'metrics':
        try:
            metrics = read_metrics(args.work_dir)
        except (OSError, ValueError) as error:
            print(f'error: {error}', file=sys.stderr)
            return 1
        print(', '.join(f'{k} {v:g}' for k, v in metrics.items()))
        return 0
    if args.command == 'verify':
        for path in args.configs:
            cfg = Config.fromfile(path)
            for name, options in all_option_sets(cfg, args.data_root).items():
                apply_options(copy.deepcopy(cfg), options)
                print(f'ok {osp.relpath(path, REPO)}: {name} '
                      f'({len(options)} options)')
        return 0
    cfg = Config.fromfile(args.config or CONFIGS[args.task])
    if task_of(cfg) != args.task:
        raise SystemExit(f'{cfg.filename} is not a {args.task} config')
    if args.command == 'train':
        try:
            options = train_options(cfg, args.data_root, args.mode,
                                    args.iters, args.batch_size,
                                    args.global_batch, workers=args.workers,
                                    warmup=args.warmup, epochs=args.epochs)
        except ValueError as error:  # --epochs, or a changed config
            raise SystemExit(f'cfg_options.py: {error}')
    else:
        options = eval_options(cfg, args.data_root, workers=args.workers)
    apply_options(cfg, options)
    print('\n'.join(options))
    return 0


if __name__ == '__main__':
    sys.exit(main())
