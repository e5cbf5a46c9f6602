"""mmvmamba.ops.backend: the setting (read once, overridden in blocks), the
reasons a kernel cannot run, what ran, and the kernels' limits from _C."""
import os
import subprocess
import sys
import types

import pytest
import torch

from mmvmamba.models import VMamba
from mmvmamba.ops import NUM_DIRECTIONS, _ext, backend, selective_scan
from mmvmamba.ops.backend import (RecordScans, current_backend, describe,
                                  fused_unsupported_reason,
                                  kernel_unsupported_reason, use_backend)

needs_cpu_kernel = pytest.mark.skipif(
    not _ext.has_kernel('cpu'), reason='mmvmamba._C has no CPU kernel here')


def run_python(code: str, **env):
    """Run ``python -c code`` with the environment variables ``env``."""
    return subprocess.run([sys.executable, '-c', code],
                          env=dict(os.environ, **env),
                          capture_output=True, text=True)


def scan_inputs(d_state=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, 7, generator=g).to(dtype)
    B = torch.randn(1, 1, d_state, 7, generator=g).to(dtype)
    return dict(u=u, delta=torch.rand(1, 2, 7, generator=g).to(dtype),
                A=-torch.rand(2, d_state, generator=g), B=B, C=B)


def test_environment_variable_is_read_once_at_import(monkeypatch):
    code = ('from mmvmamba.ops.backend import current_backend; '
            'print(current_backend())')
    proc = run_python(code, MMVMAMBA_SCAN_BACKEND='Reference')
    assert proc.returncode == 0 and proc.stdout.split() == ['reference']
    proc = run_python('import mmvmamba', MMVMAMBA_SCAN_BACKEND='fastest')
    assert proc.returncode != 0
    assert "MMVMAMBA_SCAN_BACKEND must be one of ('auto', 'reference', " \
        "'kernel'), got 'fastest'" in proc.stderr
    before = current_backend()
    monkeypatch.setenv('MMVMAMBA_SCAN_BACKEND', 'reference')
    assert current_backend() == before  # not read again


def test_use_backend_nests_and_restores():
    before = current_backend()
    with use_backend('reference'):
        assert current_backend() == 'reference'
        with use_backend('KERNEL'):
            assert current_backend() == 'kernel'
        assert current_backend() == 'reference'
        with pytest.raises(RuntimeError, match='boom'):
            with use_backend('auto'):
                raise RuntimeError('boom')
        assert current_backend() == 'reference'
    assert current_backend() == before
    with pytest.raises(ValueError, match=r'use_backend\(name\) must be one'):
        with use_backend('fast'):
            pass
    assert current_backend() == before


def test_use_n1_kernels_sets_and_restores_the_variable(monkeypatch):
    name = backend.N1_ENV_VARIABLE
    monkeypatch.delenv(name, raising=False)
    with backend.use_n1_kernels(False):
        assert os.environ[name] == '0'
        with backend.use_n1_kernels('auto'):
            assert os.environ[name] == 'auto'
        with pytest.raises(RuntimeError, match='boom'):
            with backend.use_n1_kernels(True):
                assert os.environ[name] == '1'
                raise RuntimeError('boom')
        assert os.environ[name] == '0'
    assert name not in os.environ
    with pytest.raises(ValueError, match=r'use_n1_kernels\(mode\) must be'):
        with backend.use_n1_kernels('yes'):
            pass
    assert name not in os.environ


@needs_cpu_kernel
def test_kernel_setting_raises_where_the_kernel_cannot_run(monkeypatch):
    args = scan_inputs(d_state=80)
    assert 'N=80' in kernel_unsupported_reason(args['u'], args['A'])
    with use_backend('kernel'):
        with pytest.raises(RuntimeError, match="backend is 'kernel'.*N=80"):
            selective_scan(**args)
    monkeypatch.setattr(backend, '_warned', set())  # warnings come once
    with use_backend('auto'), pytest.warns(RuntimeWarning, match='N=80'):
        with RecordScans() as scans:
            selective_scan(**args)
    assert scans.ran == ['reference']


def test_no_kernel_for_a_device_is_a_reason():
    u = torch.zeros(1, 2, 3, device='meta')
    assert 'no compiled selective-scan kernel for meta' in \
        kernel_unsupported_reason(u, torch.zeros(2, 4, device='meta'))


def test_fused_reasons_off_the_gpu():
    x = torch.zeros(1, 4, 4, 8, device='meta')
    reason = fused_unsupported_reason(x, 16, 16, torch.float32)
    assert reason == 'x is on meta, the fused kernel runs on CUDA and the CPU'
    x = torch.zeros(1, 4, 4, 8)
    reason = fused_unsupported_reason(x, 16, 16, torch.float32)
    if not _ext.has_cross_kernel('cpu'):
        assert reason.startswith('the fused CPU kernel was not built: ')
        return
    assert reason is None
    assert fused_unsupported_reason(x, 16, 17, torch.float32) == \
        'd_state N=17 > 16'
    assert fused_unsupported_reason(x, 16, 0, torch.float32) == \
        'd_state N=0 < 1'
    assert fused_unsupported_reason(x, 16, 16, torch.float32, 0) == \
        'dt_rank R=0 < 1'
    assert fused_unsupported_reason(x, 16, 16, torch.float64) == \
        'scan dtype float64'
    with use_backend('reference'):
        assert fused_unsupported_reason(x, 16, 16, torch.float32) == \
            "the scan backend is 'reference'"


@pytest.mark.parametrize('setting', ['auto', 'reference'])
def test_record_scans_names_what_ran(setting):
    model = VMamba(dict(embed_dims=8, depths=[1, 1]), out_indices=(1, ))
    x = torch.randn(1, 3, 16, 16)
    with use_backend(setting), RecordScans() as scans:
        model(x)
    fused = setting == 'auto' and _ext.has_cross_kernel('cpu')
    assert scans.ran == (['fused-cpu'] if fused else ['reference'])
    assert describe(scans.ran) == ('fused four-direction CPU kernel' if fused
                                   else 'selective-scan reference (PyTorch)')
    with RecordScans() as scans:
        torch.nn.Linear(2, 2)(torch.randn(1, 2))
    assert describe(scans.ran) == 'none'
    assert describe(['cuda', 'fused-cuda']) == \
        'compiled CUDA kernel + fused four-direction CUDA kernel'


@pytest.mark.skipif(not _ext.ext_status()[0], reason='needs mmvmamba._C')
def test_limits_come_from_the_library():
    from mmvmamba import _C
    limits = _ext.LIMITS
    assert limits == (_C.max_d_state, _C.chunk, _C.directions,
                      _C.cross_max_d_state, _C.cross_max_length)
    assert limits.directions == NUM_DIRECTIONS
    assert limits.cross_max_d_state <= limits.max_d_state


def test_a_library_without_limits_asks_for_a_rebuild(monkeypatch):
    stale = types.ModuleType('mmvmamba._C')
    stale.__torch_version__ = torch.__version__
    monkeypatch.setitem(sys.modules, 'mmvmamba._C', stale)
    import mmvmamba
    monkeypatch.setattr(mmvmamba, '_C', stale, raising=False)
    limits, status = _ext._load()
    assert limits is None
    assert 'built from older sources (it lacks max_d_state, chunk' in status
    assert 'pip install --no-deps --no-build-isolation -e .' in status
