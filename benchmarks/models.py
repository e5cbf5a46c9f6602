"""Models of the benchmarks and analysis tools: named classifiers, configs,
dummy inputs.

A model is named either by a key of :data:`MODEL_ZOO` (ImageNet classifiers:
VMamba-T/S/B of ``configs/`` and mmpretrain's Swin, ConvNeXt, ResNet-50 and
DeiT-S), by a config file, or by a package config such as
``mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py``. Configs of
mmpretrain, mmdet and mmseg models are built under their ``default_scope``.
"""
import copy
import logging
import os.path as osp
from contextlib import contextmanager
from typing import (Any, Dict, Iterator, List, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import MODELS, DefaultScope

import mmvmamba  # noqa: F401 -- registers VMamba in the root registry
from mmvmamba.models import VMamba, load_pretrained_backbone
from mmvmamba.models.checkpoint import load_user_checkpoint

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: This repository's configs (the benchmarks run from a checkout).
CONFIG_DIR = osp.join(REPO, 'configs')

class ZooModel(NamedTuple):
    """A named classifier of :data:`MODEL_ZOO`."""
    config: str  #: config file or ``pkg::path``
    overrides: Optional[dict] = None  #: merged into the config's ``model``


#: Swin on inputs of any size (mmpretrain's classification configs refuse
#: maps smaller than a window).
_ANY_SIZE = dict(backbone=dict(pad_small_map=True))

#: ImageNet-1k classifiers by name: this repository's VMamba configs and
#: mmpretrain's configs of the others, as in their papers.
MODEL_ZOO: Dict[str, ZooModel] = {
    **{f'{family}-{s}': ZooModel(
        osp.join(CONFIG_DIR, f'{family}_{s}_300e_in1k.py'))
       for family in ('vmamba', 'vmamba2') for s in 'tsb'},
    **{f'swin-{s[0]}': ZooModel('mmpretrain::swin_transformer/'
                                f'swin-{s}_16xb64_in1k.py', _ANY_SIZE)
       for s in ('tiny', 'small', 'base')},
    **{f'convnext-{s[0]}': ZooModel('mmpretrain::convnext/'
                                    f'convnext-{s}_32xb128_in1k.py')
       for s in ('tiny', 'small', 'base')},
    'resnet-50': ZooModel('mmpretrain::resnet/resnet50_8xb32_in1k.py'),
    'deit-s': ZooModel('mmpretrain::deit/deit-small_4xb256_in1k.py'),
}

#: timm's classifiers by name (built without weights when timm is
#: importable): the fastest public Swin-T and ConvNeXt-T, as baselines.
TIMM_MODELS: Dict[str, str] = {
    'timm-swin-t': 'swin_tiny_patch4_window7_224',
    'timm-convnext-t': 'convnext_tiny',
}

#: The Swin of each zoo classifier's size class (T/S/B); ResNet-50 and
#: DeiT-S compute about as much as Swin-T.
SWIN_REFERENCE: Dict[str, str] = {
    **{f'{family}-{size}': f'swin-{size}'
       for family in ('vmamba', 'vmamba2', 'swin', 'convnext')
       for size in 'tsb'},
    'resnet-50': 'swin-t',
    'deit-s': 'swin-t',
    **{name: 'swin-t' for name in TIMM_MODELS},
}

#: timm's Swin-T as the reference of every Swin-T-sized classifier.
TIMM_SWIN_REFERENCE: Dict[str, str] = {
    name: 'timm-swin-t'
    for name, swin in SWIN_REFERENCE.items() if swin == 'swin-t'
}


def timm_available() -> bool:
    """Whether timm can be imported (the GPU machines have it)."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True

#: (H, W) that the papers count FLOPs at, per OpenMMLab scope.
DEFAULT_SHAPES = {
    'mmpretrain': (224, 224),
    'mmdet': (800, 1280),
    'mmseg': (512, 2048),
}

#: Backbone options that make the last stage's output a feature map.
FEATURE_MAP_OPTIONS = {
    'ConvNeXt': dict(gap_before_final_norm=False),
    'VisionTransformer': dict(out_type='featmap'),
}


def load_config(name: str) -> Config:
    """A config from a :data:`MODEL_ZOO` key, a file, or ``pkg::path``."""
    if name in MODEL_ZOO:
        config, overrides = MODEL_ZOO[name]
        cfg = load_config(config)
        if overrides:
            cfg.merge_from_dict(dict(model=copy.deepcopy(overrides)))
        return cfg
    if '::' in name:
        from mmengine.hub import get_config
        return get_config(name)
    if not osp.isfile(name):
        raise FileNotFoundError(f'{name!r} is neither a config file nor one '
                                f'of {sorted(MODEL_ZOO)}')
    return Config.fromfile(name)


def scope_of(cfg: Config) -> Optional[str]:
    """The config's OpenMMLab scope (``'mmdet'``, ...), if it names one."""
    return cfg.get('default_scope')


def _drop_pretrained(module_cfg: dict) -> None:
    """Remove ``Pretrained`` init_cfgs (weights are loaded explicitly)."""
    for value in module_cfg.values():
        if isinstance(value, dict):
            _drop_pretrained(value)
    init = module_cfg.get('init_cfg')
    if isinstance(init, dict) and init.get('type') == 'Pretrained':
        module_cfg['init_cfg'] = None


@contextmanager
def quiet_logger(level: int = logging.WARNING) -> Iterator[None]:
    """Raise mmengine's current logger to ``level`` inside the block."""
    logger = MMLogger.get_current_instance()
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def build(module_cfg: dict, scope: Optional[str],
          init_weights: bool = False) -> nn.Module:
    """Build a model (or backbone) config in eval mode, on the CPU.

    ``Pretrained`` init_cfgs are dropped, SyncBN becomes BN (one process).

    Args:
        module_cfg (dict): The config of the module.
        scope (str, optional): The registry scope (``cfg.default_scope``).
        init_weights (bool): Run ``init_weights()`` (the config's
            initialisation, as a runner would). Defaults to False.
    """
    module_cfg = copy.deepcopy(dict(module_cfg))
    _drop_pretrained(module_cfg)
    if scope is None:
        model = MODELS.build(module_cfg)
    else:
        with DefaultScope.overwrite_default_scope(scope):
            model = MODELS.build(module_cfg)
    if init_weights and hasattr(model, 'init_weights'):
        with quiet_logger():  # init_weights logs every tensor
            model.init_weights()
    model = revert_sync_batchnorm(model)
    model.eval()  # some mmpretrain backbones' train() returns None
    return model


def build_classifier(name: str, size: int = 224) -> nn.Module:
    """A classifier, eval, on the CPU.

    Args:
        name (str): A :data:`MODEL_ZOO` or :data:`TIMM_MODELS` name, or a
            classifier config.
        size (int): Input size; only timm's Swin is built for it (its
            attention masks are fixed at construction). Defaults to 224.
    """
    if name in TIMM_MODELS:
        import timm
        options = dict(img_size=size) if 'swin' in TIMM_MODELS[name] else {}
        return timm.create_model(TIMM_MODELS[name], pretrained=False,
                                 **options).eval()
    cfg = load_config(name)
    return build(cfg.model, scope_of(cfg) or 'mmpretrain')


def model_label(name: str) -> str:
    """A short label: the zoo name, or the config file's stem."""
    if name in MODEL_ZOO or name in TIMM_MODELS:
        return name
    return osp.splitext(osp.basename(name))[0]


class TensorForward(nn.Module):
    """``model(inputs, data_samples, mode='tensor')`` as a one-input module.

    OpenMMLab models take data samples beside the image batch; the tracer
    and the timing loops want ``module(images)``.
    """

    def __init__(self, model: nn.Module, data_samples: Optional[List] = None):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor) -> Any:
        if self.data_samples is None:
            return self.model(inputs, mode='tensor')
        return self.model(inputs, self.data_samples, mode='tensor')


