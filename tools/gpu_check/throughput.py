"""Training throughput and scaling efficiency of ``tools/gpu_check.sh
scaling``'s runs, as a markdown table.

    python tools/gpu_check/throughput.py TASK:GPUS:RUN [TASK:GPUS:RUN ...] \\
        [--first 50] [--last 150] [--batch-per-gpu 2]

Each argument names a training run of TASK (a name such as ``det``) on GPUS
GPUs; RUN is its work dir (its newest ``<timestamp>/vis_data/scalars.json``),
run folder or ``scalars.json`` file. mmengine writes one record per logged
training iteration there, holding ``step`` (the iteration, from 1), ``time``
(seconds of the iteration, measured on rank 0: with
``log_processor.window_size=1`` that iteration's own, not a running mean),
``data_time`` and the losses; records without a loss (validation) are left
out.

For each run: the median of ``time`` (and of ``data_time``) over iterations
FIRST to LAST, both included (default 50 to 150: 101 iterations, after the
first ones' warm-up of the caches, cuDNN and the data workers), every one of
which must be logged; the throughput ``img/s = batch per GPU x GPUS /
median time``; the scaling efficiency ``img/s(N) / (N x img/s(1))`` against
the same task's 1-GPU run (``n/a`` without one). Exit status 1 when a run
cannot be read or lacks an iteration of the range (its error is printed,
the table holds the other runs), 2 for bad arguments, 0 otherwise.
"""
import argparse
import math
import os.path as osp
import statistics
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                            'analysis'))
from compare_losses import (INTERVAL_HINT, find_scalars,  # noqa: E402
                            read_scalars)


def iteration_times(records: Iterable[dict],
                    key: str = 'time') -> Dict[int, float]:
    """``{iteration: key}`` over the training records (those holding
    ``step``, ``key`` and a loss; a step logged twice keeps its last
    value)."""
    times = {}
    for record in records:
        if 'step' in record and key in record and any('loss' in k
                                                      for k in record):
            times[int(record['step'])] = float(record[key])
    return times


def median_time(records: Iterable[dict],
                first: int = 50,
                last: int = 150,
                key: str = 'time') -> float:
    """The median of ``key`` over iterations ``first`` to ``last`` (both
    included) of a run's records.

    Raises:
        ValueError: A bad range; no training iteration logged; an iteration
            of the range not logged (the run stopped early or logged at
            intervals); a value of the range that is not finite, negative,
            or a ``time`` of 0.
    """
    if not 1 <= first <= last:
        raise ValueError(
            f'need 1 <= first <= last, got first {first}, last {last}')
    times = iteration_times(records, key)
    if not times:
        raise ValueError(f'no training iteration with {key!r} logged')
    missing = [i for i in range(first, last + 1) if i not in times]
    if missing:
        shown = ', '.join(map(str, missing[:5]))
        more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
        raise ValueError(
            f'{len(missing)} of iterations {first}..{last} not logged '
            f'({shown}{more}); it logged {len(times)} iterations, the last '
            f'{max(times)}: train at least {last} iterations and '
            f'{INTERVAL_HINT}')
    values = [times[i] for i in range(first, last + 1)]
    # an iteration takes time; it may wait no time for its data
    bad = [(i, v) for i, v in zip(range(first, last + 1), values)
           if not math.isfinite(v) or v < 0 or (v == 0 and key == 'time')]
    if bad:
        raise ValueError(f'{key} is not a finite positive number at '
                         f'(iteration, value) {bad[:5]}')
    return statistics.median(values)


@dataclass
class Throughput:
    """One run's median iteration times and what follows from them."""
    task: str
    gpus: int
    batch_per_gpu: int
    time: float  # median seconds per iteration
    data_time: float  # median seconds of them waiting for data

    @property
    def global_batch(self) -> int:
        return self.batch_per_gpu * self.gpus

    @property
    def images_per_second(self) -> float:
        return self.global_batch / self.time


