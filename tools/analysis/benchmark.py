"""mmvmamba's benchmark entry point: prints tables of timings.

    python tools/analysis/benchmark.py models [--device cpu] [--size 224]
        [--batch 1] [--archs tiny small base] [--repeat 10]
    python tools/analysis/benchmark.py scan [--device cuda] [--batch 128]
        [--dtype float32] [--no-reference]
    python tools/analysis/benchmark.py throughput [--device cuda]
        [--models vmamba-t swin-t convnext-t resnet-50 deit-s]
        [--modes infer-fp32 infer-bf16 train-bf16] [--size 224] [--batch 128]

``models``: forward time of VMamba-T/S/B backbones against mmpretrain's
Swin-T/S/B at one input size and batch, in eval mode without gradients, with
the ratio of each VMamba to the Swin of the same size.

``scan``: the selective-scan kernel at VMamba-T's four stage shapes, forward
and forward+backward, against the PyTorch reference, with bytes moved, GB/s
and the ratios to the bandwidth and exponential floors
(:mod:`mmvmamba.analysis.scan_timing`).

``throughput``: classifiers (names of ``mmvmamba.analysis.models.MODEL_ZOO``
or classifier configs) in inference (fp32, bf16 autocast) and training steps
(bf16 autocast, forward + backward + AdamW step): median time per iteration
after warm-up (CUDA events on a GPU), images per second and peak GPU memory;
a mode that runs out of GPU memory reads OOM. The table names the device and
which selective scan ran (compiled kernel or PyTorch reference).
"""
import argparse

import torch

from mmvmamba.analysis.models import (MODEL_ZOO, build_classifier,
                                      model_label, tensor_forward)
from mmvmamba.analysis.scan_timing import (D_STATE, HEADER, format_rows,
                                           kernel_rows)
from mmvmamba.analysis.timing import (MODES, device_name, measure,
                                      print_table, scan_backend, time_mode)

SWIN_OF = {'tiny': 'tiny', 'small': 'small', 'base': 'base'}


def build_backbone(kind: str, arch: str) -> torch.nn.Module:
    """A VMamba or mmpretrain Swin backbone, final stage only."""
    if kind == 'VMamba':
        from mmvmamba.models import VMamba
        return VMamba(arch, out_indices=(3, ), drop_path_rate=0.)
    from mmpretrain.models import SwinTransformer
    return SwinTransformer(arch=SWIN_OF[arch], out_indices=(3, ),
                           drop_path_rate=0., pad_small_map=True)


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
    print_table(
        f'Backbone forward, {args.size}x{args.size}, batch {args.batch}, '
        f'{device_name(device)}, fp32, median of {args.repeat}',
        ['model', 'params (M)', 'ms', 'img/s', 'time / Swin'], rows)


def _fmt(value, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def bench_throughput(args) -> list:
    """Time each model in each mode; print and return the table rows."""
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        model = tensor_forward(build_classifier(name), 'mmpretrain',
                               args.batch, (args.size, args.size))
        model.to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for mode in args.modes:
            r = time_mode(model, mode, args.batch, args.size, device,
                          args.warmup, args.repeat)
            rows.append([
                model_label(name), f'{params:.1f}', mode, args.batch,
                _fmt(r['ms'], '.1f') if r['status'] == 'ok' else r['status'],
                _fmt(r['img_per_s'], '.1f'),
                _fmt(r['peak_gib'], '.2f')
            ])
            print('  '.join(map(str, rows[-1])), flush=True)  # progress
        del model
    print_table(
        f'Classifier throughput, {args.size}x{args.size}, '
        f'{device_name(device)}, torch {torch.__version__}, selective scan: '
        f'{scan_backend(device)}; median of {args.repeat} after '
        f'{args.warmup} warm-up'
        f'{", CUDA events" if device.type == "cuda" else ""}',
        ['model', 'params (M)', 'mode', 'batch', 'ms/iter', 'img/s',
         'peak mem (GiB)'], rows)
    return rows


def bench_scan(args) -> list:
    """Print and return the kernel table of :func:`kernel_rows`."""
    device = torch.device(args.device)
    rows = kernel_rows(device, args.batch, getattr(torch, args.dtype),
                       args.warmup, args.repeat, not args.no_reference)
    meta = rows[-1]
    title = (f'Selective scan, VMamba-T stages, batch {args.batch}, '
             f'{args.dtype}, N={D_STATE}, {device_name(device)}; copy '
             f'bandwidth {meta["copy_gb_per_s"]:.0f} GB/s')
    if meta['exps_per_s']:
        title += f', exp rate {meta["exps_per_s"] / 1e12:.2f} T/s'
    print_table(title, HEADER, format_rows(rows))
    return rows


def main(argv=None):
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

    scan = sub.add_parser('scan', help='selective-scan kernel vs floors')
    scan.add_argument('--device', default='cuda')
    scan.add_argument('--batch', type=int, default=128)
    scan.add_argument('--dtype', default='float32',
                      choices=['float32', 'float16', 'bfloat16'])
    scan.add_argument('--warmup', type=int, default=3)
    scan.add_argument('--repeat', type=int, default=20)
    scan.add_argument('--no-reference', action='store_true',
                      help='time the kernel only')
    scan.set_defaults(func=bench_scan)

    thr = sub.add_parser(
        'throughput', help='classifiers: inference and training img/s')
    thr.add_argument('--device', default='cuda' if torch.cuda.is_available()
                     else 'cpu')
    thr.add_argument(
        '--models', nargs='+',
        default=['vmamba-t', 'swin-t', 'convnext-t', 'resnet-50', 'deit-s'],
        help=f'names of {sorted(MODEL_ZOO)} or classifier configs')
    thr.add_argument('--modes', nargs='+', choices=MODES, default=MODES)
    thr.add_argument('--size', type=int, default=224)
    thr.add_argument('--batch', type=int, default=128)
    thr.add_argument('--warmup', type=int, default=5)
    thr.add_argument('--repeat', type=int, default=20)
    thr.set_defaults(func=bench_throughput)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    main()
