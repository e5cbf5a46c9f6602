"""Training steps of detectors and segmentors on synthetic batches.

:data:`DETECTOR_ZOO` names Mask R-CNN (COCO 1x) and UperNet (ADE20K 512)
with VMamba backbones (this repository's configs) and with Swin backbones
(mmdet's and mmseg's stock configs; Mask R-CNN Swin-S/B are mmdet's Swin-T
config with the backbone resized, as mmdet's own Swin-S config does).

:func:`synthetic_batch` makes what a dataloader gives (uint8 images and
packed data samples: random boxes, masks and labels for mmdet, random label
maps for mmseg) and :func:`time_train_step` times ``model.train_step``, the
call of mmengine's training loops: data preprocessor, forward with losses,
``optim_wrapper.update_params`` (backward and optimizer step), with the
config's optimizer under an ``OptimWrapper`` (``fp32``) or an
``AmpOptimWrapper`` (``amp``: autocast to bfloat16 or float16).
"""
import copy
import gc
import os.path as osp
import statistics
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import OptimWrapper, build_optim_wrapper
from mmengine.registry import DefaultScope

from models import (CONFIG_DIR, build, load_config, model_label, quiet_logger,
                    scope_of)
from timing import gpu_time, host_and_wall_ms, timed

#: Training modes of :func:`time_train_step`.
MODES = ('fp32', 'amp')

#: Tasks by config scope: the task's name and its default input (H, W).
TASKS = {
    'mmdet': ('Mask R-CNN', (800, 1333)),
    'mmseg': ('UperNet', (512, 512)),
}


class DetectorSpec(NamedTuple):
    """A named model of :data:`DETECTOR_ZOO`."""
    config: str  #: config file or ``pkg::path``
    reference: str  #: the Swin model of the same task and size class
    overrides: Optional[dict] = None  #: merged into the config's ``model``


