"""A text-style classifier over token ids, trained, then made to forget one class with JiT in embedding space.

The data are scikit-learn's digits read as "sentences": each 8x8 image is 64 tokens, its pixel values 0-16 (a
vocabulary of 17). The model is a small transformer encoder (token and position embeddings, two layers, a pooled
head) that takes ``input_ids`` and an ``attention_mask``, as a text classifier does; its batches are dicts
``{"input_ids", "attention_mask", "labels"}``, as a tokenizer's collate function gives them. The unlearning engine
takes one input tensor, so the wrapper reads the ids with ``input_key="input_ids"`` (the masks here are all ones,
which the model assumes when it gets none; a dict batch with a real mask does not reach an unlearning run yet).

Token ids cannot take Gaussian noise, so JiT perturbs the output of the token embedding instead:
``JiTSettings(perturb_at="embed")`` names the module (``"encoder.embeddings"`` for a Hugging Face model). Run::

    python examples/token_classifier.py            # train, forget class 3, print the accuracies

The same model and data on the command line (``TokenDigitsDataModule``): ``examples/token_cli.py`` and
``examples/configs/token_full_class.yaml``.

For a ``transformers`` ``BertForSequenceClassification`` the site is ``"bert.embeddings.word_embeddings"``; that
flow is not run here (a dict batch with its ``attention_mask`` does not reach an unlearning run yet).
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_jit import JiTSettings, JiTUnlearning

VOCAB, LENGTH, CLASSES = 17, 64, 10


class TokenDigits(Dataset):
    """Digits as token sequences: ``{"input_ids": (64,) int64, "attention_mask": (64,) int64, "labels": int64}``."""

    def __init__(self, ids: Tensor, labels: Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def load_token_digits(seed: int = 0) -> tuple[TokenDigits, TokenDigits]:
    """The training and test splits (stratified 75/25)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    ids, labels = torch.as_tensor(digits.data, dtype=torch.long), torch.as_tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(torch.arange(len(labels)), test_size=0.25, random_state=seed, stratify=labels)
    return TokenDigits(ids[tr], labels[tr]), TokenDigits(ids[te], labels[te])


class TokenDigitsDataModule(pl.LightningDataModule):
    """The token digits as a LightningDataModule, for the command line (``examples/token_cli.py``, ``lightning-jit``).

    Its batches are dicts ``{"input_ids", "attention_mask", "labels"}``; the validation and test loaders are the test
    split. ``lightning-jit unlearn --forget.classes=[3]`` picks the forget set out of its training set.

    Args:
        batch_size: Batch size of every loader.
        seed: Seed of the split and of the training loader's shuffling.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_data: TokenDigits | None = None
        self.test_data: TokenDigits | None = None

    def setup(self, stage: str) -> None:
        if self.train_data is None:
            self.train_data, self.test_data = load_token_digits(self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        assert self.train_data is not None
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_data, batch_size=self.hparams.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        assert self.test_data is not None
        return DataLoader(self.test_data, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class TokenClassifier(pl.LightningModule):
    """A small transformer encoder over token ids with a pooled linear head."""

    def __init__(self, vocab_size: int = VOCAB, length: int = LENGTH, num_classes: int = CLASSES, width: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, width)  # the perturbation site
        self.position = nn.Parameter(torch.randn(1, length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.embed(input_ids) + self.position[:, : input_ids.shape[1]]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = self.norm(self.encoder(h, src_key_padding_mask=mask == 0))
        keep = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@torch.no_grad()
def class_accuracy(model: nn.Module, data: TokenDigits, forgotten: int) -> dict[str, float]:
    """Test accuracy (%) on the forgotten class and on the others."""
    model.eval()
    pred = model(data.ids, torch.ones_like(data.ids)).argmax(1)
    hit, gone = pred == data.labels, data.labels == forgotten
    return {"forgotten": float(hit[gone].float().mean() * 100), "others": float(hit[~gone].float().mean() * 100)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget_class", type=int, default=3)
    parser.add_argument("--train_epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, workers=True)
    train, test = load_token_digits()
    model = TokenClassifier()
    trainer_kwargs: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False}
    pl.Trainer(max_epochs=args.train_epochs, **trainer_kwargs).fit(model, DataLoader(train, 64, shuffle=True))
    before = class_accuracy(model, test, args.forget_class)

    # Forget one class: the forget set is its training samples, in the same dict batches. `input_key` passes the ids
    # alone to the model (every mask here is all ones, which the model assumes when it gets none) and `label_key` names
    # the labels; JiT's noise goes into the token embedding's output.
    forget = [i for i in range(len(train)) if int(train.labels[i]) == args.forget_class]
    forget_loader = DataLoader(torch.utils.data.Subset(train, forget), batch_size=64)
    unlearner = JiTUnlearning(
        model, settings=JiTSettings(perturb_at="embed"), input_key="input_ids", label_key="labels"
    )
    pl.Trainer(max_epochs=-1, **trainer_kwargs).fit(unlearner, forget_loader)
    after = class_accuracy(model, test, args.forget_class)
    after_train = class_accuracy(model, train, args.forget_class)

    print(unlearner.verification.verdict)
    print(f"test accuracy on class {args.forget_class}: {before['forgotten']:.1f}% -> {after['forgotten']:.1f}%")
    print(f"test accuracy on the other classes: {before['others']:.1f}% -> {after['others']:.1f}%")
    return {"outcome": unlearner.outcome, "before": before, "after": after, "after_train": after_train}


if __name__ == "__main__":
    main()
