"""The embedded default job: train on scikit-learn's digits, forget one class with JiT, compare with retraining.

Run it with ``lightning-jit demo`` (or ``python -m lightning_jit``). It needs no download: the digits data set ships
inside scikit-learn.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import TensorDataset

from lightning_jit.demo.data import DigitsCNN, accuracy, class_mask, load_digits_split, train_classifier
from lightning_jit.lightning.data import forget_loader
from lightning_jit.lightning.module import JiTUnlearning
from lightning_jit.lightning.trainer import quiet_trainer

#: The digit the demo forgets by default. Some digits are harder (see the quality benchmark in the README).
DEMO_FORGET_CLASS = 0
#: Where the demo writes its unlearning report (report.md, report.json, report.png) when run verbosely (the CLI).
DEMO_REPORT_DIR = "lightning_jit_demo"


@dataclass
class DemoRow:
    name: str
    forget_acc: float
    forget_test_acc: float
    retain_test_acc: float
    test_acc: float
    seconds: float


@dataclass
class DemoResult:
    forget_class: int
    rows: list[DemoRow] = field(default_factory=list)
    report: Any = None
    verification: Any = None

    def row(self, name: str) -> DemoRow:
        return next(r for r in self.rows if r.name == name)

    def table(self) -> str:
        """A Markdown table of the demo's figures."""
        lines = [
            f"Forgetting digit {self.forget_class} (scikit-learn digits, small CNN). Accuracies in %.",
            "",
            "| model | forget set | forget class (test) | other classes (test) | all test | time (s) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.forget_acc:.1f} | {r.forget_test_acc:.1f} | {r.retain_test_acc:.1f} |"
                f" {r.test_acc:.1f} | {r.seconds:.2f} |"
            )
        return "\n".join(lines)


def run_demo(
    forget_class: int = DEMO_FORGET_CLASS,
    seed: int = 0,
    train_epochs: int = 15,
    verbose: bool = True,
    report_dir: str | None = None,
) -> DemoResult:
    """Train, unlearn one class with JiT, retrain without it, and compare.

    Args:
        forget_class: The digit to forget.
        seed: Seed for training, retraining and the JiT noise.
        train_epochs: Training epochs of the original and the retrained model.
        verbose: Print progress and the table.
        report_dir: Where to write the unlearning report (``report.md``, ``.json``, ``.png``); by default
            ``./lightning_jit_demo`` when ``verbose``, else no files. The report itself is always in ``result.report``.

    Returns:
        The figures for the original, JiT-unlearned and retrained models.
    """
    split = load_digits_split()
    f_train = class_mask(split.y_train, [forget_class])
    f_test = class_mask(split.y_test, [forget_class])
    result = DemoResult(forget_class=forget_class)

    def measure(name: str, model: torch.nn.Module, seconds: float) -> None:
        result.rows.append(
            DemoRow(
                name=name,
                forget_acc=accuracy(model, split.x_train[f_train], split.y_train[f_train]),
                forget_test_acc=accuracy(model, split.x_test[f_test], split.y_test[f_test]),
                retain_test_acc=accuracy(model, split.x_test[~f_test], split.y_test[~f_test]),
                test_acc=accuracy(model, split.x_test, split.y_test),
                seconds=seconds,
            )
        )

    say = print if verbose else (lambda *a, **k: None)
    say(f"[1/3] training a CNN on scikit-learn's digits ({len(split.y_train)} samples)...")
    start = time.perf_counter()
    model = train_classifier(DigitsCNN, split.x_train, split.y_train, epochs=train_epochs, seed=seed)
    measure("original", model, time.perf_counter() - start)

    say(f"[2/3] forgetting digit {forget_class} with JiT ({int(f_train.sum())} samples, no retain data, no knob)...")
    forget = forget_loader(TensorDataset(split.x_train[f_train], split.y_train[f_train]), seed=seed)
    original = copy.deepcopy(model)  # JiT changes the model in place; keep the original for the report
    wrapper = JiTUnlearning(model, seed=seed)  # everything else calibrated from the model and the forget set
    trainer = quiet_trainer(max_epochs=-1, enable_progress_bar=verbose)
    start = time.perf_counter()
    trainer.fit(wrapper, train_dataloaders=forget)
    measure("JiT (unlearned)", wrapper.model, time.perf_counter() - start)
    result.verification = wrapper.verification

    say(f"[3/3] retraining from scratch without digit {forget_class} (the gold standard)...")
    start = time.perf_counter()
    retrained = train_classifier(
        DigitsCNN, split.x_train[~f_train], split.y_train[~f_train], epochs=train_epochs, seed=seed
    )
    measure("retrained", retrained, time.perf_counter() - start)

    say("")
    say(f"JiT: {result.verification.verdict}.")
    say(result.table())

    from lightning_jit.evaluation.evaluate import evaluate_unlearning

    result.report = evaluate_unlearning(
        original,
        wrapper.model,
        forget=(split.x_train[f_train], split.y_train[f_train]),
        retain=(split.x_train[~f_train], split.y_train[~f_train]),
        test=(split.x_test, split.y_test),
        retrained=retrained,
        unlearning_seconds=result.row("JiT (unlearned)").seconds,
        retrain_seconds=result.row("retrained").seconds,
        seed=seed,
        verification=result.verification,
    )
    say("")
    say(result.report.to_markdown())
    report_dir = report_dir if report_dir is not None else (DEMO_REPORT_DIR if verbose else None)
    if report_dir is not None:
        paths = result.report.save(report_dir)
        say(f"Report written to {paths['markdown']}, {paths['json']} and {paths['png']}.")
    return result


def main() -> None:
    run_demo()


if __name__ == "__main__":
    main()
