"""tools/slurm_train.sh and slurm_test.sh build the srun command OpenMMLab's
scripts do (a fake srun on PATH records it), and without their four
arguments print a usage message and exit 2."""
import json
import os
import os.path as osp
import subprocess

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(REPO, 'tools')
FAKE_SRUN = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ['SRUN_RECORD'], 'w') as f:
    json.dump(dict(argv=sys.argv[1:], pythonpath=os.environ['PYTHONPATH']), f)
"""


@pytest.fixture
def srun(tmp_path):
    """Run a script with a fake srun first on PATH; return its record."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text(FAKE_SRUN)
    (bin_dir / 'srun').chmod(0o755)
    record = tmp_path / 'srun.json'

    def run(script, args, **env):
        environ = {
            k: v for k, v in os.environ.items()
            if k not in ('GPUS', 'GPUS_PER_NODE', 'CPUS_PER_TASK',
                         'SRUN_ARGS', 'PYTHONPATH')
        }
        environ.update(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
                       SRUN_RECORD=str(record), **env)
        proc = subprocess.run(['bash', osp.join(TOOLS, script), *args],
                              env=environ, capture_output=True, text=True,
                              cwd=tmp_path)
        recorded = json.loads(record.read_text()) if record.exists() else None
        return proc, recorded

    return run


def test_train_defaults(srun):
    proc, recorded = srun('slurm_train.sh',
                          ['gpu', 'det', 'a config.py', 'work dir'])
    assert proc.returncode == 0, proc.stderr
    assert recorded['argv'] == [
        '--partition=gpu', '--job-name=det', '--gres=gpu:8', '--ntasks=8',
        '--ntasks-per-node=8', '--cpus-per-task=5', '--kill-on-bad-exit=1',
        'python', '-u', osp.join(TOOLS, 'train.py'), 'a config.py',
        '--work-dir', 'work dir', '--launcher', 'slurm'
    ]
    assert recorded['pythonpath'] == f'{TOOLS}/..'


def test_train_environment_and_extra_options(srun):
    proc, recorded = srun(
        'slurm_train.sh', ['p', 'j', 'c.py', 'w', '--amp', '--resume'],
        GPUS='16', GPUS_PER_NODE='4', CPUS_PER_TASK='10',
        SRUN_ARGS='--time=1:00:00 --exclusive', PYTHONPATH='/elsewhere')
    assert proc.returncode == 0, proc.stderr
    assert recorded['argv'] == [
        '--partition=p', '--job-name=j', '--gres=gpu:4', '--ntasks=16',
        '--ntasks-per-node=4', '--cpus-per-task=10', '--kill-on-bad-exit=1',
        '--time=1:00:00', '--exclusive', 'python', '-u',
        osp.join(TOOLS, 'train.py'), 'c.py', '--work-dir', 'w',
        '--launcher', 'slurm', '--amp', '--resume'
    ]
    assert recorded['pythonpath'] == f'{TOOLS}/..:/elsewhere'


def test_test_script(srun):
    proc, recorded = srun('slurm_test.sh',
                          ['p', 'j', 'c.py', 'ckpt.pth', '--tta'],
                          GPUS='2', GPUS_PER_NODE='2')
    assert proc.returncode == 0, proc.stderr
    assert recorded['argv'] == [
        '--partition=p', '--job-name=j', '--gres=gpu:2', '--ntasks=2',
        '--ntasks-per-node=2', '--cpus-per-task=5', '--kill-on-bad-exit=1',
        'python', '-u', osp.join(TOOLS, 'test.py'), 'c.py', 'ckpt.pth',
        '--launcher', 'slurm', '--tta'
    ]


@pytest.mark.parametrize('script,fourth', [('slurm_train.sh', 'WORK_DIR'),
                                           ('slurm_test.sh', 'CHECKPOINT')])
def test_missing_arguments(srun, script, fourth):
    proc, recorded = srun(script, ['gpu', 'job', 'config.py'])
    assert proc.returncode == 2
    assert f'usage: {osp.join(TOOLS, script)} PARTITION JOB_NAME CONFIG ' \
        f'{fourth}' in proc.stderr
    assert recorded is None  # srun was not run


def test_srun_failure_is_the_status(srun, tmp_path):
    (tmp_path / 'bin' / 'srun').write_text('#!/bin/sh\nexit 3\n')
    proc, _ = srun('slurm_train.sh', ['p', 'j', 'c.py', 'w'])
    assert proc.returncode == 3
