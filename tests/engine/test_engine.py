"""MeanLossAcrossRanksHook: a no-op in one process; in a 2-process gloo
group (CPU) it averages the logged outputs, in a real mmengine Runner too,
whose 2-process log then matches a 1-process run with the whole batch."""
import multiprocessing
import os.path as osp

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from mmengine.model import BaseModel
from mmengine.registry import HOOKS as ROOT_HOOKS
from mmengine.runner import Runner

import mmvmamba  # noqa: F401  (registers the hook)
from mmvmamba.engine import MeanLossAcrossRanksHook
from mmvmamba.engine.hooks import mean_across_ranks

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_registered_and_highest_priority():
    from mmdet.registry import HOOKS as DET_HOOKS
    from mmengine.hooks import RuntimeInfoHook
    from mmengine.runner.priority import get_priority
    for registry in (ROOT_HOOKS, DET_HOOKS):
        hook = registry.build(dict(type='MeanLossAcrossRanksHook'))
        assert isinstance(hook, MeanLossAcrossRanksHook)
    assert get_priority(MeanLossAcrossRanksHook.priority) < get_priority(
        RuntimeInfoHook.priority)


def test_single_process_is_a_no_op():
    assert not torch_dist.is_initialized()
    loss = torch.tensor(2.5, requires_grad=True) * 1
    outputs = dict(loss=loss, acc=torch.tensor(80), note='text')
    MeanLossAcrossRanksHook().after_train_iter(None, 0, None, outputs)
    assert outputs['loss'] is loss and outputs['loss'].item() == 2.5
    assert outputs['acc'].item() == 80 and outputs['note'] == 'text'
    MeanLossAcrossRanksHook().after_train_iter(None, 0, None, None)


def _spawn(fn, tmp_path):
    """Run ``fn(rank, tmp_path)`` in 2 processes of one gloo group (a
    child's failure re-raises here, with its traceback)."""
    mp.spawn(_child, args=(fn, str(tmp_path)), nprocs=2, join=True)


def _child(rank, fn, tmp):
    torch_dist.init_process_group(
        'gloo',
        init_method='file://' + osp.join(tmp, 'rendezvous'),
        rank=rank,
        world_size=2)
    try:
        fn(rank, tmp)
    finally:
        torch_dist.destroy_process_group()


def _averages(rank, tmp):
    outputs = dict(
        loss=torch.tensor(1.0 + rank, requires_grad=True) * 1,
        loss_x=torch.tensor([2.0 * rank, 1.0]),
        half=torch.tensor(1.0 + 2 * rank, dtype=torch.float16),
        acc=torch.tensor(50 + 10 * rank),
        note=f'rank {rank}')
    MeanLossAcrossRanksHook().after_train_iter(None, 0, None, outputs)
    assert outputs['loss'].item() == pytest.approx(1.5)
    assert not outputs['loss'].requires_grad
    assert outputs['loss_x'].tolist() == pytest.approx([1.0, 1.0])
    assert outputs['half'].dtype == torch.float16
    assert outputs['half'].item() == pytest.approx(2.0)
    assert outputs['acc'].dtype == torch.float32
    assert outputs['acc'].item() == pytest.approx(55.0)
    assert outputs['note'] == f'rank {rank}'
    # different keys on the ranks: every rank raises, none hangs
    mismatched = dict(loss=torch.tensor(1.0))
    if rank == 1:
        mismatched['loss_extra'] = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match='different outputs'):
        mean_across_ranks(mismatched)
    # and the group still works afterwards
    same = dict(loss=torch.tensor(float(rank)))
    mean_across_ranks(same)
    assert same['loss'].item() == pytest.approx(0.5)


def test_two_processes_average(tmp_path):
    _spawn(_averages, tmp_path)


class MeanOfInputs(BaseModel):
    """loss = w * mean of the batch's numbers; w stays 1 (lr 0)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, inputs, mode='tensor'):
        x = torch.stack(inputs).float()
        if mode == 'loss':
            return dict(loss_mean=self.w * x.mean(), loss_max=x.max() * 0)
        return x


def _train(work_dir, batch_size, hook, name):
    """Train 3 iterations over the numbers 0..15, not shuffled, logging
    every iteration's own losses."""
    runner = Runner(
        model=MeanOfInputs(),
        work_dir=work_dir,
        experiment_name=name,
        train_dataloader=dict(
            dataset=[dict(inputs=torch.tensor(float(i))) for i in range(16)],
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=batch_size,
            num_workers=0),
        train_cfg=dict(by_epoch=False, max_iters=3),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.0)),
        default_hooks=dict(
            logger=dict(type='LoggerHook', interval=1), checkpoint=None),
        custom_hooks=[dict(type='MeanLossAcrossRanksHook')] if hook else None,
        log_processor=dict(by_epoch=False, window_size=1),
        # keep the process's start method (mmengine would force fork)
        env_cfg=dict(
            mp_cfg=dict(mp_start_method=multiprocessing.get_start_method())),
        launcher='none')  # the test made the process group itself
    runner.train()


def _two_process_runs(rank, tmp):
    _train(osp.join(tmp, 'with_hook'), 2, True, 'with_hook')
    _train(osp.join(tmp, 'without_hook'), 2, False, 'without_hook')


def test_runner_logs_the_mean_of_both_ranks(tmp_path, monkeypatch):
    """2 processes x batch 2 with the hook log what 1 process x batch 4
    logs; without the hook rank 0 logs its own half."""
    monkeypatch.syspath_prepend(osp.join(REPO, 'tools', 'analysis'))
    from compare_losses import compare_series, read_scalars
    _spawn(_two_process_runs, tmp_path)
    _train(str(tmp_path / 'single'), 4, True, 'single')

    single = read_scalars(str(tmp_path / 'single'))
    with_hook = read_scalars(str(tmp_path / 'with_hook'))
    without = read_scalars(str(tmp_path / 'without_hook'))
    # the DefaultSampler gives rank 0 the even and rank 1 the odd numbers:
    # iteration 1 is {0, 2} and {1, 3}, i.e. 0..3, mean 1.5
    expected = [1.5, 5.5, 9.5]
    assert [r['loss'] for r in single] == pytest.approx(expected)
    assert [r['loss'] for r in with_hook] == pytest.approx(expected)
    assert [r['loss'] for r in without] == pytest.approx([1.0, 5.0, 9.0])
    assert [r['step'] for r in with_hook] == [1, 2, 3]
    assert compare_series(single, with_hook, iters=3).ok
    assert not compare_series(single, without, iters=3).ok
