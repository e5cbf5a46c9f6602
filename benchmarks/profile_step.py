"""Where a step's GPU time goes: one profiled step, kernels grouped.

    python benchmarks/profile_step.py vmamba2-t [--mode train-bf16]
        [--batch 128] [--size 224] [--top 25] [--by-op]
    python benchmarks/profile_step.py mask-rcnn-vmamba-t [--mode fp32|amp]
        [--amp-dtype float16] [--batch 2] [--top 25] [--by-op]

A classifier (a name of ``benchmark.py throughput``, or a classifier config)
runs a step of ``--mode`` (a mode of ``benchmark.py throughput``); a
detector or segmentor (a name of ``benchmark.py detectors``) runs its
backbone's training step alone, forward and backward, on the task's input
(Mask R-CNN 800 x 1333, UperNet 512 x 512; ``--mode`` fp32 or amp, as
``benchmark.py detectors``'s ``backbone ms`` column times it).

After a few warm-up steps one step is profiled with ``torch.profiler``
(CUDA activity). The script prints the step's GPU time against its wall
time (a step far above its GPU time is bound by the host), the share of
mmvmamba's scan kernels, the scan kernels by kind (full passes, segment
summaries, the carries between segments, the N = 1 kernels), and the
``--top`` kernels by GPU time, each with its calls and its share of the
step's GPU time. ``--by-op`` groups the GPU time by the ATen op (or custom
op) that launched the kernels, with its input shapes instead, which tells
the copies, casts and elementwise ops of a step apart.
"""
import argparse
import time
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn
from detectors import (DETECTOR_ZOO, TASKS, backbone_step, build_detector,
                       load_detector_config, mode_label, synthetic_batch)
from detectors import MODES as DETECTOR_MODES
from models import build_classifier, model_label, scope_of, tensor_forward
from timing import (MODES, SCAN_KINDS, _step, check_lower_bounds,
                    device_kernels, print_table, scan_kernel_kind)


def scan_kinds(kernels: Sequence[Tuple[str, int, float]]
               ) -> List[Tuple[str, int, float]]:
    """The scan kernels of a profile by kind
    (:func:`timing.scan_kernel_kind`).

    Args:
        kernels: ``(name, calls, ms)`` of each kernel.

    Returns:
        list: ``(kind, calls, ms)`` of the kinds that ran, in the order of
        :data:`timing.SCAN_KINDS`.
    """
    totals = {}
    for name, calls, ms in kernels:
        kind = scan_kernel_kind(name)
        if kind is not None:
            count, total = totals.get(kind, (0, 0.0))
            totals[kind] = (count + calls, total + ms)
    return [(kind, *totals[kind]) for kind, _ in SCAN_KINDS
            if kind in totals]


def profile(step: Callable[[], object], warmup: int = 5,
            by_op: bool = False) -> dict:
    """Profile one call of ``step`` on the GPU, after ``warmup`` calls.

    Returns:
        dict: ``wall_ms``, ``gpu_ms``, ``scan_ms`` and ``kernels``, a list of
        ``(name, calls, ms)`` sorted by time; with ``by_op``, ``ops`` too:
        ``(op and input shapes, calls, ms)``, the GPU time of the kernels
        each op launched itself.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    device = torch.device('cuda')
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3
    activities = [ProfilerActivity.CUDA]
    if by_op:
        activities.append(ProfilerActivity.CPU)
    with torch_profile(activities=activities, record_shapes=by_op) as prof:
        step()
        torch.cuda.synchronize(device)
    events = prof.key_averages()
    kernels = sorted(((e.key, e.count, e.self_device_time_total / 1e3)
                      for e in device_kernels(events)),
                     key=lambda k: -k[2])
    gpu_ms = sum(k[2] for k in kernels)
    scan_ms = sum(k[2] for k in kernels if 'mmvmamba::' in k[0]
                  or 'scan' in k[0].lower())
    result = dict(wall_ms=wall_ms, gpu_ms=gpu_ms, scan_ms=scan_ms,
                  kernels=kernels)
    if by_op:
        result['ops'] = sorted(
            ((f'{e.key} {e.input_shapes}', e.count,
              e.self_device_time_total / 1e3)
             for e in prof.key_averages(group_by_input_shape=True)
             if e.device_type == torch.autograd.DeviceType.CPU
             and e.self_device_time_total > 0),
            key=lambda k: -k[2])
    return result


def build_step(args: argparse.Namespace,
               device: torch.device) -> Tuple[nn.Module, Callable[[], None]]:
    """The model and the step that the arguments of
    :func:`add_step_arguments` name (after :func:`resolve_step_arguments`):
    a classifier's ``--mode`` step on random images, or a detector's
    backbone alone, forward and backward (:func:`detectors.backbone_step`),
    on a synthetic batch at its task's input.

    Returns:
        tuple: The model (a classifier in :func:`models.tensor_forward`'s
        wrapper, or the whole detector) and the step, on ``device``.
    """
    if args.detector:
        cfg = load_detector_config(args.model)
        model = build_detector(cfg, device)
        scope = scope_of(cfg)
        data = synthetic_batch(model, scope, args.batch, TASKS[scope][1])
        return model, backbone_step(model, args.mode, data, device,
                                    args.amp_dtype)
    size = args.size
    model = tensor_forward(build_classifier(args.model, size).to(device),
                           'mmpretrain', args.batch, (size, size))
    return model, _step(model, args.mode,
                        torch.randn(args.batch, 3, size, size, device=device))


def step_label(args: argparse.Namespace) -> str:
    """What :func:`build_step` runs, in words."""
    if args.detector:
        return (f'{args.model} backbone, '
                f'{mode_label(args.mode, args.amp_dtype)}, batch {args.batch}')
    return (f'{model_label(args.model)}, {args.mode}, batch {args.batch} at '
            f'{args.size}')


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and its step: a name, ``--mode``, ``--amp-dtype``,
    ``--batch`` and ``--size``."""
    parser.add_argument('model', help='a classifier name of benchmark.py '
                        'throughput or a classifier config, or a detector '
                        'name of benchmark.py detectors (its backbone)')
    parser.add_argument(
        '--mode', choices=MODES + DETECTOR_MODES,
        help=f'a classifier: one of {MODES} (default train-bf16); a '
        f'detector: one of {DETECTOR_MODES} (default fp32)')
    parser.add_argument('--amp-dtype', choices=('bfloat16', 'float16'),
                        help="a detector's autocast dtype in amp "
                        '(default bfloat16)')
    parser.add_argument('--batch', type=int,
                        help='images a step (default 128 for a classifier, '
                        '2 for a detector)')
    parser.add_argument('--size', type=int,
                        help="a classifier's input size (default 224)")


