"""Which selective scan runs: the one place that decides, and says so.

The backend setting of :func:`mmvmamba.ops.selective_scan` is one of
:data:`BACKENDS`:

- ``'auto'`` (default): the compiled kernel of the tensor's device when one
  was built and it covers the inputs, else the PyTorch reference;
- ``'reference'``: always the reference (and never the fused kernel);
- ``'kernel'``: the compiled kernel, or a ``RuntimeError`` saying why not.

``MMVMAMBA_SCAN_BACKEND`` sets it; the variable is read once, when this module
is imported. :func:`use_backend` overrides it within a block (the tests
switch backends through it). Float64 inputs always run on the reference.

:func:`kernel_unsupported_reason` and :func:`fused_unsupported_reason` say why
the compiled kernel, or the fused four-direction CUDA kernel, cannot run
given inputs. :class:`RecordScans` records which scans actually ran within a
block, and :func:`describe` names them for the benchmark tables.

For d_state N = 1 the fused kernel has a specialisation of its own
(``csrc/cuda/cross_scan_n1.cu``, the same op): ``MMVMAMBA_SCAN_N1`` chooses
it, read by the CUDA host code at every launch; :func:`use_n1_kernels` sets
it within a block.
"""
import contextlib
import os
import warnings
from typing import Iterable, Iterator, List, Optional

import torch
from torch.overrides import TorchFunctionMode

from . import _ext
from .checks import dtype_name

BACKENDS = ('auto', 'reference', 'kernel')
ENV_VARIABLE = 'MMVMAMBA_SCAN_BACKEND'
#: Input dtypes the selective-scan kernels are instantiated for.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Input dtypes of the fused four-direction kernel.
CROSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: What ran, in words: keys of :class:`RecordScans`.
LABELS = {
    'reference': 'selective-scan reference (PyTorch)',
    'cpu': 'compiled CPU kernel',
    'cuda': 'compiled CUDA kernel',
    'fused-cuda': 'fused four-direction CUDA kernel',
    'fused-cpu': 'fused four-direction CPU kernel',
}


def _checked(name: str, source: str) -> str:
    backend = name.strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f'{source} must be one of {BACKENDS}, got {name!r}')
    return backend


_backend = _checked(os.environ.get(ENV_VARIABLE, 'auto'), ENV_VARIABLE)
_warned = set()


def current_backend() -> str:
    """The backend setting now: one of :data:`BACKENDS`."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with the backend setting ``name``, then restore the
    previous one (blocks nest; the setting is process-wide, not per thread).

    Args:
        name (str): One of :data:`BACKENDS`.
    """
    global _backend
    previous, _backend = _backend, _checked(name, 'use_backend(name)')
    try:
        yield
    finally:
        _backend = previous


#: Environment variable of the fused kernel's N = 1 specialisation.
N1_ENV_VARIABLE = 'MMVMAMBA_SCAN_N1'
#: Its settings: ``'auto'`` (default; when batch x 4 x ceil(D / 32) warps
#: give every SM at least 8, else the generic kernel, which splits long
#: sequences into segments), ``'0'`` never, ``'1'`` whenever N = 1.
N1_MODES = ('auto', '0', '1')


@contextlib.contextmanager
def use_n1_kernels(mode) -> Iterator[None]:
    """Run the block with the fused kernel's N = 1 specialisation set to
    ``mode``, then restore the previous setting (process-wide: it sets the
    environment variable ``MMVMAMBA_SCAN_N1``, read at every launch).

    Args:
        mode (str | bool): One of :data:`N1_MODES`; ``True`` / ``False``
            mean ``'1'`` / ``'0'``.
    """
    if isinstance(mode, bool):
        mode = '1' if mode else '0'
    if mode not in N1_MODES:
        raise ValueError(f'use_n1_kernels(mode) must be a bool or one of '
                         f'{N1_MODES}, got {mode!r}')
    previous = os.environ.get(N1_ENV_VARIABLE)
    os.environ[N1_ENV_VARIABLE] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ[N1_ENV_VARIABLE]
        else:
            os.environ[N1_ENV_VARIABLE] = previous


def _case_unsupported_reason(u: torch.Tensor,
                             A: torch.Tensor) -> Optional[str]:
    """Why the built kernel does not cover these inputs, or None."""
    if u.dtype not in KERNEL_DTYPES:
        return f'dtype {dtype_name(u.dtype)}'
    d_state = A.shape[-1]
    if not 1 <= d_state <= _ext.LIMITS.max_d_state:
        return f'd_state N={d_state} outside 1..{_ext.LIMITS.max_d_state}'
    return None


