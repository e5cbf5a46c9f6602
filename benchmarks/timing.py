"""Timing of models: medians after warm-up, CUDA events on GPUs.

Modes of :func:`time_mode` (a model from :mod:`models`):

- ``infer-fp32``: forward in eval mode without gradients, float32;
- ``infer-bf16``: the same under bfloat16 autocast;
- ``train-bf16``: one training step in train mode under bfloat16 autocast:
  forward, cross-entropy on random labels, backward, AdamW step.

Inputs are fresh standard-normal images, never zeros. On a GPU, cuDNN's
autotuner is switched on; float32 matmuls keep PyTorch's default (no TF32).
:func:`timed` is the guard around any step (peak memory, OOM, which scans
ran; on request :func:`gpu_time` of one step, from ``torch.profiler``) and
:func:`relative_to` the ratios of a table's rows to reference rows.
:func:`module_settings` sets a module's attributes (an op's switch, launch
settings) in a block, and :func:`switch_model_rows` times classifier steps
with a module's switch off and on. :func:`check_cli_args` is the scripts'
check of ``--device`` and (:func:`check_lower_bounds`) of their sizes and
counts.
"""
import argparse
import gc
import statistics
import time
from contextlib import contextmanager
from types import ModuleType
from typing import (Callable, Dict, Iterator, List, Optional, Sequence,
                    Tuple, Union)

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmvmamba.ops.backend import RecordScans, describe

MODES = ('infer-fp32', 'infer-bf16', 'train-bf16')


