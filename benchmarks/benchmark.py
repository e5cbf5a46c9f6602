"""mmvmamba's benchmark entry point: prints tables of timings.

    python benchmarks/benchmark.py models [--device cpu] [--size 224]
        [--batch 1] [--archs tiny small base] [--repeat 10]
    python benchmarks/benchmark.py scan [--device cuda] [--batch 128]
        [--dtype float32] [--no-reference] [--no-fused]
        [--fused-models vmamba-t vmamba2-t]
    python benchmarks/benchmark.py throughput [--device cuda]
        [--models vmamba-t vmamba-s vmamba-b swin-t swin-s swin-b convnext-t]
        [--modes infer-fp32 infer-bf16 train-bf16] [--sizes 224 512 1024]
        [--batch 128] [--batch-per-size 128 24 6]
    python benchmarks/benchmark.py detectors [--device cuda]
        [--models mask-rcnn-vmamba-t mask-rcnn-swin-t upernet-vmamba-t
        upernet-swin-t] [--modes fp32 amp] [--amp-dtype bfloat16 float16]
        [--batch 2] [--det-size 800 1333] [--seg-size 512] [--rounds 1]

``models``: forward time of VMamba-T/S/B backbones against mmpretrain's
Swin-T/S/B at one input size and batch, in eval mode without gradients, with
the ratio of each VMamba to the Swin of the same size.

``scan``: the selective-scan kernel at VMamba-T's four stage shapes, forward
and forward+backward, against the PyTorch reference, with bytes moved, GB/s
and the ratios to the bandwidth and exponential floors (copy bandwidth and
exponential rate measured in the same run); then SS2D's whole core
(``cross_selective_scan``) on the fused kernel against the unfused path,
float32 and bfloat16 scan inputs, with the same floors, at the stage shapes
of VMamba-T and of VMamba2-T (d_inner = C, N = 1) (:mod:`scan_timing`), on
the GPU or the CPU (no exponential rate there).

``throughput``: classifiers (names of ``models.MODEL_ZOO`` or classifier
configs) in inference (fp32, bf16 autocast) and training steps
(bf16 autocast, forward + backward + AdamW step) at one or more square sizes:
median time per iteration after warm-up (CUDA events on a GPU), images per
second, their ratio to the Swin of the same size class (T/S/B; ConvNeXt-T,
ResNet-50 and DeiT-S against Swin-T) in the same mode and size, and to
timm's Swin-T for the Swin-T-sized models (timm's Swin-T and ConvNeXt-T are
timed by default when timm is importable), and peak GPU memory; a mode that runs out of GPU memory reads OOM. ``--batch`` is the
batch at 224; other sizes keep the pixels per batch (larger sizes fewer
images, at least one; smaller sizes at most ``--batch``) unless
``--batch-per-size`` names each size's batch. The table names the device and
which selective scan ran (compiled kernel or PyTorch reference).

``detectors``: training steps of Mask R-CNN (800x1333) and UperNet (512x512)
with VMamba and Swin backbones (names of ``detectors.DETECTOR_ZOO`` or
mmdet / mmseg configs) on
synthetic batches, as mmengine's runner trains them (``model.train_step``:
data preprocessor, losses, ``optim_wrapper.update_params``) with each
config's optimizer, in fp32 (``OptimWrapper``) and mixed precision
(``AmpOptimWrapper``, GPU only; bfloat16 by default, ``--amp-dtype`` picks
float16 or both; mmcv 2.1's RoIAlign has no bfloat16 GPU kernel, so Mask
R-CNN reads "failed" there and needs float16): median ms per step,
images per second, peak GPU memory and the ratios of time and memory to the
Swin of the same task and size class in the same mode, and which scans ran.
On a GPU one more
step is profiled: the time its kernels take (all of them, and the scans)
shows whether the host or the GPU bounds the step. Then the backbone alone
is timed on the same images (forward and backward, in the mode), with the
host's time to enqueue it: near the backbone's wall time, the host bounds
the backbone too. ``--rounds`` times the
set several times, models in turn, for a host whose speed drifts (medians
and the range of the rounds). No checkpoint is read
(backbones start from their initialisation); SyncBN runs as BN. On the CPU,
pass small sizes (``--det-size 128 128 --seg-size 64``).
"""
import argparse

import detectors
import torch
from models import (MODEL_ZOO, SWIN_REFERENCE, TIMM_MODELS,
                    TIMM_SWIN_REFERENCE, build_classifier, model_label,
                    tensor_forward, timm_available)
