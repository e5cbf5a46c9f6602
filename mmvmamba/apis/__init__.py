"""Runner helpers shared by ``tools/train.py`` and ``tools/test.py``."""
from .runner import (InputNotFoundError, add_common_args, build_runner,
                     check_checkpoint, check_data, enable_amp,
                     enable_show_dir, enable_tta, load_config, set_local_rank,
                     set_resume, trusted_checkpoint_loading)

__all__ = [
    'InputNotFoundError', 'add_common_args', 'build_runner',
    'check_checkpoint', 'check_data', 'enable_amp', 'enable_show_dir',
    'enable_tta', 'load_config', 'set_local_rank', 'set_resume',
    'trusted_checkpoint_loading'
]
