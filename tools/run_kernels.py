"""Run every compiled kernel of mmvmamba once, forward and backward, on odd
shapes: the input of ``compute-sanitizer``.

    compute-sanitizer --tool memcheck python tools/run_kernels.py
    compute-sanitizer --tool racecheck python tools/run_kernels.py --only fused
    python tools/run_kernels.py --device cpu      # the CPU kernels
    python tools/run_kernels.py --list

Nothing is compared here (the tests compare every path with the float64
reference); each case checks only that its output and gradients are finite,
so that a sanitizer's report is the result. The cases cover what the launch
code chooses between: the plain scan in three dtypes and Q = 4 / 16 lanes a
channel; the fused four-direction scan at odd maps, every state count it
specialises (16, 15, 8, 4, 1), ranks up to 70 (the forward's step sizes on
the tensor cores, rank rows past 64), kept decays, segments (forced with
``MMVMAMBA_SCAN_SEGMENT_CHUNKS``), its N = 1 kernels, empty batches and
maps; and the VMamba-T / VMamba2-T backbones (LayerNorm, gate and depthwise
convolution kernels) in float32 and under bfloat16 autocast, VMamba-T also
under float16 autocast. Exit status 1 when a case fails, naming it.
"""
import argparse
import contextlib
import os
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmvmamba.models import VMamba, VMamba2  # noqa: E402
from mmvmamba.ops import cross_selective_scan, selective_scan  # noqa: E402
from mmvmamba.ops.backend import N1_ENV_VARIABLE  # noqa: E402

SEGMENT_ENV = 'MMVMAMBA_SCAN_SEGMENT_CHUNKS'
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (batch, D, H, W, R, N, x dtype, scan dtype, environment)
FUSED_CASES = [
    (2, 24, 7, 5, 3, 16, F32, F32, {}),
    (1, 40, 13, 9, 4, 16, BF16, F32, {}),
    (1, 40, 13, 9, 4, 16, F32, BF16, {}),
    (1, 40, 13, 9, 4, 16, F16, F32, {}),
    (1, 8, 1, 1, 2, 4, F32, F32, {}),
    (2, 48, 14, 14, 24, 16, F32, F32, {}),
    (1, 24, 5, 13, 70, 16, F32, F32, {}),
    (2, 40, 9, 15, 20, 15, F32, F32, {}),
    (2, 24, 7, 9, 33, 8, BF16, F32, {}),
    (1, 16, 3, 30, 1, 1, F32, F32, {}),
    (2, 40, 11, 37, 4, 16, F32, F32, {SEGMENT_ENV: '1'}),
    (2, 40, 11, 37, 4, 16, BF16, F32, {SEGMENT_ENV: '3'}),
    (2, 40, 11, 37, 20, 15, F32, F32, {SEGMENT_ENV: '2'}),
    (2, 40, 11, 37, 48, 16, F32, F32, {SEGMENT_ENV: '3'}),
    (2, 40, 11, 37, 20, 16, F16, F32, {SEGMENT_ENV: '2'}),
    (1, 16, 24, 30, 2, 16, F32, F32, {}),
    (3, 33, 5, 7, 6, 1, F32, F32, {N1_ENV_VARIABLE: '1'}),
    (2, 200, 7, 7, 12, 1, BF16, F32, {N1_ENV_VARIABLE: '1'}),
    (1, 33, 64, 64, 6, 1, F32, F32, {N1_ENV_VARIABLE: '1'}),
    (0, 24, 7, 5, 3, 16, F32, F32, {}),
    (2, 24, 0, 5, 3, 16, F32, F32, {}),
]
# (batch, channels, groups, N, L, dtype, environment)
PLAIN_CASES = [
    (2, 5, 1, 16, 131, F32, {}),
    (2, 6, 2, 4, 131, F16, {}),
    (1, 3, 1, 16, 1, BF16, {}),
    (1, 4, 1, 1, 77, F32, {}),
    (2, 5, 1, 16, 1000, F32, {SEGMENT_ENV: '2'}),
    (1, 4, 2, 8, 517, BF16, {SEGMENT_ENV: '1'}),
]
# (class, input (batch, H, W), autocast dtype)
BACKBONE_CASES = [
    (VMamba, (2, 71, 103), None),
    (VMamba, (1, 64, 96), BF16),
    (VMamba, (1, 64, 96), F16),
    (VMamba2, (2, 71, 103), None),
    (VMamba2, (1, 64, 96), BF16),
]


