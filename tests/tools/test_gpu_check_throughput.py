"""tools/gpu_check/throughput.py on hand-made scalars.json logs: the median
iteration time over a range of iterations, img/s, the scaling efficiency,
the table, and its errors."""
import json

import pytest
import throughput
from throughput import (Throughput, efficiencies, markdown_table, measure,
                        median_time)


def train_row(step, time, data_time=0.01):
    """A training record as mmengine writes it (iteration-based loop)."""
    return dict(lr=1e-4, data_time=data_time, loss=1.5, decode_loss_ce=1.0,
                time=time, iter=step, memory=1000, step=step)


def write_run(work_dir, rows, stamp='20261201_120000'):
    """``rows`` as ``work_dir/<stamp>/vis_data/scalars.json``."""
    folder = work_dir / stamp / 'vis_data'
    folder.mkdir(parents=True)
    (folder / 'scalars.json').write_text(
        ''.join(json.dumps(row) + '\n' for row in rows))
    return str(work_dir)


def steady(iters, time, first_time=5.0):
    """``iters`` iterations of ``time`` s, the first one slow."""
    return [train_row(1, first_time)] + [
        train_row(i, time) for i in range(2, iters + 1)
    ]


def test_median_over_the_range():
    # iteration i takes i ms: the median of 50..150 (101 values) is 100 ms
    rows = [train_row(i, i / 1000) for i in range(1, 201)]
    assert median_time(rows, 50, 150) == pytest.approx(0.100)
    assert median_time(rows, 1, 200) == pytest.approx(0.1005)  # even: mean
    assert median_time(rows, 7, 7) == pytest.approx(0.007)
    # an even count of values: the mean of the two middle ones
    rows = [train_row(i, t) for i, t in enumerate([9.0, 4.0, 1.0, 3.0, 2.0],
                                                  1)]
    assert median_time(rows, 2, 5) == 2.5
    assert median_time(rows, 1, 5) == 3.0
    # outliers outside the range or in a few iterations do not move it
    rows = steady(150, 0.25)
    rows[99] = train_row(100, 30.0)
    assert median_time(rows, 50, 150) == 0.25
    # data_time is read the same way and may be 0
    rows = [train_row(i, 0.3, data_time=0.0) for i in range(1, 11)]
    assert median_time(rows, 1, 10, 'data_time') == 0.0


def test_only_training_records_count():
    # a validation record (no loss) logged under the last step, and a step
    # logged twice (as after a resume): the last training value counts
    rows = steady(10, 0.2)
    rows.append(dict(mIoU=10.0, data_time=0.5, time=9.0, step=10))
    rows.append(train_row(5, 0.2))
    assert median_time(rows, 1, 10) == 0.2
    with pytest.raises(ValueError, match="no training iteration with 'time'"):
        median_time([dict(mIoU=1.0, time=1.0, step=1)], 1, 1)


def test_missing_iterations_are_errors():
    rows = [r for r in steady(150, 0.2) if r['step'] not in (60, 61)]
    with pytest.raises(
            ValueError,
            match=r'2 of iterations 50\.\.150 not logged \(60, 61\); it '
            r'logged 148 iterations, the last 150: .*logger\.interval=1'):
        median_time(rows, 50, 150)
    # logged every 10 iterations (mmengine's default interval)
    rows = [r for r in steady(150, 0.2) if r['step'] % 10 == 0]
    with pytest.raises(ValueError,
                       match=r'90 of iterations 50\.\.150 not logged '
                       r'\(51, 52, 53, 54, 55 and 85 more\)'):
        median_time(rows, 50, 150)


def test_too_few_iterations():
    rows = steady(120, 0.2)
    with pytest.raises(ValueError,
                       match=r'30 of iterations 50\.\.150 not logged '
                       r'\(121, .*the last 120: train at least 150'):
        median_time(rows, 50, 150)


def test_bad_values_and_range():
    rows = steady(10, 0.2)
    rows[4] = train_row(5, float('nan'))
    with pytest.raises(ValueError, match=r'time is not a finite positive '
                       r'number at \(iteration, value\) \[\(5, nan\)\]'):
        median_time(rows, 1, 10)
    rows[4] = train_row(5, 0.0)
    with pytest.raises(ValueError, match=r'\(5, 0\.0\)'):
        median_time(rows, 1, 10)
    with pytest.raises(ValueError, match='need 1 <= first <= last'):
        median_time(rows, 8, 4)
    with pytest.raises(ValueError, match='need 1 <= first <= last'):
        median_time(rows, 0, 4)


