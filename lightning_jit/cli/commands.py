"""The ``lightning-jit`` console script's command dispatch: ``demo``, ``unlearn`` (:class:`~lightning_jit.cli.JiTCLI`),
``evaluate`` and ``tune``.

::

    lightning-jit demo
    lightning-jit unlearn --config cfg.yaml
    lightning-jit evaluate --config cfg.yaml --original a.ckpt --unlearned b.ckpt
    lightning-jit tune --config cfg.yaml --out tune/ && lightning-jit unlearn --config cfg.yaml --config tune/tuned.yaml

One mechanism parses every subcommand: jsonargparse, from signatures and declarations, so that each flag, its type,
its default and its ``--help`` text are written once, where the argument is declared. ``unlearn`` is
:meth:`JiTTrainer.unlearn <lightning_jit.cli.trainer.JiTTrainer.unlearn>` (through LightningCLI); ``demo`` is
:func:`~lightning_jit.demo.run.run_demo`; ``evaluate`` is :func:`evaluate` (and ``--seed`` of
:func:`~lightning_jit.evaluation.evaluate.evaluate_unlearning`); ``tune`` is :func:`tune` and the fields of
:class:`~lightning_jit.tune.settings.TuneSettings`. A flag may be spelt with ``-`` or ``_`` (``--forget-class``).

Exit codes (``docs/cli.md`` has the table):

* 0: success; for ``unlearn``, the deletion is verified ``forgotten`` and the checkpoint written;
* 3: the run did not forget (``not_forgotten``, ``rolled_back`` or ``diverged``): one line says which and what to do
  next, and no checkpoint is written (``--keep_unverified`` writes ``*.unverified.ckpt``); for ``tune``, no trial
  met the target;
* 2: a usage error (one line naming the flag, and nothing is written);
* 1: any other failure (one line; ``--verbose`` prints the traceback); 130: interrupted.

The current folder is on the import path, as for ``python main.py``, so that a ``class_path`` may name a module of it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import sys
import traceback
import typing
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_jit.cli.diagnose import explain, given_values
from lightning_jit.cli.errors import JiTUsageError
from lightning_jit.cli.job import load_job
from lightning_jit.cli.lightning_cli import EXIT_NOT_FORGOTTEN
from lightning_jit.cli.migration import check_key
from lightning_jit.cli.trainer import UNLEARN_RECORD_KEY
from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.errors import JiTDivergenceError, JiTSettingError
from lightning_jit.core.guard import GuardSettings
from lightning_jit.core.outcome import JiTUnlearningFailed
from lightning_jit.lightning.checkpoint import recorded_batch_format

__all__ = ["EXIT_NOT_FORGOTTEN", "evaluate", "main", "tune"]

PROG = "lightning-jit"
#: The subcommands and what ``lightning-jit --help`` says of each.
_HELP = {
    "demo": "Train on scikit-learn's digits, forget one class with JiT, compare to retraining (`demo --help`).",
    "unlearn": "Unlearn a forget set from a checkpoint (JiTCLI's unlearn subcommand: `unlearn --help`).",
    "evaluate": "Write the unlearning report for an original, an unlearned and a retrained checkpoint.",
    "tune": "Search sigma and lr for a checkpoint and forget set; write tuned.yaml for `unlearn`.",
}


def main(argv: list[str] | None = None) -> int:
    """The ``lightning-jit`` console script. Returns the exit code: 0 success (for ``unlearn``: the deletion is
    verified ``forgotten``), 3 a run that did not forget (not forgotten, rolled back, diverged), 2 usage error,
    1 any other failure, 130 interrupted.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``). ``--verbose`` anywhere prints the traceback of a failure.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: lightning-jit ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        with _current_folder_importable():
            command = argv[0] if argv else None
            if command in _COMMANDS:
                _COMMANDS[command](argv[1:])
            elif command is None or not command.startswith("-"):
                raise JiTUsageError(command or "command", f"give one of {', '.join(_COMMANDS)} (see `{PROG} --help`).")
            else:
                _parse_top(argv)  # --help, or an unknown option
        return 0
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except JiTUsageError as err:
        command = argv[0] if argv and argv[0] in _COMMANDS else None
        sys.stderr.write(f"{' '.join(filter(None, [PROG, command]))}: error: {err}\n")
        return 2
    except (JiTUnlearningFailed, JiTDivergenceError) as err:
        sys.stderr.write(f"{PROG}: {' '.join(str(err).split())}\n")
        return EXIT_NOT_FORGOTTEN
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as err:  # noqa: BLE001 - the console script reports every failure as one line
        if verbose:
            traceback.print_exc()
        message = " ".join(str(err).split()) or "(no message)"
        hint = "" if verbose else " (run with --verbose for the traceback)"
        sys.stderr.write(f"{PROG}: error: {type(err).__name__}: {message}{hint}\n")
        return 1


