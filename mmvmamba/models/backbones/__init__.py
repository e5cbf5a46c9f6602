from .vmamba import VMamba
from .vmamba2 import VMamba2

__all__ = ['VMamba', 'VMamba2']
