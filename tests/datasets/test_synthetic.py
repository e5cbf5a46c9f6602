"""The synthetic COCO / ADE20K generator of the demo."""
import hashlib
import json
import os
import os.path as osp

import cv2
import numpy as np
import pytest

from mmvmamba.datasets.synthetic import (ADE_INDEX, SYNTHETIC_COCO_CLASSES,
                                         generate)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SMALL = dict(coco_train=6, coco_val=3, coco_size=96, ade_train=4, ade_val=2,
             ade_size=64)


def tree_digest(root):
    """Hash of every file's path and bytes under ``root``."""
    digest = hashlib.sha1()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = osp.join(folder, name)
            digest.update(osp.relpath(path, root).encode())
            with open(path, 'rb') as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp('synthetic')
    generate(str(out), seed=0, **SMALL)
    return str(out)


def test_layout(data):
    coco, ade = osp.join(data, 'coco'), osp.join(data, 'ADEChallengeData2016')
    for split, num in (('train', 6), ('val', 3)):
        ann = osp.join(coco, 'annotations', f'instances_{split}2017.json')
        assert osp.isfile(ann)
        assert len(os.listdir(osp.join(coco, f'{split}2017'))) == num
    for split, num in (('training', 4), ('validation', 2)):
        images = sorted(os.listdir(osp.join(ade, 'images', split)))
        labels = sorted(os.listdir(osp.join(ade, 'annotations', split)))
        assert len(images) == num
        assert [f[:-4] for f in images] == [f[:-4] for f in labels]
        assert all(f.endswith('.jpg') for f in images)
        assert all(f.endswith('.png') for f in labels)


def test_deterministic(data, tmp_path):
    generate(str(tmp_path / 'same'), seed=0, **SMALL)
    generate(str(tmp_path / 'other'), seed=1, **SMALL)
    assert tree_digest(str(tmp_path / 'same')) == tree_digest(data)
    assert tree_digest(str(tmp_path / 'other')) != tree_digest(data)


def test_coco_annotations(data):
    from mmdet.datasets import CocoDataset
    coco_names = CocoDataset.METAINFO['classes']
    ann_file = osp.join(data, 'coco/annotations/instances_train2017.json')
    with open(ann_file) as f:
        ann = json.load(f)
    # All 80 COCO categories in COCO's order (so 80-class configs evaluate),
    # objects only of the 5 synthetic ones, under their real ids.
    names = [c['name'] for c in ann['categories']]
    assert tuple(names) == tuple(coco_names)
    ids = [c['id'] for c in ann['categories']]
    assert ids == sorted(ids) and len(set(ids)) == 80
    name_of = dict(zip(ids, names))
    used = {name_of[a['category_id']] for a in ann['annotations']}
    assert used <= set(SYNTHETIC_COCO_CLASSES)
    assert name_of[13] == 'stop sign' and name_of[72] == 'tv'
    sizes = {im['id']: (im['width'], im['height']) for im in ann['images']}
    assert ann['annotations']
    for a in ann['annotations']:
        x, y, w, h = a['bbox']
        width, height = sizes[a['image_id']]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        poly = np.array(a['segmentation'][0]).reshape(-1, 2)
        assert len(poly) >= 3
        assert poly[:, 0].min() == x and poly[:, 1].min() == y
        assert 0 < a['area'] <= w * h


