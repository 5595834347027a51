"""The update of a sample request, piece by piece, against per-sample loops written out here."""

from __future__ import annotations

import torch
from torch import nn

from lightning_jit.core.matching import HeldoutProjection, MarginTargets, label_margin, matching_loss


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def test_label_margin_is_the_label_logit_minus_the_best_other():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    by_hand = [
        float(row[y] - max(v for k, v in enumerate(row) if k != y)) for row, y in zip(logits, labels, strict=True)
    ]
    assert torch.allclose(label_margin(logits, labels), torch.tensor(by_hand))


def test_targets_map_each_forget_rank_to_the_heldout_quantile():
    g = torch.Generator().manual_seed(0)
    forget, heldout = torch.rand(40, generator=g) * 10 + 5, torch.randn(300, generator=g)
    targets = MarginTargets(forget, heldout)(forget)
    ranked_heldout = sorted(heldout.tolist())
    for value, target in zip(forget.tolist(), targets.tolist(), strict=True):
        rank = sum(other < value for other in forget.tolist())  # 0 for the smallest
        assert target == ranked_heldout[int((rank + 0.5) / 40 * 300)]
    # The matched margins are distributed like the held-out ones: the same share below zero (misclassified).
    assert abs(float((targets < 0).float().mean()) - float((heldout < 0).float().mean())) <= 1 / 40 + 1e-6


def test_the_pull_is_one_sided():
    margins = torch.tensor([3.0, 1.0, -1.0], requires_grad=True)
    matching_loss(margins, torch.tensor([1.0, 2.0, 0.0])).backward()
    assert margins.grad.tolist() == [1.0, 0.0, 0.0]  # only the sample above its target is pulled (down)


def test_the_projected_update_leaves_every_heldout_margin_unchanged_to_first_order():
    net = _net()
    params = list(net.parameters())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 1, 4, 4, generator=g), torch.randint(0, 4, (20,), generator=g)
    projection = HeldoutProjection.build(net, params, x, y, lambda out: out)
    loss = -net(torch.randn(8, 1, 4, 4, generator=g)).logsumexp(1).sum()  # any loss
    loss.backward()
    projection.project_()
    step = torch.cat([p.grad.reshape(-1) for p in params])
    assert step.norm() > 0
    for xi, yi in zip(x, y, strict=True):  # each held-out margin's gradient, by plain autograd
        margin = label_margin(net(xi[None]), yi[None]).sum()
        direction = torch.cat([d.reshape(-1) for d in torch.autograd.grad(margin, params)])
        assert abs(float(direction @ step)) <= 1e-5 * float(direction.norm() * step.norm())
    again = step.clone()
    projection.project_()  # a projection: applying it twice changes nothing
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in params]), again, atol=1e-6)


def test_a_large_model_gets_fewer_directions_one_per_held_out_sample_kept(monkeypatch):
    from lightning_jit.core import matching

    net = _net()
    params = list(net.parameters())
    size = sum(p.numel() for p in params)
    monkeypatch.setattr(matching, "MAX_BASIS_FLOATS", 5 * size)  # room for 5 directions only
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(20, 1, 4, 4, generator=g), torch.randint(0, 4, (20,), generator=g)
    projection = HeldoutProjection.build(net, params, x, y, lambda out: out)
    assert projection.basis.shape == (5, size)
