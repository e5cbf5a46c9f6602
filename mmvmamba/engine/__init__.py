"""Training-loop helpers, registered in mmengine's root registries."""
from .hooks import MeanLossAcrossRanksHook, RandomStateHook

__all__ = ['MeanLossAcrossRanksHook', 'RandomStateHook']
