"""``import mmvmamba`` and a VMamba need only the runtime requirements
(torch, numpy, mmengine): run in a process where the OpenMMLab task
packages, mmcv, matplotlib and scipy cannot be imported."""
import os
import os.path as osp
import subprocess
import sys

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BLOCKED = ('mmdet', 'mmseg', 'mmpretrain', 'mmcv', 'matplotlib', 'scipy')

SCRIPT = f'''
import sys

BLOCKED = {BLOCKED!r}


class Blocker:
    """Makes the BLOCKED packages unimportable."""

    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{{name}} is blocked in this test')
        return None


sys.meta_path.insert(0, Blocker())
# What the interpreter holds already (a sitecustomize may register stand-ins)
# is not imported by mmvmamba.
before = set(sys.modules)
import torch

import mmvmamba
from mmvmamba.models import VMamba

model = VMamba('tiny', out_indices=(0, 3)).eval()
with torch.no_grad():
    outs = model(torch.randn(1, 3, 64, 64))
print([tuple(o.shape) for o in outs])
print(sorted({{name.split('.')[0] for name in set(sys.modules) - before}} &
             set(BLOCKED)))
'''


def test_import_and_forward_without_the_optional_packages():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO, env.get('PYTHONPATH')) if p)
    proc = subprocess.run([sys.executable, '-c', SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        '[(1, 96, 16, 16), (1, 768, 2, 2)]', '[]'
    ]


def test_the_blocker_blocks():
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, '-c',
         SCRIPT.split('import torch')[0] + 'import matplotlib'],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and 'matplotlib is blocked' in proc.stderr
