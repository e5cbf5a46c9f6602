"""``tools/run_kernels.py``, the cases run under ``compute-sanitizer``: on
the CPU kernels here (the GPU's run is in docs/gpu_checks.md)."""
import os

import pytest
import torch


@pytest.fixture(scope='module')
def run_kernels(load_tool):
    return load_tool('run_kernels')


def test_every_case_runs_on_the_cpu(run_kernels, capsys):
    assert run_kernels.main(['--device', 'cpu']) == 0
    out = capsys.readouterr().out.splitlines()
    total = len(run_kernels.cases())
    assert out[-1] == f'{total} of {total} cases ran'
    assert all(line.startswith('  ok  ') for line in out[:-1])
    assert len(out) == total + 1


def test_list_and_only(run_kernels, capsys):
    assert run_kernels.main(['--list', '--only', 'plain']) == 0
    names = capsys.readouterr().out.split('\n')[:-1]
    assert names and all(name.startswith('plain ') for name in names)
    assert len(names) == len(run_kernels.PLAIN_CASES)


def test_a_failing_case_is_named_and_the_rest_run(run_kernels, capsys,
                                                 monkeypatch):
    def not_finite(case, device):
        if case[1] == 6:  # the second plain case
            return [torch.tensor([float('nan')])]
        return [torch.zeros(1)]

    monkeypatch.setattr(run_kernels, 'run_plain', not_finite)
    assert run_kernels.main(['--device', 'cpu', '--only', 'plain']) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith('not finite: results [0]  plain b2 C6 G2 N4')
    assert out[-1].startswith(f'{len(out) - 2} of {len(out) - 1} cases ran; '
                              "failed: ['plain b2 C6 G2 N4")


def test_environment_is_restored(run_kernels, monkeypatch):
    monkeypatch.setenv(run_kernels.SEGMENT_ENV, '5')
    monkeypatch.delenv(run_kernels.N1_ENV_VARIABLE, raising=False)
    with run_kernels.environment({run_kernels.SEGMENT_ENV: '1',
                                  run_kernels.N1_ENV_VARIABLE: '1'}):
        assert os.environ[run_kernels.SEGMENT_ENV] == '1'
    assert os.environ[run_kernels.SEGMENT_ENV] == '5'
    assert run_kernels.N1_ENV_VARIABLE not in os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs no GPU')
def test_cuda_without_a_gpu_says_so(run_kernels, capsys):
    assert run_kernels.main([]) == 2
    assert '--device cpu' in capsys.readouterr().err
