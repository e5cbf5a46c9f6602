"""The Python files of ``tools/analysis/`` and ``tools/gpu_check/`` import
by their names here, as they do when run as scripts (the script's folder is
on ``sys.path``)."""
import os.path as osp
import sys

TOOLS = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'tools')
for folder in ('analysis', 'gpu_check'):
    sys.path.insert(0, osp.join(TOOLS, folder))
