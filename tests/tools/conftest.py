"""The Python files of ``tools/analysis/`` and ``tools/gpu_check/`` import
by their names here, as they do when run as scripts (the script's folder is
on ``sys.path``), and so do those of ``benchmarks/`` that the analysis tools
use (named models, FLOP counts). The scripts at the top of ``tools/`` load
by path (the ``load_tool`` fixture): that folder also holds ``test.py``."""
import importlib.util
import os.path as osp
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
for folder in ('benchmarks', 'tools/analysis', 'tools/gpu_check'):
    sys.path.insert(0, osp.join(REPO, folder))


@pytest.fixture(scope='session')
def load_tool():
    """A function loading the module of ``tools/<name>.py`` from its path."""
    return _load_tool


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
