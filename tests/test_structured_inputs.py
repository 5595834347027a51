"""Model inputs as models take them through a whole unlearning run: a dict (``{"input_ids", "attention_mask"}``) or a
tuple of tensors, with the noise at a module site (``perturb_at``). The input is only sliced, joined, moved and passed
through, so the attention mask reaches the model unchanged in every pass.

The token model is a small one over scikit-learn's digits as tokens (64 tokens over a vocabulary of 17), with an
attention mask: padded positions (mask 0) are left out of its mean pooling. Some tests use a real ``transformers``
BERT from a tiny config (random weights, nothing downloaded).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_jit import JiTInputError, JiTUnlearning
from lightning_jit.core.batch import input_caller
from lightning_jit.core.objective import jit_objective
from lightning_jit.core.penalties import logit_norm_penalty
from lightning_jit.core.reference import FrozenReference
from lightning_jit.core.site import AutoSite, ModuleSite
from tests._utils import digit_tokens, fit_fails_without_changing, quiet_trainer

FORGOTTEN = 3
PAD = 0


class MaskedTokenNet(nn.Module):
    """``(input_ids, attention_mask)`` -> logits: embedding plus position, ReLU, a mean over the unmasked tokens, a
    linear head. It records the ``(input_ids, attention_mask)`` of every forward when ``record`` is set."""

    def __init__(self, vocabulary: int = 17, width: int = 16, length: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(0.5 * torch.randn(length, width))
        self.head = nn.Linear(width, classes)
        self.record: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.record is not None:
            self.record.append((input_ids.detach().clone(), attention_mask.detach().clone()))
        h = torch.relu(self.embedding(input_ids) + self.position) * attention_mask[..., None]
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def _padded(ids: torch.Tensor, junk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``b``'s last ``b % 7`` positions padded (mask 0): their ids become ``PAD``, or ``junk`` plus the
    position modulo 17 when ``junk`` is given (ids the model must never see through the mask)."""
    ids = ids.clone()
    mask = torch.ones_like(ids, dtype=torch.float32)
    for b in range(ids.shape[0]):
        k = b % 7
        if k:
            mask[b, -k:] = 0.0
            ids[b, -k:] = PAD if junk is None else (junk + torch.arange(k)) % 17
    return ids, mask


@pytest.fixture(scope="module")
def tokens():
    """Digits as padded token ids: (train ids, train mask, train labels, test ids, test mask, test labels)."""
    x_tr, y_tr, x_te, y_te = digit_tokens()
    return (*_padded(x_tr), y_tr, *_padded(x_te), y_te)


@pytest.fixture(scope="module")
def _state(tokens):
    ids, mask, y = tokens[:3]
    torch.manual_seed(0)
    model = MaskedTokenNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(ids, mask), y).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model(_state):
    """The trained model (for the whole runs)."""
    net = MaskedTokenNet()
    net.load_state_dict(_state)
    return net.eval()


@pytest.fixture
def fresh():
    """An untrained model, seeded (for the checks of the arithmetic and of the refusals)."""
    torch.manual_seed(0)
    return MaskedTokenNet().eval()


class DictSet(Dataset):
    """Samples as a tokenizer gives them: ``{"input_ids", "attention_mask", "labels"}``."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _forget(tokens, batch_size: int = 32) -> DataLoader:
    ids, mask, y = tokens[:3]
    keep = y == FORGOTTEN
    return DataLoader(DictSet(ids[keep], mask[keep], y[keep]), batch_size=batch_size)


def _pairs_are_real(record, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Every row the model saw is the ids and the mask of one real sample, together (the mask unchanged)."""
    masks: dict[bytes, list[torch.Tensor]] = {}
    for i, m in zip(ids, mask, strict=True):
        masks.setdefault(i.numpy().tobytes(), []).append(m)
    seen = [(i, m) for batch_ids, batch_mask in record for i, m in zip(batch_ids, batch_mask, strict=True)]
    return bool(seen) and all(any(torch.equal(m, want) for want in masks.get(i.numpy().tobytes(), [])) for i, m in seen)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules() if m is not model)


