"""What an ``unlearn`` config describes, read for ``lightning-jit evaluate`` and ``lightning-jit tune``.

Both subcommands take the config given to ``lightning-jit unlearn`` and read its ``model`` (class), ``data``,
``forget`` and ``batch`` groups (and ``tune`` its ``jit`` and ``guard`` groups); the groups are checked as
``unlearn`` checks them, so that a bad or moved key is the same one-line usage error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from lightning_jit.cli.checkpoints import import_class, load_checkpoint, same_class
from lightning_jit.cli.diagnose import explain, given_values
from lightning_jit.cli.errors import JiTUsageError, setting_usage_error
from lightning_jit.cli.forget import ForgetSelection, select_forget_loader
from lightning_jit.cli.trainer import unlearn_groups
from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.errors import JiTSettingError
from lightning_jit.core.guard import GuardSettings

__all__ = ["UnlearnJob", "load_job"]

#: The groups of an unlearn config read here besides ``model``, ``data`` and (as written) ``jit``.
_READ_GROUPS = ("forget", "batch", "guard")


@dataclass
class UnlearnJob:
    """The model class, the datamodule, the forget selection and the batch format of an ``unlearn`` config.

    Attributes:
        path: The config file.
        config: Its content.
        model_class: The class of ``model.class_path``.
        datamodule: The datamodule of ``data``, instantiated.
        forget: The ``forget`` selection.
        batch_format: The ``batch`` group.
        guard: The ``guard`` group.
        jit: The ``jit`` group as written (``tune`` passes on the settings it does not search).
    """

    path: str
    config: dict[str, Any]
    model_class: type
    datamodule: pl.LightningDataModule
    forget: ForgetSelection
    batch_format: BatchFormat
    guard: GuardSettings
    jit: dict[str, Any] = field(default_factory=dict)

    def load(self, flag: str, ckpt_path: str) -> pl.LightningModule:
        """The model class loaded (strictly) from a checkpoint, in eval mode; a mismatch names ``flag``."""
        checkpoint = load_checkpoint(ckpt_path, flag)
        recorded = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        if recorded is not None and not same_class(recorded, self.model_class):
            raise JiTUsageError(flag, f"{ckpt_path!r} is a checkpoint of {recorded}, not of {self._class_path}.")
        try:
            return self.model_class.load_from_checkpoint(ckpt_path, map_location="cpu", strict=True).eval()
        except (RuntimeError, TypeError, KeyError) as err:
            detail = " ".join(str(err).split())[:400]
            raise JiTUsageError(flag, f"{ckpt_path!r} does not load into {self._class_path}: {detail}") from err

    def forget_loader(self) -> Any:
        """The forget loader, selected from the datamodule as ``unlearn`` selects it."""
        return select_forget_loader(self.datamodule, self.forget, self.batch_format)

    def split_loader(self, flag: str, stage: str) -> Any:
        """The datamodule's ``val_dataloader()`` or ``test_dataloader()``; a datamodule without it names ``flag``."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        hook = f"{stage}_dataloader"
        if not is_overridden(hook, self.datamodule):
            raise JiTUsageError(flag, f"the datamodule {type(self.datamodule).__name__} has no `{hook}()`.")
        self.datamodule.setup("validate" if stage == "val" else "test")
        return getattr(self.datamodule, hook)()

    @property
    def _class_path(self) -> str:
        return str(self.config["model"]["class_path"])


def load_job(config_path: str) -> UnlearnJob:
    """Read an ``unlearn`` config: its ``model``, ``data``, ``forget``, ``batch`` and ``jit`` groups.

    Raises:
        JiTUsageError: naming ``--config`` for a missing file or group, or the key at fault (a moved key of the
            previous version, an unknown or ill-typed setting, a ``class_path`` that cannot be imported).
    """
    from jsonargparse import ArgumentParser, Namespace

    if not Path(config_path).is_file():
        raise JiTUsageError("--config", f"no such file: {config_path!r}.")
    try:
        cfg = yaml.safe_load(Path(config_path).read_text()) or {}
    except yaml.YAMLError as err:
        raise JiTUsageError("--config", f"{config_path!r} is not YAML: {' '.join(str(err).split())}") from err
    if not isinstance(cfg, dict):
        raise JiTUsageError("--config", f"{config_path!r} is not a mapping of groups (model, data, jit, ...).")
    found = explain(given_values(["--config", config_path]), unlearn_groups(), {})
    if found is not None:
        raise found
    for group in ("model", "data"):
        if not isinstance(cfg.get(group), dict) or "class_path" not in cfg[group]:
            raise JiTUsageError("--config", f"{config_path!r} has no `{group}.class_path`.")
    model_class = import_class(cfg["model"]["class_path"], f"model.class_path (in {config_path})")

    groups = unlearn_groups()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data")
    for name in _READ_GROUPS:
        parser.add_class_arguments(groups[name], name)
    given = {"data": cfg["data"], **{name: cfg.get(name) or {} for name in _READ_GROUPS}}
    try:
        parsed = parser.parse_object(given)
    except Exception as err:  # noqa: BLE001 - the parser's message, as one line naming the config
        raise JiTUsageError("--config", f"{config_path!r}: {' '.join(str(err).split())[:400]}") from err
    for name in _READ_GROUPS:  # each group built on its own, so that a bad setting names its group
        try:
            parser.instantiate_classes(Namespace({name: parsed[name]}))
        except JiTSettingError as err:
            raise setting_usage_error(name, err) from err
    built = parser.instantiate_classes(parsed)
    return UnlearnJob(
        path=config_path,
        config=cfg,
        model_class=model_class,
        datamodule=built.data,
        forget=built.forget,
        batch_format=built.batch,
        guard=built.guard,
        jit=dict(cfg.get("jit") or {}),
    )
