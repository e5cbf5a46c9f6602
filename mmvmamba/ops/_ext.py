"""Loader of the compiled selective-scan kernels (``mmvmamba._C``).

Importing this module tries to load the extension once and never raises: when
it is missing or was built for another torch, :func:`ext_status` says why and
how to rebuild. When it loads, its ops
``torch.ops.mmvmamba.selective_scan_fwd`` and ``selective_scan_bwd`` (and
the fused four-direction ``cross_scan_fwd`` / ``_bwd``) get fake (meta)
kernels and autograd here, so that :func:`selective_scan_kernel` and
:func:`cross_scan_kernel` are differentiable, work under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``. The
kernels' limits are the library's own constants (:data:`LIMITS`, from
``csrc/scan.h``); which kernel runs for which inputs is
:mod:`mmvmamba.ops.backend`'s decision.
"""
import glob
import os
import re
import shutil
import sysconfig
from typing import NamedTuple, Optional, Tuple

import torch

REBUILD_HINT = ('rebuild it with `pip install --no-deps --no-build-isolation '
                '-e .` in the mmvmamba source tree')


class KernelLimits(NamedTuple):
    """What the compiled kernels cover: ``mmvmamba._C``'s constants."""
    max_d_state: int  #: largest state size N of the selective-scan kernels
    chunk: int  #: steps between the state checkpoints of the CUDA forward
    directions: int  #: scan orders of the fused kernel
    cross_max_d_state: int  #: largest N of the fused kernel
    cross_max_length: int  #: exclusive bound on H*W of the fused kernel


_FWD = 'mmvmamba::selective_scan_fwd'
_BWD = 'mmvmamba::selective_scan_bwd'
_CROSS_FWD = 'mmvmamba::cross_scan_fwd'


def _library_files() -> list:
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return sorted(glob.glob(os.path.join(package_dir, '_C.*.so')) +
                  glob.glob(os.path.join(package_dir, '_C.*.pyd')))


def _built_torch_version(path: str) -> Optional[str]:
    """Read the torch version recorded in a library file (csrc/ops.cpp)."""
    try:
        with open(path, 'rb') as f:
            found = re.search(
                rb'mmvmamba-built-with-torch=([0-9A-Za-z.+_-]*);', f.read())
    except OSError:
        return None
    return found.group(1).decode() if found else None


def _torch_release(version: str) -> str:
    return version.split('+')[0]


def _explain_load_failure(error: BaseException) -> str:
    files = _library_files()
    if not files:
        return ('mmvmamba._C is not built (installed with '
                'MMVMAMBA_BUILD_EXT=0, without a C++ compiler, or not '
                'installed with pip); build it with `pip install --no-deps '
                '--no-build-isolation -e .` (MMVMAMBA_BUILD_EXT=1, the '
                'default, with torch installed)')
    running = _torch_release(torch.__version__)
    built = _built_torch_version(files[0])
    if built is not None and built != running:
        return (f'{os.path.basename(files[0])} was built against torch '
                f'{built} but torch {running} is installed; {REBUILD_HINT}')
    if 'undefined symbol' in str(error):
        return (f'{os.path.basename(files[0])} does not match the installed '
                f'torch {torch.__version__} ({error}); {REBUILD_HINT}')
    return f'mmvmamba._C failed to load ({error}); {REBUILD_HINT}'


def _load() -> Tuple[Optional[KernelLimits], str]:
    """The library's limits (None if it is unusable), and why."""
    try:
        from mmvmamba import _C
    except Exception as error:  # noqa: BLE001 -- any failure means no kernel
        return None, _explain_load_failure(error)
    missing = [k for k in KernelLimits._fields if not hasattr(_C, k)]
    if missing:
        return None, (f'mmvmamba._C was built from older sources (it lacks '
                      f'{", ".join(missing)}); {REBUILD_HINT}')
    built = getattr(_C, '__torch_version__', '?')
    parts = 'CPU and CUDA' if getattr(_C, 'with_cuda', 0) else 'CPU'
    return KernelLimits(*(int(getattr(_C, k)) for k in KernelLimits._fields)
                        ), (f'mmvmamba._C loaded ({parts} kernels, built '
                            f'against torch {built})')


