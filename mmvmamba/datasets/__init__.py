"""Data helpers: the synthetic COCO / ADE20K generator of the demo."""
from .synthetic import (SYNTHETIC_ADE_CLASSES, SYNTHETIC_COCO_CLASSES,
                        generate)

__all__ = ['generate', 'SYNTHETIC_COCO_CLASSES', 'SYNTHETIC_ADE_CLASSES']