def measure(fn: Callable[[], object], device: torch.device, warmup: int,
            repeat: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on a GPU;
    :func:`host_and_wall_ms`)."""
    return host_and_wall_ms(fn, device, warmup, repeat)[1]


def host_and_wall_ms(fn: Callable[[], object], device: torch.device,
                     warmup: int, repeat: int) -> Tuple[float, float]:
    """Median host time of ``fn`` (until it returns, its GPU work not
    awaited) and median wall time (CUDA events on a GPU; off the GPU the
    host's clock, the same time), in milliseconds. A host time near the
    wall time means the host, not the GPU, bounds ``fn``."""
    for _ in range(warmup):
        fn()
    host, wall = [], []
    for _ in range(repeat):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize(device)
            wall.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            wall.append(host[-1])
    return statistics.median(host), statistics.median(wall)


def device_kernels(events: Sequence) -> List:
    """The GPU work among ``torch.profiler``'s ``key_averages()``: kernels,
    copies and memsets, without the GPU ranges of ``record_function``
    annotations (the optimizer's step, say), which span kernels counted
    already."""
    return [
        e for e in events if e.self_device_time_total > 0
        and e.device_type != torch.autograd.DeviceType.CPU
        and not getattr(e, 'is_user_annotation', False)
    ]


#: Kinds of mmvmamba's CUDA scan kernels, by a pattern of the kernel's name
#: (the first that matches names the kind).
SCAN_KINDS = (
    ('forward summaries', 'scan_fwd_summary_kernel'),
    ('backward summaries', 'scan_bwd_summary_kernel'),
    ('carries between segments', 'scan_carry_kernel'),
    ('forward, full passes', 'scan_fwd_kernel'),
    ('backward, full passes', 'scan_bwd_kernel'),
    ('N = 1 forward', 'n1_fwd_kernel'),
    ('N = 1 backward', 'n1_bwd_kernel'),
)


def scan_kernel_kind(name: str) -> Optional[str]:
    """The kind (:data:`SCAN_KINDS`) of an mmvmamba scan kernel from its
    name as the profiler reports it; None for any other kernel."""
    if 'mmvmamba::' not in name:
        return None
    return next((kind for kind, part in SCAN_KINDS if part in name), None)


def gpu_time(fn: Callable[[], object],
             device: torch.device) -> Dict[str, Optional[float]]:
    """GPU time of one call of ``fn``, summed over its kernels and copies.

    From ``torch.profiler`` (CUDA activity). A step whose wall time is far
    above ``gpu_ms`` is bound by the host (Python, launches, the syncs of
    data-dependent shapes), not by its kernels.

    Returns:
        dict: ``gpu_ms`` (all kernels and copies) and ``scan_ms`` (those of
        mmvmamba's extension: the selective scans), both None off the GPU.
    """
    if device.type != 'cuda':
        return dict(gpu_ms=None, scan_ms=None)
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    events = device_kernels(prof.key_averages())
    total = sum(e.self_device_time_total for e in events)
    scan = sum(e.self_device_time_total for e in events
               if 'mmvmamba::' in e.key)
    return dict(gpu_ms=total / 1e3, scan_ms=scan / 1e3)


def print_table(title: str, header: List[str], rows: List[List]) -> None:
    """Print a plain-text table with right-aligned columns."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f'\n{title}')
    for i, row in enumerate(cells):
        print('  '.join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print('  '.join('-' * w for w in widths))


def print_floor_table(title: str, rows: List[Dict], lead: Dict[str, str],
                      reference: str, reference_key: str,
                      device: torch.device, copy_gb_per_s: float,
                      repeat: int, sweep: bool = False) -> None:
    """Print an op's timings against its bandwidth floor, a row each.

    Args:
        title (str): What is timed (the device, copy bandwidth and repeats
            are added).
        rows (list[dict]): With the keys of ``lead``, ``reference_key`` and
            ``triton_ms`` (median ms), ``bytes`` (moved at least),
            ``floor_ms`` (those over the copy bandwidth) and, with
            ``sweep``, ``best`` (the fastest setting, or None).
        lead (dict): Header -> key of the columns that name the row.
        reference (str): The path Triton is timed against (``'ATen'``).
        reference_key (str): Its key in ``rows``.
        device (torch.device): Where it ran.
        copy_gb_per_s (float): The copy bandwidth measured.
        repeat (int): Timed calls a row.
        sweep (bool): Add the column of the fastest setting.
    """
    header = list(lead) + [
        f'{reference} ms', 'Triton ms', f'{reference} / Triton', 'GB moved',
        'floor ms', f'{reference} x floor', 'Triton x floor'
    ] + (['fastest Triton setting'] if sweep else [])
    table = []
    for r in rows:
        ref_ms, triton_ms, floor_ms = (r[reference_key], r['triton_ms'],
                                       r['floor_ms'])
        table.append([r[key] for key in lead.values()] + [
            f'{ref_ms:.3f}', f'{triton_ms:.3f}', f'{ref_ms / triton_ms:.2f}',
            f'{r["bytes"] / 1e9:.3f}', f'{floor_ms:.3f}',
            f'{ref_ms / floor_ms:.2f}', f'{triton_ms / floor_ms:.2f}'
        ] + ([r['best'] or '-'] if sweep else []))
    print_table(
        f'{title}, {device_name(device)}, copy bandwidth '
        f'{copy_gb_per_s:.0f} GB/s, median of {repeat}', header, table)


def device_name(device: torch.device) -> str:
    """The card's name, or the CPU with its thread count."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU, {torch.get_num_threads()} threads'


def _step(model: nn.Module, mode: str, x: torch.Tensor) -> Callable:
    """One iteration of ``mode`` on ``model`` (``model(x)`` gives logits)."""
    device_type = x.device.type
    if mode == 'train-bf16':
        model.train()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4)
        labels = []  # random classes, drawn once the class count is known

        def train_step():
            with torch.autocast(device_type, dtype=torch.bfloat16):
                logits = model(x)
            if not labels:
                labels.append(
                    torch.randint(0, logits.shape[1], (x.shape[0], ),
                                  device=x.device))
            loss = F.cross_entropy(logits.float(), labels[0])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return train_step
    model.eval()
    dtype = torch.bfloat16 if mode == 'infer-bf16' else None

    @torch.no_grad()
    def infer_step():
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16,
                            enabled=dtype is not None):
            model(x)

    return infer_step


def timed(make_step: Callable[[], Callable[[], object]],
          batch: int,
          device: torch.device,
          warmup: int = 5,
          repeat: int = 20,
          cudnn_benchmark: bool = True,
          profile: bool = False) -> Dict[str, Optional[float]]:
    """Time the step that ``make_step()`` returns, catching GPU OOM.

    ``make_step`` is called inside the guard, so that allocating its inputs
    may run out of memory too. The first warm-up step (one step even with
    ``warmup=0``) runs under :class:`mmvmamba.ops.backend.RecordScans`,
    which records the scans that ran. The peak of allocated GPU memory is
    that of the timed steps, after the warm-up (whose first steps also hold
    cuDNN's autotuner workspaces), as mmengine's logger reports it during
    training.

    Args:
        make_step (Callable): Returns the step, a callable of no arguments.
        batch (int): Images per step (for ``img_per_s``).
        device (torch.device): Where the step runs.
        warmup (int): Untimed steps first (at least one is run).
        repeat (int): Timed steps; the median is reported.
        cudnn_benchmark (bool): Value of ``torch.backends.cudnn.benchmark``
            (the autotuner) on a GPU. Defaults to True.
        profile (bool): Also profile one more step with :func:`gpu_time`
            (after the peak memory is read). Defaults to False.

    Returns:
        dict: ``ms`` (median per step), ``img_per_s``, ``peak_gib`` (peak
        allocated GPU memory, None on the CPU), ``status`` (``'ok'`` or
        ``'OOM'``, when the GPU ran out of memory), ``scan`` (the scans that
        ran, :func:`mmvmamba.ops.backend.describe`; None if the first step
        did not finish) and, with ``profile``, the keys of :func:`gpu_time`.
    """
    result = dict(ms=None, img_per_s=None, peak_gib=None, status='ok',
                  scan=None)
    if profile:
        result.update(gpu_ms=None, scan_ms=None)
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        gc.collect()  # tensors of earlier runs held in reference cycles
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = make_step()
        with RecordScans() as scans:
            step()
        result['scan'] = describe(scans.ran)
        for _ in range(warmup - 1):
            step()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        ms = measure(step, device, 0, repeat)
    except torch.OutOfMemoryError:
        result['status'] = 'OOM'
    else:
        result.update(ms=ms, img_per_s=batch * 1e3 / ms)
    if cuda:
        result['peak_gib'] = torch.cuda.max_memory_allocated(device) / 2**30
    if profile and result['status'] == 'ok':
        result.update(gpu_time(step, device))
    if cuda:
        torch.cuda.empty_cache()
    return result


def time_mode(model: nn.Module, mode: str, batch: int, size: int,
              device: torch.device, warmup: int = 5,
              repeat: int = 20) -> Dict[str, Optional[float]]:
    """Time one mode of a classifier at ``batch`` images of ``size``.

    Args:
        model (nn.Module): ``model(images)`` returns logits (wrap OpenMMLab
            models with :func:`models.tensor_forward`);
            already on ``device``.
        mode (str): One of :data:`MODES`.
        batch (int): Images per iteration.
        size (int): Image height and width.
        device (torch.device): Where to run.
        warmup (int): Untimed iterations first.
        repeat (int): Timed iterations; the median is reported.

    Returns:
        dict: As :func:`timed`.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    try:
        return timed(
            lambda: _step(model, mode,
                          torch.randn(batch, 3, size, size, device=device)),
            batch, device, warmup, repeat)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@contextmanager
def module_settings(module: Union[ModuleType, object],
                    **values) -> Iterator[None]:
    """Set attributes of ``module`` (a Python module, or any object such
    as an ``nn.Module``) in a block (restored after, errors too).

    Raises:
        AttributeError: If ``module`` has no attribute of one of the names
            (nothing is set then).
    """
    missing = sorted(name for name in values if not hasattr(module, name))
    if missing:
        owner = getattr(module, '__name__', type(module).__name__)
        raise AttributeError(f'{owner} has no attribute(s) {missing} to set')
    saved = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def switch_model_rows(names: Sequence[str], modes: Sequence[str],
                      batch: int, warmup: int, repeat: int,
                      module: ModuleType, attr: str, device='cuda',
                      size: int = 224) -> List[Dict]:
    """Classifier steps with a module's switch ``attr`` off and on.

    Args:
        names (Sequence[str]): Classifiers (:func:`models.build_classifier`).
        modes (Sequence[str]): Modes of :func:`time_mode`.
        batch (int): Images a step.
        warmup (int): Untimed steps first.
        repeat (int): Timed steps; the median is reported.
        module (ModuleType): The module holding the switch.
        attr (str): The switch's name (set to False, then True; restored).
        device (str | torch.device): Where to run. Defaults to 'cuda'.
        size (int): Image height and width. Defaults to 224.

    Returns:
        list[dict]: One a classifier and mode: ``model``, ``mode``, and
        ``off`` and ``on``, each a result of :func:`time_mode`.
    """
    if not hasattr(module, attr):
        raise AttributeError(f'{module.__name__} has no switch {attr!r}')
    from models import build_classifier, model_label, tensor_forward
    device = torch.device(device)
    rows = []
    for name in names:
        model = tensor_forward(
            build_classifier(name).to(device), 'mmpretrain', batch,
            (size, size))
        for mode in modes:
            times = {}
            for key, on in (('off', False), ('on', True)):
                with module_settings(module, **{attr: on}):
                    times[key] = time_mode(model, mode, batch, size, device,
                                           warmup, repeat)
            rows.append(dict(model=model_label(name), mode=mode, **times))
        del model
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows


def relative_to(rows: List[Dict], reference_of: Dict[str, str], key: str,
                match: Sequence[str] = ('mode', )) -> List[Optional[float]]:
    """``row[key]`` over the same value of each row's reference row.

    The reference of a row is the row whose ``model`` is
    ``reference_of[row['model']]`` and whose ``match`` keys are equal.
    Rows whose ``status`` is not ``'ok'`` (OOM, failed) are not compared.

    Returns:
        list: One ratio a row; None where the row or its reference is
        missing, not ok, or lacks the value.
    """

    def usable(row: Optional[Dict]) -> bool:
        return (row is not None and row.get('status', 'ok') == 'ok'
                and bool(row.get(key)))

    index = {(row['model'], ) + tuple(row[k] for k in match): row
             for row in rows}
    ratios = []
    for row in rows:
        ref = index.get((reference_of.get(row['model']), ) +
                        tuple(row[k] for k in match))
        ratios.append(row[key] / ref[key] if usable(row) and usable(ref)
                      else None)
    return ratios


def check_lower_bounds(parser: argparse.ArgumentParser,
                       args: argparse.Namespace,
                       lower_bounds: Dict[str, int]) -> None:
    """Refuse, as a parser error, a size or count of ``args`` below its
    bound in ``lower_bounds`` (an int or a list of them; absent or None
    arguments are skipped)."""
    for name, bound in lower_bounds.items():
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        if value is not None and min(values) < bound:
            option = '--' + name.replace('_', '-')
            shown = ' '.join(map(str, values))
            parser.error(f'{option} must be at least {bound}, got {shown}')


def check_cli_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   lower_bounds: Dict[str, int]) -> None:
    """Refuse, as parser errors, an ``args.device`` that torch has not got
    here, then what :func:`check_lower_bounds` refuses."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        parser.error(f'--device must be cpu or cuda[:N], got {args.device!r}')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            parser.error(f'--device {args.device}: torch sees no GPU here '
                         '(run with --device cpu)')
        if (device.index or 0) >= torch.cuda.device_count():
            parser.error(f'--device {args.device}: there are '
                         f'{torch.cuda.device_count()} GPUs')
    check_lower_bounds(parser, args, lower_bounds)
