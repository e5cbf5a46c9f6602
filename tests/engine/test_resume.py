"""A run stopped and resumed with ``--resume`` continues as if it had not
stopped: the demo configs (Mask R-CNN, UperNet) with a pipeline without
random augmentation, through tools/train.py on the CPU.

4 iterations in one run against 2, then 2 more resumed from the checkpoint at
iteration 2: the same losses and learning rates at iterations 3 and 4, and
the same weights, optimizer and scheduler states at the end (within 1e-5
relative; without RandomStateHook the heads' dropout and the detector's
proposal samplers redraw and the losses drift by ~1e-4 and more). A run
killed with SIGKILL in the middle of an epoch resumes from its last
checkpoint.
"""
import glob
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TRAIN = osp.join(REPO, 'tools', 'train.py')
DEMO = osp.join(REPO, 'configs', 'demo')
RTOL = 1e-5

# The demo configs at 64 pixels, nothing random in the data pipeline (it
# runs in the main process, num_workers=0), every iteration's own losses
# logged (window 1), no validation.
COMMON = """
train_dataloader = dict(
    batch_size={batch}, num_workers=0, persistent_workers=False,
    dataset=dict(pipeline=train_pipeline))
val_dataloader = None
val_cfg = None
val_evaluator = None
log_processor = dict(window_size=1)
default_hooks = dict(logger=dict(interval=1))
"""
CONFIGS = {
    'det':
    f"""_base_ = '{DEMO}/mask_rcnn_vmamba_demo_synthetic.py'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs')
]
""" + COMMON,
    'seg':
    f"""_base_ = '{DEMO}/upernet_vmamba_demo_synthetic.py'
model = dict(data_preprocessor=dict(size=(64, 64)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
""" + COMMON,
}


def schedule(task, iters, checkpoint_every=2, batch=2):
    """--cfg-options for ``iters`` iterations (Mask R-CNN: epochs of 2
    iterations at batch 2), a checkpoint every ``checkpoint_every``."""
    if task == 'det':
        per_epoch = 4 // batch
        return [f'train_cfg.max_epochs={iters // per_epoch}',
                'default_hooks.checkpoint.interval='
                f'{checkpoint_every // per_epoch}',
                'default_hooks.checkpoint.max_keep_ckpts=-1']
    return [f'train_cfg.max_iters={iters}',
            f'default_hooks.checkpoint.interval={checkpoint_every}',
            'default_hooks.checkpoint.max_keep_ckpts=-1']


