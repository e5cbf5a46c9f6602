"""Selective-scan kernel timings at the stage shapes of VMamba-T and VMamba2-T.

For each stage of VMamba-T (4 directions x 2C channels, N = 16, L = H*W at
224 input): forward and forward+backward time of the compiled kernel and of
the PyTorch reference (median after warm-up, CUDA events on a GPU; '-' where
the reference ran out of memory), the bytes the kernel must move (each input
read once, each output written once, checkpoints included), the achieved
GB/s, and the kernel's time over two floors: bytes / copy bandwidth and
exponentials / exponential rate, both measured in the same run (the rate by
a Triton kernel of chained ``ex2``; without Triton it is derived from the
clock, 16 per clock per SM, and the table says so). The exponential floor
counts one exponential per element and state forward, two forward+backward
(one forward, one to recompute the states).
:func:`fused_rows` times SS2D's whole core (:func:`cross_selective_scan` on
a channels-last map: projection, four-direction scan, merge) on the fused
kernel against the unfused path (four copies of the map, the einsums, the
kernel above, the merge), with the same floors, at the stage shapes of
VMamba-T (d_inner = 2C, N = 16) or VMamba2-T (d_inner = C, N = 1); for N = 1
also with the fused kernel's N = 1 specialisation turned off
(``MMVMAMBA_SCAN_N1=0``: the generic fused kernel), in the same process.
Run it through ``benchmarks/benchmark.py scan``.
"""
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from timing import measure

from mmvmamba.ops import (NUM_DIRECTIONS, _ext, cross_selective_scan,
                          selective_scan_reference)
from mmvmamba.ops.backend import use_n1_kernels

# (C, L) of the stages at 224 x 224 (VMamba-T and VMamba2-T alike).
STAGES = ((96, 3136), (192, 784), (384, 196), (768, 49))
D_STATE = 16
EXPS_PER_CLOCK_PER_SM = 16
#: Exponentials per element and state in each pass: one forward, and one
#: more to recompute the states in the backward.
EXP_PASSES = {'fwd': 1, 'fwd+bwd': 2}


class CoreShape(NamedTuple):
    """SS2D core shapes of a model: ``d_inner = ssm_ratio * C``, N."""
    ssm_ratio: int
    d_state: int


