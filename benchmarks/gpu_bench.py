"""The GPU check: precision, strategy and sharding checks that need CUDA, the no-knob path on ResNet18 and a small
ViT, then the JiT step benchmark. Called by gpu_check.sh.

On a GPU it runs, in about 5 minutes on one H100-class card (``gpu_check.sh`` stops it at 8):

1. ``bf16-mixed`` unlearning of the digits CNN forgets the class like ``32-true`` (forget accuracy within 5 points);
2. ``16-mixed`` with CUDA's ``GradScaler``: a batch with infinite outputs is skipped, counted, and halves the scale;
3. ``strategy="ddp_spawn"`` on every GPU of the machine gives the single-device weights, and the launching process
   holds rank 0's verified outcome;
4. FSDP2 (``ModelParallelStrategy(data_parallel_size=<GPUs>, tensor_parallel_size=1)``, the wrapper applies
   ``fully_shard``) on every GPU gives the unsharded one-device weights and outcome (``benchmarks/sharded_fit.py``,
   the script ``tests/test_sharded.py`` runs on CPU processes);
5. an FSDP1 probe: Lightning's ``FSDPStrategy`` on one GPU with ``LIGHTNING_JIT_EXPERIMENTAL_FSDP=1``, compared with
   the single-device weights (JiT refuses FSDP1; this is the evidence needed to lift that; informational);
6. the no-knob path (``JiTUnlearning(model, seed=0)``) on ResNet18 and a small ViT trained on synthetic 32x32 images:
   outcome, forget and retained accuracy, wall time, and the run's peak GPU memory against the model's own training
   step at the same batch;
7. the speed of one JiT step (:mod:`benchmarks.bench_objective`) on ResNet18 (3x32x32) and ViT-B/16 (224x224,
   random weights) at batch 128 and N=25, in ``32-true`` and ``bf16-mixed``: library, reference loop, floor.

``--cpu-smoke`` (or ``--cpu``) runs every part on the CPU in a tiny configuration, with 2 CPU processes (gloo) for the
strategy checks, so that the script is known to run before a GPU is lent. The results go to ``gpu_check.json`` and
``gpu_check.md`` (a dated section to paste into ``docs/benchmarks.md``).

Example::

    python -m benchmarks.gpu_bench --out /tmp/gpu                   # on a GPU machine
    python -m benchmarks.gpu_bench --cpu-smoke --out /tmp/gpu_cpu     # anywhere
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
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
from benchmarks.sharded_fit import run_all
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
    """One device unless ``devices`` is given (on a machine with several GPUs, "auto" would launch DDP)."""
    return quiet_trainer(**{"accelerator": accelerator, "devices": 1, "max_epochs": 1, **kwargs})


def _weights(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check_bf16(accelerator: str, tiny: bool) -> dict[str, Any]:
    split = load_digits_split()
    mask = class_mask(split.y_train, [3])
    if tiny:  # the smoke: part of the class, from a model trained for one epoch
        mask = torch.nonzero(mask).flatten()[:48]
    trained = train_classifier(DigitsCNN, split.x_train, split.y_train, epochs=1 if tiny else 15, seed=0)
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


def _processes(accelerator: str) -> int:
    """Every GPU of the machine, or 2 CPU processes (gloo)."""
    return torch.cuda.device_count() if accelerator == "gpu" else 2


def check_ddp(accelerator: str) -> dict[str, Any]:
    if "LOCAL_RANK" not in os.environ:  # not launched by torchrun/SLURM: let Lightning pick a free port
        os.environ.pop("MASTER_PORT", None)
    devices = _processes(accelerator)
    single = _jit_weights(accelerator)
    ddp = _jit_weights(accelerator, strategy="ddp_spawn", devices=devices)
    diff = _max_diff(single, ddp)
    return {"ok": diff < 1e-5, "devices": devices, "max_abs_diff": diff}


def _sharded_fit(accelerator: str, devices: int, state: Path, out: Path, *flags: str) -> dict[str, Any]:
    """One run of ``benchmarks/sharded_fit.py`` in its own process (``ModelParallelStrategy`` relaunches it)."""
    script = Path(__file__).with_name("sharded_fit.py")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    command = [sys.executable, str(script), "--state", str(state), "--out", str(out), "--devices", str(devices)]
    done = subprocess.run(
        [*command, "--accelerator", accelerator, *flags], env=env, capture_output=True, text=True, timeout=240
    )
    if done.returncode != 0:
        raise RuntimeError(f"sharded_fit.py --devices {devices} exited {done.returncode}: {done.stderr[-1500:]}")
    return torch.load(out, weights_only=False)


def check_fsdp2(accelerator: str, out: Path, tiny: bool) -> dict[str, Any]:
    split = load_digits_split()
    epochs = 1 if tiny else 3  # recognises its classes (the smoke only needs a run that moves the weights)
    trained = train_classifier(DigitsCNN, split.x_train, split.y_train, epochs=epochs, seed=0)
    state = out / "sharded_trained.pt"
    torch.save(trained.state_dict(), state)
    devices = _processes(accelerator)
    kwargs = {"accelerator": accelerator, "devices": 1, "default_root_dir": out}
    one = run_all(["wrapper"], trained.state_dict(), kwargs, shard=False)[0]["wrapper"]
    two = _sharded_fit(accelerator, devices, state, out / "sharded_many.pt", "--shard")
    update = _max_diff(one["weights"], trained.state_dict())
    diff = _max_diff(one["weights"], two["weights"])
    ok = update > 0 and diff <= 1e-5 * update and one["summary"] == two["summary"]
    return {"ok": ok, "devices": devices, "update": update, "max_abs_diff": diff, "summary": two["summary"]}


def check_fsdp(accelerator: str) -> dict[str, Any]:
    from lightning.pytorch.strategies import FSDPStrategy

    single = _jit_weights(accelerator)
    os.environ["LIGHTNING_JIT_EXPERIMENTAL_FSDP"] = "1"  # lifts JiT's refusal of FSDP1, for this probe only
    try:
        fsdp = _jit_weights(accelerator, strategy=FSDPStrategy(state_dict_type="full"))
    finally:
        os.environ.pop("LIGHTNING_JIT_EXPERIMENTAL_FSDP", None)
    diff = _max_diff(single, fsdp)
    return {"ok": diff < 1e-5, "max_abs_diff": diff}


class SyntheticImages:
    """Ten classes of 3x``size``x``size`` images: a fixed random pattern per class plus noise, learnable in a few
    epochs (the no-knob check needs a model that recognises the class it forgets)."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.templates = torch.randn(10, 3, size, size, generator=gen)
        self.y = torch.arange(n) % 10
        self.x = self.templates[self.y] + 0.8 * torch.randn(n, 3, size, size, generator=gen)