# ----------------------------------------------------------------------------------------------------------------------
# The objective and the penalty on a dict input
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_objective_on_a_structured_batch_against_a_per_sample_loop(fresh, tokens, chunk, form):
    ids, mask = tokens[0][:6], tokens[1][:6]
    assert bool((mask == 0).any())  # padded samples among them
    x = {"input_ids": ids, "attention_mask": mask} if form == "dict" else (ids, mask)
    sigma, n, seed = 0.7, 4, 3
    fresh.record = []
    got = jit_objective(
        input_caller(fresh),
        x,
        sigma,
        n,
        site=ModuleSite(fresh, "embedding"),
        perturbation_chunk=chunk,
        generator=torch.Generator().manual_seed(seed),
    )
    assert _pairs_are_real(fresh.record, ids, mask)  # every pass, the perturbed ones too, had each row's own mask
    fresh.record = None

    # By hand: the same draws, one sample and one perturbation per forward, with a hook written here.
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(6, 64, 16, generator=g) * sigma for _ in range(n)]
    with torch.no_grad():
        clean = fresh(ids, mask)
    ratios = []
    for xi in draws:
        for b in range(6):
            handle = fresh.embedding.register_forward_hook(lambda m, a, out, b=b, xi=xi: out + xi[b : b + 1])
            with torch.no_grad():
                moved = fresh(ids[b : b + 1], mask[b : b + 1])
            handle.remove()
            ratios.append(float((clean[b] - moved[0]).norm() / xi[b].norm()))
    assert got.item() == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert _no_hooks(fresh)


