"""The GPU check: precision and strategy checks that need CUDA, then the JiT step benchmark. Called by gpu_check.sh.

On a GPU it runs, in about 2-3 minutes on one H100-class card:

1. ``bf16-mixed`` unlearning of the digits CNN forgets the class like ``32-true`` (forget accuracy within 5 points);
2. ``16-mixed`` with CUDA's ``GradScaler``: a batch with infinite outputs is skipped, counted, and halves the scale;
3. ``strategy="ddp"`` on one GPU gives the single-device weights (the DDP code path, with CUDA and NCCL);
4. an FSDP probe: Lightning's ``FSDPStrategy`` on one GPU with ``LIGHTNING_JIT_EXPERIMENTAL_FSDP=1``, compared with
   the single-device weights (JiT refuses FSDP by default; this is the evidence needed to lift that);
5. the speed of one JiT step (:mod:`benchmarks.bench_objective`) on ResNet18 (3x32x32) and ViT-B/16 (224x224,
   random weights) at batch 128 and N=25, in ``32-true`` and ``bf16-mixed``: library, reference loop, floor.

``--cpu`` runs the same code on the CPU in a tiny configuration (the test suite does, so that it cannot rot).

Example::

    python benchmarks/gpu_bench.py --out /tmp/gpu            # on a GPU machine
    python benchmarks/gpu_bench.py --cpu --out /tmp/gpu_cpu  # anywhere, in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.bench_objective import bench, format_table, ratios
from lightning_jit import JiTSettings, JiTUnlearning
from lightning_jit.demo.data import DigitsCNN, accuracy, class_mask, load_digits_split, train_classifier
from lightning_jit.lightning.data import forget_loader
from lightning_jit.lightning.trainer import quiet_trainer

MARK = 40.0


class InfOnMarkedBatch(DigitsCNN):
    """Outputs Inf for samples whose first pixel is ``MARK`` (and for their perturbations)."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        marked = x.flatten(1)[:, :1] > MARK / 2
        return out * torch.where(marked, torch.full_like(marked, float("inf"), dtype=out.dtype), 1.0)


