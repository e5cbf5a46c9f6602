"""A/B check of two builds of the CUDA scan kernels (GPU only).

Two builds register the same torch ops, so each runs in its own process:

    # in each tree (PYTHONPATH=<tree>): outputs and gradients to a file
    python tools/scan_ab.py save OUT.pt
    # in any process: compare runs, first the reference
    python tools/scan_ab.py compare MAIN.pt MAIN_AGAIN.pt NEW.pt ...
    # kernel times (median ms, CUDA events) of the raw ops
    python tools/scan_ab.py time [--batch 128] [--repeat 20] [--dtype bfloat16] [--fused-only]
    # one fused forward + backward per stage, to profile (ncu)
    python tools/scan_ab.py profile [--batch 128] [--size 224] [--stages 0 2] [--dtype bfloat16]
    # the ops where sequences are split into segments: time by kernel kind
    python tools/scan_ab.py segments [--repeat 15] [--segment-chunks 0 64]
    # the fused op at a stage's shape with other ranks R: times, and the
    # kernels the launch code chose (decays kept, step sizes on tensor cores)
    python tools/scan_ab.py ranks [--stage 2] [--ranks 24 16 12 8] [--batch 128] [--dtype bfloat16]

``save`` runs the raw ops (``torch.ops.mmvmamba.*``: forward, then backward
of a fixed output gradient) on seeded inputs at VMamba-T's four stage shapes
(224 input): the fused four-direction scan (float32 and bfloat16 inputs) and
the plain scan on the four directions' rows (float32, float16). Batch 2 takes
the segmented paths where the sequence is long (stages 0 and 1) and one
segment at stages 2 and 3 (four chunks or fewer).

``compare`` measures each later file against the first, per tensor, by the
largest difference over the reference's largest magnitude. The second file
should be a second run of the reference build: float atomics make the last
bits vary between runs, and its differences are the spread the others are
held to: at most twice it (equal where it is exactly zero), and for outputs
rounded to bfloat16 / float16 after float32 atomics (where one flipped
rounding moves an element by an ulp) at most one ulp of the largest
magnitude. It exits 1 when a file is outside that.

``segments`` times the ops at shapes whose sequences are split into segments
(:data:`SEGMENTED`: VMamba-T at 1024 x 1024, batch 6, and Mask R-CNN's maps
at 800 x 1344, batch 2; the plain scan at batch 2) and splits each op's GPU
time (``torch.profiler``) into the full passes, the segment summaries and
the carries between them; ``--segment-chunks`` repeats the table with
``MMVMAMBA_SCAN_SEGMENT_CHUNKS`` set to each value (0: one segment).

``ranks`` times the fused op at one stage's map and width with dt_rank R set
to each of ``--ranks`` (VMamba-T's own: ceil(C / 16)), and names the kernels
that ran: the rank sets the block's shared memory, hence the blocks
per SM, whether the backward keeps its decays and whether the forward
computes its step sizes on the tensor cores (``keep_decays`` and
``tensor_step_sizes`` in ``csrc/cuda/scan_launch.cuh``).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'benchmarks'))
from timing import (check_lower_bounds, measure,  # noqa: E402
                    scan_kernel_kind)

# (C, H = W) of VMamba-T's stages at 224: d_inner = 2C, rank = ceil(C / 16).
STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))
# (label, batch, C, H, W) of the fused scan where sequences are split:
# VMamba-T's stages 0-1 at 1024 x 1024, Mask R-CNN's stages 0-2.
SEGMENTED = (('1024 stage 0', 6, 96, 256, 256),
             ('1024 stage 1', 6, 192, 128, 128),
             ('mask-rcnn stage 0', 2, 96, 200, 336),
             ('mask-rcnn stage 1', 2, 192, 100, 168),
             ('mask-rcnn stage 2', 2, 384, 50, 84))
# (batch, C, side) of the plain scan where sequences are split.
SEGMENTED_PLAIN = ((2, 96, 128), (2, 192, 64))
D_STATE = 16
DIRECTIONS = 4


def vmamba_rank(C):
    """VMamba's dt_rank at width C (``dt_rank='auto'``)."""
    from mmvmamba.models.backbones.common import auto_dt_rank
    return auto_dt_rank(C)


def _randn(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g, device=g.device) * scale + shift


