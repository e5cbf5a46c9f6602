"""The Python files of ``tools/analysis/`` and ``tools/gpu_check/`` import
by their names here, as they do when run as scripts (the script's folder is
on ``sys.path``), and so do those of ``benchmarks/`` that the analysis tools
use (named models, FLOP counts)."""
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
for folder in ('benchmarks', 'tools/analysis', 'tools/gpu_check'):
    sys.path.insert(0, osp.join(REPO, folder))