from scaling import batch_for
from scan_timing import (CORE_SHAPES, D_STATE, FUSED_HEADER, HEADER,
                         format_fused_rows, format_rows, fused_rows,
                         kernel_rows)
from timing import (MODES, check_cli_args, device_name, measure, print_table,
                    relative_to, time_mode)

from mmvmamba.ops import _ext
from mmvmamba.ops.backend import LABELS

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


def _ms(row: dict) -> str:
    """Milliseconds of a timing row, or its status (OOM)."""
    return _fmt(row['ms'], '.1f') if row['status'] == 'ok' else row['status']


def _ms_range(row: dict) -> str:
    """Fastest-slowest round of a row timed in several rounds, else '-'."""
    times = [t for t in row['round_ms'] if t is not None]
    if row['status'] != 'ok' or len(times) < 2:
        return '-'
    return f'{min(times):.1f}-{max(times):.1f}'


def _timing_title(what: str, device: torch.device, args) -> str:
    return (f'{what}, {device_name(device)}, torch {torch.__version__}; '
            f'median of {args.repeat} after {args.warmup} warm-up'
            f'{", CUDA events" if device.type == "cuda" else ""}; scan: '
            'the scans that ran')


def bench_throughput(args) -> list:
    """Time each model at each size in each mode; print and return rows.

    Returns:
        list[dict]: ``model``, ``size``, ``params_m``, ``mode``, ``batch``,
        the keys of :func:`time_mode` and ``x_swin`` (img/s over the img/s
        of the Swin of the same size class, mode and size).
    """
    device = torch.device(args.device)
    batches = args.batch_per_size or [
        batch_for(size, args.batch, max_batch=args.batch)
        for size in args.sizes
    ]
    rows = []
    for name in args.models:
        classifier = build_classifier(name).to(device)
        params = sum(p.numel() for p in classifier.parameters()) / 1e6
        for size, batch in zip(args.sizes, batches):
            if name in TIMM_MODELS and size != 224:
                classifier = build_classifier(name, size).to(device)
            model = tensor_forward(classifier, 'mmpretrain', batch,
                                   (size, size))
            for mode in args.modes:
                r = time_mode(model, mode, batch, size, device, args.warmup,
                              args.repeat)
                rows.append(
                    dict(model=model_label(name), size=size,
                         params_m=params, mode=mode, batch=batch, **r))
                print(f'{rows[-1]["model"]}  {size}  {mode}  batch {batch}  '
                      f'{_ms(r)} ms', flush=True)  # progress
        del classifier, model
    for row, ratio in zip(rows,
                          relative_to(rows, SWIN_REFERENCE, 'img_per_s',
                                      ('mode', 'size'))):
        row['x_swin'] = ratio
    for row, ratio in zip(rows,
                          relative_to(rows, TIMM_SWIN_REFERENCE, 'img_per_s',
                                      ('mode', 'size'))):
        row['x_timm_swin'] = ratio
    rows.sort(key=lambda row: args.sizes.index(row['size']))  # stable
    print_table(
        _timing_title(
            'Classifier throughput, '
            f'{", ".join(f"{s}x{s}" for s in args.sizes)}', device, args),
        ['model', 'size', 'params (M)', 'mode', 'batch', 'ms/iter', 'img/s',
         'x Swin', 'x timm Swin', 'peak mem (GiB)', 'scan'],
        [[
            r['model'], r['size'], f'{r["params_m"]:.1f}', r['mode'],
            r['batch'], _ms(r),
            _fmt(r['img_per_s'], '.1f'),
            _fmt(r['x_swin'], '.2f'),
            _fmt(r['x_timm_swin'], '.2f'),
            _fmt(r['peak_gib'], '.2f'),
            _fmt(r['scan'], '')
        ] for r in rows])
    return rows