def cross_inputs(batch, C, side, dtype, seed, width=None, rank=None):
    """Inputs of cross_scan_fwd / _bwd at a stage (a side x side map, or
    side x width; dt_rank ``rank``, by default VMamba's ceil(C / 16)), drawn
    on the GPU."""
    g = torch.Generator(device='cuda').manual_seed(seed)
    width = side if width is None else width
    rank = vmamba_rank(C) if rank is None else rank
    d_inner, length = 2 * C, side * width
    x_dbl = torch.cat([
        _randn(g, batch, length, DIRECTIONS, rank),
        _randn(g, batch, length, DIRECTIONS, 2 * D_STATE)
    ], -1)
    a_log = torch.log(torch.arange(1, D_STATE + 1, device='cuda'))
    args = dict(
        u=_randn(g, batch, length, d_inner).to(dtype),
        x_dbl=x_dbl.to(dtype),
        dt_weight=_randn(g, DIRECTIONS, d_inner, rank, scale=rank**-0.5),
        dt_bias=_randn(g, DIRECTIONS, d_inner, scale=0.5, shift=-4.0),
        A=-torch.exp(a_log + _randn(g, DIRECTIONS * d_inner, D_STATE,
                                    scale=0.1)),
        D=_randn(g, DIRECTIONS * d_inner))
    grad = _randn(g, batch, length, d_inner)
    return args, grad, (side, width)


def plain_inputs(batch, C, side, dtype, seed):
    """Inputs of selective_scan_fwd / _bwd on the four directions' rows,
    drawn on the GPU."""
    g = torch.Generator(device='cuda').manual_seed(seed)
    channels, length = DIRECTIONS * 2 * C, side * side
    a_log = torch.log(torch.arange(1, D_STATE + 1, device='cuda'))
    args = dict(
        u=_randn(g, batch, channels, length).to(dtype),
        delta=_randn(g, batch, channels, length, scale=0.5).to(dtype),
        A=-torch.exp(a_log + _randn(g, channels, D_STATE, scale=0.1)),
        B=_randn(g, batch, DIRECTIONS, D_STATE, length).to(dtype),
        C=_randn(g, batch, DIRECTIONS, D_STATE, length).to(dtype),
        D=_randn(g, channels),
        delta_bias=_randn(g, channels, scale=0.5, shift=-4.0))
    grad = _randn(g, batch, channels, length).to(dtype)
    return args, grad


CROSS_GRADS = ('du', 'dx_dbl', 'ddt_weight', 'ddt_bias', 'dA', 'dD')
PLAIN_GRADS = ('du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias')


def run_cross(args, grad, hw):
    """One forward and backward of the fused scan: y, checkpoints, grads."""
    _, bwd, (y, checkpoints) = cross_calls(args, grad, hw)
    return y, checkpoints, bwd()


def run_plain(args, grad):
    """One forward and backward of the plain scan: y, checkpoints, grads."""
    _, bwd, (y, checkpoints) = plain_calls(args, grad)
    return y, checkpoints, bwd()


def cases():
    """(name, kind, batch, C, side, dtype) of every saved case."""
    for C, side in STAGES:
        for dtype in (torch.float32, torch.bfloat16):
            yield (f'cross C={C} {str(dtype)[6:]} b2', 'cross', 2, C, side,
                   dtype)
        for dtype in (torch.float32, torch.float16):
            yield (f'plain C={C} {str(dtype)[6:]} b2', 'plain', 2, C, side,
                   dtype)


def save(path):
    import mmvmamba.ops._ext  # noqa: F401 -- registers the ops' fake kernels
    results = {}
    for seed, (name, kind, batch, C, side, dtype) in enumerate(cases()):
        if kind == 'cross':
            args, grad, hw = cross_inputs(batch, C, side, dtype, seed)
            y, checkpoints, grads = run_cross(args, grad, hw)
            names = CROSS_GRADS
        else:
            args, grad = plain_inputs(batch, C, side, dtype, seed)
            y, checkpoints, grads = run_plain(args, grad)
            names = PLAIN_GRADS
        tensors = dict(y=y, checkpoints=checkpoints, **dict(zip(names, grads)))
        results[name] = {k: (v.float().cpu(), str(v.dtype)[6:])
                         for k, v in tensors.items()}
        print(f'saved {name}', flush=True)
    torch.save(results, path)


