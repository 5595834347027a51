"""The embedded default data (scikit-learn's digits), small classifiers for it, and forget-set selection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_jit.core.weights import normalization_mode
from lightning_jit.lightning.trainer import quiet_trainer

#: Per-pixel scale of scikit-learn's digits (values are integers 0..16).
DIGITS_MAX = 16.0


@dataclass
class DigitsSplit:
    """A fixed, stratified train/test split of scikit-learn's digits as normalised ``(N, 1, 8, 8)`` tensors."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1


def load_digits_split(test_size: float = 0.25, seed: int = 0, coarse: bool = False) -> DigitsSplit:
    """Load scikit-learn's digits (1,797 real 8x8 images, shipped with scikit-learn; no download).

    Inputs are scaled to [0, 1] then standardised with the training mean and std, as a user pipeline would.

    Args:
        test_size: Fraction held out as the test split.
        seed: Seed of the stratified split.
        coarse: Use coarse labels ``digit // 2`` (5 classes), for sub-class forgetting.

    Example:
        >>> split = load_digits_split()
        >>> tuple(split.x_train.shape[1:]), split.num_classes
        ((1, 8, 8), 10)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / DIGITS_MAX
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if coarse:
        y_tr, y_te = y_tr // 2, y_te // 2
    return DigitsSplit(
        torch.from_numpy(x_tr).unsqueeze(1),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te).unsqueeze(1),
        torch.from_numpy(y_te),
    )


def fine_digit_labels(test_size: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The fine (0-9) labels of the train and test split that :func:`load_digits_split` makes with ``coarse=True``."""
    split = load_digits_split(test_size=test_size, seed=seed)
    return split.y_train, split.y_test


class DigitsCNN(pl.LightningModule):
    """A small CNN for 8x8 digits, optionally with BatchNorm.

    Args:
        num_classes: Number of output classes.
        width: Channels of the first convolution.
        batchnorm: Add BatchNorm after each convolution.
        lr: Adam learning rate for training.

    Example:
        >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 32, batchnorm: bool = False, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batchnorm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            norm(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            norm(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val_acc", multiclass_accuracy(logits, y, logits.shape[1], average="micro"), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def train_classifier(
    model: pl.LightningModule | Callable[[], pl.LightningModule],
    x: Tensor,
    y: Tensor,
    epochs: int = 15,
    batch_size: int = 64,
    seed: int = 0,
) -> pl.LightningModule:
    """Train a classifier on ``(x, y)`` with a quiet, seeded Lightning Trainer on the CPU; return it in eval mode.

    Pass a factory (e.g. the class ``DigitsCNN``) rather than an instance so that the seed also covers the weight
    initialisation: the result is then the same in every process.
    """
    pl.seed_everything(seed, verbose=False)
    if not isinstance(model, nn.Module):
        model = model()
    loader = DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    quiet_trainer(max_epochs=epochs, deterministic=True).fit(model, train_dataloaders=loader)
    return model.eval()


def class_mask(y: Tensor, classes: Sequence[int]) -> Tensor:
    """Boolean mask of the samples whose label is in ``classes``.

    Raises:
        MisconfigurationException: if a class does not occur in ``y``.
    """
    present = set(torch.unique(y).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise MisconfigurationException(
            f"Forget classes {missing} do not occur in the labels (present: {sorted(present)}). Check `classes`."
        )
    return torch.isin(y, torch.as_tensor(list(classes), dtype=y.dtype))


def random_forget_mask(n: int, fraction: float, seed: int = 0) -> Tensor:
    """Boolean mask selecting ``round(fraction * n)`` samples (at least one) uniformly at random."""
    if not 0 < fraction < 1:
        raise MisconfigurationException(f"`fraction` must be in (0, 1), got {fraction!r}.")
    k = max(1, round(fraction * n))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on ``(x, y)``; NaN for an empty split."""
    from lightning_jit.evaluation.metrics import SplitAccuracy

    if len(y) == 0:
        return float("nan")
    metric = SplitAccuracy().to(y.device)
    with normalization_mode(model, "eval"):
        for start in range(0, len(y), batch_size):
            metric.update(model(x[start : start + batch_size]), y[start : start + batch_size])
    return float(metric.compute())


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits as a LightningDataModule, with a ``forget_dataloader`` hook for the CLI.

    Args:
        batch_size: Batch size of the train, validation and test loaders.
        coarse: Use coarse labels ``digit // 2`` (5 classes), for sub-class forgetting.
        forget_digits: Digits (0-9, fine labels even when ``coarse``) whose training samples ``forget_dataloader``
            returns, e.g. ``[3]`` to forget the sub-class "3" of coarse class 1.
        forget_batch_size: Batch size of ``forget_dataloader``.
        test_size: Fraction held out as the test split.
        seed: Seed of the split and of the training loader's shuffling.

    Example:
        >>> dm = DigitsDataModule(forget_digits=[3])
        >>> dm.setup("fit")
        >>> len(dm.forget_dataloader().dataset)
        137
    """

    def __init__(
        self,
        batch_size: int = 64,
        coarse: bool = False,
        forget_digits: list[int] | None = None,
        forget_batch_size: int = 32,
        test_size: float = 0.25,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.split: DigitsSplit | None = None
        self.fine_train: Tensor | None = None

    def setup(self, stage: str) -> None:
        if self.split is None:
            self.split = load_digits_split(self.hparams.test_size, self.hparams.seed, coarse=self.hparams.coarse)
            self.fine_train = fine_digit_labels(self.hparams.test_size, self.hparams.seed)[0]

    def train_dataloader(self) -> DataLoader:
        assert self.split is not None
        generator = torch.Generator().manual_seed(self.hparams.seed)
        dataset = TensorDataset(self.split.x_train, self.split.y_train)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        assert self.split is not None
        return DataLoader(TensorDataset(self.split.x_test, self.split.y_test), batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def forget_dataloader(self) -> DataLoader:
        """The training samples of ``forget_digits``, unshuffled, with their (possibly coarse) training labels."""
        assert self.split is not None and self.fine_train is not None
        if not self.hparams.forget_digits:
            raise MisconfigurationException(
                "`forget_dataloader` needs `forget_digits`: set `--data.forget_digits` (e.g. [3])."
            )
        mask = class_mask(self.fine_train, self.hparams.forget_digits)
        dataset = TensorDataset(self.split.x_train[mask], self.split.y_train[mask])
        return DataLoader(dataset, batch_size=self.hparams.forget_batch_size)


__all__ = [
    "DIGITS_MAX",
    "DigitsCNN",
    "DigitsDataModule",
    "DigitsSplit",
    "accuracy",
    "class_mask",
    "fine_digit_labels",
    "load_digits_split",
    "random_forget_mask",
    "train_classifier",
]
