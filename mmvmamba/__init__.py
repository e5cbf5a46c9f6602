"""mmvmamba: VMamba for OpenMMLab (mmpretrain, mmdet, mmseg).

``import mmvmamba`` (or ``custom_imports=dict(imports=['mmvmamba'])`` in a
config) registers the ``VMamba`` backbone in mmengine's root registry.
"""
from . import models, ops
from .version import __version__

__all__ = ['models', 'ops', '__version__']
