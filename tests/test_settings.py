"""The one declaration of the settings: validation where declared, presets, routing of keyword arguments, YAML."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_jit import BatchFormat, GuardSettings, JiTSettingError, JiTSettings
from lightning_jit.core.settings import dump_settings, load_settings, split_settings


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"lr": float("nan")}, "lr"),
        ({"n_perturbations": 2.5}, "n_perturbations"),
        ({"epochs": True}, "epochs"),
        ({"reduction": "max"}, "reduction"),
        ({"normalize_logits": 1}, "normalize_logits"),
        ({"logit_norm_penalty": -1}, "logit_norm_penalty"),
        ({"clamp": (1.0, 0.0)}, "clamp"),
        ({"norm_policy": "frozen"}, "norm_policy"),
        ({"perturbation": "laplace"}, "perturbation"),
        ({"perturbation_chunk": 0}, "perturbation_chunk"),
        ({"seed": 1.5}, "seed"),
        ({"target_forget_accuracy": 101}, "target_forget_accuracy"),
    ],
)
def test_each_bad_value_names_its_setting(changes, setting):
    with pytest.raises(JiTSettingError, match=f"`{setting}`") as info:
        JiTSettings(**{"sigma": 0.1, "lr": 0.01, **changes})
    assert info.value.setting == setting


def test_values_are_normalised_where_declared():
    settings = JiTSettings(sigma=1, lr=1, clamp=[0, 1])
    assert settings.sigma == 1.0 and isinstance(settings.sigma, float)
    assert settings.clamp == (0.0, 1.0)
    with pytest.raises(JiTSettingError, match="`lr`"):
        settings.replace(lr=-1.0)


def test_presets_are_named_constructors():
    plain = JiTSettings.plain(sigma=0.1, lr=0.01)
    assert (plain.normalize_logits, plain.logit_norm_penalty, plain.probe_distillation) == (False, 0.0, 0.0)
    reference = JiTSettings.reference(sigma=0.5, lr=3e-4)
    assert (reference.reduction, reference.clamp, reference.norm_policy) == ("sum", "batch", "train")
    assert reference.logit_norm_penalty == 0.0
    assert JiTSettings.plain(sigma=0.1, lr=0.01, normalize_logits=True).normalize_logits  # overrides win


def test_keywords_go_to_the_declaration_that_has_them():
    settings, fmt, guard = split_settings(
        JiTSettings(sigma=0.1, lr=0.01, n_perturbations=4), None, False, {"lr": 0.5, "label_key": "y", "max_drop": 5}
    )
    assert (settings.sigma, settings.lr, settings.n_perturbations) == (0.1, 0.5, 4)  # the object, overridden
    assert fmt == BatchFormat(label_key="y")
    assert guard == GuardSettings(enabled=False, max_drop=5.0)


def test_unknown_keyword_names_the_closest_setting():
    with pytest.raises(JiTSettingError, match="`sgima` is not a JiT setting. Did you mean `sigma`?"):
        split_settings(None, None, True, {"sgima": 0.1, "lr": 0.01})


def test_setting_names_are_unique_across_the_declarations():
    """Keyword routing needs it: a name declared twice could not be routed (it happened: the guard's `seed`)."""
    names = [f.name for decl in (JiTSettings, BatchFormat, GuardSettings) for f in dataclasses.fields(decl)]
    assert len(names) == len(set(names))


def test_yaml_round_trip_through_the_cli_parser():
    settings = JiTSettings(sigma=0.2, lr=0.05, clamp=(0.0, 1.0), target_forget_accuracy=5.0, seed=None)
    text = dump_settings(settings)
    assert text.startswith("jit:\n")
    assert load_settings(text) == settings
    with pytest.raises(JiTSettingError, match="`sigma`"):
        load_settings(text.replace("sigma: 0.2", "sigma: -0.2"))


def test_a_callable_perturbation_cannot_be_written_to_yaml():
    settings = JiTSettings(sigma=0.2, lr=0.05, perturbation=lambda shape, g, device, dtype: torch.zeros(shape))
    with pytest.raises(JiTSettingError, match="`perturbation`"):
        dump_settings(settings)
