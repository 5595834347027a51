"""The ``lightning-jit`` console script: ``demo``, ``unlearn`` (:class:`~lightning_jit.cli.JiTCLI`), ``evaluate``
and ``tune``.

::

    lightning-jit demo
    lightning-jit unlearn --config cfg.yaml
    lightning-jit evaluate --config cfg.yaml --original a.ckpt --unlearned b.ckpt
    lightning-jit tune --config cfg.yaml --out tune/ && lightning-jit unlearn --config cfg.yaml --config tune/tuned.yaml

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
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_jit.cli.errors import JiTUsageError
from lightning_jit.cli.job import load_job
from lightning_jit.cli.lightning_cli import EXIT_NOT_FORGOTTEN
from lightning_jit.cli.migration import check_key
from lightning_jit.cli.trainer import UNLEARN_RECORD_KEY
from lightning_jit.core.batch import BatchFormat
from lightning_jit.core.errors import JiTDivergenceError
from lightning_jit.core.guard import CollapseGuard
from lightning_jit.core.outcome import JiTUnlearningFailed
from lightning_jit.lightning.checkpoint import recorded_batch_format

__all__ = ["EXIT_NOT_FORGOTTEN", "main"]

PROG = "lightning-jit"
#: ``jit`` settings of an unlearn config that ``tune`` searches (sigma, lr) or sets itself, and so does not pass on.
_SET_BY_TUNE = ("sigma", "lr", "n_perturbations", "epochs", "seed")


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
                _parse(_top_parser(), argv)  # --help, or an unknown option
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
# Parsing: argparse, with every error one line naming the flag
# ----------------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are :class:`JiTUsageError` (one line) instead of usage dumps."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(exit_on_error=False, **kwargs)

    def error(self, message: str) -> Any:
        raise JiTUsageError("arguments", message)


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    try:
        parsed, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as err:
        raise JiTUsageError(err.argument_name or parser.prog, err.message) from err
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        check_key(f"{parser.prog.split()[-1]}.{flag.lstrip('-')}", flag)
        raise JiTUsageError(flag, f"is not an option of `{parser.prog}`; see `{parser.prog} --help`.")
    return parsed


def _top_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "JiT zero-shot unlearning for Lightning. Exit codes: 0 success (verified forgotten), 3 not forgotten,"
            " 2 usage error, 1 failure, 130 interrupted."
        ),
    )
    parser.add_argument("--verbose", action="store_true", help="Print the traceback of a failure.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(_COMMANDS) + "}")
    for name, text in (
        ("demo", "Train on scikit-learn's digits, forget one class with JiT, compare to retraining (`demo --help`)."),
        ("unlearn", "Unlearn a forget set from a checkpoint (JiTCLI's unlearn subcommand: `unlearn --help`)."),
        ("evaluate", "Write the unlearning report for an original, an unlearned and a retrained checkpoint."),
        ("tune", "Search sigma and lr for a checkpoint and forget set; write tuned.yaml for `unlearn`."),
    ):
        sub.add_parser(name, add_help=False, help=text)
    return parser


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
    from lightning_jit.demo.run import DEMO_FORGET_CLASS, run_demo

    parser = _Parser(
        prog=f"{PROG} demo",
        description="Train on scikit-learn's digits, forget one class with JiT, and compare with retraining without"
        " it. Needs no download.",
    )
    default = DEMO_FORGET_CLASS
    parser.add_argument("--forget-class", type=int, default=default, help=f"The digit to forget (default: {default}).")
    parser.add_argument("--seed", type=int, default=0, help="Seed (default: 0).")
    args = _parse(parser, rest)
    if not 0 <= args.forget_class <= 9:
        raise JiTUsageError("--forget-class", f"must be a digit 0-9, got {args.forget_class}.")
    run_demo(forget_class=args.forget_class, seed=args.seed)


def _run_unlearn(rest: list[str]) -> None:
    from lightning_jit.cli.lightning_cli import JiTCLI

    # LightningCLI reads sys.argv itself (passing `args` as well would make it warn), so hand it the subcommand.
    with _argv([PROG, "unlearn", *rest]):
        JiTCLI(model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True)


# ----------------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------------
def _evaluate_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} evaluate",
        description="Write the unlearning report (report.md, report.json, report.png) for an original checkpoint, an"
        " unlearned one and an optional retrained one. The model, datamodule, forget set and batch format come from"
        " the unlearn config (its `model`, `data`, `forget` and `batch` groups; the others are ignored). Forget = the"
        " forget set, retain = the rest of the training set (for classes/indices/ids selections), test = the"
        " datamodule's test_dataloader().",
    )
    parser.add_argument("--config", help="The YAML config given to `lightning-jit unlearn` (required).")
    parser.add_argument("--unlearned", help="The unlearned checkpoint (required).")
    parser.add_argument(
        "--original", help="The original checkpoint (default: the source recorded in the unlearned checkpoint)."
    )
    parser.add_argument("--retrained", help="A checkpoint retrained without the forget set (the gold standard).")
    parser.add_argument("--report_dir", help="Where to write the report (default: <unlearned>_report/).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing report.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the ZRF random model (default: 0).")
    return parser


def _run_evaluate(rest: list[str]) -> None:
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from torch.utils.data import DataLoader, Subset

    from lightning_jit.cli.checkpoints import load_checkpoint
    from lightning_jit.cli.forget import forget_indices

    args = _parse(_evaluate_parser(), rest)
    for flag, value in (("--config", args.config), ("--unlearned", args.unlearned)):
        if not value:
            raise JiTUsageError(flag, "is required.")
    if not Path(args.config).is_file():
        raise JiTUsageError("--config", f"no such file: {args.config!r}.")
    unlearned_ckpt = load_checkpoint(args.unlearned, "--unlearned")
    original_path = args.original or (unlearned_ckpt.get(UNLEARN_RECORD_KEY) or {}).get("source_checkpoint")
    if not original_path:
        raise JiTUsageError("--original", "is required: the unlearned checkpoint records no source checkpoint.")
    for flag, path in (("--original", original_path), ("--retrained", args.retrained)):
        if path is not None:
            load_checkpoint(path, flag)
    report_dir = Path(args.report_dir or f"{Path(args.unlearned).with_suffix('')}_report")
    existing = [p for p in ("report.json", "report.md", "report.png") if (report_dir / p).exists()]
    if existing and not args.overwrite:
        raise JiTUsageError("--report_dir", f"{str(report_dir)!r} already holds {existing}; pass --overwrite.")

    job = load_job(args.config)
    models = {}
    for flag, path in (("--original", original_path), ("--unlearned", args.unlearned), ("--retrained", args.retrained)):
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

    report = evaluate_unlearning(
        models["--original"],
        models["--unlearned"],
        forget_loader,
        retain=retain,
        test=test,
        retrained=models.get("--retrained"),
        seed=args.seed,
        batch_format=recorded_batch_format(job.batch_format, unlearned_ckpt),
        verification=(unlearned_ckpt.get(UNLEARN_RECORD_KEY) or {}).get("verification"),
    )
    paths = report.save(report_dir)
    print(report.to_markdown())
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")


# ----------------------------------------------------------------------------------------------------------------------
# tune
# ----------------------------------------------------------------------------------------------------------------------
def _tune_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} tune",
        description="Search JiT's sigma and lr for a model and forget set (successive halving, see docs/tune.md) and"
        " write tuned.yaml (the `jit:` group for `unlearn --config ... --config tuned.yaml`), trials.md, trials.json"
        " and tune.png. The model, datamodule, forget set, batch format, checkpoint and the JiT settings it does not"
        " search come from the unlearn config; its jit.sigma, jit.lr, jit.n_perturbations, jit.epochs and jit.seed"
        " are the search's own.",
    )
    parser.add_argument("--config", help="The YAML config given to `lightning-jit unlearn` (required).")
    parser.add_argument("--ckpt_path", help="The trained checkpoint (default: the config's ckpt_path).")
    parser.add_argument("--out", default="lightning_jit_tune", help="Output directory (default: lightning_jit_tune).")
    parser.add_argument(
        "--task",
        choices=("class", "random"),
        help="class: the forget set is whole classes; random: a sample of the training data, judged against the"
        " test split's confidence (default: class with forget.classes, else random).",
    )
    parser.add_argument(
        "--monitor",
        choices=("val", "test"),
        help="Monitored mode: the datamodule's val or test split, without the forgotten classes, must keep its"
        " accuracy within --max_drop points (default: zero-shot, no held-out data).",
    )
    parser.add_argument("--max_drop", type=float, default=2.0, help="With --monitor: allowed fall, points.")
    parser.add_argument("--budget", type=float, help="Time budget in seconds (default: none).")
    parser.add_argument("--n_configs", type=int, default=16, help="Settings drawn at the first rung (default: 16).")
    parser.add_argument("--max_epochs", type=int, default=30, help="Epochs of the last rung (default: 30).")
    parser.add_argument("--seed", type=int, default=0, help="Seed (default: 0).")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing files in --out.")
    return parser


def _run_tune(rest: list[str]) -> None:
    args = _parse(_tune_parser(), rest)
    if not args.config:
        raise JiTUsageError("--config", "is required.")
    for flag, value, ok in (
        ("--n_configs", args.n_configs, args.n_configs >= 1),
        ("--max_epochs", args.max_epochs, args.max_epochs >= 1),
        ("--budget", args.budget, args.budget is None or args.budget > 0),
        ("--max_drop", args.max_drop, args.max_drop >= 0),
    ):
        if not ok:
            raise JiTUsageError(flag, f"must be > 0 (>= 0 for --max_drop, >= 1 for counts), got {value!r}.")
    job = load_job(args.config)
    ckpt_path = args.ckpt_path or job.config.get("ckpt_path")
    if not ckpt_path:
        raise JiTUsageError("--ckpt_path", "is required (or `ckpt_path` in the config): the trained checkpoint.")
    out = Path(args.out)
    existing = [p for p in ("tuned.yaml", "trials.md", "trials.json", "tune.png") if (out / p).exists()]
    if existing and not args.overwrite:
        raise JiTUsageError("--out", f"{str(out)!r} already holds {existing}; pass --overwrite.")
    model = job.load("--ckpt_path", ckpt_path)
    task = args.task or ("class" if job.forget.classes else "random")
    settings = {k: v for k, v in job.jit.items() if k not in _SET_BY_TUNE}
    if "target_forget_accuracy" in settings and settings["target_forget_accuracy"] is None:
        del settings["target_forget_accuracy"]  # tune's own default target then
    for given, default in ((job.batch_format, BatchFormat()), (job.guard, CollapseGuard(max_drop=args.max_drop))):
        settings.update(_changed(given, default))
    kwargs: dict[str, Any] = {}
    if args.monitor is not None:
        kwargs["monitor"] = _without_classes(
            job.split_loader("--monitor", args.monitor), job.forget.classes, job.batch_format
        )
        kwargs["max_drop"] = args.max_drop
    if task == "random":
        kwargs["unseen"] = job.split_loader("--task", "test")

    from lightning_jit.tune import tune_jit

    result = tune_jit(
        model,
        job.forget_loader(),
        task=task,
        budget=args.budget,
        n_configs=args.n_configs,
        max_epochs=args.max_epochs,
        seed=args.seed,
        **kwargs,
        **settings,
    )
    paths = result.save(out)
    print(result.table())
    if result.message:
        print(f"\n{result.message}")
    if not result.found:
        print(f"wrote {', '.join(str(p) for p in paths.values())} (no tuned.yaml: no trial met the target)")
        sys.stderr.write(f"{PROG} tune: no trial met the target. {' '.join((result.message or '').split())}\n")
        raise SystemExit(EXIT_NOT_FORGOTTEN)
    print(f"\n{result.to_yaml()}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(f"next: {PROG} unlearn --config {args.config} --config {paths['yaml']}")


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
