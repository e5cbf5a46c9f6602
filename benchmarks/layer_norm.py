"""LayerNorm timings at VMamba-T / VMamba2-T stage shapes: ATen against
Triton.

    python benchmarks/layer_norm.py [--batch 128] [--dtypes float32 bfloat16]
        [--warmup 5] [--repeat 50] [--sweep]
        [--models vmamba2-t vmamba-t] [--modes infer-bf16 train-bf16]

For each stage map (batch, H, W, C) of the models at 224 (C = 96, 192, 384,
768) and each input dtype, under bf16 autocast as the backbones run (so a
bfloat16 map is normalised in float32, the result float32): forward
(without autograd) and forward+backward (the gradients of the map, the
weight and the bias from a float32 gradient of the output) time of
``F.layer_norm`` (ATen; autocast copies a bfloat16 map to float32 first) and
of :func:`mmvmamba.ops.layer_norm.layer_norm` (Triton, which reads the map
as it is), median after warm-up on CUDA events. Beside them the bytes the op
must move at least (forward: the map read, the float32 output written;
backward: the map and the output gradient read, the map's gradient written;
parameters and per-row statistics left out), that over the device-to-device
copy bandwidth measured in the same run (the floor), each time over the
floor and ATen's time over Triton's.

``--sweep``: also times the Triton kernels at other launch settings
(elements per tile, warps, backward programs per SM) and prints the fastest
for each row, to tune :func:`mmvmamba.ops.layer_norm.launch_config`.

``--models``: classifier steps (``benchmark.py throughput``'s modes and
names) with the backbones' norms made ``nn.LayerNorm``, as they are
(:class:`mmvmamba.ops.LayerNorm`: the Triton forward where autograd does not
record, ``F.layer_norm`` where it does), and on the Triton kernels for
both (SS2D's ``out_norm``, called through ``F.layer_norm``, is not swapped).
"""
import argparse
import itertools
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from scan_timing import copy_bandwidth
from timing import (MODES, measure, print_floor_table, print_table,
                    time_mode)

from mmvmamba.ops import layer_norm as ln

#: (H, W, C) of the four stages at 224 (VMamba-T and VMamba2-T alike).
STAGES = ((56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768))
PASSES = ('fwd', 'fwd+bwd')


def floor_bytes(batch: int, height: int, width: int, channels: int,
                dtype: torch.dtype) -> Dict[str, int]:
    """Bytes a LayerNorm must move at least under autocast (float32 output
    and output gradient; the map and its gradient in ``dtype``)."""
    elements = batch * height * width * channels
    size = torch.empty(0, dtype=dtype).element_size()
    forward = elements * (size + 4)
    backward = elements * (size + 4 + size)
    return {'fwd': forward, 'fwd+bwd': forward + backward}


