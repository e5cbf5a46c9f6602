"""Scalar logs: tools/analysis/compare_losses.py (two runs compared) and
tools/gpu_check/check_losses.py (the finite-loss check)."""
import json
import math
import os
import os.path as osp

import check_losses as check_tool
import compare_losses as tool
import pytest
from check_losses import check_losses
from compare_losses import (compare_series, find_scalars, read_scalars,
                            relative_difference, series)


def write_run(work_dir, values, timestamp='20261127_080000', val=True,
              extra=None):
    """A work dir as mmengine leaves it: <timestamp>/vis_data/scalars.json
    with one training record per value (and a validation record)."""
    folder = osp.join(work_dir, timestamp, 'vis_data')
    os.makedirs(folder, exist_ok=True)
    path = osp.join(folder, 'scalars.json')
    with open(path, 'w') as f:
        for step, value in enumerate(values, 1):
            record = dict(lr=1e-4, data_time=0.1, loss=value,
                          loss_cls=value / 2, time=0.5, iter=step, step=step)
            record.update((extra or {}).get(step, {}))
            f.write(json.dumps(record) + '\n')  # NaN -> NaN, as mmengine
            if val and step == 2:  # validation shares the step numbers
                f.write(json.dumps({'coco/bbox_mAP': 0.1, 'step': 2}) + '\n')
    return path


BASE = [6.0 - 0.1 * i for i in range(20)]


def test_relative_difference():
    assert relative_difference(1.0, 1.0) == 0
    assert relative_difference(0.0, 0.0) == 0
    assert relative_difference(1.0, 0.95) == pytest.approx(0.05)
    assert relative_difference(0.95, 1.0) == pytest.approx(0.05)
    assert math.isnan(relative_difference(math.nan, 1.0))
    assert math.isnan(relative_difference(math.inf, math.inf))


def test_find_scalars_takes_the_newest_run(tmp_path):
    old = write_run(str(tmp_path), BASE, '20261127_080000')
    new = write_run(str(tmp_path), BASE, '20261127_090000')
    os.makedirs(tmp_path / '20261127_100000')  # tools/test.py: no scalars
    assert find_scalars(str(tmp_path)) == new
    assert find_scalars(osp.dirname(osp.dirname(old))) == old
    assert find_scalars(old) == old
    with pytest.raises(FileNotFoundError, match='no scalars log'):
        find_scalars(str(tmp_path / 'nothing'))


def test_series_skips_validation_records(tmp_path):
    records = read_scalars(write_run(str(tmp_path), BASE))
    assert len(records) == 21
    assert series(records, 'loss') == {i + 1: v for i, v in enumerate(BASE)}


def test_equal_logs_pass(tmp_path):
    a = read_scalars(write_run(str(tmp_path / 'a'), BASE))
    result = compare_series(a, a, keys=('loss', 'loss_cls'))
    assert result.ok and result.problems == []
    assert len(result.rows) == 40
    assert 'largest difference of loss: 0.00%' in result.table()


def test_a_difference_over_the_tolerance_fails(tmp_path):
    off = list(BASE)
    off[6] *= 1.06  # 6% at step 7
    a = read_scalars(write_run(str(tmp_path / 'a'), BASE))
    b = read_scalars(write_run(str(tmp_path / 'b'), off))
    result = compare_series(a, b, iters=20, tol=0.05)
    assert not result.ok
    assert len(result.problems) == 1 and 'step 7' in result.problems[0]
    assert compare_series(a, b, tol=0.06).ok
    # 4% passes at the default 5%
    off[6] = BASE[6] * 1.04
    b = read_scalars(write_run(str(tmp_path / 'c'), off))
    assert compare_series(a, b).ok


def test_too_few_iterations_fail(tmp_path):
    a = read_scalars(write_run(str(tmp_path / 'a'), BASE))
    b = read_scalars(write_run(str(tmp_path / 'b'), BASE[:12]))
    result = compare_series(a, b, iters=20)
    assert not result.ok
    assert any('12 of iterations 1..20' in p and 'interval=1' in p
               for p in result.problems)
    assert compare_series(a, b, iters=12).ok
    # an absent key is reported as such
    result = compare_series(a, a, keys=('loss_mask', ))
    assert 'absent' in result.problems[0]


def test_nan_fails(tmp_path):
    bad = list(BASE)
    bad[3] = math.nan
    a = read_scalars(write_run(str(tmp_path / 'a'), BASE))
    b_path = write_run(str(tmp_path / 'b'), bad)
    with open(b_path) as f:
        assert 'NaN' in f.read()  # as json.dumps and mmengine write it
    b = read_scalars(b_path)
    result = compare_series(a, b)
    assert not result.ok
    assert any('step 4 is not finite' in p for p in result.problems)
    assert compare_series(b, b).problems  # NaN never equals NaN


