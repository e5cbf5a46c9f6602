"""SS2D's depthwise convolution in training, at VMamba-T's shapes: cuDNN
(the module, today's path) against the Triton kernels
(``CONV_BACKWARD_ON_TRITON``).

    python benchmarks/depthwise_conv.py [--batch 128] [--warmup 5]
        [--repeat 50] [--sweep] [--models vmamba-t] [--modes train-bf16]

For each SS2D convolution of VMamba-T at 224 (E = 192, 384, 768, 1536
channels on maps of 56, 28, 14, 7), its input the first half of a
``(B, H, W, 2E)`` bfloat16 tensor (as ``in_proj`` writes it under bf16
autocast), its 3x3 weight and bias float32 parameters, under bf16 autocast:
the training forward (recorded by autograd, no backward) and forward +
backward (the gradients of the input, weight and bias from a fixed
bfloat16 output gradient) of
:func:`mmvmamba.ops.depthwise_conv.depthwise_conv_nhwc`, with the switch
off (the module: cuDNN on a dense copy of the view) and on (the Triton
kernels), median after warm-up on CUDA events. Beside them the bytes the
convolution must move at least (forward: the view read, the output
written; backward: the output gradient and the view read, the input
gradient written; 2 bytes each, parameters left out), that over the
device-to-device copy bandwidth measured in the same run (the floor), and
each time over the floor.

``--sweep``: also times the Triton forward + backward at other settings of
the weight-gradient kernel (tile elements, widest channel block, warps,
programs per SM) and prints the fastest for each map.

``--models``: classifier steps (``benchmark.py throughput``'s modes and
names) with the switch off and on.
"""
import argparse
import itertools
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from scan_timing import copy_bandwidth
from timing import (MODES, measure, module_settings, print_floor_table,
                    print_table, switch_model_rows)

from mmvmamba.ops import depthwise_conv as dw

#: (H, W, E) of VMamba-T's SS2D convolutions at 224 (E = 2 x the stage's
#: channels).
SS2D_SHAPES = ((56, 56, 192), (28, 28, 384), (14, 14, 768), (7, 7, 1536))
PASSES = ('fwd', 'fwd+bwd')
#: Settings of the weight-gradient kernel that ``--sweep`` tries:
#: module attribute -> values.
SWEEP = dict(WGRAD_TILE_ELEMENTS=(1024, 2048, 4096, 8192),
             WGRAD_MAX_BLOCK_C=(32, 64, 128), WGRAD_NUM_WARPS=(4, 8),
             WGRAD_PROGRAMS_PER_SM=(2, 4, 8))


def floor_bytes(batch: int, height: int, width: int,
                channels: int) -> Dict[str, int]:
    """Bytes the convolution must move at least, bfloat16 throughout
    (forward: the input read, the output written; backward: the output
    gradient and the input read, the input gradient written)."""
    elements = batch * height * width * channels
    forward = elements * (2 + 2)
    backward = elements * (2 + 2 + 2)
    return {'fwd': forward, 'fwd+bwd': forward + backward}


def make_inputs(batch: int, height: int, width: int, channels: int,
                device: torch.device):
    """SS2D's conv (float32 parameters needing gradients), its input (the
    first half of a bfloat16 ``(B, H, W, 2E)`` leaf needing its gradient)
    and a bfloat16 output gradient."""
    conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels,
                     bias=True).to(device)
    wide = torch.randn(batch, height, width, 2 * channels, device=device,
                       dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, height, width, channels, device=device,
                       dtype=torch.bfloat16)
    return conv, wide[..., :channels], grad


def make_step(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor,
              backward: bool) -> Callable[[], None]:
    """One recorded call under bf16 autocast; with ``backward``, also the
    gradients of x, the weight and the bias from ``grad``."""
    wrt = (x, conv.weight, conv.bias)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = dw.depthwise_conv_nhwc(conv, x)
        if backward:
            torch.autograd.grad(out, wrt, grad)

    return step


def check_triton_path(conv: nn.Conv2d, x: torch.Tensor) -> None:
    """Raise RuntimeError (with the reason) if the switch on would still
    run the module on these inputs under the steps' bf16 autocast."""
    with module_settings(dw, CONV_BACKWARD_ON_TRITON=True), torch.autocast(
            x.device.type, dtype=torch.bfloat16):
        reason = dw.unsupported_reason(conv, x)
    if reason is not None:
        raise RuntimeError(f'the Triton path would not run: {reason}')