def _small_vit(tiny: bool) -> torch.nn.Module:
    from torchvision.models import VisionTransformer

    if tiny:
        return VisionTransformer(16, 4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)
    return VisionTransformer(32, 4, num_layers=6, num_heads=8, hidden_dim=256, mlp_dim=512, num_classes=10)


def _resnet18(tiny: bool) -> torch.nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


def _fit_plain(model: torch.nn.Module, x: Tensor, y: Tensor, device: torch.device, epochs: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    model.eval()
    hits = sum(
        int((model(x[i : i + 256].to(device)).argmax(1).cpu() == y[i : i + 256]).sum()) for i in range(0, len(x), 256)
    )
    return 100.0 * hits / max(1, len(x))


def _train_step_peak(model: torch.nn.Module, x: Tensor, y: Tensor, device: torch.device) -> int:
    """Peak CUDA memory of one step of the model's own training (forward, backward, SGD) at ``x``'s batch."""
    probe = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    with torch.no_grad():
        for p, q in zip(model.parameters(), probe, strict=True):
            p.copy_(q)
    model.eval()
    return int(peak)


def check_no_knob(name: str, accelerator: str, tiny: bool) -> dict[str, Any]:
    """The README's path on a larger model: ``JiTUnlearning(model, seed=0)``, ``max_epochs=-1``, forget class 0."""
    cuda = accelerator == "gpu"
    device = torch.device("cuda" if cuda else "cpu")
    # The smoke: ResNet18 on 8x8 images (1x1 from its second stage on; every layer still runs), the tiny ViT on 16x16.
    size = (8 if name == "resnet18" else 16) if tiny else 32
    train = SyntheticImages(100 if tiny else 5000, size, seed=0)
    test = SyntheticImages(50 if tiny else 1000, size, seed=1)
    test.templates, test.x = train.templates, train.templates[test.y] + 0.8 * torch.randn(len(test.y), 3, size, size)
    torch.manual_seed(0)
    model = (_small_vit if name == "vit_small" else _resnet18)(tiny).to(device)
    _fit_plain(model, train.x, train.y, device, epochs=1 if tiny else 8, batch=64)
    forget = torch.nonzero(train.y == 0).flatten()[: 8 if tiny else 256]
    kept = test.y != 0
    before = {
        "forget_acc": _accuracy(model, train.x[forget], train.y[forget], device),
        "retained_test_acc": _accuracy(model, test.x[kept], test.y[kept], device),
    }
    batch = 8 if tiny else 128
    peak_train = _train_step_peak(model, train.x[forget[:batch]], train.y[forget[:batch]], device) if cuda else None
    loader = forget_loader(TensorDataset(train.x[forget], train.y[forget], forget), batch_size=batch)
    unlearner = JiTUnlearning(model, seed=0, epochs=1 if tiny else None)  # the no-knob path
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _trainer(accelerator, max_epochs=-1).fit(unlearner, loader)
    seconds = time.perf_counter() - start
    peak_jit = int(torch.cuda.max_memory_allocated()) if cuda else None
    model.to(device)
    after = {
        "forget_acc": _accuracy(model, train.x[forget], train.y[forget], device),
        "retained_test_acc": _accuracy(model, test.x[kept], test.y[kept], device),
    }
    outcome = str(unlearner.outcome)
    result = {
        "ok": tiny or outcome == "forgotten",
        "outcome": outcome,
        "before": before,
        "after": after,
        "fit_seconds": round(seconds, 1),
        "forget_samples": int(len(forget)),
        "batch": batch,
    }
    if cuda:
        result["peak_mib"] = {"jit_run": peak_jit / 2**20, "own_training_step": peak_train / 2**20}
        result["peak_over_training_step"] = round(peak_jit / max(1, peak_train), 2)
    return result


def run_check(name: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # report and go on: one failing check must not hide the others' figures
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    shown = json.dumps({k: v for k, v in result.items() if k != "traceback"}, default=str)
    log(f"[check] {name}: {'PASS' if result['ok'] else 'FAIL'} {shown}")
    return result


#: Checks whose failure is reported but does not fail the script.
INFORMATIONAL = ("fsdp1_probe",)


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits, inside dicts and lists too."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def render_markdown(summary: dict[str, Any], rows: list[Any], date: str) -> str:
    """A dated section for ``docs/benchmarks.md``: the checks, one line each, then the step benchmark's table."""
    lines = [
        f"## GPU (measured {date}, {summary['card']} x{summary['devices']})",
        "",
        f"`benchmarks/gpu_check.sh` on {summary['card']} ({summary['devices']} device(s)), torch {summary['torch']},"
        f" Lightning {summary['lightning']}. Raw figures: `gpu_check.json`.",
        "",
        "| check | result | figures |",
        "|---|---|---|",
    ]
    for name, result in summary["checks"].items():
        verdict = "PASS" if result["ok"] else ("FAIL (informational)" if name in INFORMATIONAL else "**FAIL**")
        figures = {k: _rounded(v) for k, v in result.items() if k not in ("ok", "traceback")}
        lines.append(f"| {name} | {verdict} | `{json.dumps(figures, default=str)}` |")
    if rows:
        lines += ["", "JiT step, median seconds per step:", "", format_table(rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu-smoke", "--cpu", dest="cpu", action="store_true", help="run every part on the CPU, tiny sizes"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="resnet18,vit_b_16", help="GPU models to time (default: both).")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("No CUDA device: run with --cpu-smoke for the CPU smoke configuration.", file=sys.stderr)
        return 2
    accelerator = "gpu" if cuda else "cpu"
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    devices = _processes(accelerator)
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    def write(checks: dict[str, Any], rows: list[Any]) -> list[str]:
        """Write what has run so far (after every step: a run stopped by the time limit keeps its figures)."""
        failed = [k for k, v in checks.items() if not v["ok"] and k not in INFORMATIONAL]
        summary = {
            "card": card,
            "devices": devices,
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "date": datetime.date.today().isoformat(),
            "checks": checks,
            "bench": [asdict(r) for r in rows],
            "ratios": {f"{m}|{b}|{p}": v for (m, b, p), v in ratios(rows).items()} if rows else {},
            "failed": failed,
        }
        (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
        (args.out / "gpu_check.md").write_text(render_markdown(summary, rows, summary["date"]))
        (args.out / "gpu_check.log").write_text("\n".join(lines) + "\n")
        return failed

    log(f"# lightning-jit GPU check: {card} x{devices}, torch {torch.__version__}, lightning {pl.__version__}")
    if args.cpu:
        torch.set_num_threads(1)
    checks: dict[str, Any] = {}
    if not args.skip_checks:
        plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("bf16_forgets_like_32", lambda: check_bf16(accelerator, args.cpu)),
            ("fp16_scaler_skip", lambda: check_fp16_scaler(accelerator)),
            ("ddp_equals_single", lambda: check_ddp(accelerator)),
            ("fsdp2_equals_single", lambda: check_fsdp2(accelerator, args.out, args.cpu)),
        ]
        if cuda:  # Lightning's FSDPStrategy refuses to run on a CPU
            plan.append(("fsdp1_probe", lambda: check_fsdp(accelerator)))
        plan += [
            (f"no_knob_{m}", lambda m=m: check_no_knob(m, accelerator, args.cpu)) for m in ("resnet18", "vit_small")
        ]
        for name, fn in plan:
            checks[name] = run_check(name, fn, log)
            write(checks, [])
    rows = []
    if not args.skip_bench:
        if cuda:
            torch.backends.cudnn.benchmark = True
            bench_plan = [("resnet18", [256, 1024, None], True), ("vit_b_16", [256, 1024], False)]
            bench_plan = [step for step in bench_plan if step[0] in args.models.split(",")]
            batches, n, precisions = [128], 25, ["32-true", "bf16-mixed"]
        else:
            bench_plan = [("digits", [], False)]
            batches, n, precisions = [4], 3, ["32-true", "bf16-mixed"]
        for model, chunks, compile_model in bench_plan:
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
            write(checks, rows)
        log("\n## JiT step, forget samples per second (median)\n")
        log(format_table(rows))
    failed = write(checks, rows)
    log(f"\nwrote {args.out / 'gpu_check.json'}, gpu_check.md and gpu_check.log; failed checks: {failed or 'none'}")
    write(checks, rows)  # the log's last line too
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
