"""The demo pipeline through tools/train.py and tools/test.py, reduced.

Each test runs the tools in a subprocess, in a folder holding a tiny
synthetic data set at the demo configs' ``data/synthetic`` (64-pixel images,
2-4 iterations), as a user would.
"""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TRAIN = osp.join(REPO, 'tools', 'train.py')
TEST = osp.join(REPO, 'tools', 'test.py')
DET = osp.join(REPO, 'configs', 'demo', 'mask_rcnn_vmamba_demo_synthetic.py')
SEG = osp.join(REPO, 'configs', 'demo', 'upernet_vmamba_demo_synthetic.py')
# no worker processes: the tiny runs are faster without them
NO_WORKERS = [
    f'{loader}.{key}'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    for key in ('num_workers=0', 'persistent_workers=False')
]


def run(args, cwd):
    """Run ``python ARGS`` in ``cwd``; return its output, fail on error."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
    proc = subprocess.run([sys.executable, *args],
                          cwd=cwd,
                          env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def metrics(work_dir):
    """The metrics tools/test.py saved in ``work_dir``."""
    found = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    assert found, f'no metrics in {work_dir}'
    with open(found[-1]) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('demo'))
    run([
        '-m', 'mmvmamba.datasets.synthetic', '--out', 'data/synthetic',
        '--seed', '0', '--coco-train', '4', '--coco-val', '2',
        '--coco-size', '64', '--ade-train', '4', '--ade-val', '2',
        '--ade-size', '64'
    ], root)
    return root


def test_detection_demo(workspace):
    small = ['train_dataloader.batch_size=2', *NO_WORKERS]
    out = run([
        TRAIN, DET, '--work-dir', 'det', '--cfg-options',
        'train_cfg.max_epochs=1', *small
    ], workspace)
    assert 'Epoch(train) [1][2/2]' in out
    assert osp.isfile(osp.join(workspace, 'det', 'epoch_1.pth'))
    # resume from the run's latest checkpoint (torch >= 2.6 needs the
    # trusted loading of mmengine's own checkpoints)
    out = run([
        TRAIN, DET, '--work-dir', 'det', '--resume', '--cfg-options',
        'train_cfg.max_epochs=2', *small
    ], workspace)
    assert 'resumed epoch: 1' in out
    assert 'Epoch(train) [1]' not in out
    assert 'Epoch(train) [2][2/2]' in out
    run([
        TEST, DET, 'det/epoch_2.pth', '--work-dir', 'det_test',
        '--show-dir', 'shown', '--cfg-options',
        'model.test_cfg.rcnn.score_thr=0.', *NO_WORKERS
    ], workspace)
    result = metrics(osp.join(workspace, 'det_test'))
    assert 0 <= result['coco/bbox_mAP'] <= 1
    assert 0 <= result['coco/segm_mAP'] <= 1
    shown = glob.glob(osp.join(workspace, 'det_test', '*', 'shown', '*.jpg'))
    assert len(shown) == 2


def test_segmentation_demo(workspace):
    # SyncBN of the config becomes BN in this single process
    out = run([
        TRAIN, SEG, '--work-dir', 'seg', '--cfg-options',
        'train_cfg.max_iters=2', 'default_hooks.checkpoint.interval=2',
        'default_hooks.logger.interval=1', *NO_WORKERS
    ], workspace)
    assert 'Iter(train) [2/2]' in out
    # resume from a named checkpoint
    out = run([
        TRAIN, SEG, '--work-dir', 'seg', '--resume', 'seg/iter_2.pth',
        '--cfg-options', 'train_cfg.max_iters=4',
        'default_hooks.checkpoint.interval=2',
        'default_hooks.logger.interval=1', *NO_WORKERS
    ], workspace)
    assert 'resumed epoch: 0, iter: 2' in out
    assert 'Iter(train) [3/4]' in out
    run([TEST, SEG, 'seg/iter_4.pth', '--work-dir', 'seg_test', '--tta',
         '--cfg-options', *NO_WORKERS], workspace)
    assert 0 <= metrics(osp.join(workspace, 'seg_test'))['mIoU'] <= 100


FOREIGN = """
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='VMamba',
        arch=dict(embed_dims=16, depths=[1, 1, 1, 1]),
        out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[16, 32, 64, 128]))
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(96, 96), keep_ratio=True),
    dict(type='PackDetInputs')
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root='data/synthetic/coco/', pipeline=pipeline))
train_cfg = dict(max_epochs=1)
val_dataloader = None
val_cfg = None
val_evaluator = None
"""


def test_foreign_config(workspace):
    """A stock mmdet config that imports mmvmamba trains with the tools."""
    with open(osp.join(workspace, 'retinanet_vmamba.py'), 'w') as f:
        f.write(FOREIGN)
    out = run([TRAIN, 'retinanet_vmamba.py', '--work-dir', 'foreign'],
              workspace)
    assert 'Epoch(train) [1][2/2]' in out


def test_trusted_loading_is_scoped(tmp_path, monkeypatch):
    """Full unpickling is allowed inside the context only."""
    import torch
    from mmengine.logging import HistoryBuffer
    monkeypatch.syspath_prepend(osp.join(REPO, 'tools'))
    from runner_utils import trusted_checkpoint_loading
    monkeypatch.delenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', raising=False)
    path = str(tmp_path / 'ckpt.pth')
    torch.save(dict(meta=dict(history=HistoryBuffer())), path)
    with trusted_checkpoint_loading():
        assert isinstance(torch.load(path)['meta']['history'], HistoryBuffer)
    assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' not in os.environ
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(path)


CLASSIFIER = """
_base_ = '{config}'
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=16, depths=[1, 1, 1, 1])),
    head=dict(num_classes=2, in_channels=128))
data_preprocessor = dict(num_classes=2)
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=64),
    dict(type='PackInputs')
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(
        _delete_=True, type='CustomDataset', data_root='cls',
        pipeline=pipeline))
train_cfg = dict(max_epochs=1)
param_scheduler = None
val_dataloader = None
val_cfg = None
val_evaluator = None
"""


def test_classification_config(workspace):
    """The tools also train mmpretrain configs (default_scope mmpretrain)."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(0)
    for label in ('a', 'b'):
        os.makedirs(osp.join(workspace, 'cls', label), exist_ok=True)
        for i in range(2):
            image = rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)
            cv2.imwrite(osp.join(workspace, 'cls', label, f'{i}.jpg'), image)
    config = osp.join(REPO, 'configs', 'vmamba_t_300e_in1k.py')
    with open(osp.join(workspace, 'classifier.py'), 'w') as f:
        f.write(CLASSIFIER.format(config=config))
    out = run([
        TRAIN, 'classifier.py', '--work-dir', 'cls_run', '--cfg-options',
        'default_hooks.logger.interval=1'
    ], workspace)
    assert 'Epoch(train) [1][2/2]' in out