def resolve_step_arguments(parser: argparse.ArgumentParser,
                           args: argparse.Namespace) -> None:
    """Fill the defaults that follow the model (``args.detector`` says
    which kind it is); a mode, batch or size that does not fit the model
    is an error."""
    args.detector = args.model in DETECTOR_ZOO
    if args.detector:
        args.mode = args.mode or 'fp32'
        if args.mode not in DETECTOR_MODES:
            parser.error(f"a detector's --mode is one of {DETECTOR_MODES}, "
                         f'got {args.mode!r}')
        if args.size is not None:
            parser.error("--size is a classifier's: a detector runs at its "
                         "task's input")
        if args.amp_dtype is not None and args.mode != 'amp':
            parser.error('--amp-dtype is for --mode amp')
        args.amp_dtype = args.amp_dtype or 'bfloat16'
        args.batch = 2 if args.batch is None else args.batch
    else:
        args.mode = args.mode or 'train-bf16'
        if args.mode not in MODES:
            parser.error(f"a classifier's --mode is one of {MODES}, got "
                         f'{args.mode!r}')
        if args.amp_dtype is not None:
            parser.error("--amp-dtype is a detector's")
        args.batch = 128 if args.batch is None else args.batch
        args.size = 224 if args.size is None else args.size
    check_lower_bounds(parser, args, dict(batch=1, size=1))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; a mode, batch or size that does not fit the model
    is an error."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_step_arguments(parser)
    parser.add_argument('--top', type=int, default=25)
    parser.add_argument('--by-op', action='store_true',
                        help='also group the GPU time by the launching op '
                        'and its input shapes')
    args = parser.parse_args(argv)
    resolve_step_arguments(parser, args)
    check_lower_bounds(parser, args, dict(top=1))
    if not torch.cuda.is_available():
        parser.error('profile_step.py needs a GPU')
    return args


def main(argv=None):
    args = parse_args(argv)
    r = profile(build_step(args, torch.device('cuda'))[1], by_op=args.by_op)
    what = step_label(args)
    gpu = r['gpu_ms']
    print_table(
        f'{what}, {torch.cuda.get_device_name()}: wall {r["wall_ms"]:.1f} '
        f'ms, GPU {gpu:.1f} ms, scan kernels {r["scan_ms"]:.1f} ms '
        f'({100 * r["scan_ms"] / gpu:.0f}%)',
        ['kernel', 'calls', 'ms', '% of GPU'],
        [[k[:90], calls, f'{ms:.2f}', f'{100 * ms / gpu:.1f}']
         for k, calls, ms in r['kernels'][:args.top]])
    kinds = scan_kinds(r['kernels'])
    if kinds:
        print_table('the scan kernels by kind',
                    ['kind', 'calls', 'ms', '% of GPU'],
                    [[kind, calls, f'{ms:.2f}', f'{100 * ms / gpu:.1f}']
                     for kind, calls, ms in kinds])
    if args.by_op:
        print_table(
            'by the op that launched the kernels (its input shapes)',
            ['op', 'calls', 'ms', '% of GPU'],
            [[k[:150], calls, f'{ms:.2f}', f'{100 * ms / gpu:.1f}']
             for k, calls, ms in r['ops'][:args.top]])
    return r


if __name__ == '__main__':
    main()