def test_ade_labels(data):
    from mmseg.datasets import ADE20KDataset
    ade_names = ADE20KDataset.METAINFO['classes']
    for name, index in ADE_INDEX.items():
        assert ade_names[index] == name
    allowed = {0} | {index + 1 for index in ADE_INDEX.values()}
    folder = osp.join(data, 'ADEChallengeData2016/annotations/training')
    seen = set()
    for name in os.listdir(folder):
        label = cv2.imread(osp.join(folder, name), cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and label.ndim == 2
        seen |= set(np.unique(label).tolist())
    assert seen <= allowed
    assert len(seen - {0}) >= 3


def _first_item(cfg_path, data_root):
    from mmengine.config import Config
    from mmengine.registry import DATASETS, init_default_scope
    cfg = Config.fromfile(cfg_path)
    init_default_scope(cfg.default_scope)
    dataset_cfg = cfg.train_dataloader.dataset
    dataset_cfg.data_root = data_root
    return DATASETS.build(dataset_cfg)[0]


def test_real_configs_read_it(data):
    """The real configs run on the data by changing only data_root."""
    item = _first_item(
        osp.join(REPO, 'configs/mask_rcnn_vmamba_t_1x_coco.py'),
        osp.join(data, 'coco/'))
    assert len(item['data_samples'].gt_instances) > 0
    item = _first_item(
        osp.join(REPO, 'configs/upernet_vmamba_t_512x512_160k_ade20k.py'),
        osp.join(data, 'ADEChallengeData2016'))
    seg = item['data_samples'].gt_sem_seg.data
    # reduce_zero_label: "other" (0) -> 255, class k + 1 -> k
    assert set(seg.unique().tolist()) <= (
        {255} | set(ADE_INDEX.values()))


def test_demo_config_names_the_classes():
    from mmengine.config import Config
    cfg = Config.fromfile(
        osp.join(REPO, 'configs/demo/mask_rcnn_vmamba_demo_synthetic.py'))
    classes = tuple(cfg.train_dataloader.dataset.metainfo.classes)
    assert classes == SYNTHETIC_COCO_CLASSES
    assert cfg.model.roi_head.bbox_head.num_classes == len(classes)
    assert cfg.model.roi_head.mask_head.num_classes == len(classes)


def test_seg_demo_config_has_the_seven_classes(data):
    """The seg demo trains and evaluates the 7 classes the scenes hold
    (labels 0..6, in ADE20K's order), so its class table has 7 rows."""
    from mmengine.config import Config
    from mmvmamba.datasets import SYNTHETIC_ADE_CLASSES
    path = osp.join(REPO, 'configs/demo/upernet_vmamba_demo_synthetic.py')
    cfg = Config.fromfile(path)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        classes = tuple(cfg[loader].dataset.metainfo.classes)
        assert classes == SYNTHETIC_ADE_CLASSES
    assert cfg.model.decode_head.num_classes == 7
    assert cfg.model.auxiliary_head.num_classes == 7
    item = _first_item(path, osp.join(data, 'ADEChallengeData2016'))
    seg = item['data_samples'].gt_sem_seg.data
    assert set(seg.unique().tolist()) <= set(range(7)) | {255}
    assert len(set(seg.unique().tolist()) - {255}) >= 2


def test_running_the_generator_module_does_not_warn(tmp_path):
    """``python -m mmvmamba.datasets.synthetic``: no runpy warning that the
    module was imported before it ran."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONWARNINGS='default')
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
    proc = subprocess.run([
        sys.executable, '-m', 'mmvmamba.datasets.synthetic', '--out',
        str(tmp_path), '--coco-train', '1', '--coco-val', '1',
        '--ade-train', '1', '--ade-val', '1', '--coco-size', '32',
        '--ade-size', '32'
    ], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ''


def _count(root, *parts):
    return len(os.listdir(osp.join(root, *parts)))


def test_a_new_run_replaces_the_last_one_whole(tmp_path):
    out = str(tmp_path / 'data')
    generate(out, seed=0, **SMALL)
    fewer = dict(SMALL, coco_train=2, ade_val=1)
    generate(out, seed=1, **fewer)
    assert _count(out, 'coco', 'train2017') == 2
    assert _count(out, 'ADEChallengeData2016', 'images', 'validation') == 1
    assert _count(out, 'ADEChallengeData2016', 'annotations',
                  'validation') == 1
    generate(str(tmp_path / 'fresh'), seed=1, **fewer)
    for name in ('coco', 'ADEChallengeData2016'):
        assert tree_digest(osp.join(out, name)) == tree_digest(
            str(tmp_path / 'fresh' / name))
    assert sorted(os.listdir(out)) == ['ADEChallengeData2016', 'coco']


def test_a_failed_run_leaves_the_last_one(tmp_path, monkeypatch):
    out = str(tmp_path / 'data')
    generate(out, seed=0, **SMALL)
    before = tree_digest(out)
    written = []

    def imwrite(path, image, params=()):
        written.append(path)
        return len(written) < 5  # the fifth image fails

    monkeypatch.setattr(cv2, 'imwrite', imwrite)
    with pytest.raises(OSError, match='could not write the image'):
        generate(out, seed=1, **SMALL)
    assert tree_digest(out) == before
    assert sorted(os.listdir(out)) == ['ADEChallengeData2016', 'coco']


def test_other_folders_are_not_replaced(tmp_path):
    coco = tmp_path / 'coco'
    coco.mkdir()
    (coco / 'mine.json').write_text('{}')
    with pytest.raises(FileExistsError, match='not written by this'):
        generate(str(tmp_path), seed=0, **SMALL)
    assert os.listdir(str(coco)) == ['mine.json']
    assert sorted(os.listdir(str(tmp_path))) == ['coco']
    with pytest.raises(NotADirectoryError, match='out must be a folder'):
        generate(str(coco / 'mine.json'), seed=0, **SMALL)


@pytest.mark.parametrize('name,value', [('coco_train', 0), ('ade_val', -1),
                                        ('coco_size', 31), ('ade_size', 2.5),
                                        ('max_objects', 0), ('seed', -1),
                                        ('coco_val', True)])
def test_bad_arguments_are_named(tmp_path, name, value):
    with pytest.raises(ValueError, match=f'^{name} must be an int'):
        generate(str(tmp_path / 'data'), **dict(SMALL, **{name: value}))
    assert not osp.exists(str(tmp_path / 'data'))


def test_numpy_ints_are_ints(tmp_path):
    generate(str(tmp_path / 'data'), seed=np.int64(0),
             **dict(SMALL, coco_train=np.int32(2)))
    assert _count(str(tmp_path / 'data'), 'coco', 'train2017') == 2


def test_bad_flags_are_named(tmp_path):
    import subprocess
    import sys
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
    proc = subprocess.run([
        sys.executable, '-m', 'mmvmamba.datasets.synthetic', '--out',
        str(tmp_path / 'data'), '--ade-size', '16'
    ], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert '--ade-size must be an int of at least 32, got 16' in proc.stderr
    assert not osp.exists(str(tmp_path / 'data'))
