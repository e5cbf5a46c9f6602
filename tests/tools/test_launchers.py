"""The launch scripts: tools/slurm_train.sh and slurm_test.sh build the srun
command OpenMMLab's scripts do, tools/dist_train.sh and dist_test.sh the
torch.distributed.run command (a fake srun / python on PATH records it);
without their arguments they print a usage message, and for a count (GPUS,
GPUS_PER_NODE, CPUS_PER_TASK) that is not a whole number >= 1 a message
naming it, and exit 2."""
import json
import os
import os.path as osp
import re
import subprocess

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(REPO, 'tools')
FAKE_LAUNCHER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ['SRUN_RECORD'], 'w') as f:
    json.dump(dict(argv=sys.argv[1:], pythonpath=os.environ['PYTHONPATH']), f)
"""


@pytest.fixture
def launcher(tmp_path):
    """Run a script with a fake srun and python first on PATH; return the
    record of the one it ran."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in ('srun', 'python'):
        (bin_dir / name).write_text(FAKE_LAUNCHER)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / 'launched.json'

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


def test_train_defaults(launcher):
    proc, recorded = launcher('slurm_train.sh',
                          ['gpu', 'det', 'a config.py', 'work dir'])
    assert proc.returncode == 0, proc.stderr
    assert recorded['argv'] == [
        '--partition=gpu', '--job-name=det', '--gres=gpu:8', '--ntasks=8',
        '--ntasks-per-node=8', '--cpus-per-task=5', '--kill-on-bad-exit=1',
        'python', '-u', osp.join(TOOLS, 'train.py'), 'a config.py',
        '--work-dir', 'work dir', '--launcher', 'slurm'
    ]
    assert recorded['pythonpath'] == f'{TOOLS}/..'


def test_train_environment_and_extra_options(launcher):
    proc, recorded = launcher(
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


def test_test_script(launcher):
    proc, recorded = launcher('slurm_test.sh',
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
def test_missing_arguments(launcher, script, fourth):
    proc, recorded = launcher(script, ['gpu', 'job', 'config.py'])
    assert proc.returncode == 2
    assert f'usage: {osp.join(TOOLS, script)} PARTITION JOB_NAME CONFIG ' \
        f'{fourth}' in proc.stderr
    assert recorded is None  # nothing was launched


def test_srun_failure_is_the_status(launcher, tmp_path):
    (tmp_path / 'bin' / 'srun').write_text('#!/bin/sh\nexit 3\n')
    proc, _ = launcher('slurm_train.sh', ['p', 'j', 'c.py', 'w'])
    assert proc.returncode == 3


def test_dist_train(launcher):
    proc, recorded = launcher('dist_train.sh', ['c.py', '4', '--amp'],
                              PORT='29600')
    assert proc.returncode == 0, proc.stderr
    assert recorded['argv'] == [
        '-m', 'torch.distributed.run', '--nnodes=1', '--node_rank=0',
        '--master_addr=127.0.0.1', '--master_port=29600',
        '--nproc_per_node=4',
        osp.join(TOOLS, 'train.py'), 'c.py', '--launcher', 'pytorch', '--amp'
    ]
    assert recorded['pythonpath'] == f'{TOOLS}/..'


def test_dist_test(launcher):
    proc, recorded = launcher('dist_test.sh', ['c.py', 'k.pth', '2', '--tta'])
    assert proc.returncode == 0, proc.stderr
    assert recorded['argv'][-7:] == [
        '--nproc_per_node=2',
        osp.join(TOOLS, 'test.py'), 'c.py', 'k.pth', '--launcher', 'pytorch',
        '--tta'
    ]


@pytest.mark.parametrize('script, args, env, message', [
    ('dist_train.sh', ['c.py', 'two'], {}, "GPUS must be a whole number of "
     "at least 1, got 'two'"),
    ('dist_train.sh', ['c.py', '0'], {}, "GPUS must be .*, got '0'"),
    ('dist_test.sh', ['c.py', 'k.pth', '1.5'], {}, "GPUS must be .*'1.5'"),
    ('slurm_train.sh', ['p', 'j', 'c.py', 'w'], dict(GPUS='-8'),
     "GPUS must be .*, got '-8'"),
    ('slurm_test.sh', ['p', 'j', 'c.py', 'k.pth'], dict(GPUS_PER_NODE='x'),
     "GPUS_PER_NODE must be .*, got 'x'"),
    ('slurm_train.sh', ['p', 'j', 'c.py', 'w'], dict(CPUS_PER_TASK='0'),
     "CPUS_PER_TASK must be .*, got '0'"),
])
def test_counts_that_are_not_whole_numbers(launcher, script, args, env,
                                           message):
    proc, recorded = launcher(script, args, **env)
    assert proc.returncode == 2
    assert re.search(f'{script}: {message}', proc.stderr), proc.stderr
    assert recorded is None


@pytest.mark.parametrize('script', ['dist_train.sh', 'dist_test.sh'])
def test_dist_missing_arguments(launcher, script):
    proc, recorded = launcher(script, ['c.py'])
    assert proc.returncode == 2
    assert f'usage: {osp.join(TOOLS, script)} CONFIG' in proc.stderr
    assert recorded is None
