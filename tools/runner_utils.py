"""What ``tools/train.py`` and ``tools/test.py`` share (they import it as a
module beside them: the script's folder is on ``sys.path``).

The tools work on any OpenMMLab 2.x config (mmdet, mmseg, mmpretrain): the
config's ``default_scope`` picks the registries, and mmengine imports that
scope's modules when it first builds from them, so nothing here knows the
task.
"""
import argparse
import os
import os.path as osp
import warnings
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

_NO_WEIGHTS_ONLY = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'
#: What ``mmengine.Config.fromfile`` reads.
CONFIG_SUFFIXES = ('.py', '.yml', '.yaml', '.json')


@contextmanager
def trusted_checkpoint_loading() -> Iterator[None]:
    """Let ``torch.load`` unpickle whole checkpoints inside the block.

    torch >= 2.6 loads with ``weights_only=True`` by default, which refuses
    the checkpoints mmengine writes (they hold its ``HistoryBuffer`` and numpy
    scalars). Unpickling can run code from the file, so use this only around
    loading files the user named (``load_from``, ``--resume PATH``, the
    test checkpoint) or that the run wrote itself (auto-resume from its
    ``work_dir``). The previous setting is restored on exit.
    """
    previous = os.environ.get(_NO_WEIGHTS_ONLY)
    os.environ[_NO_WEIGHTS_ONLY] = '1'
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_NO_WEIGHTS_ONLY, None)
        else:
            os.environ[_NO_WEIGHTS_ONLY] = previous


def load_config(path: str,
                cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None,
                launcher: str = 'none') -> Config:
    """Read a config and apply the options every tool has.

    Args:
        path (str): The config file.
        cfg_options (dict, optional): ``--cfg-options`` to merge in.
        work_dir (str, optional): Overrides the config's ``work_dir``; when
            neither is set, ``./work_dirs/<config name>``.
        launcher (str): ``'none'`` for one process, else the launcher of
            ``mmengine.dist.init_dist`` (``'pytorch'``, ``'slurm'``,
            ``'mpi'``).

    Returns:
        Config: The config, ready for :func:`build_runner`.

    Raises:
        InputError: If ``path`` names no file, or a file that is not a
            config (by its suffix).
    """
    if not osp.isfile(path):
        raise InputError(f'config: no file at {path!r}')
    if osp.splitext(path)[1] not in CONFIG_SUFFIXES:
        raise InputError(f'config: {path!r} is not a config file (one of '
                         f'{", ".join(CONFIG_SUFFIXES)})')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(path))[0])
    if cfg.get('default_scope') is None:
        warnings.warn(f'{path} sets no default_scope; OpenMMLab configs '
                      'name theirs (mmdet, mmseg, mmpretrain) in their '
                      'default_runtime base')
    return cfg


def set_resume(cfg: Config, resume: Optional[str]) -> None:
    """Apply ``--resume``: ``'auto'`` (latest checkpoint of ``work_dir``) or
    a checkpoint path; ``None`` leaves the config as it is.

    Raises:
        InputError: If the checkpoint path names no file.
    """
    if resume is None:
        return
    if resume != 'auto':
        check_checkpoint('--resume', resume)
    cfg.resume = True
    cfg.load_from = None if resume == 'auto' else resume


class InputError(ValueError):
    """A file the command line or the config names is not there, or not
    what was expected; the message says which and what to do (the tools
    print it, no traceback)."""


def check_checkpoint(argument: str, path: str) -> None:
    """Raise :class:`InputError` unless ``path`` is a file (local
    paths only; a URL or other backend is left to the loader)."""
    if '://' not in path and not osp.isfile(path):
        raise InputError(
            f'{argument}: no checkpoint file at {path!r}'
            f'{" (it is a folder)" if osp.isdir(path) else ""}')


# Where the configs' data sets live, for the message of a missing one.
_DATA_SETS = {
    'CocoDataset': ('COCO', 'data/coco',
                    ['annotations/instances_train2017.json',
                     'annotations/instances_val2017.json', 'train2017/',
                     'val2017/']),
    'ADE20KDataset': ('ADE20K', 'data/ade/ADEChallengeData2016',
                      ['images/training/', 'images/validation/',
                       'annotations/training/', 'annotations/validation/']),
    'ImageNet': ('ImageNet', 'data/imagenet',
                 ['train/', 'val/', 'meta/train.txt (optional)',
                  'meta/val.txt (optional)']),
}


