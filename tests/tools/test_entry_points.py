"""Every script runs as a command from any folder: its imports resolve from
the script's own folder (``benchmarks/``, ``tools/``), not from the tests'
``sys.path``."""
import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPTS = [
    'benchmarks/benchmark.py', 'benchmarks/scaling.py',
    'tools/analysis/get_flops.py', 'tools/analysis/erf.py',
    'tools/analysis/compare_losses.py', 'tools/gpu_check/cfg_options.py',
    'tools/gpu_check/check_losses.py', 'tools/gpu_check/throughput.py',
    'tools/train.py', 'tools/test.py'
]


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_help(script, tmp_path):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO, env.get('PYTHONPATH')) if p)
    proc = subprocess.run([sys.executable, osp.join(REPO, script), '--help'],
                          cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('usage:')
