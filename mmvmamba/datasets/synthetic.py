"""Small synthetic COCO and ADE20K data sets for the embedded demo.

The data sets are written in the standard layouts, so the real configs run on
them by changing only ``data_root``::

    OUT/coco/annotations/instances_{train,val}2017.json
    OUT/coco/{train,val}2017/*.jpg
    OUT/ADEChallengeData2016/images/{training,validation}/*.jpg
    OUT/ADEChallengeData2016/annotations/{training,validation}/*.png

Detection: a few objects per image (shapes named after real COCO classes)
drawn without overlap on textured backgrounds, with boxes and polygon masks
under their real COCO category ids. The annotation files list all 80 COCO
categories, so that a config with COCO's 80 classes trains and evaluates
unchanged (its labels are COCO's); a config naming the 5 classes in its
``metainfo`` sees only those. Segmentation: outdoor-like scenes whose
pixels are labelled with ADE20K classes in ADE's png convention (0 = other,
ignored; class ``k`` of the 150 is stored as ``k + 1``, to be read with
``reduce_zero_label=True``). Everything is a function of ``--seed``.

Example::

    python -m mmvmamba.datasets.synthetic --out data/synthetic --seed 0
"""
import argparse
import json
import math
import os
import os.path as osp
import shutil
import tempfile
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from mmvmamba.ops.checks import is_int

# (name, COCO category id, shape, BGR colour); sorted by category id, which
# is also the label order mmdet's CocoDataset gives them.
COCO_SHAPES = (
    ('stop sign', 13, 'octagon', (40, 40, 200)),
    ('sports ball', 37, 'disk', (30, 140, 240)),
    ('kite', 38, 'diamond', (40, 210, 220)),
    ('pizza', 59, 'wedge', (120, 190, 230)),
    ('tv', 72, 'screen', (120, 60, 30)),
)
SYNTHETIC_COCO_CLASSES = tuple(name for name, *_ in COCO_SHAPES)

# COCO's 80 detection categories: (id, name) in id order.
COCO_CATEGORIES = tuple(enumerate((
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
    'truck', 'boat', 'traffic light', 'fire hydrant', None, 'stop sign',
    'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', None, 'backpack', 'umbrella',
    None, None, 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard',
    'surfboard', 'tennis racket', 'bottle', None, 'wine glass', 'cup',
    'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich',
    'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake',
    'chair', 'couch', 'potted plant', 'bed', None, 'dining table', None,
    None, 'toilet', None, 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator',
    None, 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier',
    'toothbrush'), start=1))
COCO_CATEGORIES = tuple((i, n) for i, n in COCO_CATEGORIES if n is not None)

# Index of each class in ADE20K's 150 classes (mmseg's ADE20KDataset).
ADE_INDEX = dict(
    building=1, sky=2, tree=4, road=6, grass=9, mountain=16, water=21)
SYNTHETIC_ADE_CLASSES = tuple(
    sorted(ADE_INDEX, key=lambda name: ADE_INDEX[name]))
ADE_OTHER = 0  # "other" pixels of ADE annotations, ignored in training

# The two data sets' folders under ``--out``, and the file that marks each
# as written here (a folder without it is never replaced).
DATASET_DIRS = ('coco', 'ADEChallengeData2016')
MARKER = '.mmvmamba_synthetic'
MIN_SIZE = 32  # the backbones' largest stride


def _imwrite(path: str, image: np.ndarray, params: Sequence[int] = ()):
    """``cv2.imwrite`` that raises where it would return False."""
    if not cv2.imwrite(path, image, list(params)):
        raise OSError(f'could not write the image {path}')


