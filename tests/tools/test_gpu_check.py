"""tools/gpu_check.sh on the CPU: the --cfg-options it passes apply to the
real Mask R-CNN and UperNet configs (every key exists, the values land where
intended), the compare-mode train pipelines draw nothing at random, the
metrics reader, and the script's argument and preflight errors."""
import copy
import json
import os
import os.path as osp
import random
import signal
import subprocess

import cfg_options as gpu_check
import numpy as np
import pytest
import torch
from cfg_options import (CONFIGS, all_option_sets, apply_options,
                         eval_options, read_metrics, train_options)
from mmengine.config import Config
from mmengine.registry import DefaultScope

from mmvmamba.datasets.synthetic import generate

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(REPO, 'tools', 'gpu_check.sh')
ROOT = '/data/gpu_check'


@pytest.fixture(scope='module')
def configs():
    return {task: Config.fromfile(path) for task, path in CONFIGS.items()}


def merged(cfg, options):
    return apply_options(copy.deepcopy(cfg), options)


@pytest.mark.parametrize('task', sorted(CONFIGS))
def test_every_option_set_applies(configs, task):
    sets = all_option_sets(configs[task], ROOT)
    assert set(sets) == {
        'single', 'compare-1gpu', 'compare-2gpu', 'compare-warmup-keep',
        'compare-warmup-off', 'scaling', 'long', 'test'
    }
    for options in sets.values():
        cfg = merged(configs[task], options)
        assert cfg.model.backbone.init_cfg is None
        for loader in ('train_dataloader', 'test_dataloader'):
            assert cfg[loader].dataset.data_root.startswith(ROOT)


def test_det_options(configs):
    det = configs['det']
    root = f'{ROOT}/coco/'
    cfg = merged(det, train_options(det, ROOT, 'single', 200, 2))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].dataset.data_root == root
    ann = root + 'annotations/instances_val2017.json'
    assert cfg.val_evaluator.ann_file == ann == cfg.test_evaluator.ann_file
    # one epoch over iters x batch images: 200 iterations
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
    assert cfg.train_cfg.max_epochs == 1 and cfg.train_cfg.val_interval == 1
    assert cfg.train_dataloader.dataset.indices == 400
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.default_hooks.logger.interval == 1
    assert cfg.log_processor.window_size == 1
    assert cfg.randomness.seed == 0
    assert 'mean_loss' not in cfg.default_hooks
    assert cfg.train_dataloader.dataset.pipeline[3] == dict(
        type='RandomFlip', prob=0.5)  # single mode keeps the augmentation
    assert cfg.param_scheduler[0].start_factor == 0.001

    one = merged(det, train_options(det, ROOT, 'compare', 20, 4, 4))
    two = merged(det, train_options(det, ROOT, 'compare', 20, 2, 4))
    assert one.train_dataloader.batch_size == 4
    assert two.train_dataloader.batch_size == 2
    for cfg in (one, two):
        assert cfg.train_dataloader.dataset.indices == 80  # 20 iterations
        assert cfg.default_hooks.mean_loss.type == 'MeanLossAcrossRanksHook'
        assert cfg.val_dataloader is None and cfg.val_cfg is None
        assert cfg.train_dataloader.sampler.seed == 0
        assert cfg.model.backbone.drop_path_rate == 0
        flip = cfg.train_dataloader.dataset.pipeline[3]
        assert flip.type == 'RandomFlip' and flip.prob == 0.0
        assert isinstance(flip.prob, float)  # mmcv refuses an int
        # Mask R-CNN compares under the config's own warm-up by default
        assert cfg.param_scheduler[0].start_factor == 0.001
    # everything else equal between the two runs
    one.train_dataloader.batch_size = 2
    assert one.to_dict() == two.to_dict()

    off = merged(det,
                 train_options(det, ROOT, 'compare', 20, 2, 4, warmup='off'))
    assert off.param_scheduler[0].start_factor == 1.0
    with pytest.raises(ValueError, match="warmup must be 'keep', 'off'"):
        train_options(det, ROOT, 'compare', 20, 2, 4, warmup='on')