def dummy_data_samples(scope: Optional[str], batch: int,
                       shape: Tuple[int, int]) -> Optional[List]:
    """Data samples a ``mode='tensor'`` forward needs (mmdet's RPN does)."""
    if scope != 'mmdet':
        return None
    from mmdet.structures import DetDataSample
    meta = dict(img_shape=tuple(shape), ori_shape=tuple(shape),
                pad_shape=tuple(shape), batch_input_shape=tuple(shape),
                scale_factor=(1., 1.))
    return [DetDataSample(metainfo=meta) for _ in range(batch)]


def tensor_forward(model: nn.Module, scope: Optional[str], batch: int,
                   shape: Sequence[int]) -> nn.Module:
    """Wrap an OpenMMLab model so that ``module(images)`` runs it.

    A model without a ``data_preprocessor`` (a plain backbone) is returned
    as it is.
    """
    if not hasattr(model, 'data_preprocessor'):
        return model
    return TensorForward(model,
                         dummy_data_samples(scope, batch, tuple(shape)))


def last_stage_backbone(cfg: Union[Config, dict],
                        init_weights: bool = True) -> nn.Module:
    """The config's backbone, returning feature maps (last one is used).

    Options in :data:`FEATURE_MAP_OPTIONS` turn pooled or token outputs
    into maps (ConvNeXt's pooling, ViT's class token).
    """
    backbone = copy.deepcopy(dict(cfg['model']['backbone']))
    short_type = str(backbone['type']).split('.')[-1]
    backbone.update(FEATURE_MAP_OPTIONS.get(short_type, {}))
    return build(backbone, cfg.get('default_scope'), init_weights)


def load_backbone_weights(backbone: nn.Module, checkpoint: str) -> str:
    """Load a classifier's (or a bare backbone's) weights into ``backbone``.

    VMamba goes through :func:`mmvmamba.models.load_pretrained_backbone`
    (strict; converted or the authors' files); other backbones take the keys
    under ``backbone.`` (or all keys, if none has that prefix) non-strictly.
    The file is unpickled in full: name only files you trust.

    Returns:
        str: A line saying what was loaded.
    """
    ckpt = load_user_checkpoint(checkpoint)
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt,
                                                            dict) else ckpt
    prefix = 'backbone.' if any(
        str(k).startswith('backbone.') for k in state_dict) else None
    if isinstance(backbone, VMamba):
        load_pretrained_backbone(backbone, checkpoint, prefix)
        return f'{checkpoint}: all VMamba weights loaded'
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()
                      if k.startswith(prefix)}
    missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
    return (f'{checkpoint}: {len(state_dict) - len(unexpected)} tensors '
            f'loaded, {len(missing)} missing, {len(unexpected)} unexpected')
