"""The modules of ``benchmarks/`` import by their names here, as they do in
``python benchmarks/benchmark.py`` (the script's folder is on ``sys.path``)."""
import os.path as osp
import sys

sys.path.insert(
    0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                'benchmarks'))
