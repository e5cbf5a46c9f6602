"""Training-loop helpers, registered in mmengine's root registries."""
from .hooks import MeanLossAcrossRanksHook

__all__ = ['MeanLossAcrossRanksHook']