def op_rows(batch: int, warmup: int, repeat: int, sweep: bool,
            device='cuda') -> List[Dict]:
    """Time cuDNN and Triton at each shape and pass.

    Returns:
        list[dict]: One dict per row, then one with the copy bandwidth.
    """
    device = torch.device(device)
    torch.backends.cudnn.benchmark = True  # as the training runs
    bandwidth = copy_bandwidth(device)
    rows = []
    for height, width, channels in SS2D_SHAPES:
        conv, x, grad = make_inputs(batch, height, width, channels, device)
        check_triton_path(conv, x)
        moved = floor_bytes(batch, height, width, channels)
        for name, backward in zip(PASSES, (False, True)):
            times = {}
            for label, on in (('cudnn', False), ('triton', True)):
                with module_settings(dw, CONV_BACKWARD_ON_TRITON=on):
                    times[label] = measure(
                        make_step(conv, x, grad, backward), device, warmup,
                        repeat)
            best = None
            if sweep and backward:
                best = sweep_settings(conv, x, grad, device,
                                      max(10, repeat // 2))
            rows.append(dict(shape=f'{batch}x{height}x{width}x{channels}',
                             pass_=name, cudnn_ms=times['cudnn'],
                             triton_ms=times['triton'], bytes=moved[name],
                             floor_ms=moved[name] / bandwidth * 1e3,
                             best=best))
        del conv, x, grad
        torch.cuda.empty_cache()
    rows.append(dict(copy_gb_per_s=bandwidth / 1e9))
    return rows


def sweep_settings(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor,
                   device: torch.device, repeat: int) -> Optional[str]:
    """The fastest setting of the weight-gradient kernel (the values of
    :data:`SWEEP`) for the Triton forward + backward on these inputs."""
    results = []
    names = list(SWEEP)
    for values in itertools.product(*SWEEP.values()):
        settings = dict(zip(names, values), CONV_BACKWARD_ON_TRITON=True)
        try:
            with module_settings(dw, **settings):
                ms = measure(make_step(conv, x, grad, True), device, 2,
                             repeat)
        except Exception as error:  # noqa: BLE001 -- e.g. out of
            # resources at this setting: reported, not timed
            print(f'  {x.shape[-1]} channels, {values}: '
                  f'{type(error).__name__}')
            continue
        results.append((ms, values))
    if not results:
        return None
    ms, values = min(results)
    return f'{ms:.3f} ms: ' + ', '.join(
        f'{name[len("WGRAD_"):].lower()} {value}'
        for name, value in zip(names, values))


def print_model_table(results: List[Dict], batch: int) -> None:
    """The classifiers' table: rows of
    :func:`timing.switch_model_rows` (``off``: cuDNN, ``on``: Triton)."""
    print_table(
        f'Classifier steps, batch {batch} at 224: SS2D\'s '
        'convolution on cuDNN (CONV_BACKWARD_ON_TRITON off) and on '
        'Triton (on)',
        ['model', 'mode', 'cuDNN ms', 'Triton ms', 'img/s cuDNN',
         'img/s Triton', 'cuDNN / Triton', 'peak GiB cuDNN',
         'peak GiB Triton'],
        [[r['model'], r['mode'], _fmt(r['off']['ms'], '.1f'),
          _fmt(r['on']['ms'], '.1f'),
          _fmt(r['off']['img_per_s'], '.0f'),
          _fmt(r['on']['img_per_s'], '.0f'),
          _ratio(r['off']['ms'], r['on']['ms']),
          _fmt(r['off']['peak_gib'], '.2f'),
          _fmt(r['on']['peak_gib'], '.2f')] for r in results])


def _fmt(value, spec='.3f'):
    return '-' if value is None else format(value, spec)


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    if not numerator or not denominator:
        return '-'
    return format(numerator / denominator, '.2f')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--repeat', type=int, default=50)
    parser.add_argument('--sweep', action='store_true',
                        help='also time other weight-gradient settings')
    parser.add_argument('--models', nargs='*', default=[],
                        help='classifier names of benchmark.py throughput')
    parser.add_argument('--modes', nargs='+', choices=MODES,
                        default=['train-bf16'])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error('depthwise_conv.py needs a GPU')
    if dw.TRITON_IMPORT_ERROR:
        parser.error(dw.TRITON_IMPORT_ERROR)
    device = torch.device('cuda')
    rows = op_rows(args.batch, args.warmup, args.repeat, args.sweep)
    meta = rows.pop()
    print_floor_table(
        "SS2D's depthwise 3x3 convolution in training, bf16 autocast, input "
        'a half of a (B, H, W, 2E) bfloat16 map', rows,
        {'map': 'shape', 'pass': 'pass_'}, 'cuDNN', 'cudnn_ms', device,
        meta['copy_gb_per_s'], args.repeat, args.sweep)
    if args.models:
        results = switch_model_rows(args.models, args.modes, args.batch,
                                    args.warmup, max(10, args.repeat // 5),
                                    dw, 'CONV_BACKWARD_ON_TRITON')
        print_model_table(results, args.batch)
        rows.extend(results)
    return rows


if __name__ == '__main__':
    main()