def test_seg_options(configs):
    seg = configs['seg']
    cfg = merged(seg, train_options(seg, ROOT, 'single', 200, 2))
    assert cfg.train_dataloader.dataset.data_root == (
        f'{ROOT}/ADEChallengeData2016')
    assert cfg.train_cfg.max_iters == 200 == cfg.train_cfg.val_interval
    assert cfg.default_hooks.checkpoint.interval == 200
    assert cfg.log_processor.window_size == 1

    cfg = merged(seg, train_options(seg, ROOT, 'compare', 20, 2, 4))
    assert cfg.train_cfg.max_iters == 20
    pipeline = cfg.train_dataloader.dataset.pipeline
    assert [t.type for t in pipeline] == [
        'LoadImageFromFile', 'LoadAnnotations', 'RandomResize', 'RandomCrop',
        'RandomFlip', 'RandomFlip', 'PackSegInputs'
    ]
    assert pipeline[2].ratio_range == (1.0, 1.0)
    assert pipeline[4].prob == 0.0 and pipeline[5] == dict(
        type='RandomFlip', prob=0.0)
    assert cfg.model.decode_head.dropout_ratio == 0
    assert cfg.model.auxiliary_head.dropout_ratio == 0
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'  # kept
    assert cfg.env_cfg.cudnn_benchmark is False
    assert cfg.param_scheduler[0].start_factor == 1.0  # no warm-up by default
    keep = merged(seg,
                  train_options(seg, ROOT, 'compare', 20, 2, 4, warmup='keep'))
    assert keep.param_scheduler[0].start_factor == 1e-6

    cfg = merged(seg, eval_options(seg, ROOT))
    assert cfg.test_dataloader.dataset.data_root == (
        f'{ROOT}/ADEChallengeData2016')


@pytest.mark.parametrize('task', sorted(CONFIGS))
def test_scaling_options(configs, task):
    """Scaling mode trains as single mode does (the configs' own
    augmentation, warm-up, stochastic depth) but validates nothing."""
    cfg = configs[task]
    single = train_options(cfg, ROOT, 'single', 150, 2, 8)
    scaling = train_options(cfg, ROOT, 'scaling', 150, 2, 8)
    assert scaling == single + [
        'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None'
    ]
    merged_single = merged(cfg, single)
    merged_scaling = merged(cfg, scaling)
    assert merged_scaling.val_dataloader is None
    assert merged_scaling.val_cfg is None
    assert merged_scaling.val_evaluator is None
    assert merged_scaling.train_dataloader.batch_size == 2
    assert merged_scaling.default_hooks.logger.interval == 1
    assert merged_scaling.log_processor.window_size == 1
    assert 'mean_loss' not in merged_scaling.default_hooks
    assert (merged_scaling.train_dataloader.dataset.pipeline ==
            cfg.train_dataloader.dataset.pipeline)
    assert merged_scaling.model.backbone.drop_path_rate == (
        cfg.model.backbone.drop_path_rate) > 0
    assert merged_scaling.param_scheduler == cfg.param_scheduler
    if task == 'det':  # one epoch over 150 iterations of 8 images
        assert merged_scaling.train_dataloader.dataset.indices == 1200
        assert merged_scaling.train_cfg.max_epochs == 1
    else:
        assert merged_scaling.train_cfg.max_iters == 150
    a, b = merged_single.to_dict(), merged_scaling.to_dict()
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator'):
        a.pop(key), b.pop(key)
    assert a == b