# ----------------------------------------------------------------------------------------------------------------------
# Parsing: jsonargparse from the signatures, with every error one line naming the flag
# ----------------------------------------------------------------------------------------------------------------------
#: Where a subcommand's arguments are declared: a function or a settings class, and the names it gives (all: ``None``).
_Source = tuple[Callable[..., Any], Collection[str] | None]


class _Command:
    """A subcommand's parser, built by jsonargparse from ``sources`` (the first one's docstring describes it), and the
    typed parameters behind its flags."""

    def __init__(self, name: str, *sources: _Source) -> None:
        from jsonargparse import ArgumentParser

        self.name = name
        self.parser = ArgumentParser(
            prog=f"{PROG} {name}", description=_description(sources[0][0]), exit_on_error=False
        )
        self.parameters: dict[str, inspect.Parameter] = {}
        for source, names in sources:
            taken = _typed_parameters(source, names)
            skip = _signature_arguments(source) - set(taken)
            _add_arguments(self.parser, source, skip)
            self.parameters.update(taken)
        for action in self.parser._actions:  # a bool flag given alone means true (`--overwrite`)
            if getattr(action, "_typehint", None) is bool:
                action.nargs, action.const = "?", True

    def parse(self, args: list[str]) -> dict[str, Any]:
        """The arguments as keywords; a usage error names the flag (the parser's own message only as a last resort).

        Raises:
            JiTUsageError: for a removed flag (with what to do instead), an unknown flag, a value of the wrong type or
                a missing required argument.
        """
        args = [_underscored(a) for a in args]
        given = given_values(_without_config(args))
        for item in given:
            check_key(f"{self.name}.{item.key}", item.flag)
        try:
            parsed = self.parser.parse_args(args)
        except argparse.ArgumentError as err:
            flags = [g for g in given if not (g.value is None and self._is_bool(g.key))]  # `--overwrite` alone
            found = explain(flags, {}, self.parameters, set(self.parser._option_string_actions))
            if found is not None:
                raise found from err
            named = {item.key for item in given}
            named |= {"config"} if any(a == "--config" or a.startswith("--config=") for a in args) else set()
            for name, param in self.parameters.items():
                if param.default is inspect.Parameter.empty and name not in named:
                    raise JiTUsageError(f"--{name}", "is required.") from err
            raise JiTUsageError("arguments", " ".join(str(err).split())) from err
        return parsed.as_dict()

    def _is_bool(self, name: str) -> bool:
        param = self.parameters.get(name)
        return param is not None and param.annotation is bool


def _add_arguments(parser: Any, source: Callable[..., Any], skip: set[str]) -> None:
    if isinstance(source, type):
        parser.add_class_arguments(source, nested_key=None, as_group=False, skip=skip)
    else:
        parser.add_function_arguments(source, nested_key=None, as_group=False, skip=skip)


def _signature_arguments(source: Callable[..., Any]) -> set[str]:
    """Every argument jsonargparse makes of ``source``: its parameters and, for a ``**kwargs``, the parameters of what
    it is passed on to (which it finds itself); only those that a subcommand takes from ``source`` are kept."""
    from jsonargparse import ArgumentParser

    probe = ArgumentParser(exit_on_error=False)
    _add_arguments(probe, source, set())
    return {action.dest for action in probe._actions if action.dest != "help"} | set(
        inspect.signature(source).parameters
    )


def _typed_parameters(source: Callable[..., Any], names: Collection[str] | None) -> dict[str, inspect.Parameter]:
    """The named parameters of a function or settings class, with their annotations resolved."""
    hints = typing.get_type_hints(source)
    return {
        name: param.replace(annotation=hints.get(name, param.annotation))
        for name, param in inspect.signature(source).parameters.items()
        if (names is None or name in names) and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
    }


#: Docstring sections that are not the description of a subcommand.
_SECTIONS = ("Args:", "Returns:", "Raises:", "Example:", "Examples:")


