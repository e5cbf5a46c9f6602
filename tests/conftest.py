"""Fixtures shared by the test folders: tiny classifier configs, seeds."""
import os
import re
import secrets
import subprocess
import sys

import pytest
import torch

SEED_ENV = 'MMVMAMBA_TEST_SEED'


@pytest.fixture
def run_interpreted():
    """A function that runs the tests ``path::node`` in a fresh pytest
    process with ``TRITON_INTERPRET=1`` (Triton reads it when imported, so
    the kernels run on the CPU) and asserts that at least ``min_passed``
    passed and none failed."""

    def run(path: str, node: str, min_passed: int) -> None:
        proc = subprocess.run(
            [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
             f'{path}::{node}'],
            env=dict(os.environ, TRITON_INTERPRET='1'), capture_output=True,
            text=True, timeout=900)
        output = proc.stdout[-6000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, output
        summary = re.search(r'(\d+) passed', proc.stdout)
        assert summary and int(summary.group(1)) >= min_passed, output
        assert 'failed' not in proc.stdout.splitlines()[-1], output

    return run


@pytest.fixture
def index_as_in_triton_3_6(monkeypatch):
    """Make the interpreter's ``tensor.__index__`` refuse as Triton 3.6's
    does under NumPy >= 2.4: it takes ``int()`` of the one-element array of
    a runtime value (``range(pid, n, step)`` in a kernel, say), which those
    NumPy versions reject. Later Triton versions squeeze the array first."""
    from triton.runtime import interpreter
    patch_tensor = getattr(interpreter, '_patch_lang_tensor', None)
    if patch_tensor is None:
        return

    def refuse(self):
        raise TypeError('only 0-dimensional arrays can be converted to '
                        'Python scalars (Triton 3.6 interpreter, NumPy >= '
                        f'2.4): value of shape {self.handle.data.shape}')

    def patch_strictly(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, '__index__', refuse)

    monkeypatch.setattr(interpreter, '_patch_lang_tensor', patch_strictly)


@pytest.fixture
def reported_seed():
    """Seed torch's generator (CPU and GPUs) for a test of fresh random
    inputs: a new seed each run, or ``MMVMAMBA_TEST_SEED``. It is printed,
    so a failing test's captured output says how to draw the same inputs
    again."""
    value = os.environ.get(SEED_ENV)
    seed = int(value) if value else secrets.randbelow(2**31)
    print(f'random inputs from seed {seed} ({SEED_ENV}={seed} repeats them)')
    torch.manual_seed(seed)
    return seed


TINY = dict(embed_dims=16, depths=[1, 1, 2, 1])


@pytest.fixture
def tiny_classifier_cfg() -> dict:
    """An mmpretrain classifier with a tiny VMamba, 10 classes."""
    return dict(
        type='ImageClassifier',
        backbone=dict(type='VMamba', arch=TINY, out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=128))


def write_config(path, model: dict) -> str:
    path.write_text("custom_imports = dict(imports=['mmvmamba'])\n"
                    "default_scope = 'mmpretrain'\n"
                    f'model = {model!r}\n')
    return str(path)


@pytest.fixture
def tiny_config(tmp_path, tiny_classifier_cfg):
    """A config file of a tiny VMamba classifier."""
    return write_config(tmp_path / 'tiny_vmamba.py', tiny_classifier_cfg)


@pytest.fixture
def resnet_config(tmp_path):
    """A config file of mmpretrain's ResNet-18 classifier."""
    return write_config(
        tmp_path / 'resnet18.py',
        dict(type='ImageClassifier',
             backbone=dict(type='ResNet', depth=18),
             neck=dict(type='GlobalAveragePooling'),
             head=dict(type='LinearClsHead', num_classes=10,
                       in_channels=512)))