def kernel_unsupported_reason(u: torch.Tensor,
                              A: torch.Tensor) -> Optional[str]:
    """Say why the compiled selective-scan kernel cannot run these inputs.

    Args:
        u (Tensor): The scan's input ``(batch, channels, L)``.
        A (Tensor): Its state matrix ``(channels, N)``.

    Returns:
        str | None: The reason, or None if the kernel can run them.
    """
    device = u.device.type
    if not _ext.has_kernel(device):
        return (f'there is no compiled selective-scan kernel for {device}: '
                f'{_ext.ext_status()[1]}')
    return _case_unsupported_reason(u, A)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def choose_scan_backend(u: torch.Tensor, A: torch.Tensor) -> str:
    """``'kernel'`` or ``'reference'``: what :func:`selective_scan` runs.

    Under ``'auto'`` a missing GPU kernel or a case the kernel does not
    cover warns once and falls back to the reference (a CPU without the
    extension falls back silently).

    Raises:
        RuntimeError: The setting is ``'kernel'`` and the kernel cannot run
            these inputs.
    """
    if _backend == 'reference' or u.dtype == torch.float64:
        return 'reference'
    device = u.device.type
    built = _ext.has_kernel(device)
    reason = kernel_unsupported_reason(u, A)
    if reason is None:
        return 'kernel'
    if _backend == 'kernel':
        raise RuntimeError(f'the scan backend is \'kernel\' ({ENV_VARIABLE} '
                           f'or use_backend), but {reason}')
    if not built and device != 'cpu':
        _warn_once(f'missing-{device}',
                   f'mmvmamba: {reason}; using the slow PyTorch reference.')
    elif built:
        _warn_once(f'unsupported-{reason}',
                   f'mmvmamba: the selective-scan kernel does not cover '
                   f'{reason}; using the PyTorch reference.')
    return 'reference'


def fused_unsupported_reason(x: torch.Tensor, length: int, d_state: int,
                             scan_dtype: torch.dtype,
                             dt_rank: int = 1) -> Optional[str]:
    """Say why the fused four-direction kernel (CUDA or CPU) cannot run
    SS2D's core.

    Args:
        x (Tensor): The map (its device decides).
        length (int): ``H * W``.
        d_state (int): State size N.
        scan_dtype (torch.dtype): Dtype of the scan's inputs.
        dt_rank (int): Rank R of the step sizes' projection. Defaults to 1.

    Returns:
        str | None: The reason, or None if the fused kernel can run it.
    """
    device = x.device.type
    if device not in ('cuda', 'cpu'):
        return f'x is on {device}, the fused kernel runs on CUDA and the CPU'
    if not _ext.has_cross_kernel(device):
        return (f'the fused {device.upper()} kernel was not built: ' +
                _ext.ext_status()[1])
    if _backend == 'reference':
        return 'the scan backend is \'reference\''
    if x.numel() == 0:
        return f'the map of shape {tuple(x.shape)} is empty'
    limits = _ext.LIMITS
    if d_state < 1:
        return f'd_state N={d_state} < 1'
    if dt_rank < 1:
        return f'dt_rank R={dt_rank} < 1'
    if d_state > limits.cross_max_d_state:
        return f'd_state N={d_state} > {limits.cross_max_d_state}'
    if scan_dtype not in CROSS_DTYPES:
        return f'scan dtype {dtype_name(scan_dtype)}'
    if length >= limits.cross_max_length:
        return f'H*W={length} >= {limits.cross_max_length}'
    return None


def _op_name(func) -> Optional[str]:
    """``'ns::name'`` of a ``torch.ops`` packet or overload, else None."""
    name = getattr(func, '_qualified_op_name', None)
    if name is None and hasattr(func, '_schema'):
        name = func._schema.name
    return name


class RecordScans(TorchFunctionMode):
    """Within the block, record which scans ran (keys of :data:`LABELS`).

    It sees the three places a scan runs: the PyTorch reference
    (:func:`mmvmamba.ops.selective_scan_reference`), the compiled op
    ``mmvmamba::selective_scan_fwd`` (by its tensors' device) and the fused
    ``mmvmamba::cross_scan_fwd``. Every torch call in the block passes
    through it, so record one step, not the timed ones::

        with RecordScans() as scans:
            model(x)
        describe(scans.ran)  # e.g. 'fused four-direction CUDA kernel'
    """

    def __init__(self):
        super().__init__()
        self.ran: List[str] = []

    def _add(self, key: str) -> None:
        if key not in self.ran:
            self.ran.append(key)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from .selective_scan import selective_scan_reference
        kwargs = kwargs or {}
        if func is selective_scan_reference:
            self._add('reference')
        else:
            name = _op_name(func)
            if name == 'mmvmamba::selective_scan_fwd':
                self._add(args[0].device.type)
            elif name == 'mmvmamba::cross_scan_fwd':
                self._add(f'fused-{args[0].device.type}')
        return func(*args, **kwargs)


def describe(ran: Iterable[str]) -> str:
    """Name what ran (keys of :data:`LABELS`), e.g. for a table; ``'none'``
    when no scan ran."""
    names = [LABELS.get(key, key) for key in ran]
    return ' + '.join(names) if names else 'none'