def _description(run: Callable[..., Any]) -> str:
    """The text of a function's docstring before its sections (``Args:``...), as one paragraph per line."""
    text = inspect.cleandoc(run.__doc__ or "").split("\n\n")
    kept = [" ".join(p.split()) for p in text if not p.lstrip().startswith(_SECTIONS)]
    return "\n\n".join(kept)


def _underscored(token: str) -> str:
    """``--forget-class=3`` -> ``--forget_class=3``: a flag may be spelt with ``-`` or ``_``."""
    if not token.startswith("--"):
        return token
    flag, eq, value = token.partition("=")
    return "--" + flag[2:].replace("-", "_") + eq + value


def _without_config(args: list[str]) -> list[str]:
    """The arguments without ``--config <file>``: the unlearn config is a path here, not a config of this parser."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--config":
            i += 2
            continue
        if not args[i].startswith("--config="):
            out.append(args[i])
        i += 1
    return out


def _parse_top(args: list[str]) -> None:
    """``lightning-jit --help``; any other option before the subcommand is a usage error naming it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog=PROG,
        description="JiT zero-shot unlearning for Lightning. Exit codes: 0 success (verified forgotten), 3 not"
        " forgotten, 2 usage error, 1 failure, 130 interrupted.",
        exit_on_error=False,
    )
    parser.add_argument("--verbose", action="store_true", help="Print the traceback of a failure.")
    subcommands = parser.add_subcommands(required=False, dest="command")
    for name, text in _HELP.items():
        subcommands.add_subcommand(name, ArgumentParser(exit_on_error=False), help=text)
    try:
        parser.parse_args(args)
    except argparse.ArgumentError as err:
        flag = args[0].split("=", 1)[0]
        raise JiTUsageError(flag, f"is not an option of `{PROG}`; see `{PROG} --help`.") from err


@contextlib.contextmanager
def _current_folder_importable() -> Iterator[None]:
    """Put the current folder first on ``sys.path`` (as ``python main.py`` and ``python -m`` do) for the run."""
    folder = os.getcwd()
    added = folder not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


# ----------------------------------------------------------------------------------------------------------------------
# demo and unlearn
# ----------------------------------------------------------------------------------------------------------------------
def _run_demo(rest: list[str]) -> None:
    from lightning_jit.demo.run import run_demo

    args = _Command("demo", (run_demo, ("forget_class", "seed"))).parse(rest)
    if not 0 <= args["forget_class"] <= 9:
        raise JiTUsageError("--forget_class", f"must be a digit 0-9, got {args['forget_class']}.")
    run_demo(**args)


def _run_unlearn(rest: list[str]) -> None:
    from lightning_jit.cli.lightning_cli import JiTCLI

    # LightningCLI reads sys.argv itself (passing `args` as well would make it warn), so hand it the subcommand.
    with _argv([PROG, "unlearn", *rest]):
        JiTCLI(model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True)