def _register() -> None:
    """Fake kernels and autograd of the compiled ops."""

    @torch.library.register_fake(_FWD)
    def _fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus):
        batch, channels, length = u.shape
        if u.device.type == 'cuda':
            chunks = -(-length // LIMITS.chunk)
            checkpoints = u.new_empty((batch, channels, chunks, A.shape[1]),
                                      dtype=torch.float32)
        else:
            checkpoints = u.new_empty((0, ), dtype=torch.float32)
        return u.new_empty(u.shape), checkpoints

    @torch.library.register_fake(_BWD)
    def _bwd_fake(grad_out, u, delta, A, B, C, D, delta_bias, delta_softplus,
                  checkpoints):
        channels = u.shape[1]
        return (u.new_empty(u.shape), u.new_empty(u.shape),
                A.new_empty(A.shape, dtype=torch.float32),
                B.new_empty(B.shape), C.new_empty(C.shape),
                u.new_empty((channels, ), dtype=torch.float32),
                u.new_empty((channels, ), dtype=torch.float32))

    def _setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
        ctx.delta_softplus = delta_softplus

    def _backward(ctx, grad_out, grad_checkpoints):
        u, delta, A, B, C, D, delta_bias, checkpoints = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias = torch.ops.mmvmamba.\
            selective_scan_bwd(grad_out, u, delta, A, B, C, D, delta_bias,
                               ctx.delta_softplus, checkpoints)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None,
                ddelta_bias if delta_bias is not None else None, None)

    torch.library.register_autograd(_FWD, _backward,
                                    setup_context=_setup_context)
    _register_cross()


def _register_cross() -> None:
    """Fake kernels and autograd of the fused four-direction op."""

    @torch.library.register_fake(_CROSS_FWD)
    def _fwd_fake(u, x_dbl, dt_weight, dt_bias, A, D, height, width):
        batch, length, _ = u.shape
        chunks = -(-length // LIMITS.chunk)
        # A is (directions * D, N): a state per direction and channel; the
        # CPU backward recomputes, so its forward keeps no checkpoints
        shape = ((batch, A.shape[0], chunks, A.shape[1])
                 if u.device.type == 'cuda' else (0, ))
        return (u.new_empty(u.shape, dtype=torch.float32),
                u.new_empty(shape, dtype=torch.float32))

    @torch.library.register_fake('mmvmamba::cross_scan_bwd')
    def _bwd_fake(grad_out, u, x_dbl, dt_weight, dt_bias, A, D, height, width,
                  checkpoints):
        return (u.new_empty(u.shape), x_dbl.new_empty(x_dbl.shape),
                dt_weight.new_empty(dt_weight.shape),
                dt_bias.new_empty(dt_bias.shape), A.new_empty(A.shape),
                D.new_empty(D.shape))

    def _setup_context(ctx, inputs, output):
        u, x_dbl, dt_weight, dt_bias, A, D, height, width = inputs
        ctx.save_for_backward(u, x_dbl, dt_weight, dt_bias, A, D, output[1])
        ctx.size = (height, width)

    def _backward(ctx, grad_out, grad_checkpoints):
        u, x_dbl, dt_weight, dt_bias, A, D, checkpoints = ctx.saved_tensors
        grads = torch.ops.mmvmamba.cross_scan_bwd(grad_out, u, x_dbl,
                                                  dt_weight, dt_bias, A, D,
                                                  *ctx.size, checkpoints)
        return (*grads, None, None)

    torch.library.register_autograd(_CROSS_FWD, _backward,
                                    setup_context=_setup_context)


#: The compiled kernels' limits; None when ``mmvmamba._C`` is unusable.
LIMITS, _STATUS = _load()
_LOADED = LIMITS is not None
if _LOADED:
    try:
        _register()
    except Exception as error:  # noqa: BLE001 -- report, never raise here
        LIMITS, _LOADED = None, False
        _STATUS = (f'mmvmamba._C loaded but its ops could not be registered '
                   f'with this torch ({error})')


def ext_status() -> Tuple[bool, str]:
    """Return whether ``mmvmamba._C`` is usable, and a sentence saying why."""
    return _LOADED, _STATUS


# Set to 1 to run the tests or the demo without mmvmamba._C although a C++
# compiler is there (see :func:`missing_extension_error`).
ALLOW_NO_EXT = 'MMVMAMBA_ALLOW_NO_EXT'


def find_cxx_compiler() -> Optional[str]:
    """The C++ compiler an install would build with (``$CXX``, else
    Python's), if it is on ``PATH`` (as setup.py decides)."""
    cxx = os.environ.get('CXX') or sysconfig.get_config_var('CXX') or 'c++'
    return shutil.which(cxx.split()[0])


def missing_extension_error() -> Optional[str]:
    """Say why it is an error that ``mmvmamba._C`` did not load, or ``None``.

    It is one when a C++ compiler is there (so the install should have built
    the extension, and its absence means a failed or skipped build that would
    leave the slow PyTorch reference running and the kernel tests skipped),
    unless ``MMVMAMBA_ALLOW_NO_EXT=1`` or ``MMVMAMBA_BUILD_EXT=0`` says that
    pure Python is wanted.
    """
    if _LOADED:
        return None
    for name, value in ((ALLOW_NO_EXT, '1'), ('MMVMAMBA_BUILD_EXT', '0')):
        if os.environ.get(name, '').strip() == value:
            return None
    compiler = find_cxx_compiler()
    if compiler is None:
        return None
    return (f'a C++ compiler is there ({compiler}) but {_STATUS}. See what '
            'the build says with `pip install -v --no-deps '
            '--no-build-isolation -e .`; to go on without the compiled '
            f'kernels, set {ALLOW_NO_EXT}=1.')


def check_extension(tag: str) -> Optional[str]:
    """Print the extension's status as ``[tag] ...``; return the message to
    stop with (see :func:`missing_extension_error`), or ``None``.

    The shell tools call it as ``python -c 'import sys; from
    mmvmamba.ops._ext import check_extension;
    sys.exit(check_extension("TAG"))'``.
    """
    print(f'[{tag}] {_STATUS}', flush=True)
    error = missing_extension_error()
    return None if error is None else f'[{tag}] stopping: {error}'


def has_kernel(device_type: str) -> bool:
    """Whether the compiled kernel exists for ``device_type`` ('cpu',
    'cuda')."""
    return _BUILT.get(device_type, False)


def _kernels_built() -> dict:
    """Which compiled kernels exist, looked up once (plain booleans keep
    the front doors traceable by ``torch.compile``)."""

    def has(op: str, key: str) -> bool:
        return _LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
            op, key)

    return {
        'cpu': has(_FWD, 'CPU'),
        'cuda': has(_FWD, 'CUDA'),
        'cross-cuda': has(_CROSS_FWD, 'CUDA'),
        'cross-cpu': has(_CROSS_FWD, 'CPU'),
    }


