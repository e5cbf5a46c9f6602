"""Analysis of models: FLOPs with the scan, receptive fields, timings.

Not imported by ``import mmvmamba``: it registers a custom op for FLOP
counting and pulls in matplotlib for plots.
"""
