"""The modules of ``benchmarks/`` import by their names here, as they do in
``python benchmarks/benchmark.py`` (the script's folder is on ``sys.path``)."""
import os.path as osp
import sys

import pytest

sys.path.insert(
    0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                'benchmarks'))


@pytest.fixture
def switch_table(capsys):
    """Print a classifiers' table of a benchmark (its function given) with
    rows as ``timing.switch_model_rows`` returns them: a step of 2 ms with
    the switch off and of 1 ms on, then one whose on step ran out of
    memory. Returns the title, the header's words and each row's cells."""

    def result(ms, peak_gib=1.5):
        return dict(ms=ms, img_per_s=None if ms is None else 2e3 / ms,
                    peak_gib=peak_gib, status='ok' if ms else 'OOM')

    rows = [dict(model='vmamba-t', mode='train-bf16', off=result(2.),
                 on=result(1., 1.25)),
            dict(model='vmamba-t', mode='infer-bf16', off=result(2.),
                 on=result(None))]

    def printed(print_fn):
        print_fn(rows, 2)
        _, title, header, _, *lines = capsys.readouterr().out.splitlines()
        return title, header.split(), [line.split() for line in lines]

    return printed
