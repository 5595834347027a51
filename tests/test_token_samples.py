"""Sample requests on a model over token ids: the held-out loader's token ids reach the model as ids (the collapse
guard's monitor pass and the held-out basis of the update used to cast them to float, which ``nn.Embedding``
refuses), and the benchmark's token draws are their image siblings'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import bench_samples
from lightning_jit import JiTUnlearning
from lightning_jit.lightning.data import forget_loader
from lightning_jit.lightning.trainer import quiet_trainer


class TokenBag(nn.Module):
    """Token embedding (the site ``embed``) over 64 positions, flattened, a linear head: memorises a small set."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(17, 8)
        self.head = nn.Linear(64 * 8, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).flatten(1))


def test_token_draws_are_the_image_draws():
    image, token = bench_samples.load_memorising("digits"), bench_samples.load_memorising("token_digits")
    assert token.x_train.dtype == torch.int64 and token.x_train.shape == (700, 64)
    for part in ("train", "heldout", "test"):
        assert torch.equal(getattr(token, f"y_{part}"), getattr(image, f"y_{part}"))
        # The image is the pixel values over 16; the tokens are the values themselves.
        pixels = (getattr(image, f"x_{part}").flatten(1) * 16).round().long()
        assert torch.equal(getattr(token, f"x_{part}"), pixels)


@pytest.mark.slow
def test_sample_request_on_token_ids_with_a_heldout_loader():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    split = bench_samples.load_memorising("token_digits")
    x, y = split.x_train[:200], split.y_train[:200]
    model = TokenBag()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xh, yh = split.x_heldout, split.y_heldout
    with torch.no_grad():
        train_acc = float((model(x).argmax(1) == y).float().mean() * 100)
        heldout_before = float((model(xh).argmax(1) == yh).float().mean() * 100)
    # A memorised forget set that the held-out test tells apart: the run updates, and so builds its held-out basis.
    assert train_acc == 100.0 and heldout_before < 90.0
    forget = TensorDataset(x[:60], y[:60])
    monitor = DataLoader(TensorDataset(xh, yh), batch_size=128)
    unlearner = JiTUnlearning(model, monitor=monitor, task="random", seed=0, perturb_at="embed")
    quiet_trainer(max_epochs=-1).fit(unlearner, forget_loader(forget, seed=0))
    v = unlearner.verification
    assert v is not None and v.heldout_test is not None and v.passes >= 1
    assert v.outcome.value in ("forgotten", "not_forgotten")
    # The record's held-out accuracy is the returned model's, measured here by a direct pass over the ids.
    with torch.no_grad():
        heldout_after = 100 * int((model(xh).argmax(1) == yh).sum()) / len(yh)
        forget_after = 100 * int((model(x[:60]).argmax(1) == y[:60]).sum()) / 60
    assert v.heldout_test["heldout_accuracy"] == pytest.approx(heldout_after, abs=1e-9)
    assert v.heldout_test["forget_accuracy"] == pytest.approx(forget_after, abs=1e-9)
    assert forget_after < 100.0  # the update moved the memorised samples
