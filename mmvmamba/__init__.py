"""mmvmamba: VMamba for OpenMMLab (mmpretrain, mmdet, mmseg).

``import mmvmamba`` (or ``custom_imports=dict(imports=['mmvmamba'])`` in a
config) registers the ``VMamba`` and ``VMamba2`` backbones in mmengine's root
registry, the ``MeanLossAcrossRanksHook`` and ``RandomStateHook``
(:mod:`mmvmamba.engine`) in its root ``HOOKS``, and the
``MergedGroupsOptimWrapperConstructor`` in its root
``OPTIM_WRAPPER_CONSTRUCTORS``.
"""
from . import engine, models, ops
from .version import __version__

__all__ = ['engine', 'models', 'ops', '__version__']
