"""Models of mmvmamba, registered in mmengine's root MODELS registry."""
from .backbones import VMamba, VMamba2
from .checkpoint import convert_authors_state_dict, load_pretrained_backbone

__all__ = [
    'VMamba', 'VMamba2', 'convert_authors_state_dict',
    'load_pretrained_backbone'
]
