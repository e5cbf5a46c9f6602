"""Compare the logged losses of two training runs, iteration by iteration.

    python tools/analysis/compare_losses.py RUN_A RUN_B [--iters 20] \\
        [--tol 0.05] [--keys loss loss_cls ...]

RUN_A and RUN_B are work dirs (their newest ``<timestamp>/vis_data/
scalars.json``), run folders or ``scalars.json`` files. For each key
(default ``loss``; ``all``: every key holding ``loss`` that either run
logged) it prints step, A, B and the relative difference
``|a - b| / max(|a|, |b|)`` for iterations 1..ITERS, and exits with 1 when
any difference is above TOL, a value is NaN or infinite, or either run
logged fewer than ITERS of those iterations; 2 when a log cannot be read; 0
otherwise.

Train both runs with ``--cfg-options default_hooks.logger.interval=1
log_processor.window_size=1``: a record every iteration, holding that
iteration's losses (mmengine otherwise logs running means).

In a distributed run rank 0 logs its own share of the batch unless the run
had ``MeanLossAcrossRanksHook`` (``mmvmamba.engine``); see
``tools/gpu_check.sh compare``.

How the logs are read: mmengine writes every logged record of a run as one
JSON line in ``<work_dir>/<timestamp>/vis_data/scalars.json``: training
records hold ``step`` (the iteration, from 1), ``lr``, ``loss``, ``loss_*``,
``time``...; validation records hold their metrics under the same ``step``
key. A loss series is taken from the records that hold the loss's key, so
validation records never mix in. The helpers here also serve
``tools/gpu_check/check_losses.py`` (finite losses of single runs).
"""
import argparse
import glob
import json
import math
import os.path as osp
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

SCALARS = osp.join('vis_data', 'scalars.json')
INTERVAL_HINT = ('log every iteration: --cfg-options '
                 'default_hooks.logger.interval=1 log_processor.window_size=1')


def find_scalars(path: str) -> str:
    """The ``scalars.json`` of a run.

    Args:
        path (str): A ``scalars.json`` file; a run's timestamped folder
            (holding ``vis_data/scalars.json``); or a work dir, whose newest
            timestamped folder with a ``vis_data/scalars.json`` is taken
            (timestamps ``YYYYmmdd_HHMMSS`` sort by time; a folder of
            ``tools/test.py``, which writes none, is passed over).

    Raises:
        FileNotFoundError: No scalars file there.
    """
    if osp.isfile(path):
        return path
    direct = osp.join(path, SCALARS)
    if osp.isfile(direct):
        return direct
    runs = sorted(glob.glob(osp.join(glob.escape(path), '*', SCALARS)))
    if runs:
        return runs[-1]
    raise FileNotFoundError(
        f'no scalars log at {path}: expected a scalars.json, a run folder '
        f'with {SCALARS} or a work dir with <timestamp>/{SCALARS}')


def read_scalars(path: str) -> List[dict]:
    """The records of a run's scalars log (see :func:`find_scalars` for
    ``path``), in file order. ``NaN`` and ``Infinity`` parse as floats.

    Raises:
        ValueError: A line that is not a JSON object.
    """
    records = []
    with open(find_scalars(path)) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f'{path}: line {number} is not JSON '
                                 f'({error})') from None
            if not isinstance(record, dict):
                raise ValueError(f'{path}: line {number} is not a JSON '
                                 f'object (a record of mmengine\'s '
                                 f'scalars.json), got {line[:40]!r}')
            records.append(record)
    return records


def series(records: Iterable[dict], key: str) -> Dict[int, float]:
    """``{step: value}`` of ``key`` over the records that hold it and a
    ``step`` (a step logged twice, as after a resume, keeps its last
    value)."""
    values = {}
    for record in records:
        if key in record and 'step' in record:
            values[int(record['step'])] = float(record[key])
    return values


def loss_keys(records: Iterable[dict]) -> List[str]:
    """Every key of the records that names a loss, sorted: those holding
    ``loss``, as for mmengine's ``parse_losses`` (``loss``, mmdet's
    ``loss_cls``, mmseg's ``decode.loss_ce``...)."""
    return sorted({k for r in records for k in r if 'loss' in k})


def relative_difference(a: float, b: float) -> float:
    """``|a - b| / max(|a|, |b|)``: symmetric, 0 when both are 0, NaN when
    either is not finite (so it never passes a tolerance)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


@dataclass
class Row:
    """One iteration of one key: the two runs' values, their difference."""
    key: str
    step: int
    a: Optional[float]
    b: Optional[float]
    rel: float  # NaN where a value is missing or not finite


