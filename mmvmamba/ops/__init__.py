"""Operators of VMamba: the selective scan and the four-direction scan.

Each op is one entry point that picks the backend by the tensor's device and
what was built; the pure-PyTorch reference beside it is the oracle in tests.
"""
from .cross_scan import cross_merge, cross_scan, cross_selective_scan
from .selective_scan import selective_scan, selective_scan_reference

__all__ = [
    'selective_scan', 'selective_scan_reference', 'cross_scan', 'cross_merge',
    'cross_selective_scan'
]
