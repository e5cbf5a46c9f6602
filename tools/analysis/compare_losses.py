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
"""
import argparse
import sys

from mmvmamba.analysis.losses import (compare_series, find_scalars, loss_keys,
                                      read_scalars)


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
    return parser.parse_args(argv)


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