def bench_detectors(args) -> list:
    """Time training steps of detectors and segmentors; print and return.

    Returns:
        list[dict]: The rows of :func:`detectors.benchmark`
        with ``time_vs_swin`` and ``mem_vs_swin`` (ms and peak memory over
        those of the Swin of the same task, size class and mode).
    """
    device = torch.device(args.device)
    rows = detectors.benchmark(
        args.models, args.modes, device, args.batch, args.det_size,
        (args.seg_size, args.seg_size), args.warmup, args.repeat,
        args.amp_dtype, args.rounds, log=lambda line: print(line, flush=True),
        merge_groups=args.merge_param_groups)
    for key, out in (('ms', 'time_vs_swin'), ('peak_gib', 'mem_vs_swin')):
        for row, ratio in zip(
                rows, relative_to(rows, detectors.REFERENCE_OF, key)):
            row[out] = ratio
    title = _timing_title(
        'Training step (data preprocessor, forward, backward, optimizer '
        f'step), batch {args.batch}', device, args)
    if args.rounds > 1:
        title += f'; median of {args.rounds} rounds, models in turn'
    title += ('; every model\'s param groups merged' if
              args.merge_param_groups else '; each config\'s param groups')
    print_table(
        title + '; GPU ms: kernels and copies of one step (torch.profiler), '
        'scan ms: the selective-scan kernels among them; backbone ms: the '
        'backbone alone, forward and backward on the batch, host ms the '
        'host\'s time to enqueue that, busy ms its GPU time (near backbone '
        'ms: GPU-bound)',
        ['model', 'input', 'params (M)', 'mode', 'ms/step', 'ms range',
         'GPU ms', 'scan ms', 'backbone ms', 'host ms', 'busy ms', 'img/s',
         'peak mem (GiB)', 'time / Swin', 'mem / Swin', 'scan'],
        [[
            r['model'], f'{r["shape"][0]}x{r["shape"][1]}',
            f'{r["params_m"]:.1f}', r['mode'], _ms(r),
            _ms_range(r),
            _fmt(r['gpu_ms'], '.1f'),
            _fmt(r['scan_ms'], '.1f'),
            _fmt(r['backbone_ms'], '.1f'),
            _fmt(r['backbone_host_ms'], '.1f'),
            _fmt(r['backbone_gpu_ms'], '.1f'),
            _fmt(r['img_per_s'], '.2f'),
            _fmt(r['peak_gib'], '.2f'),
            _fmt(r['time_vs_swin'], '.2f'),
            _fmt(r['mem_vs_swin'], '.2f'),
            _fmt(r['scan'], '')
        ] for r in rows])
    for r in rows:
        if r['error']:
            print(f'{r["model"]} {r["mode"]} failed: {r["error"]}')
    return rows


def _rates(meta: dict) -> str:
    """The measured copy bandwidth and exponential rate of a table."""
    text = f'copy bandwidth {meta["copy_gb_per_s"]:.0f} GB/s'
    if meta['exps_per_s']:
        text += (f', exp rate {meta["exps_per_s"] / 1e12:.2f} T/s '
                 f'({meta["exp_source"]})')
    return text


def bench_scan(args) -> list:
    """Print and return the kernel table of :func:`kernel_rows` and the
    fused tables of :func:`fused_rows` (one per ``--fused-models``)."""
    device = torch.device(args.device)
    rows = kernel_rows(device, args.batch, getattr(torch, args.dtype),
                       args.warmup, args.repeat, not args.no_reference)
    title = (f'Selective scan, VMamba-T stages, batch {args.batch}, '
             f'{args.dtype}, N={D_STATE}, {device_name(device)}, '
             f'{LABELS[device.type]} against the reference; '
             f'{_rates(rows[-1])}; exp floor: 1 exp per element and state '
             'forward, 2 forward+backward')
    print_table(title, HEADER, format_rows(rows))
    rows = rows[:-1]
    if not args.no_fused and _ext.has_cross_kernel(device.type):
        for model in args.fused_models:
            fused = fused_rows(device, args.batch, args.warmup, args.repeat,
                               model=model)
            core = CORE_SHAPES[model]
            print_table(
                f'SS2D core (cross_selective_scan, channels-last), {model} '
                f'stages (d_inner = {core.ssm_ratio}C, N = {core.d_state}), '
                f'batch {args.batch}, {device_name(device)}: '
                f'{LABELS["fused-" + device.type]} vs the unfused path (four '
                f'copies + the plain kernel); {_rates(fused[-1])}',
                FUSED_HEADER, format_fused_rows(fused))
            rows += [dict(r, model=model) for r in fused[:-1]]
    return rows


