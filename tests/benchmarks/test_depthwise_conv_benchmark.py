"""benchmarks/depthwise_conv.py: the bytes of its floor, its check of the
Triton path, its classifiers' table, and a small run on the GPU (skipped
without one)."""
import copy

import depthwise_conv as bench
import pytest
import torch

from mmvmamba.ops import depthwise_conv as dw


def test_floor_bytes():
    # forward: the input read, the output written; backward: the output
    # gradient and the input read, the input gradient written; bfloat16
    elements = 2 * 7 * 7 * 1536
    assert bench.floor_bytes(2, 7, 7, 1536) == {
        'fwd': elements * 4, 'fwd+bwd': elements * 4 + elements * 6}


def test_sweep_names_settings_of_the_module():
    assert set(bench.SWEEP) <= set(vars(dw))


def test_model_table(switch_table):
    title, header, rows = switch_table(bench.print_model_table)
    assert 'CONV_BACKWARD_ON_TRITON off' in title
    assert header[2:4] == ['cuDNN', 'ms'] and header[-2:] == ['GiB', 'Triton']
    assert rows == [['vmamba-t', 'train-bf16', '2.0', '1.0', '1000', '2000',
                     '2.00', '1.50', '1.25'],
                    ['vmamba-t', 'infer-bf16', '2.0', '-', '1000', '-', '-',
                     '1.50', '1.50']]


def test_step_on_the_module():
    """The timed step (CPU tensors: the module) computes the gradients of
    the input's leaf, the weight and the bias."""
    conv, x, grad = bench.make_inputs(2, 5, 5, 8, torch.device('cpu'))
    assert x.dtype == torch.bfloat16 and x.stride()[-2:] == (16, 1)
    bench.make_step(conv, x, grad, backward=True)()
    bench.make_step(conv, x, grad, backward=False)()


@pytest.mark.skipif(dw.TRITON_IMPORT_ERROR is not None,
                    reason=str(dw.TRITON_IMPORT_ERROR))
def test_check_triton_path_under_the_steps_autocast(monkeypatch):
    """The check turns the switch on and takes the steps' autocast (CPU's
    for CUDA's, as the op tests do); a float64 map fails it."""
    monkeypatch.setattr(dw, 'TRITON_DEVICE_TYPES', ('cuda', 'cpu'))
    monkeypatch.setattr(dw, 'AUTOCAST_DEVICE_TYPES', ('cuda', 'cpu'))
    conv, x, _ = bench.make_inputs(2, 5, 5, 8, torch.device('cpu'))
    bench.check_triton_path(conv, x)
    assert dw.CONV_BACKWARD_ON_TRITON is False
    with pytest.raises(RuntimeError, match='float64'):
        bench.check_triton_path(copy.deepcopy(conv).double(), x.double())
    monkeypatch.setattr(dw, 'TRITON_DEVICE_TYPES', ('cuda', ))
    with pytest.raises(RuntimeError, match='x is on cpu'):
        bench.check_triton_path(conv, x)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU path')
def test_refuses_to_run_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        bench.main(['--batch', '1'])
    assert 'needs a GPU' in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available()
                    or dw.TRITON_IMPORT_ERROR is not None,
                    reason='needs a GPU and Triton')
def test_small_run_on_the_gpu(capsys, tiny_config):
    rows = bench.main(['--batch', '2', '--warmup', '1', '--repeat', '2',
                       '--models', tiny_config])
    assert len(rows) == 4 * 2 + 1
    assert all(r['cudnn_ms'] > 0 and r['triton_ms'] > 0 for r in rows[:8])
    assert rows[8]['off']['ms'] > 0 and rows[8]['on']['ms'] > 0
    out = capsys.readouterr().out
    assert 'cuDNN / Triton' in out and 'Classifier steps' in out
    assert dw.CONV_BACKWARD_ON_TRITON is False
