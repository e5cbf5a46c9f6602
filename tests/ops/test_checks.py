"""mmvmamba/ops/checks.py: the argument checks' messages, whether autograd
records a call, and autocast's dtype for the kernels' device types."""
import pytest
import torch

from mmvmamba.ops import checks


def test_check_tensor_names_the_argument_and_what_was_expected():
    x = torch.zeros(2, 3, 4)
    checks.check_tensor('x', x, (2, None, 4), checks.FLOAT)
    with pytest.raises(ValueError, match='x must be a torch.Tensor, got list'):
        checks.check_tensor('x', [1], (1, ))
    with pytest.raises(ValueError, match=r'u must have shape \(B, C, L\) = '
                       r'\(2, \*, 5\), got \(2, 3, 4\)'):
        checks.check_tensor('u', x, (2, None, 5), labels='(B, C, L)')
    with pytest.raises(ValueError, match=r'A must have dtype in \(float32, '
                       r'float64\), got int64'):
        checks.check_tensor('A', x.long(), (2, 3, 4), checks.FLOAT)


def test_check_same_device():
    checks.check_same_device(a=torch.zeros(1), b=None, c=torch.zeros(2))
    with pytest.raises(ValueError, match='a on cpu, b on meta'):
        checks.check_same_device(a=torch.zeros(1),
                                 b=torch.zeros(1, device='meta'))


def test_autograd_records_and_forward_only_reason():
    x, w = torch.zeros(3), torch.zeros(3, requires_grad=True)
    assert not checks.autograd_records(x, None)
    assert checks.autograd_records(x, w)
    assert 'records' in checks.forward_only_reason(x, w)
    with torch.no_grad():
        assert not checks.autograd_records(x, w)
        assert checks.forward_only_reason(x, w) is None


def test_autocast_dtype_only_for_the_given_device_types():
    x = torch.zeros(2)
    assert checks.autocast_dtype(x, ('cpu', )) is None  # autocast off
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert checks.autocast_dtype(x, ('cpu', )) is torch.bfloat16
        assert checks.autocast_dtype(x, ('cuda', )) is None
        assert checks.autocast_dtype(x, ()) is None