def environment(cpu=True):
    """The tools' environment: the CPU (bitwise repeatable), unless
    ``cpu=False``."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    if cpu:
        env['CUDA_VISIBLE_DEVICES'] = ''
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
    return env


def train(cwd, config, work_dir, options, resume=(), extra=(), cpu=True):
    proc = subprocess.run(
        [sys.executable, TRAIN, config, '--work-dir', work_dir, *resume,
         *extra, '--cfg-options', *options],
        cwd=cwd, env=environment(cpu), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def logged(work_dir):
    """Each iteration's logged scalars (all runs in ``work_dir``), by
    iteration."""
    rows = {}
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data',
                                          'scalars.json'))):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if 'loss' in row:
                    rows[row['step']] = row
    return rows


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def assert_close_nested(a, b, where=''):
    """Tensors and numbers of two nested structures agree within RTOL."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close_nested(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_nested(x, y, f'{where}[{i}]')
    elif isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-8,
                                       msg=lambda m: f'{where}: {m}')
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=RTOL, abs=1e-12), where
    else:
        assert a == b, where


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    from mmvmamba.datasets.synthetic import generate
    root = tmp_path_factory.mktemp('resume')
    generate(str(root / 'data' / 'synthetic'), seed=0, coco_train=4,
             coco_val=1, coco_size=64, ade_train=4, ade_val=1, ade_size=64)
    for task, text in CONFIGS.items():
        for batch in (1, 2):
            (root / f'{task}_b{batch}.py').write_text(text.format(batch=batch))
    return str(root)


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_resumed_run_continues_the_uninterrupted_one(workspace, task):
    config = f'{task}_b2.py'
    whole, part = f'{task}_whole', f'{task}_part'
    train(workspace, config, whole, schedule(task, 4))
    train(workspace, config, part, schedule(task, 2))
    if task == 'det':  # the latest checkpoint of the work dir
        resume, last = ['--resume'], 'epoch_2.pth'
        saved = load(osp.join(workspace, part, 'epoch_1.pth'))
    else:  # a named checkpoint
        resume, last = ['--resume', f'{part}/iter_2.pth'], 'iter_4.pth'
        saved = load(osp.join(workspace, part, 'iter_2.pth'))
    assert len(saved['meta']['random_states']) == 1
    out = train(workspace, config, part, schedule(task, 4), resume)
    assert 'resumed epoch: 1, iter: 2' in out or \
        'resumed epoch: 0, iter: 2' in out, out[-3000:]
    assert 'random generators restored' in out

    expected, got = logged(osp.join(workspace, whole)), logged(
        osp.join(workspace, part))
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4]
    for it in (3, 4):
        keys = [k for k in expected[it] if k.startswith(('loss', 'lr'))]
        assert 'loss' in keys and 'lr' in keys
        assert {k: got[it][k] for k in keys} == pytest.approx(
            {k: expected[it][k] for k in keys}, rel=RTOL), f'iteration {it}'

    ends = [load(osp.join(workspace, d, last)) for d in (whole, part)]
    for key in ('state_dict', 'optimizer', 'param_schedulers'):
        assert_close_nested(ends[0][key], ends[1][key], key)
    assert ends[0]['meta']['iter'] == ends[1]['meta']['iter'] == 4


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_killed_run_resumes_from_its_last_checkpoint(workspace, task):
    """SIGKILL once a checkpoint is written, then ``--resume``. Mask R-CNN
    trains epochs of 4 iterations (batch 1) and is killed in the middle of
    the one after its checkpoint; UperNet (batch 2: its pooling module's BN
    needs two images) saves every 4 iterations."""
    batch = 1 if task == 'det' else 2
    config, work = f'{task}_b{batch}.py', f'{task}_killed'
    work_dir = osp.join(workspace, work)
    options = schedule(task, 40, checkpoint_every=4, batch=batch)
    with open(osp.join(workspace, f'{work}.log'), 'w') as log:
        proc = subprocess.Popen(
            [sys.executable, TRAIN, config, '--work-dir', work,
             '--cfg-options', *options], cwd=workspace, env=environment(),
            stdout=log, stderr=subprocess.STDOUT)
        pointer = osp.join(work_dir, 'last_checkpoint')
        deadline = time.monotonic() + 600
        try:
            while not osp.isfile(pointer) and proc.poll() is None:
                assert time.monotonic() < deadline, 'no checkpoint in 10 min'
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    with open(osp.join(workspace, f'{work}.log')) as log:
        assert proc.returncode == -signal.SIGKILL, log.read()[-5000:]
    with open(pointer) as f:
        checkpoint = f.read().strip()
    done = load(checkpoint)['meta']['iter']
    assert done % 4 == 0 and done > 0

    # resume from the latest checkpoint: 4 more iterations
    more = schedule(task, done + 4, checkpoint_every=4, batch=batch)
    out = train(workspace, config, work, more, ['--resume'])
    assert f'iter: {done}' in out and 'random generators restored' in out
    assert max(logged(work_dir)) == done + 4
    last = f'epoch_{done // 4 + 1}.pth' if task == 'det' else \
        f'iter_{done + 4}.pth'
    assert load(osp.join(work_dir, last))['meta']['iter'] == done + 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_resumed_amp_run_keeps_the_loss_scaler(workspace):
    """On a GPU with --amp (UperNet): the resumed run ends with the
    uninterrupted run's loss-scaler state, learning rate and iteration;
    its losses at iterations 3-4 are printed with their difference (GPU
    kernels need not repeat bitwise) and must agree within 1e-3."""
    config, whole, part = 'seg_b2.py', 'amp_whole', 'amp_part'
    amp = ['--amp']
    train(workspace, config, whole, schedule('seg', 4), extra=amp, cpu=False)
    train(workspace, config, part, schedule('seg', 2), extra=amp, cpu=False)
    out = train(workspace, config, part, schedule('seg', 4),
                ['--resume', f'{part}/iter_2.pth'], extra=amp, cpu=False)
    assert 'resumed epoch: 0, iter: 2' in out
    ends = [load(osp.join(workspace, d, 'iter_4.pth')) for d in (whole, part)]
    scalers = [end['optimizer']['loss_scaler'] for end in ends]
    assert scalers[0] == scalers[1]
    assert ends[0]['meta']['iter'] == ends[1]['meta']['iter'] == 4
    expected, got = logged(osp.join(workspace, whole)), logged(
        osp.join(workspace, part))
    for it in (3, 4):
        assert got[it]['lr'] == expected[it]['lr']
        rel = abs(got[it]['loss'] - expected[it]['loss']) / abs(
            expected[it]['loss'])
        print(f'iteration {it}: loss {got[it]["loss"]} resumed, '
              f'{expected[it]["loss"]} uninterrupted, relative {rel:.2e}')
        assert rel < 1e-3