def measure(task: str,
            gpus: int,
            run: str,
            first: int = 50,
            last: int = 150,
            batch_per_gpu: int = 2) -> Throughput:
    """The :class:`Throughput` of the run at ``run`` (see
    :func:`compare_losses.find_scalars`).

    Raises:
        FileNotFoundError: No scalars log there.
        ValueError: An empty or unreadable log, or one that
            :func:`median_time` refuses.
    """
    path = find_scalars(run)
    records = read_scalars(path)
    if not records:
        raise ValueError(f'{path} is empty')
    try:
        time = median_time(records, first, last, 'time')
        data_time = median_time(records, first, last, 'data_time')
    except ValueError as error:
        raise ValueError(f'{path}: {error}') from None
    return Throughput(task, gpus, batch_per_gpu, time, data_time)


def efficiencies(
        results: Sequence[Throughput]) -> Dict[Tuple[str, int],
                                               Optional[float]]:
    """``{(task, gpus): img/s(gpus) / (gpus x img/s(1))}``; None where the
    task has no 1-GPU result."""
    single = {r.task: r.images_per_second for r in results if r.gpus == 1}
    return {(r.task, r.gpus): (r.images_per_second /
                               (r.gpus * single[r.task])
                               if r.task in single else None)
            for r in results}


def markdown_table(results: Sequence[Throughput]) -> str:
    """A markdown table of ``results``: task, GPUs, global batch, median
    seconds per iteration (and of data loading), img/s, efficiency."""
    eff = efficiencies(results)
    lines = [
        '| task | GPUs | global batch | median s/iter | median data s/iter '
        '| img/s | efficiency |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for r in results:
        e = eff[(r.task, r.gpus)]
        shown = 'n/a' if e is None else f'{100 * e:.1f}%'
        lines.append(f'| {r.task} | {r.gpus} | {r.global_batch} | '
                     f'{r.time:.4f} | {r.data_time:.4f} | '
                     f'{r.images_per_second:.2f} | {shown} |')
    return '\n'.join(lines)


def parse_run(spec: str) -> Tuple[str, int, str]:
    """``TASK:GPUS:RUN`` as ``(task, gpus, run)`` (RUN may hold ``:``).

    Raises:
        ValueError: Not of that form, or GPUS not a positive integer.
    """
    parts = spec.split(':', 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ValueError(f'expected TASK:GPUS:RUN, got {spec!r}')
    task, gpus, run = parts
    if not gpus.isdigit() or int(gpus) < 1:
        raise ValueError(f'GPUS of {spec!r} must be a positive integer, '
                         f'got {gpus!r}')
    return task, int(gpus), run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python tools/gpu_check/throughput.py',
        description=__doc__.split('\n\n')[0].replace('\n', ' '))
    parser.add_argument(
        'runs', nargs='+', metavar='TASK:GPUS:RUN',
        help='a run of TASK on GPUS GPUs: work dir, run folder or '
        'scalars.json')
    parser.add_argument('--first', type=int, default=50,
                        help='first iteration of the median (from 1)')
    parser.add_argument('--last', type=int, default=150,
                        help='last iteration of the median (included)')
    parser.add_argument('--batch-per-gpu', type=int, default=2)
    args = parser.parse_args(argv)
    if not 1 <= args.first <= args.last:
        parser.error(f'need 1 <= --first <= --last, got {args.first} and '
                     f'{args.last}')
    if args.batch_per_gpu < 1:
        parser.error(f'--batch-per-gpu must be positive, got '
                     f'{args.batch_per_gpu}')
    try:
        args.runs = [parse_run(spec) for spec in args.runs]
    except ValueError as error:
        parser.error(str(error))
    seen = [(task, gpus) for task, gpus, _ in args.runs]
    twice = sorted({k for k in seen if seen.count(k) > 1})
    if twice:
        parser.error('more than one run of ' + ', '.join(
            f'{task} on {gpus} GPU(s)' for task, gpus in twice))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results: List[Throughput] = []
    failed = False
    for task, gpus, run in args.runs:
        try:
            results.append(measure(task, gpus, run, args.first, args.last,
                                   args.batch_per_gpu))
        except (OSError, ValueError) as error:
            print(f'FAIL {task} on {gpus} GPU(s): {error}')
            failed = True
    if results:
        print(f'Training throughput: median over iterations {args.first}..'
              f'{args.last} of the time rank 0 logged, '
              f'{args.batch_per_gpu} images per GPU; efficiency = img/s(N) '
              '/ (N x img/s(1))\n')
        print(markdown_table(results))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