_BUILT = _kernels_built()


def has_cross_kernel(device_type: str = 'cuda') -> bool:
    """Whether the fused four-direction kernel was built for ``device_type``
    ('cuda' or 'cpu')."""
    return _BUILT.get(f'cross-{device_type}', False)


def selective_scan_kernel(u: torch.Tensor,
                          delta: torch.Tensor,
                          A: torch.Tensor,
                          B: torch.Tensor,
                          C: torch.Tensor,
                          D: Optional[torch.Tensor] = None,
                          delta_bias: Optional[torch.Tensor] = None,
                          delta_softplus: bool = False) -> torch.Tensor:
    """Selective scan on the compiled kernel (arguments as ``selective_scan``).

    ``A``, ``D`` and ``delta_bias`` are cast to float32 (their gradients come
    back in their own dtype). Raises ``RuntimeError`` if the kernel is not
    loaded and, from the op, on invalid arguments.
    """
    if not _LOADED:
        raise RuntimeError(f'no compiled selective-scan kernel: {_STATUS}')

    def f32(t):
        return t if t is None or t.dtype == torch.float32 else t.float()

    out, _ = torch.ops.mmvmamba.selective_scan_fwd(u, delta, f32(A), B, C,
                                                   f32(D), f32(delta_bias),
                                                   bool(delta_softplus))
    return out


def cross_scan_kernel(u: torch.Tensor, x_dbl: torch.Tensor,
                      dt_weight: torch.Tensor, dt_bias: torch.Tensor,
                      A: torch.Tensor, D: torch.Tensor, height: int,
                      width: int) -> torch.Tensor:
    """SS2D's four-direction scan on the fused kernel (CUDA or CPU).

    Args:
        u (Tensor): Channels-last map ``(batch, H*W, D)``, float32,
            float16 or bfloat16.
        x_dbl (Tensor): ``(batch, H*W, 4, R + 2N)`` of ``u``'s dtype: per
            position and scan order, the low-rank step size, B and C.
        dt_weight (Tensor): Float32 ``(4, D, R)``.
        dt_bias (Tensor): Float32 ``(4, D)``, added before the softplus.
        A (Tensor): Float32 ``(4*D, N)``.
        D (Tensor): Float32 ``(4*D,)``.
        height (int): H.
        width (int): W.

    Returns:
        Tensor: The four outputs summed at their positions, float32
        ``(batch, H*W, D)``.
    """
    if not has_cross_kernel(u.device.type):
        raise RuntimeError(f'no fused {u.device.type} cross-scan kernel: '
                           f'{_STATUS}')
    out, _ = torch.ops.mmvmamba.cross_scan_fwd(u, x_dbl, dt_weight, dt_bias,
                                               A, D, int(height), int(width))
    return out
