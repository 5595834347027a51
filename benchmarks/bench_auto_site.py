"""Does ``perturb_at="auto"`` pick the token embedding that the benchmark names by hand, with the same results?

For each token model of the generalisation benchmark's token family (``TokenTransformer``; BERT with ``--models bert``)
and each full-class request (classes 3, 4, 8; seeds 0, 1, 2), the library's no-knob run is made twice from the same
original, with the same forget loader and seed: once with the site named (``embed``,
``bert.embeddings.word_embeddings``) and once with ``perturb_at="auto"``. The table gives the module ``auto`` picked,
whether the final weights are bit-identical, both outcomes and costs, and the forgotten class's test accuracy. Run::

    python -m benchmarks.bench_auto_site [--datasets token_digits,token_mnist] [--models transformer,bert]
        [--seeds 0,1,2] [--classes 3,4,8] [--out benchmarks/out/auto_site]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import datasets as D
from lightning_jit import JiTSettings, JiTUnlearning
from lightning_jit.core.batching import batch_size_for
from lightning_jit.core.site import first_embedding
from lightning_jit.lightning.trainer import quiet_trainer

#: The token embedding of each token model, named by hand.
NAMED = {"transformer": "embed", "bert": "bert.embeddings.word_embeddings"}


def unlearn(original: nn.Module, xf: torch.Tensor, yf: torch.Tensor, seed: int, perturb_at: str) -> dict[str, Any]:
    """The benchmark's library run (no setting but the seed and the site) on a copy of ``original``."""
    model = copy.deepcopy(original)
    loader = DataLoader(
        TensorDataset(xf, yf),
        batch_size=batch_size_for(len(yf)),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    unlearner = JiTUnlearning(model, JiTSettings(seed=seed, on_unverified="keep", perturb_at=perturb_at))
    quiet_trainer(max_epochs=-1).fit(unlearner, loader)
    verification = unlearner.verification
    assert verification is not None and unlearner.run is not None
    return {
        "model": model.eval(),
        "site": unlearner.run.site.name,
        "outcome": verification.outcome.value,
        "cost": verification.cost.get("total"),
    }


@torch.no_grad()
def class_accuracy(model: nn.Module, split: D.Split, c: int) -> float:
    keep = split.y_test == c
    logits = D.forward_logits(model, split.x_test[keep])
    return float((logits.argmax(1) == split.y_test[keep]).float().mean() * 100)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="token_digits")
    parser.add_argument("--models", default="transformer")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--classes", default="3,4,8")
    parser.add_argument("--out", default="benchmarks/out/auto_site")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for dataset in args.datasets.split(","):
        split = D.load_split(dataset)
        for model_name in args.models.split(","):
            for seed in map(int, args.seeds.split(",")):
                original = D.cached_train(dataset, model_name, split, None, seed, "orig")
                for c in map(int, args.classes.split(",")):
                    sc = D.full_class(split, c)
                    xf, yf = split.x_train[sc.forget_train], split.y_train[sc.forget_train]
                    named = unlearn(original, xf, yf, seed, NAMED[model_name])
                    auto = unlearn(original, xf, yf, seed, "auto")
                    a, b = named["model"].state_dict(), auto["model"].state_dict()
                    row = {
                        "dataset": dataset,
                        "model": model_name,
                        "seed": seed,
                        "class": c,
                        "first_embedding": first_embedding(original),
                        "auto_site": auto["site"],
                        "named_site": named["site"],
                        "identical": all(torch.equal(a[k], b[k]) for k in a),
                        "outcome_named": named["outcome"],
                        "outcome_auto": auto["outcome"],
                        "cost_named": named["cost"],
                        "cost_auto": auto["cost"],
                        "test_acc_before": class_accuracy(original, split, c),
                        "test_acc_named": class_accuracy(named["model"], split, c),
                        "test_acc_auto": class_accuracy(auto["model"], split, c),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    table = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(table)
    print(table)
    return table


def summarise(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data set | model | seed | class | auto picked | named | bit-identical | outcome (named / auto) | cost"
        " (named / auto) | class test acc. before -> named / auto |",
        "|---|---|---:|---:|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['seed']} | {r['class']} | `{r['auto_site']}` | `{r['named_site']}`"
            f" | {'yes' if r['identical'] else 'NO'} | {r['outcome_named']} / {r['outcome_auto']}"
            f" | {r['cost_named']} / {r['cost_auto']}"
            f" | {r['test_acc_before']:.1f} -> {r['test_acc_named']:.1f} / {r['test_acc_auto']:.1f} |"
        )
    same = sum(r["auto_site"] == r["named_site"] for r in rows)
    identical = sum(r["identical"] for r in rows)
    lines.append("")
    lines.append(f"auto picked the named module in {same} of {len(rows)} cases; bit-identical weights in {identical}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