_SIZES = (('t', 'tiny'), ('s', 'small'), ('b', 'base'))
_SWIN_MASK_RCNN = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
_SWIN_OVERRIDES = {
    't': None,
    's': dict(backbone=dict(depths=[2, 2, 18, 2])),
    'b': dict(
        backbone=dict(
            embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
        neck=dict(in_channels=[128, 256, 512, 1024])),
}

#: Mask R-CNN and UperNet, VMamba-T/S/B and VMamba2-T/S/B against
#: Swin-T/S/B.
DETECTOR_ZOO: Dict[str, DetectorSpec] = {
    **{
        f'mask-rcnn-{family}-{s}': DetectorSpec(
            osp.join(CONFIG_DIR, f'mask_rcnn_{family}_{s}_1x_coco.py'),
            f'mask-rcnn-swin-{s}')
        for family in ('vmamba', 'vmamba2') for s, _ in _SIZES
    },
    **{
        f'mask-rcnn-swin-{s}': DetectorSpec(
            _SWIN_MASK_RCNN, f'mask-rcnn-swin-{s}', _SWIN_OVERRIDES[s])
        for s, _ in _SIZES
    },
    **{
        f'upernet-{family}-{s}': DetectorSpec(
            osp.join(CONFIG_DIR,
                     f'upernet_{family}_{s}_512x512_160k_ade20k.py'),
            f'upernet-swin-{s}')
        for family in ('vmamba', 'vmamba2') for s, _ in _SIZES
    },
    **{
        f'upernet-swin-{s}': DetectorSpec(
            f'mmseg::swin/swin-{arch}-patch4-window7-in1k-pre_upernet_'
            '8xb2-160k_ade20k-512x512.py', f'upernet-swin-{s}')
        for s, arch in _SIZES
    },
}

#: The Swin model each zoo model is compared with.
REFERENCE_OF = {name: spec.reference for name, spec in DETECTOR_ZOO.items()}


def load_detector_config(
        name: str,
        shapes: Optional[Dict[str, Sequence[int]]] = None) -> Config:
    """The config of a zoo name or an mmdet / mmseg config, for training.

    The backbone's ``init_cfg`` is dropped (no checkpoints are read). A data
    preprocessor with a fixed ``size`` (mmseg's crop) pads to the input
    (H, W) of ``shapes`` (by scope) instead.
    """
    spec = DETECTOR_ZOO.get(name)
    cfg = load_config(spec.config if spec else name)
    if scope_of(cfg) not in TASKS:
        raise ValueError(f'{name}: default_scope must be one of '
                         f'{sorted(TASKS)}, got {scope_of(cfg)!r}')
    if spec and spec.overrides:
        cfg.merge_from_dict(dict(model=copy.deepcopy(spec.overrides)))
    cfg.model.backbone.init_cfg = None
    preprocessor = cfg.model.get('data_preprocessor', {})
    if shapes and preprocessor.get('size') is not None:
        preprocessor['size'] = tuple(shapes[scope_of(cfg)])
    return cfg


def build_detector(cfg: Config, device: torch.device) -> nn.Module:
    """Build and initialise the config's model in train mode on ``device``.

    SyncBN becomes BN (one process), as in ``tools/train.py``.
    """
    model = build(cfg.model, scope_of(cfg), init_weights=True).to(device)
    model.train()  # not chained: some backbones' train() returns None
    return model


def num_classes(model: nn.Module) -> int:
    """Classes of an mmdet detector's box head or an mmseg decode head."""
    for path in ('roi_head.bbox_head', 'bbox_head', 'decode_head'):
        head = model
        for attr in path.split('.'):
            head = getattr(head, attr, None)
        if head is not None and hasattr(head, 'num_classes'):
            return head.num_classes
    raise ValueError(f'{type(model).__name__} has no head with num_classes')


def _images(rng: np.random.Generator, batch: int,
            shape: Sequence[int]) -> List[torch.Tensor]:
    """Random uint8 images (3, H, W), as a dataloader packs them."""
    return [
        torch.from_numpy(rng.integers(0, 256, (3, *shape), dtype=np.uint8))
        for _ in range(batch)
    ]


def _meta(shape: Sequence[int]) -> dict:
    """Image metainfo of an unscaled, unpadded, unflipped image."""
    shape = tuple(shape)
    return dict(img_shape=shape, ori_shape=shape, pad_shape=shape,
                batch_input_shape=shape, scale_factor=(1., 1.), flip=False,
                flip_direction=None)


def _ellipse_masks(boxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """uint8 masks (N, H, W) of the ellipses inscribed in ``boxes``."""
    ys = np.arange(shape[0])[:, None] + 0.5
    xs = np.arange(shape[1])[None] + 0.5
    masks = np.zeros((len(boxes), *shape), dtype=np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        rx, ry = (x2 - x1) / 2, (y2 - y1) / 2
        mask[(((xs - x1 - rx) / rx)**2 + ((ys - y1 - ry) / ry)**2) <= 1] = 1
    return masks


def det_batch(batch: int,
              shape: Sequence[int],
              classes: int,
              boxes_per_image: int = 5,
              seed: int = 0) -> dict:
    """A batch of mmdet training data: images with boxes, masks, labels.

    Each image has ``boxes_per_image`` random boxes (sides 5% to 50% of the
    image's) with the inscribed ellipse as ``BitmapMasks`` and random labels
    in ``[0, classes)``.

    Returns:
        dict: ``inputs`` (uint8 tensors (3, H, W)) and ``data_samples``
        (``DetDataSample`` with ``gt_instances`` and empty
        ``ignored_instances``), as ``PackDetInputs`` and ``pseudo_collate``.
    """
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    rng = np.random.default_rng(seed)
    h, w = shape
    samples = []
    for _ in range(batch):
        sides = rng.uniform(0.05, 0.5, (boxes_per_image, 2)) * (w, h)
        corners = rng.uniform(0, 1, (boxes_per_image, 2)) * ((w, h) - sides)
        boxes = np.concatenate([corners, corners + sides],
                               axis=1).astype(np.float32)
        gt = InstanceData(
            bboxes=HorizontalBoxes(torch.from_numpy(boxes)),
            labels=torch.from_numpy(
                rng.integers(0, classes, boxes_per_image)),
            masks=BitmapMasks(_ellipse_masks(boxes, shape), h, w))
        ignored = InstanceData(
            bboxes=HorizontalBoxes(torch.zeros(0, 4)),
            labels=torch.zeros(0, dtype=torch.long),
            masks=BitmapMasks(np.zeros((0, h, w), np.uint8), h, w))
        samples.append(
            DetDataSample(
                metainfo=_meta(shape), gt_instances=gt,
                ignored_instances=ignored))
    return dict(inputs=_images(rng, batch, shape), data_samples=samples)


def seg_batch(batch: int,
              shape: Sequence[int],
              classes: int,
              cell: int = 32,
              seed: int = 0) -> dict:
    """A batch of mmseg training data: images with random label maps.

    The label maps are constant on ``cell`` x ``cell`` squares, each with a
    random class in ``[0, classes)``.

    Returns:
        dict: ``inputs`` (uint8 tensors (3, H, W)) and ``data_samples``
        (``SegDataSample`` with ``gt_sem_seg``), as ``PackSegInputs`` and
        ``pseudo_collate``.
    """
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    rng = np.random.default_rng(seed)
    h, w = shape
    samples = []
    for _ in range(batch):
        cells = rng.integers(0, classes, (-(-h // cell), -(-w // cell)))
        labels = cells.repeat(cell, 0).repeat(cell, 1)[:h, :w]
        samples.append(
            SegDataSample(
                metainfo=_meta(shape),
                gt_sem_seg=PixelData(data=torch.from_numpy(labels[None]))))
    return dict(inputs=_images(rng, batch, shape), data_samples=samples)


def synthetic_batch(model: nn.Module, scope: str, batch: int,
                    shape: Sequence[int], seed: int = 0) -> dict:
    """:func:`det_batch` or :func:`seg_batch` for ``model``'s classes."""
    make = {'mmdet': det_batch, 'mmseg': seg_batch}[scope]
    return make(batch, shape, num_classes(model), seed=seed)


def optim_wrapper_cfg(cfg: Config, mode: str,
                      amp_dtype: str = 'bfloat16',
                      merge_groups: bool = False) -> dict:
    """The config's optim_wrapper as ``OptimWrapper`` or ``AmpOptimWrapper``.

    The optimizer and its paramwise settings stay the config's; with
    ``merge_groups`` its param groups are built by mmvmamba's
    ``MergedGroupsOptimWrapperConstructor`` (one group per setting), as
    mmvmamba's configs do, whatever the config's constructor.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    wrapper = copy.deepcopy(cfg.optim_wrapper.to_dict())
    for key in ('dtype', 'loss_scale'):
        wrapper.pop(key, None)
    if mode == 'amp':
        wrapper.update(
            type='AmpOptimWrapper', dtype=amp_dtype, loss_scale='dynamic')
    else:
        wrapper['type'] = 'OptimWrapper'
    if merge_groups:
        wrapper['constructor'] = 'MergedGroupsOptimWrapperConstructor'
    return wrapper


def build_train_optim_wrapper(model: nn.Module,
                              cfg: Config,
                              mode: str,
                              amp_dtype: str = 'bfloat16',
                              merge_groups: bool = False) -> OptimWrapper:
    """The optim wrapper of :func:`optim_wrapper_cfg` for ``model``."""
    # the paramwise constructor logs every parameter's options
    with DefaultScope.overwrite_default_scope(scope_of(cfg)), quiet_logger():
        return build_optim_wrapper(
            model, optim_wrapper_cfg(cfg, mode, amp_dtype, merge_groups))


def mode_label(mode: str, amp_dtype: Optional[str] = 'bfloat16') -> str:
    """``'fp32'``, ``'amp-bf16'`` or ``'amp-fp16'``."""
    if mode != 'amp':
        return mode
    return 'amp-' + {'bfloat16': 'bf16', 'float16': 'fp16'}[amp_dtype]


def time_train_step(model: nn.Module,
                    cfg: Config,
                    mode: str,
                    data: dict,
                    device: torch.device,
                    warmup: int = 5,
                    repeat: int = 20,
                    amp_dtype: str = 'bfloat16',
                    merge_groups: bool = False) -> Dict[str, Optional[float]]:
    """Time ``model.train_step(data, optim_wrapper)`` in one mode.

    A fresh optim wrapper of the config (:func:`optim_wrapper_cfg`) takes
    every step of the run. cuDNN's autotuner follows the config's
    ``env_cfg.cudnn_benchmark``, as the runner sets it. A step that raises
    (other than running out of GPU memory, which reads ``'OOM'``) gives
    status ``'failed'`` and its message under ``error``: an op without a
    kernel for the autocast dtype, say (mmcv 2.1's RoIAlign has none for
    bfloat16 on GPUs, so Mask R-CNN's AMP needs ``amp_dtype='float16'``).

    Args:
        model (nn.Module): From :func:`build_detector`, on ``device``.
        cfg (Config): Its config (optim_wrapper, env_cfg, scope).
        mode (str): One of :data:`MODES`; ``'amp'`` needs a GPU.
        data (dict): A batch of :func:`synthetic_batch`, on the CPU like a
            dataloader's (the data preprocessor moves it).
        device (torch.device): The model's device.
        warmup (int): Untimed steps first.
        repeat (int): Timed steps; the median is reported.
        amp_dtype (str): ``'bfloat16'`` or ``'float16'`` for ``'amp'``.
        merge_groups (bool): Param groups merged whatever the config's
            constructor (:func:`optim_wrapper_cfg`).

    Returns:
        dict: As :func:`timing.timed` with ``profile``
        (``gpu_ms`` and ``scan_ms`` of one more step on a GPU), plus
        ``loss`` (the total loss of the last step; None if none finished)
        and ``error``.
    """
    if mode == 'amp' and device.type != 'cuda':
        raise ValueError('mode amp needs a GPU (mmengine\'s AmpOptimWrapper)')
    last = {}

    def make_step() -> Callable[[], None]:
        optim_wrapper = build_train_optim_wrapper(model, cfg, mode, amp_dtype,
                                                  merge_groups)

        def step():
            last['loss'] = model.train_step(data, optim_wrapper)['loss']

        return step

    cudnn_benchmark = cfg.get('env_cfg', {}).get('cudnn_benchmark', False)
    try:
        result = timed(make_step, len(data['inputs']), device, warmup, repeat,
                       cudnn_benchmark, profile=True)
        result['error'] = None
    except (RuntimeError, NotImplementedError) as error:
        result = dict(ms=None, img_per_s=None, peak_gib=None, gpu_ms=None,
                      scan_ms=None, status='failed', scan=None,
                      error=str(error).splitlines()[0])
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    finally:
        model.zero_grad(set_to_none=True)
    loss = last.get('loss') if result['status'] == 'ok' else None
    result['loss'] = None if loss is None else loss.item()
    return result


def backbone_step(model: nn.Module,
                  mode: str,
                  data: dict,
                  device: torch.device,
                  amp_dtype: Optional[str] = 'bfloat16') -> Callable[[], None]:
    """The backbone's training step on the batch's preprocessed images: its
    forward (under autocast in ``'amp'``), the sum of its outputs' means,
    the backward. Each step first drops the gradients of the last
    (``zero_grad(set_to_none=True)``, as mmengine's optimizer wrapper does
    after its step), so that none are accumulated into.

    Args:
        model (nn.Module): From :func:`build_detector`, on ``device``.
        mode (str): One of :data:`MODES`.
        data (dict): A batch of :func:`synthetic_batch`.
        device (torch.device): The model's device.
        amp_dtype (str, optional): Autocast's dtype in ``'amp'`` (read
            there only).

    Returns:
        Callable: The step; the backbone is put in train mode.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    inputs = model.data_preprocessor(data, True)['inputs']
    backbone = model.backbone
    backbone.train()  # some backbones' train() returns None
    dtype = getattr(torch, amp_dtype) if mode == 'amp' else None

    def step():
        backbone.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype,
                            enabled=dtype is not None):
            outs = backbone(inputs)
        sum(out.float().mean() for out in outs).backward()

    return step


def time_backbone(model: nn.Module,
                  mode: str,
                  data: dict,
                  device: torch.device,
                  warmup: int = 5,
                  repeat: int = 20,
                  amp_dtype: Optional[str] = 'bfloat16'
                  ) -> Dict[str, Optional[float]]:
    """Time the backbone alone: the step of :func:`backbone_step`.

    Args:
        model, mode, data, device, amp_dtype: As :func:`backbone_step`'s.
        warmup (int): Untimed steps first.
        repeat (int): Timed steps; medians are reported.

    Returns:
        dict: ``backbone_ms``, the median wall time of a step,
        ``backbone_host_ms``, the host's time to enqueue one
        (:func:`timing.host_and_wall_ms`), and ``backbone_gpu_ms``, the
        GPU's busy time in one more step (:func:`timing.gpu_time`; None off
        the GPU); all None when the GPU ran out of memory. A wall time near
        the busy time means the GPU bounds the step; a host time near the
        wall time alone does not tell (a full launch queue stalls the host).
    """
    step = backbone_step(model, mode, data, device, amp_dtype)
    try:
        host, wall = host_and_wall_ms(step, device, warmup, repeat)
        busy = gpu_time(step, device)['gpu_ms']
    except torch.OutOfMemoryError:
        host = wall = busy = None
        torch.cuda.empty_cache()
    finally:
        model.zero_grad(set_to_none=True)
    return dict(backbone_ms=wall, backbone_host_ms=host,
                backbone_gpu_ms=busy)


def merge_rounds(results: Sequence[dict], batch: int) -> dict:
    """One row from the timings of a model and mode over several rounds.

    Times are the medians over the rounds (``round_ms`` keeps them all),
    memory the largest peak; a round that did not finish makes the row that
    round's (OOM, failed).
    """
    ms = [r['ms'] for r in results]
    for result in results:
        if result['status'] != 'ok':
            return dict(result, round_ms=ms)
    merged = dict(results[-1], ms=statistics.median(ms), round_ms=ms)
    merged['img_per_s'] = batch * 1e3 / merged['ms']
    for key in ('gpu_ms', 'scan_ms', 'backbone_ms', 'backbone_host_ms',
                'backbone_gpu_ms'):
        values = [r[key] for r in results if r.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    peaks = [r['peak_gib'] for r in results if r['peak_gib'] is not None]
    merged['peak_gib'] = max(peaks) if peaks else None
    return merged


def benchmark(names: Sequence[str],
              modes: Sequence[str],
              device: torch.device,
              batch: int = 2,
              det_shape: Sequence[int] = TASKS['mmdet'][1],
              seg_shape: Sequence[int] = TASKS['mmseg'][1],
              warmup: int = 5,
              repeat: int = 20,
              amp_dtypes: Sequence[str] = ('bfloat16', ),
              rounds: int = 1,
              log: Callable[[str], None] = print,
              merge_groups: bool = False) -> List[dict]:
    """Time the training step of each model in each mode.

    With several ``rounds`` the models take turns, each rebuilt every round,
    so that a slow spell of the host or the card is shared out rather than
    charged to one model (:func:`merge_rounds`).

    Args:
        names (Sequence[str]): Keys of :data:`DETECTOR_ZOO` or mmdet / mmseg
            config files.
        modes (Sequence[str]): Of :data:`MODES`.
        device (torch.device): Where to train.
        batch (int): Images per step.
        det_shape, seg_shape (Sequence[int]): Input (H, W) of mmdet and
            mmseg models.
        warmup (int): Untimed steps.
        repeat (int): Timed steps (median).
        amp_dtypes (Sequence[str]): Autocast dtypes of ``'amp'``, each timed
            as a mode of its own.
        rounds (int): Times the whole set is timed. Defaults to 1.
        log (Callable): Called with a line per measurement.
        merge_groups (bool): Every model's param groups merged
            (:func:`optim_wrapper_cfg`), so that baselines whose configs
            give each parameter a group step their optimizer as mmvmamba's
            configs do. Defaults to False (each config's own).

    Returns:
        list[dict]: One row per model and mode: ``model``, ``task``,
        ``shape``, ``params_m``, ``mode`` (:func:`mode_label`), ``batch``,
        the keys of :func:`time_train_step` and :func:`time_backbone`, and
        ``round_ms``.
    """
    if rounds < 1:
        raise ValueError(f'rounds must be at least 1, got {rounds}')
    shapes = {'mmdet': tuple(det_shape), 'mmseg': tuple(seg_shape)}
    runs = [(mode, dtype) for mode in modes
            for dtype in (amp_dtypes if mode == 'amp' else [None])]
    rows, results = {}, {}
    for round_ in range(rounds):
        prefix = f'round {round_ + 1}/{rounds}  ' if rounds > 1 else ''
        for name in names:
            cfg = load_detector_config(name, shapes)
            scope = scope_of(cfg)
            shape = shapes[scope]
            model = build_detector(cfg, device)
            data = synthetic_batch(model, scope, batch, shape)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            for mode, dtype in runs:
                key = (name, mode, dtype)
                if key not in rows:  # the first round's
                    rows[key] = dict(
                        model=name if name in DETECTOR_ZOO else
                        model_label(name),
                        task=TASKS[scope][0],
                        shape=shape,
                        params_m=params,
                        mode=mode_label(mode, dtype),
                        batch=batch)
                row = rows[key]
                result = time_train_step(model, cfg, mode, data, device,
                                         warmup, repeat, dtype, merge_groups)
                result.update(
                    time_backbone(model, mode, data, device, warmup, repeat,
                                  dtype)
                    if result['status'] == 'ok' else
                    dict(backbone_ms=None, backbone_host_ms=None,
                         backbone_gpu_ms=None))
                results.setdefault(key, []).append(result)
                ms = result['ms']
                log(f'{prefix}{row["model"]}  {row["mode"]}  ' +
                    (f'{ms:.1f} ms' if ms else result['status']) +
                    (f'  ({result["error"]})' if result['error'] else ''))
            del model, data
            gc.collect()
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    return [
        dict(row, **merge_rounds(results[key], batch))
        for key, row in rows.items()
    ]