@pytest.mark.parametrize('task', sorted(CONFIGS))
def test_long_options(configs, task):
    """Long mode trains as scaling mode does, over fewer Mask R-CNN images
    for several epochs, and saves a checkpoint every iters / epochs
    iterations."""
    cfg = configs[task]
    long = merged(cfg, train_options(cfg, ROOT, 'long', 1000, 2, epochs=5))
    scaling = merged(cfg, train_options(cfg, ROOT, 'scaling', 1000, 2))
    assert long.val_dataloader is None and long.val_cfg is None
    assert long.train_dataloader.dataset.pipeline == (
        cfg.train_dataloader.dataset.pipeline)
    assert long.model.backbone.drop_path_rate == (
        cfg.model.backbone.drop_path_rate) > 0
    assert long.param_scheduler == cfg.param_scheduler
    if task == 'det':  # 5 epochs of 200 iterations over 400 images
        assert long.train_dataloader.dataset.indices == 400
        assert long.train_cfg.max_epochs == 5
        assert long.default_hooks.checkpoint.interval == 1
        assert cfg.default_hooks.checkpoint.get('by_epoch', True)
    else:
        assert long.train_cfg.max_iters == 1000
        assert long.default_hooks.checkpoint.interval == 200
        assert scaling.default_hooks.checkpoint.interval == 1000
    with pytest.raises(ValueError, match='positive divisor of iters'):
        train_options(cfg, ROOT, 'long', 1000, 2, epochs=3)
    with pytest.raises(ValueError, match='epochs is for long mode'):
        train_options(cfg, ROOT, 'single', 1000, 2, epochs=5)


def test_unknown_keys_are_refused(configs):
    seg = configs['seg']
    for bad in ('train_cfg.max_iter=5', 'model.backbone.drop_path=0.1',
                'train_dataloader.dataset.pipeline.4.foo=1',
                'train_dataloader.dataset.pipeline.9.prob=0.0'):
        with pytest.raises(KeyError, match=bad.split('=')[0]):
            apply_options(copy.deepcopy(seg), [bad])
    # arguments of an item whose type the options change may be new
    apply_options(
        copy.deepcopy(seg), [
            'train_dataloader.dataset.pipeline.5.type=RandomFlip',
            'train_dataloader.dataset.pipeline.5.prob=0.0'
        ])