def test_padded_positions_are_masked_in_the_objective_and_the_penalty(fresh, tokens):
    """Ids under mask 0 never reach the output: the objective and the penalty are the same whatever they are (the same
    noise), and they would differ if the mask let them through."""
    ids, mask = tokens[0][:12], tokens[1][:12]
    ids_a, _ = _padded(ids, junk=5)
    ids_b, _ = _padded(ids, junk=11)
    assert not torch.equal(ids_a, ids_b)
    site = ModuleSite(fresh, "embedding")
    smaller = MaskedTokenNet()
    smaller.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        smaller.head.weight.mul_(0.3)  # an original with smaller logits: the penalty sees growth
    frozen = FrozenReference(smaller.eval())

    def objective(ids_, mask_):
        x = {"input_ids": ids_, "attention_mask": mask_}
        loss = jit_objective(input_caller(fresh), x, 0.5, 3, site=site, generator=torch.Generator().manual_seed(0))
        penalty = logit_norm_penalty(
            input_caller(fresh), frozen, x, 0.5, site=site, generator=torch.Generator().manual_seed(1)
        )
        return loss.item(), penalty.item()

    got = objective(ids_a, mask)
    assert got[1] > 0 and got == pytest.approx(objective(ids_b, mask), rel=1e-6)
    ones = torch.ones_like(mask)
    assert objective(ids_a, ones)[0] != pytest.approx(objective(ids_b, ones)[0], rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals, before any weight changes
# ----------------------------------------------------------------------------------------------------------------------
def test_dict_input_at_the_input_site_names_perturb_at(fresh, tokens):
    fit_fails_without_changing(fresh, _forget(tokens), JiTInputError, r"perturb_at='embedding'", perturb_at="input")
    with pytest.raises(JiTInputError, match="`perturb_at`"):
        jit_objective(input_caller(fresh), {"input_ids": tokens[0][:4], "attention_mask": tokens[1][:4]}, 1.0, 2)


def test_dict_input_with_no_setting_takes_the_first_embedding(fresh, tokens):
    told = []
    site = AutoSite(fresh, announce=told.append)
    site.admit({"input_ids": tokens[0][:4], "attention_mask": tokens[1][:4]})
    assert site.name == "embedding" and not site.perturbs_input
    assert len(told) == 1 and "`embedding`" in told[0] and "'input_ids'" in told[0]
    with pytest.raises(JiTInputError, match="`perturb_at`"):  # no embedding: the input site's refusal
        AutoSite(nn.Sequential(nn.Flatten(), nn.Linear(8, 2))).admit({"x": torch.zeros(2, 8, dtype=torch.long)})


def test_sample_request_on_a_dict_input_is_refused_naming_the_task(fresh, tokens):
    ids, mask, y = tokens[:3]
    monitor = DataLoader(DictSet(ids[200:300], mask[200:300], y[200:300]), batch_size=50)
    forget = DataLoader(DictSet(ids[:40], mask[:40], y[:40]), batch_size=20)
    fit_fails_without_changing(
        fresh, forget, JiTInputError, "task='random'", perturb_at="embedding", task="random", monitor=monitor
    )


# ----------------------------------------------------------------------------------------------------------------------
# A whole run
# ----------------------------------------------------------------------------------------------------------------------
def _accuracies(model, tokens) -> tuple[float, float]:
    _, _, _, ids, mask, y = tokens
    with torch.no_grad():
        hit = model(ids, mask).argmax(1) == y
    return float(hit[y == FORGOTTEN].float().mean()), float(hit[y != FORGOTTEN].float().mean())


@pytest.mark.slow
def test_no_knob_run_on_a_dict_batch_model_forgets_the_class(model, tokens):
    forgotten_before, kept_before = _accuracies(model, tokens)
    ids, mask, y = tokens[:3]
    keep = y == FORGOTTEN
    model.record = []
    wrapper = JiTUnlearning(model, perturb_at="embedding", seed=0)
    quiet_trainer(max_epochs=20).fit(wrapper, _forget(tokens))
    # Every forward of the run (clean, perturbed, penalty, probes and guard through the carrier, verification) saw a
    # real forget sample's ids with its own mask, padding included.
    assert _pairs_are_real(model.record, ids[keep], mask[keep])
    model.record = None
    forgotten_after, kept_after = _accuracies(model, tokens)
    assert wrapper.outcome == "forgotten"
    assert forgotten_before > 0.7 and forgotten_after < 0.05, (forgotten_before, forgotten_after)
    assert kept_after >= kept_before - 0.02, (kept_before, kept_after)
    assert _no_hooks(model)


@pytest.mark.slow
def test_callback_forgets_a_class_of_a_dict_batch_model(_state, tokens, tmp_path):
    import lightning.pytorch as pl

    from lightning_jit import JiTUnlearningCallback

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = MaskedTokenNet()

        def forward(self, input_ids, attention_mask):
            return self.net(input_ids, attention_mask)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    ids, mask, y = tokens[:3]
    module = Classifier()
    module.net.load_state_dict(_state)
    keep = y == FORGOTTEN
    callback = JiTUnlearningCallback(
        DictSet(ids[keep], mask[keep], y[keep]), perturb_at="net.embedding", when="fit_end", epochs=20
    )
    trainer = quiet_trainer(limit_train_batches=1, default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(module, DataLoader(DictSet(ids[:64], mask[:64], y[:64]), batch_size=64))
    assert callback.ledger.runs[-1]["outcome"] == "forgotten"
    forgotten, _ = _accuracies(module.net.eval(), tokens)
    assert forgotten < 0.1
    assert _no_hooks(module)


# ----------------------------------------------------------------------------------------------------------------------
# A real `transformers` BERT from a tiny config
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=17,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        type_vocab_size=1,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config).eval()


def test_bert_objective_on_a_dict_batch_against_a_per_sample_loop_and_its_mask(bert, tokens):
    ids, mask = tokens[0][:5], tokens[1][:5].long()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

    handle = bert.register_forward_pre_hook(record, with_kwargs=True)
    sigma, n = 0.3, 3
    try:
        got = jit_objective(
            input_caller(bert),
            {"input_ids": ids, "attention_mask": mask},
            sigma,
            n,
            site=ModuleSite(bert, "bert.embeddings.word_embeddings"),
            perturbation_chunk=4,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert len(seen) == 1 + 4  # the clean pass, then 15 perturbed rows in chunks of 4
    assert _pairs_are_real(seen, ids, mask)

    g = torch.Generator().manual_seed(0)
    draws = [torch.randn(5, 64, 16, generator=g) * sigma for _ in range(n)]
    embeddings = bert.bert.embeddings.word_embeddings
    with torch.no_grad():
        clean = bert(input_ids=ids, attention_mask=mask).logits
    ratios = []
    for xi in draws:
        for b in range(5):
            handle = embeddings.register_forward_hook(lambda m, a, out, b=b, xi=xi: out + xi[b : b + 1])
            with torch.no_grad():
                moved = bert(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits
            handle.remove()
            ratios.append(float((clean[b] - moved[0]).norm() / xi[b].norm()))
    assert got.item() == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)
    assert _no_hooks(bert)


class KeyedDictSet(DictSet):
    """A :class:`DictSet` whose samples carry their id (``"id"``), for keyed noise under DDP."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "id": torch.tensor(i)}


def _run_on(devices: int, state, data) -> dict[str, torch.Tensor]:
    from tests._utils import release_process_group

    net = MaskedTokenNet()
    net.load_state_dict(state)
    wrapper = JiTUnlearning(net, perturb_at="embedding", seed=0, on_unverified="keep")
    trainer = quiet_trainer(
        max_epochs=-1,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        callbacks=[release_process_group()],
    )
    # 96 samples in batches of 19: the last batch has a single sample, so one of the two ranks gets none of it.
    trainer.fit(wrapper, DataLoader(data, batch_size=19))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.slow
def test_dict_batches_give_the_same_weights_on_one_and_two_processes(_state, tokens):
    """DDP shards each dict batch field by field (the mask with its ids), with the noise at a site (the embedding's
    output) and a batch that leaves one rank without a sample: two processes reach the one-process weights."""
    ids, mask, y = tokens[:3]
    keep = torch.nonzero(y == FORGOTTEN).flatten()[:96]
    data = KeyedDictSet(ids[keep], mask[keep], y[keep])
    one, two = _run_on(1, _state, data), _run_on(2, _state, data)
    update = max(float((one[k] - v).abs().max()) for k, v in _state.items())
    assert update > 1e-2
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-5 * update
