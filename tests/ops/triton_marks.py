"""Skip marks of the tests of mmvmamba's Triton kernels: whether Triton is
importable, whether the kernels run in Triton's interpreter (set
``TRITON_INTERPRET=1`` before Triton is imported) or on a CUDA GPU; and
:func:`interpreter_test`, the test that runs a file's interpreted tests in a
process of their own."""
import os

import pytest
import torch

from mmvmamba.ops.layer_norm import TRITON_IMPORT_ERROR

INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
needs_triton = pytest.mark.skipif(TRITON_IMPORT_ERROR is not None,
                                  reason=str(TRITON_IMPORT_ERROR))
interpreted = pytest.mark.skipif(
    not INTERPRETED or TRITON_IMPORT_ERROR is not None,
    reason='needs TRITON_INTERPRET=1 (the file\'s test_*_in_triton_'
    'interpreter runs these in a process of its own)')
needs_cuda = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available()
    or TRITON_IMPORT_ERROR is not None,
    reason='needs a CUDA GPU and compiled Triton kernels')


def interpreter_test(path: str, min_passed: int,
                     node: str = 'TestInterpreted'):
    """A test that runs ``path::node`` in a fresh pytest process with
    ``TRITON_INTERPRET=1`` (conftest's ``run_interpreted``: at least
    ``min_passed`` pass, none fails); skipped without Triton and inside the
    interpreter. Assign it to a ``test_*`` name of the test file."""

    @needs_triton
    @pytest.mark.skipif(INTERPRETED, reason='already in the interpreter')
    def test(run_interpreted):
        run_interpreted(path, node, min_passed)

    test.__doc__ = f'Run :class:`{node}` in a process with TRITON_INTERPRET=1.'
    return test
