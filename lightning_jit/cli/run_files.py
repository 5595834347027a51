"""The files a Trainer run writes besides its result, so that an ``unlearn`` that fails leaves none of them.

During ``trainer.fit`` Lightning writes files of its own before the run has an outcome: LightningCLI's
``SaveConfigCallback`` writes ``config.yaml`` into the log directory, the loggers write theirs (``hparams.yaml`` and
``metrics.csv``, or TensorBoard's event file) into a new ``version_N`` directory, and ``ModelCheckpoint`` writes into
``checkpoints/`` below it. :class:`RunFiles` notes, before the fit, which of these directories do not exist yet and
what the existing ones hold; :meth:`RunFiles.remove` then removes what the run added there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback


class RunFiles:
    """What a Trainer's next run will write in its own directories, noted before the run.

    * a run directory (a logger's ``log_dir``, the checkpoint directory, the log directory) that does not exist yet:
      its highest missing ancestor (e.g. ``lightning_logs/`` or ``lightning_logs/version_3/``) is the run's own, and
      is removed whole;
    * a logger's or the checkpoint directory that already exists: the files it did not hold before the run;
    * any other existing directory (``default_root_dir`` without a logger): only the ``config.yaml`` that
      ``SaveConfigCallback`` writes there, if it did not exist before the run.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> trainer = pl.Trainer(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False)
        >>> files = RunFiles(trainer)
        >>> (root / "lightning_logs" / "version_0").mkdir(parents=True)  # as the logger makes it during the fit
        >>> (root / "lightning_logs" / "version_0" / "hparams.yaml").write_text("{}")
        2
        >>> [Path(p).name for p in files.remove()], sorted(os.listdir(root))
        (['lightning_logs'], [])
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        owned = [getattr(logger, "log_dir", None) for logger in trainer.loggers]
        checkpoint = trainer.checkpoint_callback
        owned.append(getattr(checkpoint, "dirpath", None) if checkpoint is not None else None)
        log_dir = trainer.log_dir or trainer.default_root_dir
        self._new: list[Path] = []
        self._listed: dict[Path, set[str]] = {}
        for directory in {Path(d).absolute() for d in owned if d}:
            self._note(directory)
        self._configs: list[Path] = []
        log_path = Path(log_dir).absolute()
        if not log_path.exists():
            self._note(log_path)
        else:
            for callback in trainer.callbacks:
                if isinstance(callback, SaveConfigCallback) and callback.save_to_log_dir:
                    config = log_path / callback.config_filename
                    if not config.exists():
                        self._configs.append(config)

    def _note(self, directory: Path) -> None:
        if directory.exists():
            self._listed[directory] = {p.name for p in directory.iterdir()}
            return
        top = directory
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        if top not in self._new:
            self._new.append(top)

    def remove(self) -> list[str]:
        """Remove what the run added (call it in rank 0 only); returns the paths removed, directories whole."""
        removed: list[str] = []
        for top in self._new:
            if top.exists():
                shutil.rmtree(top, ignore_errors=True)
                removed.append(os.fspath(top))
        for directory, before in self._listed.items():
            if not directory.is_dir():
                continue
            for path in sorted(directory.iterdir()):
                if path.name in before:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(os.fspath(path))
        for config in self._configs:
            if config.exists():
                config.unlink(missing_ok=True)
                removed.append(os.fspath(config))
        return removed
