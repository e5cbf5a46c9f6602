"""Operators of VMamba: the selective scan and the four-direction scan.

Each op is one entry point; :mod:`mmvmamba.ops.backend` decides which backend
runs (compiled kernel, fused kernel or the pure-PyTorch reference, which is
the oracle in tests), and :mod:`mmvmamba.ops.flops` holds the scan's cost
model for FLOP counters. :class:`LayerNorm` (:mod:`mmvmamba.ops.layer_norm`)
is the backbones' ``nn.LayerNorm`` on Triton kernels, and
:func:`depthwise_conv_nhwc` (:mod:`mmvmamba.ops.depthwise_conv`) SS2D's
depthwise convolution of a channels-last map, and
:func:`~mmvmamba.ops.scaled_add.scaled_add` the blocks' residual sum under
stochastic depth.
"""
from .cross_scan import (NUM_DIRECTIONS, cross_merge, cross_scan,
                         cross_selective_scan)
from .depthwise_conv import depthwise_conv_nhwc
from .layer_norm import LayerNorm
from .selective_scan import selective_scan, selective_scan_reference

__all__ = [
    'selective_scan', 'selective_scan_reference', 'cross_scan', 'cross_merge',
    'cross_selective_scan', 'NUM_DIRECTIONS', 'LayerNorm',
    'depthwise_conv_nhwc'
]
