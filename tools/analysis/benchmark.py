"""mmvmamba's benchmark entry point: prints tables of timings.

    python tools/analysis/benchmark.py models [--device cpu] [--size 224]
        [--batch 1] [--archs tiny small base] [--repeat 10]

``models``: forward time of VMamba-T/S/B backbones against mmpretrain's
Swin-T/S/B at one input size and batch, in eval mode without gradients, with
the ratio of each VMamba to the Swin of the same size.
"""
import argparse
import statistics
import time
from typing import Callable, List

import torch

SWIN_OF = {'tiny': 'tiny', 'small': 'small', 'base': 'base'}


def measure(fn: Callable[[], object], device: torch.device, warmup: int,
            repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == 'cuda':
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def print_table(title: str, header: List[str], rows: List[List]) -> None:
    """Print a plain-text table with right-aligned columns."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f'\n{title}')
    for i, row in enumerate(cells):
        print('  '.join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print('  '.join('-' * w for w in widths))


def build_backbone(kind: str, arch: str) -> torch.nn.Module:
    """A VMamba or mmpretrain Swin backbone, final stage only."""
    if kind == 'VMamba':
        from mmvmamba.models import VMamba
        return VMamba(arch, out_indices=(3, ), drop_path_rate=0.)
    from mmpretrain.models import SwinTransformer
    return SwinTransformer(arch=SWIN_OF[arch], out_indices=(3, ),
                           drop_path_rate=0.)


def bench_models(args) -> None:
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    rows = []
    for arch in args.archs:
        times = {}
        for kind in ('VMamba', 'Swin'):
            model = build_backbone(kind, arch).to(device)
            model.eval()  # mmpretrain's Swin.train() returns None
            with torch.no_grad():
                times[kind] = measure(lambda: model(x), device, args.warmup,
                                      args.repeat)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            rows.append([
                f'{kind}-{arch[0].upper()}', f'{params:.1f}',
                f'{times[kind]:.1f}',
                f'{args.batch * 1e3 / times[kind]:.1f}',
                f'{times[kind] / times["VMamba"]:.2f}' if kind == 'Swin' else
                ''
            ])
        rows[-2][-1] = f'{times["VMamba"] / times["Swin"]:.2f}'
        rows[-1][-1] = '1.00'
    name = (torch.cuda.get_device_name(device)
            if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} '
            f'threads')
    print_table(
        f'Backbone forward, {args.size}x{args.size}, batch {args.batch}, '
        f'{name}, fp32, median of {args.repeat}',
        ['model', 'params (M)', 'ms', 'img/s', 'time / Swin'], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='mode', required=True)
    models = sub.add_parser('models', help='VMamba vs Swin forward time')
    models.add_argument('--device', default='cpu')
    models.add_argument('--size', type=int, default=224)
    models.add_argument('--batch', type=int, default=1)
    models.add_argument(
        '--archs', nargs='+', default=['tiny', 'small', 'base'],
        choices=sorted(SWIN_OF))
    models.add_argument('--warmup', type=int, default=2)
    models.add_argument('--repeat', type=int, default=10)
    models.set_defaults(func=bench_models)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == '__main__':
    main()
