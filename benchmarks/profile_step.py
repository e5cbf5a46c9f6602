"""Where a classifier's GPU time goes: one profiled step, kernels grouped.

    python benchmarks/profile_step.py vmamba2-t [--mode train-bf16]
        [--batch 128] [--size 224] [--top 25] [--by-op]

Runs a few warm-up steps of ``--mode`` (a mode of ``benchmark.py
throughput``), then profiles one step with ``torch.profiler`` (CUDA
activity) and prints the step's GPU time against its wall time (a step far
above its GPU time is bound by the host), the share of mmvmamba's scan
kernels, and the ``--top`` kernels by GPU time, each with its calls and its
share of the step's GPU time. ``--by-op`` groups the GPU time by the ATen
op (or custom op) that launched the kernels, with its input shapes instead,
which tells the copies, casts and elementwise ops of a step apart.
"""
import argparse
import time

import torch
from models import build_classifier, model_label, tensor_forward
from timing import MODES, _step, device_kernels, print_table


def profile_step(name: str, mode: str, batch: int, size: int,
                 warmup: int = 5, by_op: bool = False) -> dict:
    """Profile one ``mode`` step of classifier ``name`` on the GPU.

    Returns:
        dict: ``wall_ms``, ``gpu_ms``, ``scan_ms`` and ``kernels``, a list of
        ``(name, calls, ms)`` sorted by time; with ``by_op``, ``ops`` too:
        ``(op and input shapes, calls, ms)``, the GPU time of the kernels
        each op launched itself.
    """
    from torch.profiler import ProfilerActivity, profile
    device = torch.device('cuda')
    model = tensor_forward(build_classifier(name, size).to(device),
                           'mmpretrain', batch, (size, size))
    step = _step(model, mode,
                 torch.randn(batch, 3, size, size, device=device))
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
    with profile(activities=activities, record_shapes=by_op) as prof:
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('model', help='a classifier name of benchmark.py '
                        'throughput, or a classifier config')
    parser.add_argument('--mode', choices=MODES, default='train-bf16')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--top', type=int, default=25)
    parser.add_argument('--by-op', action='store_true',
                        help='also group the GPU time by the launching op '
                        'and its input shapes')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error('profile_step.py needs a GPU')
    r = profile_step(args.model, args.mode, args.batch, args.size,
                     by_op=args.by_op)
    gpu = r['gpu_ms']
    print_table(
        f'{model_label(args.model)}, {args.mode}, batch {args.batch} at '
        f'{args.size}, {torch.cuda.get_device_name()}: wall '
        f'{r["wall_ms"]:.1f} ms, GPU {gpu:.1f} ms, scan kernels '
        f'{r["scan_ms"]:.1f} ms ({100 * r["scan_ms"] / gpu:.0f}%)',
        ['kernel', 'calls', 'ms', '% of GPU'],
        [[k[:90], calls, f'{ms:.2f}', f'{100 * ms / gpu:.1f}']
         for k, calls, ms in r['kernels'][:args.top]])
    if args.by_op:
        print_table(
            'by the op that launched the kernels (its input shapes)',
            ['op', 'calls', 'ms', '% of GPU'],
            [[k[:150], calls, f'{ms:.2f}', f'{100 * ms / gpu:.1f}']
             for k, calls, ms in r['ops'][:args.top]])
    return r


if __name__ == '__main__':
    main()
