"""Speed of one JiT training step: the library vs. the reference loop vs. the bare compute floor.

For each model and batch size it times, interleaved in one process:

* ``library``: :meth:`lightning_jit.JiTRun.step` (plain JiT, the guard off) on one forget batch: the clean forward,
  the ``N`` perturbed copies in chunked no-grad passes, backward and the SGD step (``perturbation_chunk="auto"``
  unless ``--chunks`` adds other sizes);
* ``reference``: the faithful port of the authors' loop (:mod:`benchmarks.reference_port`): ``N`` separate forward
  passes, noise drawn on the CPU and clamped per copy, then backward and the SGD step;
* ``floor``: plain torch, the least work any implementation must do: one no-grad forward of the ``N * B`` perturbed
  batch (drawn before the clock starts) plus a forward and backward of the ``B`` clean samples and the SGD step.

It prints forget samples per second (median over ``--repeats`` interleaved rounds) and the ratios ``library /
reference`` and ``library / floor``. All models run in eval mode (BatchNorm cannot run a batch of one in train mode).

Example::

    python -m benchmarks.bench_objective --models digits resnet18 --batches 1 128 --n 25 --repeats 7
    python -m benchmarks.bench_objective --models digits --batches 2 --n 3 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.reference_port import reference_step
from lightning_jit import GuardSettings, JiTRun, JiTSettings

#: (channels, height, width) of each benchmark model's input.
INPUT_SHAPES = {"digits": (1, 8, 8), "resnet18": (3, 32, 32), "vit_b_16": (3, 224, 224)}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A benchmark model with random weights: ``digits`` (the library's DigitsCNN) or a torchvision model."""
    if name == "digits":
        from lightning_jit.demo.data import DigitsCNN

        return DigitsCNN(num_classes=num_classes)
    import torchvision

    if name == "resnet18":
        return torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if name == "vit_b_16":
        return torchvision.models.vit_b_16(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {sorted(INPUT_SHAPES)}")


@dataclass
class Row:
    model: str
    batch: int
    n: int
    method: str
    seconds: float
    samples_per_s: float
    precision: str = "32-true"
    device: str = "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext


def make_methods(
    model: nn.Module,
    x: torch.Tensor,
    n: int,
    sigma: float,
    chunks: list[int | None],
    precision: str = "32-true",
    compiled: nn.Module | None = None,
) -> dict[str, Callable[[], None]]:
    """The timed closures; each runs one full training step on ``x`` (weights change a little each call)."""
    device = x.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-6)
    autocast = _autocast(device, precision)
    off = GuardSettings(enabled=False)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    methods: dict[str, Callable[[], None]] = {}

    # Plain JiT: the reference's objective, so that the timings compare the same computation.
    def plain_run(chunk: int | str | None) -> JiTRun:
        settings = JiTSettings.plain(sigma=sigma, lr=1e-6, n_perturbations=n, clamp="batch", perturbation_chunk=chunk)
        run = JiTRun(model, settings, guard=off)
        run.start()
        return run

    def timed(run: JiTRun) -> Callable[[], None]:
        return lambda: run.step(x, optimizer=optimizer, backward=backward, epoch=0, forward_context=autocast)

    for chunk in chunks:
        methods["library" if chunk == "auto" else f"library[chunk={chunk}]"] = timed(plain_run(chunk))
    if compiled is not None:
        compiled_run = plain_run("auto")
        methods["library+compile"] = lambda: compiled_run.step(
            x, optimizer=optimizer, backward=backward, epoch=0, forward=compiled, forward_context=autocast
        )

    def reference() -> None:
        optimizer.zero_grad()
        with autocast():
            loss = reference_step(model, x, sigma, n)
        loss.backward()
        optimizer.step()

    methods["reference"] = reference

    lo, hi = x.min(), x.max()
    repeated = x.repeat(n, *([1] * (x.dim() - 1)))
    perturbed = (repeated + sigma * torch.randn(repeated.shape, device=device)).clamp(lo, hi)

    def floor() -> None:
        optimizer.zero_grad()
        with autocast():
            with torch.no_grad():
                model(perturbed)
            loss = model(x).float().sum()
        loss.backward()
        optimizer.step()

    methods["floor"] = floor
    return methods