def _datasets(dataset_cfg) -> List[dict]:
    """The dataset configs inside a (possibly wrapping) dataset config."""
    if not isinstance(dataset_cfg, dict):
        return []
    inner = dataset_cfg.get('datasets', dataset_cfg.get('dataset'))
    if isinstance(inner, (list, tuple)):
        return [d for cfg in inner for d in _datasets(cfg)]
    if isinstance(inner, dict):
        return _datasets(inner)
    return [dataset_cfg]


def _local(path) -> bool:
    return isinstance(path, str) and bool(path) and '://' not in path


def _missing_paths(dataset: dict) -> List[Tuple[str, str]]:
    """(what, path) of the files and folders of a dataset config that are
    not there, as its class would join them to ``data_root``."""
    root = dataset.get('data_root') or ''
    if _local(root) and not osp.isdir(root):
        return [('data_root', root)]
    if root and not _local(root):
        return []

    def under_root(path):
        return path if osp.isabs(path) else osp.join(root, path)

    missing = []
    ann_file = dataset.get('ann_file')
    if _local(ann_file) and not osp.isfile(under_root(ann_file)):
        missing.append(('ann_file', under_root(ann_file)))
    prefix = dataset.get('data_prefix')
    prefixes = prefix.items() if isinstance(prefix, dict) else [
        ('data_prefix', prefix)
    ]
    if not prefix and _local(dataset.get('split')):  # mmpretrain's ImageNet
        prefixes = [('split', dataset['split'])]
    for key, path in prefixes:
        if _local(path) and not osp.exists(under_root(path)):
            missing.append((key, under_root(path)))
    return missing


def check_data(cfg: Config, loaders: Sequence[str],
               config_path: str) -> None:
    """Check that the data the run will read is where the config says.

    Looks at each named dataloader's dataset (inside dataset wrappers):
    ``data_root``, ``ann_file`` and the ``data_prefix`` folders, joined as
    mmengine's ``BaseDataset`` joins them, and at the matching evaluator's
    ``ann_file`` (COCO's); remote paths (``s3://``...) are not checked.

    Raises:
        InputError: Naming each missing path and the config key
            that sets it, the layout the data set is expected in, and how to
            run on the synthetic data instead.
    """
    lines, layouts = [], {}
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not isinstance(loader_cfg, dict):
            continue
        for dataset in _datasets(loader_cfg.get('dataset')):
            kind = str(dataset.get('type', '')).split('.')[-1]
            for key, path in _missing_paths(dataset):
                lines.append(f'  {loader} ({kind}): {key} {path} does not '
                             'exist')
                if kind in _DATA_SETS:
                    layouts[kind] = dataset.get('data_root')
        evaluator = cfg.get(loader.replace('_dataloader', '_evaluator'))
        for metric in evaluator if isinstance(evaluator, list) else [
                evaluator
        ]:
            ann_file = metric.get('ann_file') if isinstance(metric,
                                                            dict) else None
            if _local(ann_file) and not osp.isfile(ann_file):
                lines.append(f'  {loader.replace("_dataloader", "_evaluator")}'
                             f': ann_file {ann_file} does not exist')
    if not lines:
        return
    message = [f'the data of {config_path} is not there:', *dict.fromkeys(lines)]
    for kind, root in layouts.items():
        name, default_root, layout = _DATA_SETS[kind]
        root = (root or default_root).rstrip('/')
        message.append(f'{name} is expected under {root} in this layout:')
        message += [f'  {root}/{entry}' for entry in layout]
    message.append(
        'Put the data there (a symbolic link will do), or point the config '
        'at it with --cfg-options (e.g. '
        'train_dataloader.dataset.data_root=PATH). `bash tools/demo.sh` '
        'runs on synthetic data, with nothing to download.')
    raise InputError('\n'.join(message))


