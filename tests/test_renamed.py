"""Renamed public names keep working for now: the old name is the new object, and its first use warns once."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import lightning_jit.core.renamed as renamed_module
from lightning_jit.core.distillation import DistillationSet
from lightning_jit.core.guard import GuardSettings

#: (module, old name, the new object).
OLD_NAMES = [
    ("lightning_jit", "CollapseGuard", GuardSettings),
    ("lightning_jit.core", "CollapseGuard", GuardSettings),
    ("lightning_jit.core.guard", "CollapseGuard", GuardSettings),
    ("lightning_jit.core", "ProbeDistillation", DistillationSet),
    ("lightning_jit.core.probes", "ProbeDistillation", DistillationSet),
]


@pytest.mark.parametrize(("module", "old", "new"), OLD_NAMES)
def test_an_old_name_is_the_new_object_and_warns_once_at_the_callers_line(monkeypatch, module, old, new):
    monkeypatch.setattr(renamed_module, "_warned", set())
    package = importlib.import_module(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = getattr(package, old)
        second = getattr(package, old)
    assert first is new and second is new
    assert len(caught) == 1
    assert caught[0].category is FutureWarning
    assert f"`{old}` was renamed `{new.__name__}`" in str(caught[0].message)
    assert caught[0].filename == __file__  # it points at the line that used the old name


def test_an_unknown_name_is_still_an_attribute_error():
    import lightning_jit
    import lightning_jit.core

    for package in (lightning_jit, lightning_jit.core, importlib.import_module("lightning_jit.core.guard")):
        with pytest.raises(AttributeError, match="NoSuchName"):
            package.NoSuchName  # noqa: B018


def test_a_distillation_set_resumes_its_rotation_from_its_state_dict():
    """A copy loaded with the state takes the same probes next as the original would: here probes 2 and 3 of 5
    (``ceil(0.5 * 4)`` per step), whose KL is computed by hand."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4)
    x, classes = torch.randn(5, 3), torch.arange(5) % 4
    targets = torch.log_softmax(torch.randn(5, 4), dim=1)
    first = DistillationSet(x, classes, targets)
    first.loss(net, batch_size=4)
    state = first.state_dict()
    assert state == {"offset": 2}

    again = DistillationSet(x, classes, targets)
    again.load_state_dict(state)
    got = again.loss(net, batch_size=4)
    log_q = torch.log_softmax(net(x[2:4]), dim=1)
    by_hand = (targets[2:4].exp() * (targets[2:4] - log_q)).sum(dim=1).mean()
    torch.testing.assert_close(got, by_hand)
    torch.testing.assert_close(got, first.loss(net, batch_size=4))
    assert again.state_dict() == first.state_dict() == {"offset": 4}
    assert F.kl_div(log_q, targets[2:4], log_target=True, reduction="batchmean").item() == pytest.approx(got.item())


def test_only_the_first_process_warns(monkeypatch):
    monkeypatch.setattr(renamed_module, "_warned", set())
    monkeypatch.setenv("RANK", "1")
    import lightning_jit

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lightning_jit.core.guard.CollapseGuard is GuardSettings
    assert caught == []