def difference(a, b):
    """max |a - b| / max |b| (0 when both are zero; inf on a NaN)."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float('inf')
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


# One ulp of the low-precision output dtypes, relative.
ULP = {'bfloat16': 2.0**-8, 'float16': 2.0**-11}


def compare(paths):
    runs = [torch.load(p) for p in paths]
    reference, spread_run, others = runs[0], runs[1], runs[2:]
    failed = False
    header = f'{"case":28s} {"tensor":12s} {"spread":>9s}' + ''.join(
        f' {p[-24:]:>24s}' for p in paths[2:])
    print(header)
    for case, tensors in reference.items():
        for key, (ref, dtype) in tensors.items():
            spread = difference(spread_run[case][key][0], ref)
            cells = []
            for run in others:
                d = difference(run[case][key][0], ref)
                ok = d <= max(2 * spread, ULP.get(dtype, 0.0))
                failed |= not ok
                cells.append(f'{d:.2e}{"" if ok else " OUT"}')
            print(f'{case:28s} {key:12s} {spread:9.2e}' +
                  ''.join(f' {c:>24s}' for c in cells))
    print('all within the spread of the reference'
          if not failed else 'SOME OUTSIDE THE SPREAD')
    return 1 if failed else 0


def median_ms(fn, repeat):
    """Median ms of ``fn`` over ``repeat`` calls after 3, CUDA events
    (:func:`timing.measure` of ``benchmarks/``)."""
    return measure(fn, torch.device('cuda'), 3, repeat)


def cross_calls(args, grad, hw):
    """The fused scan's forward and backward on ``args`` as callables, and
    the outputs of one forward run (whose checkpoints the backward reads)."""
    ops, a = torch.ops.mmvmamba, args

    def fwd():
        return ops.cross_scan_fwd(a['u'], a['x_dbl'], a['dt_weight'],
                                  a['dt_bias'], a['A'], a['D'], *hw)

    y, checkpoints = fwd()

    def bwd():
        return ops.cross_scan_bwd(grad, a['u'], a['x_dbl'], a['dt_weight'],
                                  a['dt_bias'], a['A'], a['D'], *hw,
                                  checkpoints)

    return fwd, bwd, (y, checkpoints)


def plain_calls(args, grad):
    """The plain scan's forward and backward on ``args`` as callables, and
    the outputs of one forward run (whose checkpoints the backward reads)."""
    ops, a = torch.ops.mmvmamba, args
    inputs = (a['u'], a['delta'], a['A'], a['B'], a['C'], a['D'],
              a['delta_bias'], True)

    def fwd():
        return ops.selective_scan_fwd(*inputs)

    y, checkpoints = fwd()

    def bwd():
        return ops.selective_scan_bwd(grad, *inputs, checkpoints)

    return fwd, bwd, (y, checkpoints)


def time_ops(batch, repeat, dtype=torch.float32, fused_only=False):
    """Median ms of the fused scan's forward and backward (inputs of
    ``dtype``) and, unless ``fused_only``, the plain scan's (float32), at
    each stage."""
    import mmvmamba.ops._ext  # noqa: F401

    print(f'{"stage":12s} {"op":6s} {"fwd ms":>8s} {"bwd ms":>8s} '
          f'{"fwd+bwd":>8s}')
    total = 0.0
    for depth, (C, side) in zip((2, 2, 9, 2), STAGES):
        fwd, bwd, _ = cross_calls(*cross_inputs(batch, C, side, dtype, 0))
        f, b = median_ms(fwd, repeat), median_ms(bwd, repeat)
        total += depth * (f + b)
        print(f'C={C:<3d} L={side * side:<4d} cross  {f:8.3f} {b:8.3f} '
              f'{f + b:8.3f}', flush=True)
        del fwd, bwd
        torch.cuda.empty_cache()
    print(f'fused fwd+bwd summed over VMamba-T\'s 15 blocks: {total:.1f} ms')
    for C, side in () if fused_only else STAGES:
        fwd, bwd, _ = plain_calls(*plain_inputs(batch, C, side,
                                                torch.float32, 0))
        f, b = median_ms(fwd, repeat), median_ms(bwd, repeat)
        print(f'C={C:<3d} L={side * side:<4d} plain  {f:8.3f} {b:8.3f} '
              f'{f + b:8.3f}', flush=True)
        del fwd, bwd
        torch.cuda.empty_cache()


def kernel_kind(name):
    """``'summary'``, ``'carry'`` or ``'full'`` for a scan kernel's name
    (of :func:`timing.scan_kernel_kind`'s kinds), None for any other
    kernel."""
    kind = scan_kernel_kind(name)
    if kind is None:
        return None
    if 'summaries' in kind:
        return 'summary'
    return 'carry' if kind.startswith('carries') else 'full'


def profiled_events(fn):
    """``torch.profiler``'s ``key_averages()`` of one call of ``fn`` (CUDA
    activity)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def kernel_kind_ms(fn):
    """GPU ms of one call of ``fn`` by :func:`kernel_kind`."""
    ms = dict(full=0.0, summary=0.0, carry=0.0)
    for event in profiled_events(fn):
        kind = kernel_kind(event.key)
        if kind is not None:
            ms[kind] += event.self_device_time_total / 1e3
    return ms