def test_cli_prints_the_options(configs, capsys):
    assert gpu_check.main([
        'train', 'seg', '--mode', 'compare', '--iters', '20', '--batch-size',
        '2', '--global-batch', '4', '--data-root', ROOT
    ]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == train_options(configs['seg'], ROOT, 'compare', 20, 2,
                                    4)
    with pytest.raises(SystemExit, match='not a det config'):
        gpu_check.main(['test', 'det', '--config', CONFIGS['seg'],
                        '--data-root', ROOT])


@pytest.mark.parametrize('argv, message', [
    (['train', 'seg', '--iters', '0'], '--iters must be at least 1, got 0'),
    (['train', 'seg', '--batch-size', '0'],
     '--batch-size must be at least 1, got 0'),
    (['train', 'det', '--global-batch', '0'],
     '--global-batch must be at least 1, got 0'),
    (['train', 'det', '--global-batch', '3'],
     '--global-batch (3) must be a multiple of --batch-size (2)'),
    (['train', 'det', '--mode', 'long', '--epochs', '0'],
     '--epochs must be at least 1, got 0'),
    (['test', 'det', '--workers', '-1'], '--workers must be at least 0, '
     'got -1'),
    (['test', 'det', '--config', 'none.py'],
     "--config: no config file at 'none.py'"),
    (['verify', '--configs', CONFIGS['det'], 'none.py'],
     "--configs: no config file at 'none.py'"),
])
def test_cli_bad_arguments(argv, message, capsys):
    """Parser errors naming the option (were options of no images or
    iterations, a global batch silently taken as the batch, or a
    traceback)."""
    if argv[0] != 'verify':
        argv = argv + ['--data-root', ROOT]
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_epochs_that_do_not_divide():
    with pytest.raises(SystemExit,
                       match=r'^cfg_options.py: epochs must be a positive '
                       r'divisor of iters \(200\), got 3$'):
        gpu_check.main(['train', 'seg', '--mode', 'long', '--epochs', '3',
                        '--data-root', ROOT])


def first_sample(dataset, seed):
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    sample = dataset[0]
    return sample['inputs'], sample['data_samples']


@pytest.mark.parametrize('task', sorted(CONFIGS))
def test_compare_pipelines_draw_nothing_at_random(configs, task, tmp_path):
    """The first training sample is the same under any seed with the
    compare options, and not with the single-GPU ones (the configs'
    augmentation)."""
    generate(str(tmp_path), coco_train=2, coco_val=1, coco_size=48,
             ade_train=2, ade_val=1, ade_size=48)
    scope = 'mmdet' if task == 'det' else 'mmseg'
    if task == 'det':
        import mmdet.datasets  # noqa: F401  (registers the transforms)
        from mmdet.registry import DATASETS
    else:
        import mmseg.datasets  # noqa: F401
        from mmseg.registry import DATASETS

    def samples(mode):
        cfg = merged(
            configs[task],
            train_options(configs[task], str(tmp_path), mode, 1, 2, 2))
        with DefaultScope.overwrite_default_scope(scope):
            dataset = DATASETS.build(cfg.train_dataloader.dataset)
            return [first_sample(dataset, seed) for seed in range(8)]

    def same(a, b):
        if a[0].shape != b[0].shape or not torch.equal(a[0], b[0]):
            return False
        if task == 'det':
            return torch.equal(a[1].gt_instances.bboxes.tensor,
                               b[1].gt_instances.bboxes.tensor)
        return torch.equal(a[1].gt_sem_seg.data, b[1].gt_sem_seg.data)

    compare = samples('compare')
    assert compare[0][0].shape[-2:] == ((800, 800) if task == 'det' else
                                        (512, 512))
    assert all(same(compare[0], s) for s in compare[1:])
    single = samples('single')
    assert not all(same(single[0], s) for s in single[1:])


def test_read_metrics(tmp_path, capsys):
    run = tmp_path / '20261127_080000'
    run.mkdir()
    (run / '20261127_080000.json').write_text(
        json.dumps({'coco/bbox_mAP': 0.5, 'coco/segm_mAP': 0.25,
                    'coco/bbox_mAP_50': 0.9, 'time': 1.0}))
    assert read_metrics(str(tmp_path)) == {
        'coco/bbox_mAP': 0.5, 'coco/segm_mAP': 0.25}
    assert gpu_check.main(['metrics', str(tmp_path)]) == 0
    assert 'coco/bbox_mAP 0.5' in capsys.readouterr().out
    (run / '20261127_080000.json').write_text(
        json.dumps({'mIoU': float('nan'), 'aAcc': 90.0}))
    with pytest.raises(ValueError, match='not finite'):
        read_metrics(str(tmp_path))
    assert gpu_check.main(['metrics', str(tmp_path / 'none')]) == 1


def run_script(*args, **env):
    """Run the script in its own process group; stop the whole group if it
    runs past 120 s (training would mean a check failed to stop it)."""
    proc = subprocess.Popen(['bash', SCRIPT, *args],
                            env=dict(os.environ, **env),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def test_script_arguments(tmp_path):
    assert subprocess.run(['bash', '-n', SCRIPT]).returncode == 0
    proc = run_script()
    assert proc.returncode == 2 and 'MODE' in proc.stdout
    assert run_script('train', str(tmp_path)).returncode == 2
    proc = run_script('single', str(tmp_path / 'w'), 'cls')
    assert proc.returncode == 2 and "unknown task 'cls'" in proc.stdout
    assert not (tmp_path / 'w').exists()
    for mode in ('compare', 'scaling'):
        proc = run_script(mode, str(tmp_path), SMOKE_CPU='1')
        assert proc.returncode == 2
        assert 'single or long mode only' in proc.stdout
    for value in ('0', 'x', '1 2 x', '2 1 2', '-1', ','):
        proc = run_script('scaling', str(tmp_path), SCALING_GPUS=value)
        assert proc.returncode == 2, proc.stdout
        assert 'SCALING_GPUS' in proc.stdout and f"'{value}'" in proc.stdout
    proc = run_script('scaling', str(tmp_path), SCALING_ITERS='10')
    assert proc.returncode == 2
    assert ('need SCALING_FIRST (50) <= SCALING_LAST (10) <= SCALING_ITERS '
            '(10)') in proc.stdout
    proc = run_script('scaling', str(tmp_path), SCALING_LAST='200')
    assert proc.returncode == 2 and 'SCALING_ITERS (150)' in proc.stdout
    proc = run_script('scaling', str(tmp_path), SCALING_FIRST='0')
    assert proc.returncode == 2
    assert "SCALING_FIRST must be a positive integer, got '0'" in proc.stdout
    for gpus in ('0', 'x', '-2'):
        proc = run_script('compare', str(tmp_path), GPUS=gpus)
        assert proc.returncode == 2
        assert f"GPUS must be a positive integer, got '{gpus}'" in proc.stdout
    proc = run_script('long', str(tmp_path), LONG_EPOCHS='0')
    assert proc.returncode == 2
    assert "LONG_EPOCHS must be a positive integer, got '0'" in proc.stdout
    proc = run_script('long', str(tmp_path), LONG_ITERS='1000',
                      LONG_EPOCHS='3')
    assert proc.returncode == 2
    assert 'LONG_EPOCHS (3) must divide LONG_ITERS (1000)' in proc.stdout


@pytest.mark.parametrize('name, value, expected', [
    ('ITERS', '0', 'a positive integer'),
    ('FP32_ITERS', 'x', 'a positive integer'),
    ('COMPARE_ITERS', '-1', 'a positive integer'),
    ('COCO_SIZE', '0', 'a positive integer'),
    ('ADE_SIZE', '1.5', 'a positive integer'),
    ('PORT', 'http', 'a positive integer'),
    ('PREFLIGHT_TIMEOUT', '0', 'a positive integer'),
    ('NUM_WORKERS', '-1', 'an integer >= 0'),
    ('TOL', '-0.1', 'a number >= 0 (e.g. 0.05)'),
    ('TOL', 'abc', 'a number >= 0 (e.g. 0.05)'),
    ('WARMUP', 'on', 'keep or off (or unset)'),
    ('VERBOSE', 'yes', '0 or 1'),
    ('SMOKE_CPU', 'true', '0 or 1'),
])
def test_script_environment(tmp_path, name, value, expected):
    """Refused before the preflight and before the work dir is made
    (were found only by the step they break, after the preflight, or
    never)."""
    proc = run_script('single', str(tmp_path / 'w'), **{name: value})
    assert proc.returncode == 2, proc.stdout
    assert f"{name} must be {expected}, got '{value}'" in proc.stdout
    assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('name, value', [('DET_CONFIG', 'none.py'),
                                         ('SEG_CONFIG', 'configs')])
def test_script_configs_must_be_files(tmp_path, name, value):
    proc = run_script('single', str(tmp_path / 'w'), **{name: value})
    assert proc.returncode == 2, proc.stdout
    assert f"{name}: no config file at '{value}'" in proc.stdout
    assert not (tmp_path / 'w').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')
@pytest.mark.parametrize('mode,env,gpus', [('single', {}, 1),
                                           ('long', {}, 1),
                                           ('compare', {}, 2),
                                           ('compare', dict(GPUS='4'), 4),
                                           ('all', dict(GPUS='4'), 4),
                                           ('scaling', {}, 2),
                                           ('scaling',
                                            dict(SCALING_GPUS='1,8'), 8)])
def test_script_preflight_needs_gpus(tmp_path, mode, env, gpus):
    proc = run_script(mode, str(tmp_path), 'seg', **env)
    assert proc.returncode == 2, proc.stdout
    assert f'this mode needs {gpus} GPU(s), found 0' in proc.stdout
    if mode == 'scaling':  # which counts asked for them
        counts = '1 2' if gpus == 2 else '1 8'
        assert (f"SCALING_GPUS='{counts}' runs on up to {gpus}; set "
                'SCALING_GPUS (or GPUS)') in proc.stdout
    assert 'preflight failed' in proc.stdout
    assert not (tmp_path / 'synthetic').exists()  # it stopped there