def _trainer(accelerator: str, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(**{"accelerator": accelerator, "max_epochs": 1, **kwargs})


def _weights(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check_bf16(accelerator: str, tiny: bool) -> dict[str, Any]:
    split = load_digits_split()
    mask = class_mask(split.y_train, [3])
    trained = train_classifier(DigitsCNN, split.x_train, split.y_train, epochs=2 if tiny else 15, seed=0)
    state = trained.state_dict()
    loader = forget_loader(TensorDataset(split.x_train[mask], split.y_train[mask]))
    acc, outcomes = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        model = DigitsCNN()
        model.load_state_dict(state)
        pl.seed_everything(0, verbose=False)
        unlearner = JiTUnlearning(model, seed=0, epochs=1 if tiny else None)  # the no-knob path
        _trainer(accelerator, precision=precision, max_epochs=-1).fit(unlearner, loader)
        acc[precision] = accuracy(model.cpu(), split.x_train[mask], split.y_train[mask])
        outcomes[precision] = str(unlearner.outcome)
    ok = abs(acc["32-true"] - acc["bf16-mixed"]) <= 5.0 and (tiny or acc["32-true"] <= 5.0)
    return {"ok": ok, "forget_acc": acc, "outcome": outcomes}


def check_fp16_scaler(accelerator: str) -> dict[str, Any]:
    from lightning.pytorch.plugins.precision import MixedPrecision

    split = load_digits_split()
    x, y = split.x_train[:24].clone(), split.y_train[:24]
    x[8:16, :, 0, 0] = MARK
    loader = DataLoader(TensorDataset(x, y, torch.arange(24)), batch_size=8)
    results = {}
    for bad in (True, False):
        torch.manual_seed(0)
        model = InfOnMarkedBatch()
        # A target: a forget set across every class is otherwise a sample request, which needs held-out data.
        plain = JiTSettings.plain(
            sigma=0.2, lr=0.01, n_perturbations=4, seed=5, target_forget_accuracy=0.0, on_unverified="keep"
        )
        wrapper = JiTUnlearning(model, plain, guard=False)
        device = "cuda" if accelerator == "gpu" else "cpu"
        trainer = _trainer(accelerator, plugins=[MixedPrecision("16-mixed", device)])
        data = loader if bad else DataLoader(TensorDataset(x[[*range(8), *range(16, 24)]]), batch_size=8)
        trainer.fit(wrapper, data)
        results[bad] = (wrapper.skipped_steps, float(trainer.precision_plugin.scaler.get_scale()))
    ok = results[True][0] == results[False][0] + 1 and results[True][1] == 0.5 * results[False][1]
    return {"ok": ok, "skipped_and_scale_with_bad_batch": results[True], "without": results[False]}


def _jit_weights(accelerator: str, **trainer_kwargs: Any) -> dict[str, Tensor]:
    split = load_digits_split()
    torch.manual_seed(0)
    model = DigitsCNN()
    # The defaults, calibrated, with a target (else a request across every class is a sample request) and the
    # weights each run reaches kept, verified or not: they are what is compared.
    wrapper = JiTUnlearning(
        model, n_perturbations=5, epochs=2, seed=7, guard=False, target_forget_accuracy=0.0, on_unverified="keep"
    )
    data = TensorDataset(split.x_train[:40], split.y_train[:40], torch.arange(40))
    _trainer(accelerator, max_epochs=2, use_distributed_sampler=False, **trainer_kwargs).fit(
        wrapper, DataLoader(data, batch_size=13)
    )
    return _weights(model)


def check_ddp(accelerator: str) -> dict[str, Any]:
    if "LOCAL_RANK" not in os.environ:  # not launched by torchrun/SLURM: let Lightning pick a free port
        os.environ.pop("MASTER_PORT", None)
    single = _jit_weights(accelerator)
    ddp = _jit_weights(accelerator, strategy="ddp")
    diff = _max_diff(single, ddp)
    return {"ok": diff < 1e-5, "max_abs_diff": diff}


def check_fsdp(accelerator: str) -> dict[str, Any]:
    from lightning.pytorch.strategies import FSDPStrategy

    single = _jit_weights(accelerator)
    os.environ["LIGHTNING_JIT_EXPERIMENTAL_FSDP"] = "1"
    try:
        fsdp = _jit_weights(accelerator, strategy=FSDPStrategy(state_dict_type="full"))
    finally:
        os.environ.pop("LIGHTNING_JIT_EXPERIMENTAL_FSDP", None)
    diff = _max_diff(single, fsdp)
    return {"ok": diff < 1e-5, "max_abs_diff": diff}


def run_check(name: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # report and go on: one failing check must not hide the others' figures
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    shown = json.dumps({k: v for k, v in result.items() if k != "traceback"})
    log(f"[check] {name}: {'PASS' if result['ok'] else 'FAIL'} {shown}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU in a tiny configuration")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="resnet18,vit_b_16", help="GPU models to time (default: both).")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("No CUDA device: run with --cpu for the CPU smoke configuration.", file=sys.stderr)
        return 2
    accelerator = "gpu" if cuda else "cpu"
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    log(f"# lightning-jit GPU check: {card}, torch {torch.__version__}, lightning {pl.__version__}")
    if args.cpu:
        torch.set_num_threads(1)
    checks: dict[str, Any] = {}
    if not args.skip_checks:
        checks["bf16_forgets_like_32"] = run_check(
            "bf16_forgets_like_32", lambda: check_bf16(accelerator, args.cpu), log
        )
        checks["fp16_scaler_skip"] = run_check("fp16_scaler_skip", lambda: check_fp16_scaler(accelerator), log)
        checks["ddp_equals_single"] = run_check("ddp_equals_single", lambda: check_ddp(accelerator), log)
        if cuda:
            checks["fsdp_probe"] = run_check("fsdp_probe", lambda: check_fsdp(accelerator), log)
    rows = []
    if not args.skip_bench:
        if cuda:
            torch.backends.cudnn.benchmark = True
            plan = [("resnet18", [256, 1024, None], True), ("vit_b_16", [256, 1024], False)]
            plan = [step for step in plan if step[0] in args.models.split(",")]
            batches, n, precisions = [128], 25, ["32-true", "bf16-mixed"]
        else:
            plan = [("digits", [], False)]
            batches, n, precisions = [4], 3, ["32-true", "bf16-mixed"]
        for model, chunks, compile_model in plan:
            rows += bench(
                [model],
                batches,
                n,
                repeats=args.repeats if cuda else 1,
                chunks=chunks,
                device="cuda" if cuda else "cpu",
                precisions=precisions,
                compile_model=compile_model,
                log=log,
            )
        log("\n## JiT step, forget samples per second (median)\n")
        log(format_table(rows))
    failed = [k for k, v in checks.items() if not v["ok"] and k != "fsdp_probe"]
    summary = {
        "card": card,
        "torch": torch.__version__,
        "checks": checks,
        "bench": [asdict(r) for r in rows],
        "ratios": {f"{m}|{b}|{p}": v for (m, b, p), v in ratios(rows).items()} if rows else {},
        "failed": failed,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    log(f"\nwrote {args.out / 'gpu_check.json'} and gpu_check.md; failed checks: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
