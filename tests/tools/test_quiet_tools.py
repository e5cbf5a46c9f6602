"""The tools print no ``pkg_resources is deprecated`` warnings (mmengine
imports pkg_resources when it reads a config of another package; the tools
filter the warning before importing it)."""
import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
COCO = osp.join(REPO, 'configs', 'mask_rcnn_vmamba_t_1x_coco.py')


@pytest.mark.parametrize('tool,args,status', [
    ('tools/train.py', [COCO], 1),  # reads mmdet::, stops: no COCO here
    ('tools/test.py', [COCO, 'none.pth'], 1),  # stops: no checkpoint
    ('tools/analysis/get_flops.py', [COCO, '--shape', '64', '64'], 0),
])
def test_no_pkg_resources_warning(tool, args, status, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
    proc = subprocess.run([sys.executable, osp.join(REPO, tool), *args],
                          cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == status, proc.stderr
    assert 'pkg_resources' not in proc.stderr, proc.stderr