def kernel_variant(name):
    """The variant a full kernel of the fused op names: the backward's
    ``'kept decays'`` or ``'decays recomputed'``, the forward's ``'tensor
    step sizes'`` or ``'FMA step sizes'``; None for any other kernel."""
    if 'CrossIo' not in name:
        return None
    flag = ', true>' in name
    if 'scan_bwd_kernel' in name:
        return 'kept decays' if flag else 'decays recomputed'
    if 'scan_fwd_kernel' in name:
        return 'tensor step sizes' if flag else 'FMA step sizes'
    return None


def time_ranks(batch, stage, ranks, dtype, repeat):
    """Print the fused op's ms (forward, backward) at stage ``stage``'s map
    and width with each dt_rank of ``ranks``, and the kernels that ran
    (:func:`kernel_variant`)."""
    import mmvmamba.ops._ext  # noqa: F401
    C, side = STAGES[stage]
    print(f'fused scan, C={C} L={side * side} (d_inner {2 * C}), batch '
          f'{batch}, {str(dtype)[6:]}; VMamba\'s rank here: {vmamba_rank(C)}')
    print(f'{"R":>3s} {"fwd ms":>8s} {"bwd ms":>8s}  kernels')
    for rank in ranks:
        fwd, bwd, _ = cross_calls(
            *cross_inputs(batch, C, side, dtype, 0, rank=rank))
        f, b = median_ms(fwd, repeat), median_ms(bwd, repeat)
        kinds = [kernel_variant(e.key) for fn in (fwd, bwd)
                 for e in profiled_events(fn)]
        kinds = sorted(set(kinds) - {None})
        print(f'{rank:3d} {f:8.3f} {b:8.3f}  {", ".join(kinds)}', flush=True)
        del fwd, bwd
        torch.cuda.empty_cache()


def time_segments(repeat, segment_chunks=(None, )):
    """Print the ops' ms (forward, backward) at :data:`SEGMENTED` and
    :data:`SEGMENTED_PLAIN`, each pass's GPU ms split by
    :func:`kernel_kind`, once per value of ``segment_chunks`` (None: the
    launch code's choice; else MMVMAMBA_SCAN_SEGMENT_CHUNKS)."""
    import mmvmamba.ops._ext  # noqa: F401
    env = 'MMVMAMBA_SCAN_SEGMENT_CHUNKS'
    before = os.environ.get(env)
    cases = [(f'cross {label} b{batch}', dtype,
              lambda batch=batch, C=C, H=H, W=W, dtype=dtype: cross_calls(
                  *cross_inputs(batch, C, H, dtype, 0, width=W)))
             for dtype in (torch.bfloat16, torch.float32)
             for label, batch, C, H, W in SEGMENTED]
    cases += [(f'plain b{batch} {4 * 2 * C} rows L={side * side}', dtype,
               lambda batch=batch, C=C, side=side, dtype=dtype: plain_calls(
                   *plain_inputs(batch, C, side, dtype, 0)))
              for dtype in (torch.float32, torch.float16)
              for batch, C, side in SEGMENTED_PLAIN]
    try:
        for chunks in segment_chunks:
            if chunks is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = str(chunks)
            setting = 'as chosen' if chunks is None else f'{env}={chunks}'
            print(f'\nsegments: {setting}')
            print(f'{"case":34s} {"dtype":9s} {"fwd ms":>7s} {"bwd ms":>7s}  '
                  'fwd full / summary / carry   bwd full / summary / carry')
            for name, dtype, make in cases:
                fwd, bwd, _ = make()
                f, b = median_ms(fwd, repeat), median_ms(bwd, repeat)
                kf, kb = kernel_kind_ms(fwd), kernel_kind_ms(bwd)
                print(f'{name:34s} {str(dtype)[6:]:9s} {f:7.3f} {b:7.3f}  ' +
                      ' / '.join(f'{kf[k]:.3f}' for k in kf) + '   ' +
                      ' / '.join(f'{kb[k]:.3f}' for k in kb), flush=True)
                del fwd, bwd
                torch.cuda.empty_cache()
    finally:
        if before is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = before