def aten_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def make_step(fn: Callable, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One call of ``fn`` under bf16 autocast; with ``backward``, also the
    gradients of x, weight and bias from a fixed float32 gradient."""
    grad = torch.randn(x.shape, device=x.device)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            if not backward:
                with torch.no_grad():
                    fn(x, weight, bias, 1e-5)
                return
            y = fn(x, weight, bias, 1e-5)
        torch.autograd.grad(y, (x, weight, bias), grad)

    return step


def check_triton_path(x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor) -> None:
    """Raise RuntimeError (with the reason) if
    :func:`mmvmamba.ops.layer_norm.layer_norm` would run ``F.layer_norm``
    on these inputs under the bf16 autocast of the timed steps."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        reason = ln.unsupported_reason(x, weight, bias)
    if reason is not None:
        raise RuntimeError(f'the Triton path would not run: {reason}')


def op_rows(batch: int, dtypes, warmup: int, repeat: int, sweep: bool,
            device='cuda') -> List[Dict]:
    """Time ATen and Triton at each stage, dtype and pass.

    Returns:
        list[dict]: One dict per row, then one with the copy bandwidth.
    """
    device = torch.device(device)
    bandwidth = copy_bandwidth(device)
    rows = []
    for (height, width, channels), dtype in itertools.product(
            STAGES, dtypes):
        x = torch.randn(batch, height, width, channels, device=device)
        x = x.to(dtype)
        weight = 1 + 0.1 * torch.randn(channels, device=device)
        bias = 0.1 * torch.randn(channels, device=device)
        moved = floor_bytes(batch, height, width, channels, dtype)
        for name, backward in zip(PASSES, (False, True)):
            for t in (x, weight, bias):
                t.requires_grad_(backward)
            check_triton_path(x, weight, bias)
            times = {
                label: measure(make_step(fn, x, weight, bias, backward),
                               device, warmup, repeat)
                for label, fn in (('aten', aten_layer_norm),
                                  ('triton', ln.layer_norm))
            }
            floor_ms = moved[name] / bandwidth * 1e3
            row = dict(shape=f'{batch}x{height}x{width}x{channels}',
                       dtype=str(dtype).replace('torch.', ''), pass_=name,
                       aten_ms=times['aten'], triton_ms=times['triton'],
                       bytes=moved[name], floor_ms=floor_ms, best=None)
            if sweep:
                row['best'] = sweep_launch(x, weight, bias, backward, 2,
                                           max(10, repeat // 2))
            rows.append(row)
            torch.cuda.empty_cache()
    rows.append(dict(copy_gb_per_s=bandwidth / 1e9))
    return rows


def sweep_launch(x, weight, bias, backward: bool, warmup: int,
                 repeat: int) -> Optional[str]:
    """The fastest launch setting of the Triton kernels for this row:
    elements per tile x warps, then (backward) programs per SM at the
    fastest of those."""
    channels = x.shape[-1]
    block_c = max(16, 1 << (channels - 1).bit_length())
    default = ln.launch_config
    default_programs = ln.BACKWARD_PROGRAMS_PER_SM
    settings = [(tile, warps, default_programs)
                for tile in sorted({max(block_c, t)
                                    for t in (2048, 4096, 8192)})
                for warps in (4, 8, 16)]
    results = []

    def run(tile, warps, per_sm):
        config = (block_c, tile // block_c, warps)
        ln.launch_config = lambda c: config
        ln.BACKWARD_PROGRAMS_PER_SM = per_sm
        try:
            ms = measure(make_step(ln.layer_norm, x, weight, bias, backward),
                         x.device, warmup, repeat)
        except Exception as error:  # noqa: BLE001 -- e.g. out of
            # resources at this setting: reported, not timed
            print(f'  C={channels} tile {tile} warps {warps}: '
                  f'{type(error).__name__}')
            return
        results.append((ms, tile, warps, per_sm))

    try:
        for setting in settings:
            run(*setting)
        if backward and results:
            _, tile, warps, _ = min(results)
            for per_sm in (2, 8):
                run(tile, warps, per_sm)
    finally:
        ln.launch_config = default
        ln.BACKWARD_PROGRAMS_PER_SM = default_programs
    if not results:
        return None
    ms, tile, warps, per_sm = min(results)
    text = f'{ms:.3f} ms: tile {tile}, {warps} warps'
    return text + (f', {per_sm}/SM' if backward else '')


class TritonWhenRecorded(ln.LayerNorm):
    """The backbones' LayerNorm on the Triton kernels for training too."""
    triton_when_recorded = True


def set_norm_class(norms: List[torch.nn.Module], cls: type) -> None:
    """Make each of ``norms`` a ``cls`` (the LayerNorm classes add no state
    to ``nn.LayerNorm``)."""
    for module in norms:
        module.__class__ = cls


def model_rows(names, modes, batch: int, warmup: int,
               repeat: int) -> List[Dict]:
    """Classifier steps with nn.LayerNorm, the backbones' own LayerNorm and
    the Triton kernels for both passes."""
    from models import build_classifier, model_label, tensor_forward
    device = torch.device('cuda')
    rows = []
    for name in names:
        model = tensor_forward(
            build_classifier(name).to(device), 'mmpretrain', batch,
            (224, 224))
        norms = [m for m in model.modules() if type(m) is ln.LayerNorm]
        for mode in modes:
            times = {}
            for key, cls in (('aten', torch.nn.LayerNorm),
                             ('default', ln.LayerNorm),
                             ('triton', TritonWhenRecorded)):
                if key == 'triton' and not mode.startswith('train'):
                    continue  # the same calls as the default's
                set_norm_class(norms, cls)
                times[key] = time_mode(model, mode, batch, 224, device,
                                       warmup, repeat)
            set_norm_class(norms, ln.LayerNorm)
            rows.append(dict(model=model_label(name), mode=mode,
                             norms=len(norms), **times))
        del model
        torch.cuda.empty_cache()
    return rows


def _fmt(value, spec='.3f'):
    return '-' if value is None else format(value, spec)


def _speed_up(row: Dict, key: str) -> str:
    """nn.LayerNorm's time over the ``key`` column's, or '-'."""
    if key not in row or not row['aten']['ms'] or not row[key]['ms']:
        return '-'
    return _fmt(row['aten']['ms'] / row[key]['ms'], '.2f')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'],
                        choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--repeat', type=int, default=50)
    parser.add_argument('--sweep', action='store_true',
                        help='also time other launch settings')
    parser.add_argument('--models', nargs='*', default=[],
                        help='classifier names of benchmark.py throughput')
    parser.add_argument('--modes', nargs='+', choices=MODES,
                        default=['infer-bf16', 'train-bf16'])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error('layer_norm.py needs a GPU')
    if ln.TRITON_IMPORT_ERROR:
        parser.error(ln.TRITON_IMPORT_ERROR)
    device = torch.device('cuda')
    rows = op_rows(args.batch, [getattr(torch, d) for d in args.dtypes],
                   args.warmup, args.repeat, args.sweep)
    meta = rows.pop()
    print_floor_table('LayerNorm under bf16 autocast (float32 output)', rows,
                      {'map': 'shape', 'x dtype': 'dtype', 'pass': 'pass_'},
                      'ATen', 'aten_ms', device, meta['copy_gb_per_s'],
                      args.repeat, args.sweep)
    if args.models:
        results = model_rows(args.models, args.modes, args.batch,
                             args.warmup, max(10, args.repeat // 5))
        print_table(
            f'Classifier steps, batch {args.batch} at 224: the norms as '
            'nn.LayerNorm, as the backbones have them (Triton forward where '
            'autograd does not record) and on Triton for both passes '
            '(out_norm not swapped)',
            ['model', 'mode', 'norms', 'nn.LayerNorm ms', 'default ms',
             'Triton both ms', 'img/s nn', 'img/s default',
             'default speed-up', 'Triton both speed-up'],
            [[r['model'], r['mode'], r['norms'],
              _fmt(r['aten']['ms'], '.1f'), _fmt(r['default']['ms'], '.1f'),
              _fmt(r['triton']['ms'], '.1f') if 'triton' in r else '-',
              _fmt(r['aten']['img_per_s'], '.0f'),
              _fmt(r['default']['img_per_s'], '.0f'),
              _speed_up(r, 'default'), _speed_up(r, 'triton')]
             for r in results])
    return rows


if __name__ == '__main__':
    main()
