"""Training-loop helpers, registered in mmengine's root registries."""
from .hooks import MeanLossAcrossRanksHook, RandomStateHook
from .optim_constructor import (MergedGroupsOptimWrapperConstructor,
                                merge_param_groups)

__all__ = [
    'MeanLossAcrossRanksHook', 'RandomStateHook',
    'MergedGroupsOptimWrapperConstructor', 'merge_param_groups'
]