def test_check_losses(tmp_path):
    good = read_scalars(write_run(str(tmp_path / 'a'), BASE))
    assert check_losses(good) == []
    assert check_losses(good, min_iters=20) == []
    assert 'fewer than 30' in check_losses(good, min_iters=30)[0]
    inf = read_scalars(
        write_run(str(tmp_path / 'b'), BASE,
                  extra={5: dict(loss_mask=math.inf)}))
    problems = check_losses(inf)
    assert problems == ['loss_mask is not finite at 1 iterations '
                        '(step 5: inf)']
    assert check_losses([dict(step=1, acc=1.0)]) == ['no loss was logged']


def test_check_losses_cli(tmp_path, capsys):
    write_run(str(tmp_path / 'a'), BASE)
    bad = list(BASE)
    bad[0] = math.nan
    write_run(str(tmp_path / 'b'), bad)
    assert check_tool.main([str(tmp_path / 'a'), '--min-iters', '20']) == 0
    assert 'ok' in capsys.readouterr().out
    assert check_tool.main([str(tmp_path / 'a'), str(tmp_path / 'b')]) == 1
    out = capsys.readouterr().out
    assert 'FAIL' in out and 'loss is not finite' in out
    assert check_tool.main([str(tmp_path / 'missing')]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f'FAIL no scalars log at {tmp_path / "missing"}')
    assert out.count(str(tmp_path / 'missing')) == 1  # named once


@pytest.mark.parametrize('argv, message', [
    (['--iters', '0'], '--iters must be at least 1, got 0'),
    (['--tol', '-0.1'], '--tol must be a finite number >= 0, got -0.1'),
    (['--tol', 'nan'], '--tol must be a finite number >= 0, got nan'),
    (['--tol', 'inf'], '--tol must be a finite number >= 0, got inf'),
])
def test_bad_iters_or_tolerance_are_parser_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(['a', 'b', *argv])
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match='must be'):
        kwargs = dict(iters=1, tol=0.05)
        kwargs[argv[0][2:]] = float(argv[1])
        compare_series([], [], keys=['loss'], **kwargs)


def test_keys_that_were_never_logged_fail(tmp_path, capsys):
    """A key asked for and never logged is a problem, not a pass over
    nothing."""
    good = read_scalars(write_run(str(tmp_path / 'a'), BASE))
    assert check_losses(good, keys=['loss_typo']) == [
        'loss_typo was never logged (the logged losses: loss, loss_cls)']
    assert check_tool.main([str(tmp_path / 'a'), '--keys', 'loss_typo']) == 1
    assert 'loss_typo was never logged' in capsys.readouterr().out
    # no loss in either run: --keys all has nothing to compare
    write_run(str(tmp_path / 'b'), [])
    run = str(tmp_path / 'b')
    assert tool.main([run, run, '--keys', 'all']) == 1
    assert 'FAIL: --keys all: neither run logged a loss' in \
        capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool.parse_args(['a', 'b', '--keys', 'all', 'loss'])
    assert '--keys all stands alone, got all loss' in capsys.readouterr().err


@pytest.mark.parametrize('line', ['5', '[1, 2]', '"loss"'])
def test_a_line_that_is_not_a_record_is_an_error(line, tmp_path, capsys):
    """A message naming the file and the line, not a TypeError."""
    good = write_run(str(tmp_path / 'a'), BASE)
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(dict(step=1, loss=1.0)) + '\n' + line + '\n')
    with pytest.raises(ValueError, match='line 2 is not a JSON object'):
        read_scalars(str(bad))
    assert tool.main([good, str(bad)]) == 2
    assert 'bad.json: line 2 is not a JSON object' in capsys.readouterr().err
    assert check_tool.main([str(bad)]) == 1
    assert 'line 2 is not a JSON object' in capsys.readouterr().out


def test_negative_min_iters_is_a_parser_error(capsys):
    with pytest.raises(SystemExit):
        check_tool.parse_args(['run', '--min-iters', '-1'])
    assert '--min-iters must be at least 0, got -1' in capsys.readouterr().err


def test_compare_losses_tool(tmp_path, capsys):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    write_run(a, BASE)
    write_run(b, [v * 1.01 for v in BASE])
    assert tool.main([a, b]) == 0
    out = capsys.readouterr().out
    assert 'PASS' in out
    assert out.count('\n') > 20  # the per-iteration table
    assert '0.99%' in out  # 0.01 / 1.01

    assert tool.main([a, b, '--tol', '0.005']) == 1
    out = capsys.readouterr().out
    assert 'FAIL: 20 problem(s)' in out and '  !' in out

    assert tool.main([a, b, '--keys', 'all']) == 0
    out = capsys.readouterr().out
    assert 'loss_cls' in out and 'PASS: loss, loss_cls' in out

    short = str(tmp_path / 'short')
    write_run(short, BASE[:5])
    assert tool.main([a, short]) == 1
    assert 'logged loss at 5 of iterations 1..20' in capsys.readouterr().out
    assert tool.main([a, str(tmp_path / 'missing')]) == 2
