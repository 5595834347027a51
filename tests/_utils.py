"""Helpers shared by the tests."""

from __future__ import annotations


def quiet_trainer(**kwargs):
    """The library's quiet Trainer, for one epoch unless told otherwise."""
    from lightning_jit.data import quiet_trainer as library_quiet_trainer

    return library_quiet_trainer(**{"max_epochs": 1, **kwargs})
