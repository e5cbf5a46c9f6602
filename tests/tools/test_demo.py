"""The demo pipeline through tools/train.py and tools/test.py, reduced.

Each test runs the tools in a subprocess, in a folder holding a tiny
synthetic data set at the demo configs' ``data/synthetic`` (64-pixel images),
as a user would. The detection and segmentation demos train on the two
validation images (warm-up off), stopped half-way and resumed, and must then
score on them well above a predictor that ignores the image.
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


# train on the validation images, at the base learning rate from the start
ON_VAL = {
    'det': ['train_dataloader.dataset.ann_file=annotations/'
            'instances_val2017.json',
            'train_dataloader.dataset.data_prefix.img=val2017/',
            'param_scheduler.0.start_factor=1.0',
            'param_scheduler.1.milestones=[100]'],
    'seg': ['train_dataloader.dataset.data_prefix.img_path=images/validation',
            'train_dataloader.dataset.data_prefix.seg_map_path='
            'annotations/validation',
            'param_scheduler.0.start_factor=1.0'],
}


def constant_detection_map(ann_file):
    """COCO bbox and segm mAP of a predictor that ignores the image: in
    every image, for each class of the annotations, one image-sized box
    (and mask) with score 1."""
    import contextlib
    import io

    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco = COCO(ann_file)
    classes = {a['category_id'] for a in coco.dataset['annotations']}
    results = []
    for image in coco.dataset['images']:
        h, w = image['height'], image['width']
        rle = mask_util.frPyObjects([[0, 0, w, 0, w, h, 0, h]], h, w)[0]
        rle['counts'] = rle['counts'].decode()
        results += [
            dict(image_id=image['id'], category_id=c, bbox=[0, 0, w, h],
                 segmentation=rle, score=1.0) for c in classes
        ]
    found = {}
    for kind in ('bbox', 'segm'):
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco, coco.loadRes(results), kind)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        found[kind] = max(float(evaluator.stats[0]), 0.0)
    return found


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
    """10 iterations, resumed for 10 more, then tested on the images it
    trained on: bbox and segm mAP 0.40 and 0.395 (measured; 20 uninterrupted
    iterations score the same), against 0 for a predictor that ignores the
    image."""
    small = ['train_dataloader.batch_size=2', 'train_cfg.val_interval=100',
             *NO_WORKERS, *ON_VAL['det']]
    out = run([
        TRAIN, DET, '--work-dir', 'det', '--cfg-options',
        'train_cfg.max_epochs=10', 'default_hooks.checkpoint.interval=10',
        *small
    ], workspace)
    assert 'Epoch(train) [10][1/1]' in out
    assert osp.isfile(osp.join(workspace, 'det', 'epoch_10.pth'))
    # resume from the run's latest checkpoint (torch >= 2.6 needs the
    # trusted loading of mmengine's own checkpoints)
    out = run([
        TRAIN, DET, '--work-dir', 'det', '--resume', '--cfg-options',
        'train_cfg.max_epochs=20', 'default_hooks.checkpoint.interval=10',
        *small
    ], workspace)
    assert 'resumed epoch: 10' in out
    assert 'Epoch(train) [10]' not in out
    assert 'Epoch(train) [20][1/1]' in out
    run([
        TEST, DET, 'det/epoch_20.pth', '--work-dir', 'det_test',
        '--show-dir', 'shown', '--cfg-options',
        'model.test_cfg.rcnn.score_thr=0.', *NO_WORKERS
    ], workspace)
    result = metrics(osp.join(workspace, 'det_test'))
    constant = constant_detection_map(
        osp.join(workspace, 'data', 'synthetic', 'coco', 'annotations',
                 'instances_val2017.json'))
    assert result['coco/bbox_mAP'] > constant['bbox'] + 0.15, result
    assert result['coco/segm_mAP'] > constant['segm'] + 0.15, result
    shown = glob.glob(osp.join(workspace, 'det_test', '*', 'shown', '*.jpg'))
    assert len(shown) == 2


def test_segmentation_demo(workspace):
    """5 iterations, resumed for 5 more, then tested with --tta on the
    images it trained on: mIoU 31.9 (measured), against 4.4 for
    predicting the most frequent class everywhere."""
    from mmvmamba.datasets.synthetic import constant_prediction_miou

    # SyncBN of the config becomes BN in this single process
    options = ['default_hooks.checkpoint.interval=5',
               'default_hooks.logger.interval=1', *NO_WORKERS, *ON_VAL['seg']]
    out = run([
        TRAIN, SEG, '--work-dir', 'seg', '--cfg-options',
        'train_cfg.max_iters=5', *options
    ], workspace)
    assert 'Iter(train) [5/5]' in out
    # resume from a named checkpoint
    out = run([
        TRAIN, SEG, '--work-dir', 'seg', '--resume', 'seg/iter_5.pth',
        '--cfg-options', 'train_cfg.max_iters=10', *options
    ], workspace)
    assert 'resumed epoch: 0, iter: 5' in out
    assert 'Iter(train) [ 6/10]' in out
    run([TEST, SEG, 'seg/iter_10.pth', '--work-dir', 'seg_test', '--tta',
         '--cfg-options', *NO_WORKERS], workspace)
    baseline = constant_prediction_miou(
        osp.join(workspace, 'data', 'synthetic', 'ADEChallengeData2016'))
    assert metrics(osp.join(workspace, 'seg_test'))['mIoU'] > baseline + 10


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
