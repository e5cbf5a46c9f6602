"""RandomStateHook's states: every generator restored, stored in plain types
that ``torch.load(weights_only=True)`` reads, restored only on resume."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.registry import HOOKS as ROOT_HOOKS

import mmvmamba  # noqa: F401  (registers the hook)
from mmvmamba.engine import RandomStateHook
from mmvmamba.engine.hooks import get_random_states, set_random_states


def draws():
    values = [torch.rand(3).tolist(), np.random.rand(3).tolist(),
              np.random.randn(), [random.random() for _ in range(3)],
              random.gauss(0, 1)]
    if torch.cuda.is_available():
        values.append(torch.rand(3, device='cuda').tolist())
    return values


def test_states_round_trip_through_a_weights_only_file(tmp_path):
    np.random.randn()  # numpy keeps a cached Gaussian
    random.gauss(0, 1)  # and so does Python's random
    path = tmp_path / 'states.pth'
    torch.save(get_random_states(), path)
    first = draws()
    set_random_states(torch.load(path, weights_only=True))
    assert draws() == first


class FakeRunner:

    def __init__(self, iteration):
        self.iter = iteration
        self.warnings = []
        self.logger = SimpleNamespace(info=lambda message: None,
                                      warning=self.warnings.append)


@pytest.mark.parametrize('iteration,restored', [(2, True), (0, False)])
def test_restored_on_resume_only(iteration, restored):
    hook = ROOT_HOOKS.build(dict(type='RandomStateHook'))
    assert isinstance(hook, RandomStateHook)
    checkpoint = dict(meta=dict())
    hook.before_save_checkpoint(None, checkpoint)
    first = draws()
    hook.after_load_checkpoint(None, checkpoint)
    runner = FakeRunner(iteration)  # iteration 0: load_from, not a resume
    hook.before_train(runner)
    assert (draws() == first) == restored
    assert not runner.warnings


def test_checkpoint_without_states_warns():
    hook = RandomStateHook()
    hook.after_load_checkpoint(None, dict(meta=dict()))
    runner = FakeRunner(4)
    hook.before_train(runner)
    assert 'holds no random states' in runner.warnings[0]
    hook.after_load_checkpoint(None, dict(meta=dict(random_states=[{}, {}])))
    hook.before_train(runner)
    assert 'random states of 2 processes, this run has 1' in \
        runner.warnings[1]
