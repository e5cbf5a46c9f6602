"""Shared fixtures of the test suite."""
import os
import secrets

import pytest
import torch

SEED_ENV = 'MMVMAMBA_TEST_SEED'


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