#: Sizes and counts of the subcommands, each at least its bound here.
LOWER_BOUNDS = dict(size=1, batch=1, sizes=1, batch_per_size=1, det_size=1,
                    seg_size=1, warmup=0, repeat=1)


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
    scan.add_argument('--no-fused', action='store_true',
                      help='skip the SS2D-core tables (fused vs unfused)')
    scan.add_argument('--fused-models', nargs='+', choices=sorted(CORE_SHAPES),
                      default=sorted(CORE_SHAPES),
                      help='models whose SS2D core shapes the fused tables '
                      'time')
    scan.set_defaults(func=bench_scan)

    thr = sub.add_parser(
        'throughput', help='classifiers: inference and training img/s')
    thr.add_argument('--device', default='cuda' if torch.cuda.is_available()
                     else 'cpu')
    thr.add_argument(
        '--models', nargs='+',
        default=['vmamba-t', 'vmamba-s', 'vmamba-b', 'vmamba2-t', 'vmamba2-s',
                 'vmamba2-b', 'swin-t', 'swin-s', 'swin-b', 'convnext-t'] +
        (list(TIMM_MODELS) if timm_available() else []),
        help=f'names of {sorted(MODEL_ZOO)}, of {sorted(TIMM_MODELS)} '
        '(with timm) or classifier configs')
    thr.add_argument('--modes', nargs='+', choices=MODES, default=MODES)
    thr.add_argument('--sizes', '--size', nargs='+', type=int, default=[224],
                     help='square input sizes')
    thr.add_argument('--batch', type=int, default=128,
                     help='batch at 224 (scaled by area for other sizes)')
    thr.add_argument('--batch-per-size', nargs='+', type=int,
                     help='the batch of each of --sizes instead')
    thr.add_argument('--warmup', type=int, default=5)
    thr.add_argument('--repeat', type=int, default=20)
    thr.set_defaults(func=bench_throughput)

    det = sub.add_parser(
        'detectors', help='Mask R-CNN and UperNet: training step time, memory')
    det.add_argument('--device', default='cuda')
    det.add_argument(
        '--models', nargs='+',
        default=['mask-rcnn-vmamba-t', 'mask-rcnn-swin-t', 'upernet-vmamba-t',
                 'upernet-swin-t'],
        help=f'names of {sorted(detectors.DETECTOR_ZOO)} or mmdet / mmseg '
        'configs')
    det.add_argument('--modes', nargs='+', choices=detectors.MODES,
                     help='default: fp32 amp on a GPU, fp32 on the CPU')
    det.add_argument('--amp-dtype', nargs='+', default=['bfloat16'],
                     choices=['bfloat16', 'float16'],
                     help='autocast dtype(s) of mode amp, each timed as a '
                     'mode (mmcv\'s RoIAlign has no bfloat16 GPU kernel: '
                     'Mask R-CNN needs float16)')
    det.add_argument('--batch', type=int, default=2, help='images per step')
    det.add_argument('--det-size', nargs=2, type=int, metavar=('H', 'W'),
                     default=list(detectors.TASKS['mmdet'][1]),
                     help='Mask R-CNN input')
    det.add_argument('--seg-size', type=int,
                     default=detectors.TASKS['mmseg'][1][0],
                     help='UperNet input (square)')
    det.add_argument('--warmup', type=int, default=5)
    det.add_argument('--repeat', type=int, default=20)
    det.add_argument('--rounds', type=int, default=1,
                     help='time all models this many times, in turn '
                     '(medians over the rounds)')
    det.add_argument('--merge-param-groups', action='store_true',
                     help='build every model\'s optimizer with mmvmamba\'s '
                     'MergedGroupsOptimWrapperConstructor (one param group '
                     'per setting), as mmvmamba\'s configs do, instead of '
                     'its config\'s constructor (mmdet\'s and mmseg\'s Swin: '
                     'one group per parameter)')
    det.set_defaults(func=bench_detectors)

    args = parser.parse_args(argv)
    check_cli_args(parser, args, LOWER_BOUNDS)
    if args.func is bench_throughput and args.batch_per_size and len(
            args.batch_per_size) != len(args.sizes):
        parser.error(f'--batch-per-size needs {len(args.sizes)} values, one '
                     'for each of --sizes')
    if args.func is bench_detectors:
        cuda = torch.device(args.device).type == 'cuda'
        if args.modes is None:
            args.modes = list(detectors.MODES) if cuda else ['fp32']
        if 'amp' in args.modes and not cuda:
            parser.error('mode amp needs a GPU (mmengine\'s AmpOptimWrapper)')
        if args.rounds < 1:
            parser.error(f'--rounds must be at least 1, got {args.rounds}')
    return args.func(args)


if __name__ == '__main__':
    main()
