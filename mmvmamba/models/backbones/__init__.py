from .vmamba import VMamba

__all__ = ['VMamba']
