"""Which predictions are right: the one accuracy rule of the core, which stays pure torch.

The upper layers use torchmetrics' ``multiclass_accuracy(..., average="micro")`` where they need a rate from one
batch; the core counts hits per sample, since it pools them over batches and processes, or keeps them per sample.
"""

from __future__ import annotations

from torch import Tensor


def top1_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """Whether each sample's top class is its label: a boolean tensor of shape ``(batch,)``, on ``logits``' device
    when ``labels`` is there.

    Args:
        logits: The model's outputs, ``(batch, classes)``.
        labels: The class indices, ``(batch,)``.

    Example:
        >>> import torch
        >>> top1_hits(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])).tolist()
        [True, True, False]
    """
    return logits.argmax(1) == labels


__all__ = ["top1_hits"]
