"""How long must the token family's transformers train? Train/test accuracy and training loss per epoch.

For each token data set and seed, :class:`benchmarks.datasets.TokenTransformer` is trained with the data set's batch
size and learning rate from ``TRAIN_RECIPE`` (the same seeded Adam loop as :func:`benchmarks.datasets.train`, one
epoch at a time) for ``--epochs`` epochs; after each epoch it records the mean training loss of that epoch, and the
accuracy on the whole training and test splits (eval mode). With ``--retrain-class c`` the same is done without class
``c`` (the retrained model's task) and the test accuracy is on the other classes. The recipe is chosen by the
training criterion only (train accuracy about 100%, the loss on its plateau), never by an unlearning result.

Run (one CPU thread)::

    python -m benchmarks.token_convergence --dataset token_digits --epochs 80 --seeds 0 [--retrain-class 3]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks import datasets as D


def curve(dataset: str, seed: int, epochs: int, retrain_class: int | None, lr: float | None, bs: int | None):
    split = D.load_split(dataset)
    _, bs0, lr0 = D.TRAIN_RECIPE[dataset]
    bs, lr = bs or bs0, lr or lr0
    keep = torch.ones_like(split.y_train, dtype=torch.bool)
    keep_test = torch.ones_like(split.y_test, dtype=torch.bool)
    if retrain_class is not None:
        keep, keep_test = split.y_train != retrain_class, split.y_test != retrain_class
    x, y = split.x_train[keep], split.y_train[keep]
    torch.manual_seed(seed)
    model = D.make_model(dataset, "transformer", split.num_classes, split.input_shape)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    for epoch in range(1, epochs + 1):
        model.train()
        perm, total = torch.randperm(n, generator=g), 0.0
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            loss = F.cross_entropy(D.forward_logits(model, x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        tr = float((D.logits_of(model, x).argmax(1) == y).float().mean() * 100)
        xt, yt = split.x_test[keep_test], split.y_test[keep_test]
        te = float((D.logits_of(model, xt).argmax(1) == yt).float().mean() * 100)
        row = dict(dataset=dataset, seed=seed, retrain_class=retrain_class, lr=lr, bs=bs, epoch=epoch,
                   loss=total / n, train=tr, test=te)  # fmt: skip
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="token_digits", choices=sorted(D.TOKEN_DATASETS))
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--retrain-class", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="Default: the data set's TRAIN_RECIPE.")
    parser.add_argument("--batch-size", type=int, default=None, help="Default: the data set's TRAIN_RECIPE.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed in (int(s) for s in args.seeds.split(",")):
        curve(args.dataset, seed, args.epochs, args.retrain_class, args.lr, args.batch_size)


if __name__ == "__main__":
    main()