def profile(batch, stages, size=224, dtype=torch.float32):
    """One forward and one backward of the fused scan (inputs of ``dtype``)
    at each of `stages` (indices into STAGES, maps scaled to a ``size``
    input), for a profiler such as ncu."""
    import mmvmamba.ops._ext  # noqa: F401
    for stage in stages:
        C, side = STAGES[stage]
        side = side * size // 224
        args, grad, hw = cross_inputs(batch, C, side, dtype, 0)
        run_cross(args, grad, hw)
        torch.cuda.synchronize()
        print(f'profiled C={C} L={side * side}', flush=True)
        del args, grad
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='mode', required=True)
    p = sub.add_parser('save', help='outputs and gradients to a file')
    p.add_argument('path')
    p = sub.add_parser('compare', help='reference, its rerun, then others')
    p.add_argument('paths', nargs='+')
    p = sub.add_parser('time', help='kernel times at VMamba-T stage shapes')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--repeat', type=int, default=20)
    p.add_argument('--dtype', choices=['float32', 'bfloat16'],
                   default='float32', help="the fused scan's input dtype")
    p.add_argument('--fused-only', action='store_true',
                   help='leave out the plain scan')
    p = sub.add_parser('profile', help='one fused forward and backward per '
                       'stage, for a profiler')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--stages', type=int, nargs='+', default=[0, 2])
    p.add_argument('--size', type=int, default=224,
                   help='the input side the stage maps are scaled to '
                   '(a multiple of 32)')
    p.add_argument('--dtype', choices=['float32', 'bfloat16'],
                   default='float32', help="the fused scan's input dtype")
    p = sub.add_parser('segments', help='the ops where sequences are split, '
                       'time by kernel kind')
    p.add_argument('--repeat', type=int, default=15)
    p.add_argument('--segment-chunks', type=int, nargs='+',
                   help='also with MMVMAMBA_SCAN_SEGMENT_CHUNKS set to each')
    p = sub.add_parser('ranks', help="the fused op at a stage's shape with "
                       'other ranks')
    p.add_argument('--stage', type=int, default=2,
                   help='0 .. 3, a stage of VMamba-T at 224')
    p.add_argument('--ranks', type=int, nargs='+', default=[24, 16, 12, 8])
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--repeat', type=int, default=20)
    p.add_argument('--dtype', choices=['float32', 'bfloat16'],
                   default='bfloat16', help="the fused scan's input dtype")
    args = parser.parse_args(argv)
    check_lower_bounds(parser, args,
                       dict(batch=1, repeat=1, segment_chunks=0))
    if args.mode == 'profile' and not all(0 <= s < len(STAGES)
                                          for s in args.stages):
        parser.error(f'--stages must be 0 .. {len(STAGES) - 1}, got '
                     f'{" ".join(map(str, args.stages))}')
    if args.mode == 'compare':
        if len(args.paths) < 3:
            parser.error('compare needs the reference, its rerun and at '
                         'least one more file')
        missing = [p for p in args.paths if not os.path.isfile(p)]
        if missing:
            parser.error(f'compare: no file at {", ".join(missing)}')
    if args.mode == 'ranks':
        if not 0 <= args.stage < len(STAGES):
            parser.error(f'--stage must be 0 .. {len(STAGES) - 1}, got '
                         f'{args.stage}')
        if min(args.ranks) < 1:
            parser.error(f'--ranks must be positive, got {args.ranks}')
    if args.mode == 'profile' and (args.size < 32 or args.size % 32):
        parser.error(f'--size must be a positive multiple of 32, got '
                     f'{args.size}')
    if args.mode != 'compare' and not torch.cuda.is_available():
        parser.error(f'{args.mode} needs a CUDA GPU')
    if args.mode == 'save':
        save(args.path)
    elif args.mode == 'compare':
        return compare(args.paths)
    elif args.mode == 'time':
        time_ops(args.batch, args.repeat, getattr(torch, args.dtype),
                 args.fused_only)
    elif args.mode == 'segments':
        time_segments(args.repeat, [None] + (args.segment_chunks or []))
    elif args.mode == 'ranks':
        time_ranks(args.batch, args.stage, args.ranks,
                   getattr(torch, args.dtype), args.repeat)
    else:
        profile(args.batch, args.stages, args.size, getattr(torch, args.dtype))
    return 0


if __name__ == '__main__':
    sys.exit(main())