def textured_background(rng: np.random.Generator, height: int,
                        width: int) -> np.ndarray:
    """A muted, low-frequency colour field with stripes and pixel noise."""
    grid = rng.uniform(60, 190, size=(4, 4, 3)).astype(np.float32)
    image = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 24)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = (xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi
    stripes = np.sin(phase / period)[..., None] * rng.uniform(5, 25)
    noise = rng.normal(0, 6, size=(height, width, 3))
    return np.clip(image + stripes + noise, 0, 255)


def shape_polygon(rng: np.random.Generator, shape: str, cx: float, cy: float,
                  radius: float) -> np.ndarray:
    """Vertices (N, 2) of a class's shape around ``(cx, cy)``."""
    if shape == 'disk':
        angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        aspect = rng.uniform(0.9, 1.1)
        xs, ys = np.cos(angles) * aspect, np.sin(angles) / aspect
    elif shape == 'octagon':
        angles = np.arange(8) * math.pi / 4 + math.pi / 8
        xs, ys = np.cos(angles), np.sin(angles)
    elif shape == 'diamond':
        xs = np.array([0, 0.6, 0, -0.6])
        ys = np.array([-1, 0, 1, 0])
    elif shape == 'wedge':
        xs = np.array([0, 0.55, -0.55])
        ys = np.array([-1, 0.8, 0.8])
    elif shape == 'screen':
        xs = np.array([-1, 1, 1, -1])
        ys = np.array([-0.7, -0.7, 0.7, 0.7])
    else:
        raise ValueError(f'unknown shape {shape!r}')
    rot = rng.uniform(-0.4, 0.4) if shape != 'wedge' else rng.uniform(
        0, 2 * math.pi)
    cos, sin = math.cos(rot), math.sin(rot)
    px = cx + radius * (xs * cos - ys * sin)
    py = cy + radius * (xs * sin + ys * cos)
    return np.round(np.stack([px, py], axis=1)).astype(np.int32)


def paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
          colour: Sequence[float], jitter: float, noise: float) -> None:
    """Fill ``image`` where ``mask`` with a jittered, noisy colour."""
    base = np.asarray(colour, np.float32) + rng.uniform(-jitter, jitter, 3)
    count = int(mask.sum())
    image[mask] = base + rng.normal(0, noise, size=(count, 3))


def _overlaps(box: Sequence[int], boxes: List[Sequence[int]],
              gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap
               and b[1] < y1 + gap for b in boxes)


def coco_image(rng: np.random.Generator, size: int,
               max_objects: int) -> Tuple[np.ndarray, List[Dict]]:
    """One detection image and its objects (category, polygon, mask)."""
    image = textured_background(rng, size, size)
    objects, boxes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(30):
            _, cat_id, shape, colour = COCO_SHAPES[rng.integers(
                len(COCO_SHAPES))]
            radius = rng.uniform(0.08, 0.22) * size
            cx, cy = rng.uniform(radius, size - radius, 2)
            poly = shape_polygon(rng, shape, cx, cy, radius)
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            if x0 < 1 or y0 < 1 or x1 > size - 2 or y1 > size - 2:
                continue
            if _overlaps((x0, y0, x1, y1), boxes, gap=3):
                continue
            mask = np.zeros((size, size), np.uint8)
            cv2.fillPoly(mask, [poly], 1)
            mask = mask.astype(bool)
            paint(image, mask, rng, colour, jitter=25, noise=8)
            if shape == 'screen':  # a darker screen inside the frame
                centre = poly.mean(0)
                screen = np.round(centre + 0.75 * (poly - centre))
                inner = np.zeros_like(mask, np.uint8)
                cv2.fillPoly(inner, [screen.astype(np.int32)], 1)
                paint(image, inner.astype(bool), rng, (90, 40, 20), 10, 6)
            boxes.append((x0, y0, x1, y1))
            objects.append(dict(category_id=cat_id, polygon=poly, mask=mask))
            break
    return np.clip(image, 0, 255).astype(np.uint8), objects


