"""Checks shared by the ops: of arguments (clear ``ValueError`` s, never a
crash), and whether autograd records a call."""
import numbers
from typing import Iterable, Optional, Sequence

import torch

HALF = (torch.float16, torch.bfloat16)
HALF_AND_FLOAT = (torch.float32, ) + HALF + (torch.float64, )
FLOAT = (torch.float32, torch.float64)


def is_int(value) -> bool:
    """Whether ``value`` is an integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def dtype_name(dtype: torch.dtype) -> str:
    """``'float32'`` for ``torch.float32``: a dtype as messages name it."""
    return str(dtype).replace('torch.', '')


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ', '.join(dtype_name(d) for d in dtypes)


def check_tensor(name: str,
                 value,
                 shape: Sequence[Optional[int]],
                 dtypes: Optional[Sequence[torch.dtype]] = None,
                 labels: Optional[str] = None) -> None:
    """Check that ``value`` is a tensor of the expected rank, sizes and dtype.

    Args:
        name (str): Argument name used in the error message.
        value: The argument.
        shape (Sequence[int | None]): Expected sizes; ``None`` matches any.
        dtypes (Sequence[torch.dtype], optional): Accepted dtypes.
        labels (str, optional): Names of the dimensions, e.g.
            ``'(batch, channels, L)'``, for the error message.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f'{name} must be a torch.Tensor, got '
                         f'{type(value).__name__}')
    expected = '(' + ', '.join('*' if s is None else str(s)
                               for s in shape) + ')'
    if labels:
        expected = f'{labels} = {expected}'
    if value.dim() != len(shape) or any(
            s is not None and s != v for s, v in zip(shape, value.shape)):
        raise ValueError(f'{name} must have shape {expected}, '
                         f'got {tuple(value.shape)}')
    if dtypes is not None and value.dtype not in dtypes:
        raise ValueError(f'{name} must have dtype in '
                         f'({_dtype_names(dtypes)}), got '
                         f'{dtype_name(value.dtype)}')


def check_bool(name: str, value, optional: bool = False) -> None:
    """Check that a flag is a bool (a string such as ``'no'`` is not), or
    None where ``optional``."""
    if optional and value is None:
        return
    if not isinstance(value, bool):
        kind = 'None or a bool' if optional else 'a bool'
        raise ValueError(f'{name} must be {kind}, got {value!r}')


def check_float_dtype(name: str, value) -> None:
    """Check that a dtype argument is None or a floating-point dtype (a
    string such as ``'float16'`` is not)."""
    if value is not None and not (isinstance(value, torch.dtype)
                                  and value.is_floating_point):
        raise ValueError(f'{name} must be None or a floating-point '
                         f'torch.dtype, got {value!r}')


def check_same_device(**tensors) -> None:
    """Check that all given (non-None) tensors lie on one device."""
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ', '.join(f'{n} on {d}' for n, d in devices.items())
        raise ValueError(f'all tensors must be on one device, got {listing}')


def autocast_dtype(x: torch.Tensor,
                   device_types: Sequence[str]) -> Optional[torch.dtype]:
    """Autocast's dtype for ``x``'s device where autocast is on there and
    the device is one of ``device_types`` (the kernels' own, which they
    read at call time), else None."""
    device_type = x.device.type
    if device_type in device_types and torch.is_autocast_enabled(
            device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autograd_records(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records an op on ``tensors`` here."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def forward_only_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Why a kernel without a backward must not run on ``tensors`` here
    (autograd records the call, or ``torch.compile`` traces it: the ATen
    ops run), or None."""
    if autograd_records(*tensors):
        return 'autograd records the call (the kernel has no backward)'
    if torch.compiler.is_compiling():
        return 'torch.compile traces the call (the ATen ops run)'
    return None
