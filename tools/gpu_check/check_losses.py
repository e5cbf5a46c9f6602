"""Check that the logged losses of training runs are finite.

    python tools/gpu_check/check_losses.py RUN [RUN ...] [--keys loss ...] \\
        [--min-iters N]

Each RUN is a work dir (its newest ``<timestamp>/vis_data/scalars.json``), a
run folder or a ``scalars.json`` file. It fails (exit 1) when a loss (default:
every logged key holding ``loss``) is NaN or infinite at some iteration, or
when fewer than ``--min-iters`` iterations of ``loss`` were logged (the logs
are read by ``tools/analysis/compare_losses.py``).
"""
import argparse
import math
import os.path as osp
import sys
from typing import Iterable, List, Optional, Sequence

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                            'analysis'))
from compare_losses import (INTERVAL_HINT, find_scalars,  # noqa: E402
                            loss_keys, read_scalars, series)


def check_losses(records: Iterable[dict],
                 keys: Optional[Sequence[str]] = None,
                 min_iters: int = 0) -> List[str]:
    """Problems of one run's losses: a NaN or infinite value of ``keys``
    (default: :func:`loss_keys`) or one of ``keys`` never logged, or fewer
    than ``min_iters`` logged iterations of ``loss``. An empty list when all
    is well."""
    records = list(records)
    keys = loss_keys(records) if keys is None else list(keys)
    problems = []
    if not keys:
        problems.append('no loss was logged')
    for key in keys:
        values = series(records, key)
        if not values:
            problems.append(f'{key} was never logged (the logged losses: '
                            f'{", ".join(loss_keys(records)) or "none"})')
        bad = [(s, v) for s, v in sorted(values.items())
               if not math.isfinite(v)]
        if bad:
            shown = ', '.join(f'step {s}: {v}' for s, v in bad[:5])
            more = f' and {len(bad) - 5} more' if len(bad) > 5 else ''
            problems.append(f'{key} is not finite at {len(bad)} iterations '
                            f'({shown}{more})')
    if min_iters:
        logged = len(series(records, 'loss'))
        if logged < min_iters:
            problems.append(f'loss logged at {logged} iterations, fewer '
                            f'than {min_iters}; {INTERVAL_HINT}')
    return problems


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        'runs', nargs='+', help='work dir, run folder or scalars.json')
    parser.add_argument(
        '--keys', nargs='+',
        help='keys to check (default: every key holding "loss")')
    parser.add_argument(
        '--min-iters', type=int, default=0,
        help='also fail when fewer iterations of loss were logged')
    args = parser.parse_args(argv)
    if args.min_iters < 0:
        parser.error(f'--min-iters must be at least 0, got {args.min_iters}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    failed = False
    for run in args.runs:
        try:
            path = find_scalars(run)
            records = read_scalars(path)
        except (OSError, ValueError) as error:
            print(f'FAIL {error}')  # the message names the path
            failed = True
            continue
        problems = check_losses(records, args.keys, args.min_iters)
        logged = len(series(records, 'loss'))
        keys = args.keys or loss_keys(records)
        if problems:
            failed = True
            print(f'FAIL {path}:')
            for problem in problems:
                print(f'  - {problem}')
        else:
            print(f'ok   {path}: {len(keys)} loss keys finite over {logged} '
                  'logged iterations')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