@dataclass
class LossComparison:
    """What :func:`compare_series` found; ``ok`` when nothing is wrong."""
    keys: Sequence[str]
    iters: int
    tol: float
    rows: List[Row] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self, names: Sequence[str] = ('A', 'B')) -> str:
        """Per key, one line per iteration: step, A, B, relative
        difference (``!`` marks those over the tolerance), then the largest
        difference, the two runs' means over the iterations (information
        only) and how far A's loss moved over them."""
        lines = []
        for key in self.keys:
            rows = [r for r in self.rows if r.key == key]
            lines.append(f'{"step":>5}  {key + " " + names[0]:>22}  '
                         f'{key + " " + names[1]:>22}  {"rel. diff":>9}')
            for r in rows:
                mark = '' if r.rel <= self.tol else '  !'
                lines.append(f'{r.step:>5}  {_fmt(r.a):>22}  '
                             f'{_fmt(r.b):>22}  {_pct(r.rel):>9}{mark}')
            finite = [r for r in rows if math.isfinite(r.rel)]
            if finite:
                worst = max(finite, key=lambda r: r.rel)
                lines.append(f'largest difference of {key}: '
                             f'{_pct(worst.rel)} at step {worst.step} '
                             f'(tolerance {_pct(self.tol)})')
            both = [r for r in rows if r.a is not None and r.b is not None]
            if both:
                mean_a = sum(r.a for r in both) / len(both)
                mean_b = sum(r.b for r in both) / len(both)
                lines.append(
                    f'mean of {key} over {len(both)} iterations: '
                    f'{names[0]} {mean_a:.6g}, {names[1]} {mean_b:.6g}, '
                    f'{_pct(relative_difference(mean_a, mean_b))} apart')
            known = [r for r in rows if r.a is not None]
            if len(known) > 1:
                first, last = known[0], known[-1]
                lines.append(
                    f'{key} of {names[0]} went from {first.a:.6g} (step '
                    f'{first.step}) to {last.a:.6g} (step {last.step}), '
                    f'{_pct(relative_difference(first.a, last.a))} apart')
            lines.append('')
        return '\n'.join(lines)


def _fmt(value: Optional[float]) -> str:
    return 'missing' if value is None else f'{value:.6f}'


def _pct(value: float) -> str:
    return 'n/a' if math.isnan(value) else f'{100 * value:.2f}%'


def compare_series(a: Iterable[dict],
                   b: Iterable[dict],
                   keys: Sequence[str] = ('loss', ),
                   iters: int = 20,
                   tol: float = 0.05) -> LossComparison:
    """Compare two runs' records over iterations 1..``iters``.

    A problem (``LossComparison.problems``) is: a run that logged fewer of
    those iterations for a key than ``iters``; a value that is NaN or
    infinite; a relative difference (:func:`relative_difference`) above
    ``tol``.
    """
    if iters < 1:
        raise ValueError(f'iters must be at least 1, got {iters}')
    if not tol >= 0 or math.isinf(tol):
        raise ValueError(f'tol must be a finite number >= 0, got {tol}')
    a, b = list(a), list(b)
    result = LossComparison(keys=list(keys), iters=iters, tol=tol)
    for key in keys:
        sa, sb = series(a, key), series(b, key)
        for name, values in (('A', sa), ('B', sb)):
            logged = [s for s in range(1, iters + 1) if s in values]
            if len(logged) < iters:
                result.problems.append(
                    f'run {name} logged {key} at {len(logged)} of iterations '
                    f'1..{iters}' + ('' if values else ' (the key is absent)')
                    + f'; {INTERVAL_HINT}, and train at least {iters} '
                    'iterations')
        for step in range(1, iters + 1):
            va, vb = sa.get(step), sb.get(step)
            rel = (math.nan if va is None or vb is None else
                   relative_difference(va, vb))
            result.rows.append(Row(key, step, va, vb, rel))
            if va is None or vb is None:
                continue
            if not (math.isfinite(va) and math.isfinite(vb)):
                result.problems.append(
                    f'{key} at step {step} is not finite (A {va}, B {vb})')
            elif rel > tol:
                result.problems.append(
                    f'{key} at step {step} differs by {_pct(rel)} > '
                    f'{_pct(tol)} (A {va:.6g}, B {vb:.6g})')
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('run_a', help='work dir, run folder or scalars.json')
    parser.add_argument('run_b', help='work dir, run folder or scalars.json')
    parser.add_argument(
        '--iters', type=int, default=20,
        help='compare iterations 1..ITERS (default 20)')
    parser.add_argument(
        '--tol', type=float, default=0.05,
        help='largest relative difference allowed (default 0.05)')
    parser.add_argument(
        '--keys', nargs='+', default=['loss'],
        help='logged keys to compare (default: loss; all: every key '
        'holding "loss")')
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f'--iters must be at least 1, got {args.iters}')
    if 'all' in args.keys and len(args.keys) > 1:
        parser.error(f'--keys all stands alone, got {" ".join(args.keys)}')
    if not args.tol >= 0 or math.isinf(args.tol):
        parser.error(f'--tol must be a finite number >= 0, got {args.tol}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        paths = [find_scalars(run) for run in (args.run_a, args.run_b)]
        records = [read_scalars(path) for path in paths]
    except (OSError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f'A: {paths[0]}\nB: {paths[1]}\n')
    keys = args.keys
    if keys == ['all']:
        keys = sorted(set(loss_keys(records[0])) | set(loss_keys(records[1])))
        if not keys:
            print('FAIL: --keys all: neither run logged a loss')
            return 1
    result = compare_series(*records, keys=keys, iters=args.iters,
                            tol=args.tol)
    print(result.table())
    if result.ok:
        print(f'PASS: {", ".join(keys)} of A and B agree within '
              f'{100 * args.tol:g}% over iterations 1..{args.iters}')
        return 0
    print(f'FAIL: {len(result.problems)} problem(s):')
    for problem in result.problems:
        print(f'  - {problem}')
    return 1


if __name__ == '__main__':
    sys.exit(main())
