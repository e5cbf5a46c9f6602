"""Data helpers: the synthetic COCO / ADE20K generator of the demo.

The names below are imported from :mod:`.synthetic` on first use, not here,
so that ``python -m mmvmamba.datasets.synthetic`` runs that module once (as
``__main__``) rather than after the package imported it (runpy's "found in
sys.modules" warning).
"""
__all__ = ['generate', 'SYNTHETIC_COCO_CLASSES', 'SYNTHETIC_ADE_CLASSES']


def __getattr__(name: str):
    if name in __all__:
        from . import synthetic
        return getattr(synthetic, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