# ----------------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------------
def evaluate(
    config: str,
    unlearned: str,
    original: str | None = None,
    retrained: str | None = None,
    report_dir: str | None = None,
    overwrite: bool = False,
    **report: Any,
) -> None:
    """Write the unlearning report (report.md, report.json, report.png) for an original checkpoint, an unlearned one
    and an optional retrained one.

    The model, datamodule, forget set and batch format come from the unlearn config (its `model`, `data`, `forget`
    and `batch` groups; the others are ignored). Forget = the forget set, retain = the rest of the training set (for
    classes/indices/ids selections), test = the datamodule's test_dataloader().

    Args:
        config: The YAML config given to `lightning-jit unlearn`.
        unlearned: The unlearned checkpoint.
        original: The original checkpoint (default: the source recorded in the unlearned checkpoint).
        retrained: A checkpoint retrained without the forget set (the gold standard).
        report_dir: Where to write the report (default: <unlearned>_report/).
        overwrite: Replace an existing report.
        report: Arguments of ``evaluate_unlearning`` (``--seed``, of the ZRF random model).

    Raises:
        JiTUsageError: naming the flag, before anything is written.

    Example:
        >>> evaluate("no_such.yaml", "unlearned.ckpt")
        Traceback (most recent call last):
        ...
        lightning_jit.cli.errors.JiTUsageError: --config: no such file: 'no_such.yaml'.
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from torch.utils.data import DataLoader, Subset

    from lightning_jit.cli.checkpoints import load_checkpoint
    from lightning_jit.cli.forget import forget_indices

    if not Path(config).is_file():
        raise JiTUsageError("--config", f"no such file: {config!r}.")
    unlearned_ckpt = load_checkpoint(unlearned, "--unlearned")
    original_path = original or (unlearned_ckpt.get(UNLEARN_RECORD_KEY) or {}).get("source_checkpoint")
    if not original_path:
        raise JiTUsageError("--original", "is required: the unlearned checkpoint records no source checkpoint.")
    for flag, path in (("--original", original_path), ("--retrained", retrained)):
        if path is not None:
            load_checkpoint(path, flag)
    report_dir = Path(report_dir or f"{Path(unlearned).with_suffix('')}_report")
    existing = [p for p in ("report.json", "report.md", "report.png") if (report_dir / p).exists()]
    if existing and not overwrite:
        raise JiTUsageError("--report_dir", f"{str(report_dir)!r} already holds {existing}; pass --overwrite.")

    job = load_job(config)
    models = {}
    for flag, path in (("--original", original_path), ("--unlearned", unlearned), ("--retrained", retrained)):
        if path is not None:
            models[flag] = job.load(flag, path)
    forget_loader = job.forget_loader()
    retain = None
    if job.forget.selector() not in (None, "loader"):
        train_loader, dataset, indices = forget_indices(job.datamodule, job.forget, job.batch_format)
        keep = sorted(set(range(len(dataset))) - set(indices))
        retain = DataLoader(Subset(dataset, keep), batch_size=256, collate_fn=getattr(train_loader, "collate_fn", None))
    test = job.split_loader("--config", "test") if is_overridden("test_dataloader", job.datamodule) else None

    from lightning_jit.evaluation.evaluate import evaluate_unlearning

    result = evaluate_unlearning(
        models["--original"],
        models["--unlearned"],
        forget_loader,
        retain=retain,
        test=test,
        retrained=models.get("--retrained"),
        **report,
        batch_format=recorded_batch_format(job.batch_format, unlearned_ckpt),
        verification=(unlearned_ckpt.get(UNLEARN_RECORD_KEY) or {}).get("verification"),
    )
    paths = result.save(report_dir)
    print(result.to_markdown())
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")


def _run_evaluate(rest: list[str]) -> None:
    from lightning_jit.evaluation.evaluate import evaluate_unlearning

    evaluate(**_Command("evaluate", (evaluate, None), (evaluate_unlearning, ("seed",))).parse(rest))


# ----------------------------------------------------------------------------------------------------------------------
# tune
# ----------------------------------------------------------------------------------------------------------------------
def tune(
    config: str,
    ckpt_path: str | None = None,
    out: str = "lightning_jit_tune",
    task: Literal["class", "random"] | None = None,
    monitor: Literal["val", "test"] | None = None,
    max_drop: float | None = None,
    overwrite: bool = False,
    **search: Any,
) -> None:
    """Search JiT's sigma and lr for a model and forget set (successive halving, see docs/tune.md) and write
    tuned.yaml (the `jit:` group for `unlearn --config ... --config tuned.yaml`), trials.md, trials.json and tune.png.

    The model, datamodule, forget set, batch format, checkpoint, collapse guard and the JiT settings it does not search
    come from the unlearn config; its jit.sigma, jit.lr, jit.n_perturbations, jit.epochs and jit.seed are the search's
    own. The other flags are the search's settings (TuneSettings).

    Args:
        config: The YAML config given to `lightning-jit unlearn`.
        ckpt_path: The trained checkpoint (default: the config's ckpt_path).
        out: Output directory.
        task: class: the forget set is whole classes; random: a sample of the training data, judged against the test
            split's confidence (default: the config's jit.task if class or random, else class with forget.classes and
            random without).
        monitor: Monitored mode: the datamodule's val or test split, without the forgotten classes, must keep its
            accuracy within --max_drop points (default: zero-shot, no held-out data).
        max_drop: With --monitor: the largest allowed fall of its accuracy, in points (default: the config's
            guard.max_drop).
        overwrite: Replace existing files in --out.
        search: Fields of ``TuneSettings`` (``--n_configs``, ``--max_epochs``, ``--budget``, ``--seed``...).

    Raises:
        JiTUsageError: naming the flag, before anything is written.

    Example:
        >>> tune("no_such.yaml", n_configs=0)  # the search's settings are checked first, by their declaration
        Traceback (most recent call last):
        ...
        lightning_jit.cli.errors.JiTUsageError: --n_configs: must be an integer >= 1, got 0.
    """
    from lightning_jit.tune import tune_jit
    from lightning_jit.tune.settings import PER_TRIAL, TuneSettings

    try:
        TuneSettings(**search)  # the search's settings, checked before anything is read
        job = load_job(config)
        guard = job.guard if max_drop is None else dataclasses.replace(job.guard, max_drop=max_drop)
    except JiTSettingError as err:
        raise JiTUsageError(f"--{err.setting}", _without_name(err)) from err
    ckpt_path = ckpt_path or job.config.get("ckpt_path")
    if not ckpt_path:
        raise JiTUsageError("--ckpt_path", "is required (or `ckpt_path` in the config): the trained checkpoint.")
    out_dir = Path(out)
    existing = [p for p in ("tuned.yaml", "trials.md", "trials.json", "tune.png") if (out_dir / p).exists()]
    if existing and not overwrite:
        raise JiTUsageError("--out", f"{str(out_dir)!r} already holds {existing}; pass --overwrite.")
    model = job.load("--ckpt_path", ckpt_path)
    own = {f.name for f in dataclasses.fields(TuneSettings)}
    configured_task = job.jit.get("task") if job.jit.get("task") in ("class", "random") else None
    task = task or configured_task or ("class" if job.forget.classes else "random")
    settings = {k: v for k, v in job.jit.items() if k not in PER_TRIAL and k not in own}
    for given, default in ((job.batch_format, BatchFormat()), (guard, GuardSettings())):
        settings.update(_changed(given, default))
    data: dict[str, Any] = {}
    if monitor is not None:
        data["monitor"] = _without_classes(job.split_loader("--monitor", monitor), job.forget.classes, job.batch_format)
    if task == "random":
        data["unseen"] = job.split_loader("--task", "test")

    result = tune_jit(model, job.forget_loader(), task=task, **data, **search, **settings)
    paths = result.save(out_dir)
    print(result.table())
    if result.message:
        print(f"\n{result.message}")
    if not result.found:
        print(f"wrote {', '.join(str(p) for p in paths.values())} (no tuned.yaml: no trial met the target)")
        sys.stderr.write(f"{PROG} tune: no trial met the target. {' '.join((result.message or '').split())}\n")
        raise SystemExit(EXIT_NOT_FORGOTTEN)
    print(f"\n{result.to_yaml()}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(f"next: {PROG} unlearn --config {config} --config {paths['yaml']}")


def _run_tune(rest: list[str]) -> None:
    from lightning_jit.tune.settings import TuneSettings

    search = [f.name for f in dataclasses.fields(TuneSettings) if f.name != "task"]  # `--task` is tune's own
    tune(**_Command("tune", (tune, None), (TuneSettings, search)).parse(rest))


def _without_name(err: JiTSettingError) -> str:
    """The message of a setting's error without its leading `` `name` ``, for a usage error that names the flag."""
    prefix = f"`{err.setting}` "
    text = str(err)
    return text[len(prefix) :] if text.startswith(prefix) else text


def _changed(given: Any, default: Any) -> dict[str, Any]:
    """The fields of a settings dataclass that differ from ``default``'s (the ones the config set)."""
    return {
        f.name: getattr(given, f.name)
        for f in dataclasses.fields(given)
        if getattr(given, f.name) != getattr(default, f.name)
    }


def _without_classes(loader: Any, classes: list[int] | None, batch_format: BatchFormat) -> list[tuple[Tensor, Tensor]]:
    """The ``(x, y)`` batches of ``loader`` without the samples of ``classes`` (the forgotten ones)."""
    batches = []
    for batch in loader:
        x, y = batch_format.input_and_labels(batch, "monitor")
        keep = ~torch.isin(y, torch.tensor(classes or [], dtype=y.dtype))
        if keep.any():
            batches.append((x[keep], y[keep]))
    if not batches:
        raise JiTUsageError("--monitor", "the monitor split holds no sample of a kept class.")
    return batches


_COMMANDS = {"demo": _run_demo, "unlearn": _run_unlearn, "evaluate": _run_evaluate, "tune": _run_tune}