def write_coco(root: str, rng: np.random.Generator, split: str, num: int,
               size: int, max_objects: int, first_id: int) -> None:
    """Write ``{split}2017/*.jpg`` and its ``annotations/instances_*.json``."""
    img_dir = osp.join(root, f'{split}2017')
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    images, annotations = [], []
    for img_id in range(first_id, first_id + num):
        image, objects = coco_image(rng, size, max_objects)
        file_name = f'{img_id:012d}.jpg'
        _imwrite(osp.join(img_dir, file_name), image,
                 [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append(
            dict(id=img_id, file_name=file_name, width=size, height=size))
        for obj in objects:
            poly = obj['polygon']
            x0, y0 = poly.min(0).tolist()
            x1, y1 = poly.max(0).tolist()
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=img_id,
                    category_id=obj['category_id'],
                    bbox=[x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                    area=int(obj['mask'].sum()),
                    segmentation=[poly.reshape(-1).tolist()],
                    iscrowd=0))
    categories = [
        dict(id=cat_id, name=name, supercategory='coco')
        for cat_id, name in COCO_CATEGORIES
    ]
    with open(osp.join(root, 'annotations', f'instances_{split}2017.json'),
              'w') as f:
        json.dump(
            dict(
                info=dict(description='mmvmamba synthetic COCO'),
                images=images,
                annotations=annotations,
                categories=categories), f)


def ade_scene(rng: np.random.Generator,
              size: int) -> Tuple[np.ndarray, np.ndarray]:
    """One outdoor-like scene and its ADE-convention label map."""
    h = w = size
    image = np.zeros((h, w, 3), np.float32)
    label = np.zeros((h, w), np.uint8)

    def fill(mask: np.ndarray, name: str, colour, jitter=20, noise=10):
        paint(image, mask, rng, colour, jitter, noise)
        label[mask] = ADE_INDEX[name] + 1 if name else ADE_OTHER

    def polygon_mask(points) -> np.ndarray:
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
        return mask.astype(bool)

    ys, xs = np.mgrid[0:h, 0:w]
    horizon = int(rng.uniform(0.35, 0.6) * h)
    # sky with a vertical gradient, ground of grass with a road
    sky = ys < horizon
    fill(sky, 'sky', (225, 170, 120), noise=4)
    image[sky] -= (ys[sky, None] / h * 80).astype(np.float32)
    fill(~sky, 'grass', (50, 150, 60), noise=18)
    if rng.random() < 0.8:
        top, bottom = rng.uniform(0.2, 0.8, 2) * w
        half_top, half_bottom = rng.uniform(2, 8), rng.uniform(20, 50)
        fill(
            polygon_mask([(top - half_top, horizon),
                          (top + half_top, horizon),
                          (bottom + half_bottom, h),
                          (bottom - half_bottom, h)]), 'road',
            (110, 110, 110), noise=6)
    if rng.random() < 0.4:
        centre = (rng.uniform(0.1, 0.9) * w, rng.uniform(horizon + 10, h))
        axes = (rng.uniform(0.1, 0.25) * w, rng.uniform(0.04, 0.1) * h)
        mask = (((xs - centre[0]) / axes[0])**2 +
                ((ys - centre[1]) / axes[1])**2) < 1
        fill(mask & ~sky, 'water', (150, 90, 30), noise=8)
    for _ in range(int(rng.integers(0, 3))):
        peak = (rng.uniform(0, w), horizon - rng.uniform(0.15, 0.35) * h)
        half = rng.uniform(0.2, 0.4) * w
        fill(
            polygon_mask([(peak[0] - half, horizon), peak,
                          (peak[0] + half, horizon)]), 'mountain',
            (110, 100, 130), noise=10)
    for _ in range(int(rng.integers(0, 4))):
        x0 = rng.uniform(0, 0.85) * w
        bw, bh = rng.uniform(0.1, 0.25) * w, rng.uniform(0.15, 0.45) * h
        x1, y0, y1 = x0 + bw, horizon - bh, horizon + rng.uniform(0, 6)
        mask = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        fill(mask, 'building', (70, 90, 160), noise=8)
        windows = mask & ((xs - int(x0)) % 8 >= 4) & ((ys - int(y0)) % 10 >= 5)
        image[windows] = image[windows] * 0.5 + 20
    for _ in range(int(rng.integers(0, 4))):
        cx, base = rng.uniform(0, w), rng.uniform(horizon + 5, h)
        r = rng.uniform(0.05, 0.1) * w
        trunk = (np.abs(xs - cx) < r * 0.25) & (ys <= base) & (
            ys > base - 2.2 * r)
        crown = ((xs - cx)**2 + (ys - (base - 2.4 * r))**2) < r**2
        fill(trunk, 'tree', (30, 60, 100), noise=6)
        fill(crown, 'tree', (40, 110, 30), noise=15)
    if rng.random() < 0.5:  # an unlabelled ("other") thing, ignored
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.03, 0.08) * w
        fill(((xs - cx)**2 + (ys - cy)**2) < r**2, '',
             rng.uniform(0, 255, 3), noise=10)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_ade(root: str, rng: np.random.Generator, split: str, num: int,
              size: int) -> None:
    """Write ``images/{split}/*.jpg`` and ``annotations/{split}/*.png``."""
    img_dir = osp.join(root, 'images', split)
    ann_dir = osp.join(root, 'annotations', split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    tag = 'train' if split == 'training' else 'val'
    for i in range(1, num + 1):
        image, label = ade_scene(rng, size)
        stem = f'ADE_{tag}_{i:08d}'
        _imwrite(
            osp.join(img_dir, stem + '.jpg'), image,
            [cv2.IMWRITE_JPEG_QUALITY, 95])
        _imwrite(osp.join(ann_dir, stem + '.png'), label)


def constant_prediction_miou(ade_root: str,
                             split: str = 'validation') -> float:
    """mIoU (%) of predicting the most frequent class everywhere.

    The baseline of the segmentation demo, computed as mmseg's ``IoUMetric``
    does (pixels summed over the split, "other" pixels ignored, classes
    absent from both prediction and ground truth left out): the frequent
    class scores its pixel share, every other present class 0.
    """
    folder = osp.join(ade_root, 'annotations', split)
    counts = np.zeros(256, np.int64)
    for name in sorted(os.listdir(folder)):
        label = cv2.imread(osp.join(folder, name), cv2.IMREAD_UNCHANGED)
        counts += np.bincount(label.ravel(), minlength=256)
    counts = counts[1:]  # drop "other"
    present = np.count_nonzero(counts)
    return float(100 * counts.max() / counts.sum() / present)


def generate(out: str,
             seed: int = 0,
             coco_train: int = 400,
             coco_val: int = 50,
             coco_size: int = 128,
             max_objects: int = 3,
             ade_train: int = 200,
             ade_val: int = 50,
             ade_size: int = 128) -> None:
    """Write both data sets under ``out``; deterministic given ``seed``.

    They are written to a temporary folder inside ``out`` and moved into
    place once complete, each replacing the folder of an earlier run (no
    file of that run is left), so a failed or interrupted run leaves the
    earlier data sets as they were. A ``coco`` or ``ADEChallengeData2016``
    folder that this function did not write is never replaced
    (``FileExistsError``).

    Args:
        out (str): Output folder (``coco/`` and ``ADEChallengeData2016/``).
        seed (int): Seed of everything drawn.
        coco_train, coco_val (int): Number of detection images per split.
        coco_size (int): Side of the (square) detection images.
        max_objects (int): Most objects in one detection image.
        ade_train, ade_val (int): Number of segmentation images per split.
        ade_size (int): Side of the (square) segmentation images.
    """
    check_generate_args(
        seed=seed, coco_train=coco_train, coco_val=coco_val,
        coco_size=coco_size, max_objects=max_objects, ade_train=ade_train,
        ade_val=ade_val, ade_size=ade_size)
    if osp.exists(out) and not osp.isdir(out):
        raise NotADirectoryError(f'out must be a folder, got the file {out}')
    for name in DATASET_DIRS:
        target = osp.join(out, name)
        if osp.exists(target) and not osp.isfile(osp.join(target, MARKER)):
            raise FileExistsError(
                f'{target} exists and was not written by this generator (no '
                f'{MARKER} in it); not replacing it: remove it or choose '
                'another out')
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix='.synthetic-', dir=out)
    try:
        _write_datasets(staging, seed, coco_train, coco_val, coco_size,
                        max_objects, ade_train, ade_val, ade_size)
        for name in DATASET_DIRS:
            target = osp.join(out, name)
            if osp.exists(target):
                os.rename(target, osp.join(staging, name + '.old'))
            os.rename(osp.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_generate_args(flags: bool = False, **args) -> None:
    """Raise ``ValueError`` naming the first argument of :func:`generate`
    out of range (as its command-line flag with ``flags``): ``seed`` a
    non-negative int, the image counts and ``max_objects`` positive ints,
    the sizes ints of at least :data:`MIN_SIZE`."""
    lowest = dict(seed=0, coco_size=MIN_SIZE, ade_size=MIN_SIZE)
    for name, value in args.items():
        low = lowest.get(name, 1)
        if not (is_int(value) and value >= low):
            label = '--' + name.replace('_', '-') if flags else name
            raise ValueError(f'{label} must be an int of at least {low}, '
                             f'got {value!r}')


def _write_datasets(root: str, seed: int, coco_train: int, coco_val: int,
                    coco_size: int, max_objects: int, ade_train: int,
                    ade_val: int, ade_size: int) -> None:
    """Both data sets under ``root``, each with its :data:`MARKER`."""
    # One independent stream per split, so a split's images do not depend
    # on how many images the other splits have.
    streams = np.random.SeedSequence(seed).spawn(4)
    rngs = [np.random.default_rng(s) for s in streams]
    coco = osp.join(root, 'coco')
    write_coco(coco, rngs[0], 'train', coco_train, coco_size, max_objects, 1)
    write_coco(coco, rngs[1], 'val', coco_val, coco_size, max_objects,
               1_000_001)
    ade = osp.join(root, 'ADEChallengeData2016')
    write_ade(ade, rngs[2], 'training', ade_train, ade_size)
    write_ade(ade, rngs[3], 'validation', ade_val, ade_size)
    for name in DATASET_DIRS:
        with open(osp.join(root, name, MARKER), 'w') as f:
            f.write('written by python -m mmvmamba.datasets.synthetic\n')


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; out-of-range values stop it with a usage error."""
    parser = argparse.ArgumentParser(
        description='Write small synthetic COCO and ADE20K data sets.')
    parser.add_argument('--out', default='data/synthetic', help='output dir')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--coco-train', type=int, default=400)
    parser.add_argument('--coco-val', type=int, default=50)
    parser.add_argument('--coco-size', type=int, default=128)
    parser.add_argument('--max-objects', type=int, default=3)
    parser.add_argument('--ade-train', type=int, default=200)
    parser.add_argument('--ade-val', type=int, default=50)
    parser.add_argument('--ade-size', type=int, default=128)
    args = parser.parse_args(argv)
    try:
        check_generate_args(
            flags=True, **{k: v
                           for k, v in vars(args).items() if k != 'out'})
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cv2.setNumThreads(1)
    generate(
        args.out,
        seed=args.seed,
        coco_train=args.coco_train,
        coco_val=args.coco_val,
        coco_size=args.coco_size,
        max_objects=args.max_objects,
        ade_train=args.ade_train,
        ade_val=args.ade_val,
        ade_size=args.ade_size)
    print(f'synthetic COCO and ADE20K written to {args.out} '
          f'(seed {args.seed})')


if __name__ == '__main__':
    main()