def test_measure_reads_the_newest_run(tmp_path):
    write_run(tmp_path, steady(150, 9.0), stamp='20261201_110000')
    run = write_run(tmp_path, steady(150, 0.4), stamp='20261201_120000')
    result = measure('seg', 1, run)
    assert result == Throughput('seg', 1, 2, 0.4, 0.01)
    assert result.global_batch == 2
    assert result.images_per_second == pytest.approx(5.0)
    result = measure('seg', 4, run, batch_per_gpu=2)
    assert result.global_batch == 8
    assert result.images_per_second == pytest.approx(20.0)


def test_measure_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no scalars log at'):
        measure('det', 1, str(tmp_path / 'none'))
    empty = write_run(tmp_path / 'empty', [])
    with pytest.raises(ValueError, match='scalars.json is empty'):
        measure('det', 1, empty)
    short = write_run(tmp_path / 'short', steady(40, 0.4))
    with pytest.raises(ValueError,
                       match=r'short/.*scalars\.json: 101 of iterations '
                       r'50\.\.150 not logged'):
        measure('det', 1, short)


def test_efficiency_and_table():
    results = [
        Throughput('det', 1, 2, 0.4, 0.01),  # 5 img/s
        Throughput('det', 2, 2, 0.5, 0.01),  # 8 img/s: 80%
        Throughput('det', 4, 2, 0.8, 0.02),  # 10 img/s: 50%
        Throughput('seg', 2, 2, 0.25, 0.0),  # no 1-GPU run of seg
    ]
    eff = efficiencies(results)
    assert eff[('det', 1)] == pytest.approx(1.0)
    assert eff[('det', 2)] == pytest.approx(0.8)
    assert eff[('det', 4)] == pytest.approx(0.5)
    assert eff[('seg', 2)] is None
    assert markdown_table(results).splitlines() == [
        '| task | GPUs | global batch | median s/iter | median data s/iter '
        '| img/s | efficiency |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
        '| det | 1 | 2 | 0.4000 | 0.0100 | 5.00 | 100.0% |',
        '| det | 2 | 4 | 0.5000 | 0.0100 | 8.00 | 80.0% |',
        '| det | 4 | 8 | 0.8000 | 0.0200 | 10.00 | 50.0% |',
        '| seg | 2 | 4 | 0.2500 | 0.0000 | 16.00 | n/a |',
    ]


def test_cli(tmp_path, capsys):
    one = write_run(tmp_path / 'a:1gpu', steady(150, 0.4))  # ':' in a path
    two = write_run(tmp_path / '2gpu', steady(150, 0.5))
    assert throughput.main([f'det:1:{one}', f'det:2:{two}']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('Training throughput: median over iterations '
                             '50..150')
    assert out[-1] == '| det | 2 | 4 | 0.5000 | 0.0100 | 8.00 | 80.0% |'
    # a run that stopped early: its error, the table of the others, exit 1
    short = write_run(tmp_path / 'short', steady(100, 0.5))
    assert throughput.main([f'det:1:{one}', f'det:2:{short}']) == 1
    out = capsys.readouterr().out
    assert 'FAIL det on 2 GPU(s): ' in out and 'the last 100' in out
    assert '| det | 1 | 2 | 0.4000 |' in out and '| det | 2 |' not in out
    # another range
    assert throughput.main([f'det:1:{short}', '--first', '10', '--last',
                            '100']) == 0
    assert '| det | 1 | 2 | 0.5000 |' in capsys.readouterr().out


@pytest.mark.parametrize('argv,message', [
    (['det:0:run'], "GPUS of 'det:0:run' must be a positive integer"),
    (['det:x:run'], "GPUS of 'det:x:run' must be a positive integer"),
    (['det:run'], "expected TASK:GPUS:RUN, got 'det:run'"),
    (['det:1:a', 'det:1:b'], 'more than one run of det on 1 GPU'),
    (['det:1:a', '--first', '60', '--last', '50'],
     'need 1 <= --first <= --last, got 60 and 50'),
    (['det:1:a', '--batch-per-gpu', '0'], '--batch-per-gpu must be positive'),
])
def test_cli_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