def enable_amp(cfg: Config) -> None:
    """Train with mixed precision (``AmpOptimWrapper``, dynamic loss scale).

    On a CPU, autocast runs in bfloat16, which mmcv's nms refuses: use it on
    GPUs.
    """
    import torch
    if not torch.cuda.is_available():
        warnings.warn('--amp without a GPU autocasts to bfloat16 on the '
                      'CPU; mmcv ops such as nms (Mask R-CNN) refuse it')
    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper':
        return
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'


def enable_tta(cfg: Config) -> None:
    """Test with the config's ``tta_model`` and ``tta_pipeline``."""
    missing = [k for k in ('tta_model', 'tta_pipeline') if k not in cfg]
    if missing:
        raise InputError(f'--tta needs {" and ".join(missing)} in the config '
                         '(mmdet and mmseg configs of multi-scale testing '
                         'set both)')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def enable_show_dir(cfg: Config, show_dir: str) -> None:
    """Draw test predictions into ``show_dir``, whichever task the config is
    for, as each library's own ``tools/test.py`` does (a relative path is
    taken under the run's timestamped folder by mmdet, under the current
    folder by mmseg and mmpretrain)."""
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise InputError('--show-dir needs default_hooks.visualization in the '
                         'config')
    kind = hook['type'].split('.')[-1]
    if kind == 'DetVisualizationHook':  # mmdet
        hook.update(draw=True, test_out_dir=show_dir)
    elif kind == 'SegVisualizationHook':  # mmseg: the visualizer saves
        hook.update(draw=True)
        cfg.visualizer.save_dir = show_dir
    elif kind == 'VisualizationHook':  # mmpretrain
        hook.update(enable=True, out_dir=show_dir)
    else:
        raise InputError(f'--show-dir does not know {hook["type"]} (it '
                         'draws with DetVisualizationHook, '
                         'SegVisualizationHook or VisualizationHook)')


def build_runner(cfg: Config) -> Runner:
    """Build the config's runner, ready to ``train()`` or ``test()``.

    - ``runner_type`` in the config picks a runner from mmengine's
      ``RUNNERS``; otherwise :class:`mmengine.runner.Runner`.
    - In a single process (``launcher='none'``) mmengine's runner turns
      SyncBN layers (UperNet's) into BN: SyncBN needs a process group.
    - The checkpoint the runner loads or resumes from (``load_from``,
      ``--resume``, the test checkpoint, or the ``work_dir``'s latest) is
      read inside :func:`trusted_checkpoint_loading`; other ``torch.load``
      calls keep torch's default.
    """
    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    load_or_resume = runner.load_or_resume

    def trusted_load_or_resume() -> None:
        with trusted_checkpoint_loading():
            load_or_resume()

    runner.load_or_resume = trusted_load_or_resume
    return runner


class CfgOptionsAction(DictAction):
    """mmengine's ``DictAction``, refusing an entry without ``=`` with a
    parser error that names it (``DictAction`` fails on it with a
    traceback)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for value in values:
            key = value.partition('=')[0]
            if '=' not in value or not key:
                raise argparse.ArgumentError(
                    self, f'expected KEY=VALUE entries, got {value!r}')
        super().__call__(parser, namespace, values, option_string)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--work-dir``, ``--cfg-options``, ``--launcher`` and
    ``--local-rank`` to a tool's parser."""
    parser.add_argument(
        '--work-dir', help='folder for logs and checkpoints (default '
        './work_dirs/<config name>)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=CfgOptionsAction,
        help='override config entries, key=value (e.g. '
        'model.backbone.init_cfg=None train_cfg.max_epochs=1); lists as '
        'key="[a,b]"')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher (tools/dist_*.sh pass pytorch)')
    # torch.distributed.launch (not .run) passes --local-rank
    parser.add_argument(
        '--local-rank', '--local_rank', type=int, default=0,
        help=argparse.SUPPRESS)


def set_local_rank(local_rank: int) -> None:
    """Export ``LOCAL_RANK`` when a launcher passed it as an argument."""
    os.environ.setdefault('LOCAL_RANK', str(local_rank))
