"""Shared fixtures: real digits data and a trained digits CNN, cached per test session."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

from lightning_jit.demo.data import DigitsCNN, load_digits_split, train_classifier

torch.set_num_threads(1)  # see _one_torch_thread below
# The processes the tests start (ddp_spawn workers, the installed script, the GPU check's CPU run) take one thread too:
# two workers on two threads each would share the 2 cores the suite is sized for.
os.environ.setdefault("OMP_NUM_THREADS", "1")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(scope="session")
def digits():
    return load_digits_split()


@pytest.fixture(scope="session")
def _trained_state(digits):
    model = train_classifier(DigitsCNN, digits.x_train, digits.y_train, epochs=15, seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def _trained_bn_state(digits):
    model = train_classifier(lambda: DigitsCNN(batchnorm=True), digits.x_train, digits.y_train, epochs=10, seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def trained_cnn(_trained_state):
    """A fresh copy of the digits CNN trained once per session (seeded)."""
    model = DigitsCNN()
    model.load_state_dict(_trained_state)
    return model.eval()


@pytest.fixture
def trained_bn_cnn(_trained_bn_state):
    model = DigitsCNN(batchnorm=True)
    model.load_state_dict(_trained_bn_state)
    return model.eval()


_DISTRIBUTED_ENV = ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


@pytest.fixture(autouse=True)
def _fresh_distributed_env():
    """Start and end every test without the variables a ddp_spawn run leaves in the environment.

    Otherwise the next DDP test reuses the last run's MASTER_PORT, which may still be taken (EADDRINUSE).
    """
    for name in _DISTRIBUTED_ENV:
        os.environ.pop(name, None)
    yield
    for name in _DISTRIBUTED_ENV:
        os.environ.pop(name, None)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Start every test on one torch thread, whatever the test before it set (some benchmarks' entry points set
    their own count and keep it). The models here are tiny: one thread runs them fastest, and far faster than two
    when the machine is shared, where waiting threads spin."""
    torch.set_num_threads(1)
    yield