def _timed(fn: Callable[[], None], device: torch.device, clock: str = "wall") -> float:
    """Seconds one call takes: wall-clock, or the process's CPU time (``clock="cpu"``).

    On a shared CPU machine the CPU time of a single-threaded process is the robust measure: it does not count the
    time the process waits for a core. With several threads it adds up their times (CPU-seconds, not wall time).
    """
    _sync(device)
    now = time.process_time if clock == "cpu" else time.perf_counter
    start = now()
    fn()
    _sync(device)
    return now() - start


def bench(
    models: list[str],
    batches: list[int],
    n: int = 25,
    repeats: int = 5,
    sigma: float = 0.1,
    chunks: list[int | None] | None = None,
    device: str = "cpu",
    precisions: list[str] | None = None,
    compile_model: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
    clock: str = "wall",
) -> list[Row]:
    """Time every method on every (model, batch, precision); returns one row per method with the median time."""
    dev = torch.device(device)
    extra = [c for c in (chunks or []) if c != "auto"]
    chunk_list: list[int | str | None] = ["auto", *extra]
    rows: list[Row] = []
    for name in models:
        torch.manual_seed(seed)
        model = build_model(name).to(dev).eval()
        compiled = torch.compile(model) if compile_model else None
        for precision in precisions or ["32-true"]:
            for batch in batches:
                x = torch.randn((batch, *INPUT_SHAPES[name]), device=dev)
                methods = make_methods(model, x, n, sigma, chunk_list, precision, compiled)
                for fn in methods.values():  # warm-up (and compilation) outside the clock
                    fn()
                times: dict[str, list[float]] = {k: [] for k in methods}
                for r in range(repeats):
                    order = list(methods.items())
                    if r % 2:
                        order.reverse()  # interleave, alternating the order so no method always runs first
                    for key, fn in order:
                        times[key].append(_timed(fn, dev, clock))
                for key, ts in times.items():
                    median = statistics.median(ts)
                    rows.append(Row(name, batch, n, key, median, batch / median, precision, str(dev)))
                log(format_table([r for r in rows if (r.model, r.batch, r.precision) == (name, batch, precision)]))
    return rows


def ratios(rows: list[Row]) -> dict[tuple[str, int, str], dict[str, float]]:
    """``library / reference`` and ``library / floor`` (speed ratios) for each (model, batch, precision)."""
    out: dict[tuple[str, int, str], dict[str, float]] = {}
    for key in {(r.model, r.batch, r.precision) for r in rows}:
        speed = {r.method: r.samples_per_s for r in rows if (r.model, r.batch, r.precision) == key}
        out[key] = {
            "library/reference": speed["library"] / speed["reference"],
            "library/floor": speed["library"] / speed["floor"],
        }
        if "library+compile" in speed:
            out[key]["compile/library"] = speed["library+compile"] / speed["library"]
    return out


def format_table(rows: list[Row]) -> str:
    lines = [
        "| model | precision | batch | N | method | median s/step | forget samples/s |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.precision} | {r.batch} | {r.n} | {r.method} | {r.seconds:.4f} | {r.samples_per_s:.1f} |"
        )
    for (model, batch, precision), rs in sorted(ratios(rows).items()):
        text = ", ".join(f"{k} = {v:.2f}" for k, v in rs.items())
        lines.append(f"\n{model} {precision} batch {batch}: {text}")
    return "\n".join(lines)


def _chunk(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18"], choices=sorted(INPUT_SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128])
    parser.add_argument("--n", type=int, default=25, help="perturbations per sample (default 25)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds; medians are reported")
    parser.add_argument("--chunks", nargs="*", type=_chunk, default=[], help="extra perturbation_chunk sizes to time")
    parser.add_argument("--precisions", nargs="+", default=["32-true"], choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time the library step on torch.compile(model)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=None,
        help="wall-clock or process CPU time (default: cpu with --threads 1 on the CPU, else wall)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall")
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, device {args.device}, threads {threads}, N={args.n}, clock {clock}")
    rows = bench(
        args.models,
        args.batches,
        args.n,
        args.repeats,
        chunks=args.chunks,
        device=args.device,
        precisions=args.precisions,
        compile_model=args.compile,
        clock=clock,
    )
    print("\n## all results\n")
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