#: Models whose SS2D core the fused table can time.
CORE_SHAPES = {
    'vmamba-t': CoreShape(ssm_ratio=2, d_state=16),
    'vmamba2-t': CoreShape(ssm_ratio=1, d_state=1),
}


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.randn(int(gib * 2**30) // 4, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, 3, 10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def _clock_exp_rate(device: torch.device) -> float:
    """Exponentials per second from the clock: 16 per clock per SM."""
    props = torch.cuda.get_device_properties(device)
    clock_hz = 1.98e9  # H100 / H200 SXM boost clock
    try:
        clock_hz = torch.cuda.clock_rate(device) * 1e6 or clock_hz
    except Exception:  # noqa: BLE001 -- pynvml missing: keep the boost clock
        pass
    return props.multi_processor_count * EXPS_PER_CLOCK_PER_SM * clock_hz


def exp_rate(device: torch.device,
             elements: int = 2**26,
             steps: int = 256) -> Tuple[Optional[float], Optional[str]]:
    """Exponentials per second of the GPU, measured.

    A Triton kernel applies ``steps`` dependent ``exp2`` (``ex2.approx``)
    to every element of a float32 tensor, so that the special-function
    units bound it; the rate is ``elements * steps`` over its median time.
    Without Triton the rate comes from the clock. Off the GPU there is no
    such unit, and no rate.

    Returns:
        tuple[float, str]: The rate and how it was obtained; ``(None,
        None)`` off the GPU.
    """
    if device.type != 'cuda':
        return None, None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return _clock_exp_rate(device), 'from the clock (no Triton)'

    @triton.jit
    def ex2_chain(x_ptr, n, STEPS: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask, other=0.)
        for _ in tl.static_range(STEPS):
            x = tl.exp2(x) * -0.5  # stays in [-0.5, -0.35]
        tl.store(x_ptr + offsets, x, mask=mask)

    x = torch.rand(elements, device=device) * -0.5
    block = 1024
    grid = (triton.cdiv(elements, block), )
    ms = measure(lambda: ex2_chain[grid](x, elements, steps, block), device,
                 2, 10)
    return elements * steps / (ms * 1e-3), f'ex2 kernel, {steps} per element'


def _inputs(batch, C, L, dtype, device, requires_grad):
    channels = NUM_DIRECTIONS * 2 * C
    g = torch.Generator(device='cpu').manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    args = dict(u=rand(batch, channels, L).to(dtype),
                delta=(rand(batch, channels, L, scale=0.5) - 3).to(dtype),
                A=-torch.exp(rand(channels, D_STATE, scale=0.5)),
                B=rand(batch, NUM_DIRECTIONS, D_STATE, L).to(dtype),
                C=rand(batch, NUM_DIRECTIONS, D_STATE, L).to(dtype),
                D=rand(channels), delta_bias=rand(channels, scale=0.3))
    return {k: v.requires_grad_(requires_grad) for k, v in args.items()}


def scan_bytes(batch, C, L, dtype) -> Dict[str, int]:
    """Bytes the kernel must move, forward and backward."""
    size = torch.empty(0, dtype=dtype).element_size()
    channels = NUM_DIRECTIONS * 2 * C
    row = batch * channels * L * size
    bc = batch * NUM_DIRECTIONS * D_STATE * L * size
    checkpoints = batch * channels * -(-L // _ext.LIMITS.chunk) * D_STATE * 4
    forward = 3 * row + 2 * bc + checkpoints  # u, delta, B, C in; y out
    backward = 5 * row + 4 * bc + checkpoints  # + dy in; du, ddelta, dB, dC out
    return {'fwd': forward, 'fwd+bwd': forward + backward}


def _against_floors(ms: float, moved: int, bandwidth: float, exps: int,
                    exps_per_s: Optional[float]) -> Dict:
    """Bytes moved, GB/s and the time over the bandwidth floor (bytes /
    copy bandwidth) and the exponential floor (exps / rate; ``None``
    without a rate)."""
    return dict(
        bytes=moved,
        gb_per_s=moved / ms / 1e6,
        over_bandwidth_floor=ms / (moved / bandwidth * 1e3),
        over_exp_floor=ms / (exps / exps_per_s * 1e3) if exps_per_s else None)


def _run(fn, args, backward):
    y = fn(**args, delta_softplus=True)
    if backward:
        torch.autograd.grad(y, list(args.values()), torch.ones_like(y))


def kernel_rows(device='cuda', batch: int = 128, dtype=torch.float32,
                warmup: int = 3, repeat: int = 20,
                reference: bool = True) -> List[Dict]:
    """Time the kernel (and the reference) at VMamba-T's stage shapes.

    Returns one dict per (stage, pass) with the times in ms (``None`` when
    the reference ran out of memory or was skipped), bytes, GB/s and the
    ratios to the bandwidth and exponential floors.
    """
    device = torch.device(device)
    if not _ext.has_kernel(device.type):
        raise RuntimeError(f'no compiled kernel for {device.type}: '
                           f'{_ext.ext_status()[1]}')
    bandwidth = copy_bandwidth(device)
    exps_per_s, exp_source = exp_rate(device)
    rows = []
    for C, L in STAGES:
        exps = batch * NUM_DIRECTIONS * 2 * C * L * D_STATE
        moved = scan_bytes(batch, C, L, dtype)
        for name, backward in (('fwd', False), ('fwd+bwd', True)):
            args = _inputs(batch, C, L, dtype, device, backward)
            kernel_ms = measure(
                lambda: _run(_ext.selective_scan_kernel, args, backward),
                device, warmup, repeat)
            reference_ms = None
            if reference:
                try:
                    reference_ms = measure(
                        lambda: _run(selective_scan_reference, args, backward),
                        device, 1, 3)
                except torch.OutOfMemoryError:
                    pass
            if device.type == 'cuda':
                torch.cuda.empty_cache()
            rows.append(
                dict(stage=f'C={C} L={L}', pass_=name, kernel_ms=kernel_ms,
                     reference_ms=reference_ms,
                     **_against_floors(kernel_ms, moved[name], bandwidth,
                                       EXP_PASSES[name] * exps, exps_per_s)))
    rows.append(dict(copy_gb_per_s=bandwidth / 1e9, exps_per_s=exps_per_s,
                     exp_source=exp_source))
    return rows


def _ss2d_inputs(batch, C, L, core, dtype, device, requires_grad):
    """A channels-last map and SS2D parameters of stage width C."""
    d_inner, rank, d_state = core.ssm_ratio * C, -(-C // 16), core.d_state
    side = int(round(L**0.5))
    g = torch.Generator(device='cpu').manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    k = NUM_DIRECTIONS
    args = dict(
        x=rand(batch, side, side, d_inner).to(dtype),
        x_proj_weight=rand(k, rank + 2 * d_state, d_inner,
                           scale=d_inner**-0.5),
        dt_projs_weight=rand(k, d_inner, rank, scale=rank**-0.5),
        dt_projs_bias=rand(k, d_inner, scale=0.5, shift=-4),
        A_logs=rand(k * d_inner, d_state, scale=0.5),
        Ds=rand(k * d_inner))
    return {k: v.requires_grad_(requires_grad) for k, v in args.items()}


def fused_bytes(batch, C, L, scan_dtype,
                core: CoreShape = CORE_SHAPES['vmamba-t'],
                checkpoints: bool = True) -> Dict[str, int]:
    """Bytes SS2D's core must move at least, forward and backward: the map
    and its projections read once, the float32 output written once (and
    their gradients), the checkpoints (the CUDA kernels'; the CPU backward
    recomputes the states instead)."""
    size = torch.empty(0, dtype=scan_dtype).element_size()
    d_inner, rank, d_state = core.ssm_ratio * C, -(-C // 16), core.d_state
    plane = batch * L * d_inner
    x_dbl = batch * L * NUM_DIRECTIONS * (rank + 2 * d_state) * size
    kept = (batch * NUM_DIRECTIONS * d_inner * -(-L // _ext.LIMITS.chunk) *
            d_state * 4) if checkpoints else 0
    forward = plane * size + plane * 4 + x_dbl + kept
    backward = forward + plane * 4 + plane * size + x_dbl
    return {'fwd': forward, 'fwd+bwd': forward + backward}


def fused_rows(device='cuda', batch: int = 128, warmup: int = 3,
               repeat: int = 20,
               scan_dtypes=(torch.float32, torch.bfloat16),
               model: str = 'vmamba-t') -> List[Dict]:
    """Time SS2D's core, fused against unfused, at a model's stages.

    ``model`` is a key of :data:`CORE_SHAPES` (VMamba-T: d_inner = 2C,
    N = 16; VMamba2-T: d_inner = C, N = 1).

    Returns one dict per (stage, scan dtype, pass): ``fused_ms``,
    ``generic_ms`` (N = 1 only: the fused path with its N = 1 kernels off;
    else ``None``), ``unfused_ms`` (the four-copy path on the plain kernel;
    ``None`` if it ran out of memory), bytes, GB/s and the fused path's
    ratios to the
    bandwidth and exponential floors; the last dict holds the measured copy
    bandwidth and exponential rate.
    """
    device = torch.device(device)
    if not _ext.has_cross_kernel(device.type):
        raise RuntimeError(f'no fused kernel for {device.type}: '
                           f'{_ext.ext_status()[1]}')
    core = CORE_SHAPES[model]
    bandwidth = copy_bandwidth(device)
    exps_per_s, exp_source = exp_rate(device)
    rows = []
    for C, L in STAGES:
        exps = batch * NUM_DIRECTIONS * core.ssm_ratio * C * L * core.d_state
        for scan_dtype in scan_dtypes:
            moved = fused_bytes(batch, C, L, scan_dtype, core,
                                checkpoints=device.type == 'cuda')
            for name, backward in (('fwd', False), ('fwd+bwd', True)):
                args = _ss2d_inputs(batch, C, L, core, torch.float32, device,
                                    backward)
                times = {}
                # 'generic': the fused path with the N = 1 kernels off (the
                # CPU has none).
                variants = ['fused', 'unfused'] + (
                    ['generic'] if core.d_state == 1 and device.type == 'cuda'
                    else [])
                for variant in variants:

                    def step():
                        y = cross_selective_scan(
                            **args, channels_last=True,
                            scan_dtype=scan_dtype,
                            fused=variant != 'unfused')
                        if backward:
                            torch.autograd.grad(y, list(args.values()),
                                                torch.ones_like(y))

                    try:
                        with use_n1_kernels(
                                False if variant == 'generic' else 'auto'):
                            times[variant] = measure(step, device, warmup,
                                                     repeat)
                    except torch.OutOfMemoryError:
                        times[variant] = None
                    torch.cuda.empty_cache()
                rows.append(
                    dict(stage=f'C={C} L={L}', pass_=name,
                         scan_dtype=str(scan_dtype).replace('torch.', ''),
                         fused_ms=times['fused'],
                         generic_ms=times.get('generic'),
                         unfused_ms=times['unfused'],
                         **_against_floors(times['fused'], moved[name],
                                           bandwidth, EXP_PASSES[name] * exps,
                                           exps_per_s)))
    rows.append(dict(copy_gb_per_s=bandwidth / 1e9, exps_per_s=exps_per_s,
                     exp_source=exp_source))
    return rows


FUSED_HEADER = [
    'stage', 'scan dtype', 'pass', 'fused ms', 'N=1 off ms', 'unfused ms',
    'unfused / fused', 'GB moved', 'GB/s', 'x bw floor', 'x exp floor'
]


def format_fused_rows(rows: List[Dict]) -> List[List[str]]:
    """Rows of strings for the fused table (last dict is metadata)."""

    def fmt(v, spec):
        return '-' if v is None else format(v, spec)

    return [[
        r['stage'], r['scan_dtype'], r['pass_'], fmt(r['fused_ms'], '.3f'),
        fmt(r.get('generic_ms'), '.3f'), fmt(r['unfused_ms'], '.3f'),
        fmt(r['unfused_ms'] / r['fused_ms'] if r['unfused_ms'] else None,
            '.2f'), f'{r["bytes"] / 1e9:.3f}', f'{r["gb_per_s"]:.0f}',
        f'{r["over_bandwidth_floor"]:.2f}', fmt(r['over_exp_floor'], '.2f')
    ] for r in rows[:-1]]


def format_rows(rows: List[Dict]) -> List[List[str]]:
    """Rows of strings for a table (the last dict of ``rows`` is metadata)."""

    def fmt(v, spec):
        return '-' if v is None else format(v, spec)

    return [[
        r['stage'], r['pass_'], fmt(r['kernel_ms'], '.3f'),
        fmt(r['reference_ms'], '.2f'), f'{r["bytes"] / 1e9:.3f}',
        f'{r["gb_per_s"]:.0f}', f'{r["over_bandwidth_floor"]:.2f}',
        fmt(r['over_exp_floor'], '.2f')
    ] for r in rows[:-1]]


HEADER = [
    'stage', 'pass', 'kernel ms', 'reference ms', 'GB moved', 'GB/s',
    'x bw floor', 'x exp floor'
]