@contextlib.contextmanager
def environment(values: Dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` within the block, then restore."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _grads(out: torch.Tensor, inputs: List[torch.Tensor]) -> List:
    """Gradients of a fixed random projection of ``out``."""
    dy = torch.randn(out.shape, device=out.device, dtype=out.dtype)
    return list(torch.autograd.grad((out * dy).sum(), inputs,
                                    allow_unused=True))


def run_fused(case: Tuple, device: torch.device) -> List[torch.Tensor]:
    batch, d_inner, H, W, rank, d_state, x_dtype, scan_dtype, _ = case
    params = [
        torch.randn(4, rank + 2 * d_state, d_inner) * d_inner**-0.5,
        (torch.rand(4, d_inner, rank) * 2 - 1) * rank**-0.5,
        torch.rand(4, d_inner) * 4 - 5,
        torch.log(torch.rand(4 * d_inner, d_state) * 8 + 0.5),
        torch.randn(4 * d_inner),
    ]
    params = [p.to(device).requires_grad_() for p in params]
    x = torch.randn(batch, H, W, d_inner, device=device,
                    dtype=x_dtype).requires_grad_()
    y = cross_selective_scan(x, *params, channels_last=True,
                             scan_dtype=scan_dtype, silu=True)
    return [y, *_grads(y, [x, *params])]


def run_plain(case: Tuple, device: torch.device) -> List[torch.Tensor]:
    batch, channels, groups, d_state, length, dtype, _ = case

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, device=device,
                           dtype=dtype).requires_grad_()

    inputs = [
        rand(batch, channels, length),
        rand(batch, channels, length),
        (-torch.rand(channels, d_state, device=device) -
         0.5).requires_grad_(),
        rand(batch, groups, d_state, length),
        rand(batch, groups, d_state, length),
        rand(channels, dtype=F32),
        rand(channels, dtype=F32),
    ]
    y = selective_scan(*inputs, delta_softplus=True)
    return [y, *_grads(y, inputs)]


def run_backbone(case: Tuple, device: torch.device) -> List[torch.Tensor]:
    cls, (batch, H, W), dtype = case
    model = cls('tiny', out_indices=(0, 1, 2, 3)).to(device).train()
    x = torch.randn(batch, 3, H, W, device=device)
    with torch.autocast(device.type, dtype=dtype or F32,
                        enabled=dtype is not None):
        outs = model(x)
    loss = sum(out.float().square().mean() for out in outs)
    loss.backward()
    return [*outs, *(p.grad for p in model.parameters())]


def cases() -> List[Tuple[str, Callable, Tuple, Dict[str, str]]]:
    """Every case as ``(name, runner, case, environment)``."""
    found = []
    for case in FUSED_CASES:
        b, d, h, w, r, n, xd, sd, env = case
        name = (f'fused b{b} D{d} {h}x{w} R{r} N{n} x={str(xd)[6:]} '
                f'scan={str(sd)[6:]}' +
                ''.join(f' {k}={v}' for k, v in env.items()))
        found.append((name, run_fused, case, env))
    for case in PLAIN_CASES:
        b, c, g, n, length, dtype, env = case
        name = (f'plain b{b} C{c} G{g} N{n} L{length} {str(dtype)[6:]}' +
                ''.join(f' {k}={v}' for k, v in env.items()))
        found.append((name, run_plain, case, env))
    for case in BACKBONE_CASES:
        cls, shape, dtype = case
        name = (f'backbone {cls.__name__}-T {shape} '
                f'{"autocast " + str(dtype)[6:] if dtype else "float32"}')
        found.append((name, run_backbone, case, {}))
    return found


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--only', nargs='+', default=[],
                        choices=['fused', 'plain', 'backbone'],
                        help='run these kinds of case only')
    parser.add_argument('--list', action='store_true',
                        help='print the cases and exit')
    args = parser.parse_args(argv)
    chosen = [c for c in cases()
              if not args.only or c[0].split()[0] in args.only]
    if args.list:
        print('\n'.join(name for name, *_ in chosen))
        return 0
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('run_kernels.py: --device cuda, but torch sees no GPU; '
              'pass --device cpu for the CPU kernels', file=sys.stderr)
        return 2
    torch.manual_seed(0)
    failed = []
    for name, runner, case, env in chosen:
        with environment(env):
            try:
                tensors = runner(case, device)
                bad = [i for i, t in enumerate(tensors)
                       if t is not None and not torch.isfinite(t).all()]
                status = f'not finite: results {bad}' if bad else 'ok'
            except Exception as error:  # reported, then the next case
                status = f'{type(error).__name__}: {error}'
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        print(f'{status:>4}  {name}', flush=True)
        if status != 'ok':
            failed.append(name)
    print(f'{len(chosen) - len(failed)} of {len(chosen)} cases ran'
          + (f'; failed: {failed}' if failed else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
