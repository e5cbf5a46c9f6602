"""Skip marks of the tests of mmvmamba's Triton kernels: whether Triton is
importable, whether the kernels run in Triton's interpreter (set
``TRITON_INTERPRET=1`` before Triton is imported) or on a CUDA GPU."""
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
