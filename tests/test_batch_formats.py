"""Batches as models take them (dict / tuple inputs with attention masks), outputs as models give them (logits found
by the class count, a Hugging Face ``ModelOutput``'s ``logits``), labels as users have them (whole-number floats)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_jit import BatchFormat, JiTInputError, JiTUnlearning, evaluate_unlearning
from lightning_jit.core.batch import (
    LogitsByClassCount,
    batch_size,
    call_model,
    check_forget_input,
    check_logits,
    concat,
    index,
    move,
    select_output,
)
from tests._utils import quiet_trainer


class MaskedBag(nn.Module):
    """Token ids and an attention mask in, logits out: the masked mean of the token embeddings, then a linear head."""

    num_classes = 3

    def __init__(self, vocab: int = 7, width: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, self.num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        keep = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * keep).sum(1) / keep.sum(1).clamp_min(1.0))


def _tokens(n: int = 6, length: int = 4, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, -1] = 0  # every other sequence is one token shorter: the mask matters
    return {
        "input_ids": torch.randint(0, 7, (n, length), generator=g),
        "attention_mask": mask,
        "labels": torch.randint(0, 3, (n,), generator=g).float(),  # float labels, as a tokenizer pipeline may give
        "id": torch.arange(n),
    }


def test_dict_token_batch_reaches_the_model_unchanged():
    batch = _tokens()
    fmt = BatchFormat()
    x = fmt.input(batch)
    assert set(x) == {"input_ids", "attention_mask"}  # labels and ids are not model inputs
    assert x["input_ids"] is batch["input_ids"] and x["attention_mask"] is batch["attention_mask"]
    model = MaskedBag()
    want = model(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(fmt.model_logits(model, x), want)
    assert fmt.labels(batch).dtype == torch.int64 and torch.equal(fmt.labels(batch), batch["labels"].long())
    # The mask is used: changing a masked-out token does not change that sequence's logits, an unmasked one does.
    changed = dict(x, input_ids=x["input_ids"].clone())
    changed["input_ids"][0, -1] = (changed["input_ids"][0, -1] + 1) % 7
    changed["input_ids"][1, -1] = (changed["input_ids"][1, -1] + 1) % 7
    after = fmt.model_logits(model, changed)
    assert torch.equal(after[0], want[0]) and not torch.equal(after[1], want[1])


def test_tuple_input_and_explicit_keys():
    batch = _tokens()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model = MaskedBag()
    want = model(ids, mask)
    nested = ((ids, mask), batch["labels"])  # ((ids, mask), y)
    fmt = BatchFormat()
    assert torch.equal(fmt.model_logits(model, fmt.input(nested)), want)
    flat = (ids, mask, batch["labels"].long())  # (ids, mask, y): the input is positions 0 and 1
    fmt = BatchFormat(input_key=[0, 1], label_key=2)
    assert torch.equal(fmt.model_logits(model, fmt.input(flat)), want)
    keyed = BatchFormat(input_key=["input_ids", "attention_mask"])
    assert torch.equal(keyed.model_logits(model, keyed.input(batch)), want)
    # A model taking one dict argument: unpack_input=False.
    one_arg = BatchFormat(unpack_input=False)
    assert torch.equal(one_arg.call(lambda d: model(**d), one_arg.input(batch)), want)


def test_slicing_joining_and_moving_apply_to_every_field():
    x = {k: v for k, v in _tokens(5).items() if k in ("input_ids", "attention_mask")}
    assert batch_size(x) == 5
    rows = torch.tensor([4, 0, 2])
    taken = index(x, rows)
    for k in x:  # against plain per-field indexing
        assert torch.equal(taken[k], x[k][rows])
    parts = [index(x, slice(i, i + 2)) for i in range(0, 5, 2)]
    joined = concat(parts)
    assert all(torch.equal(joined[k], x[k]) for k in x)
    moved = move({**x, "scale": torch.ones(5, 2)}, "cpu", torch.float64)
    assert moved["input_ids"].dtype == torch.int64 and moved["scale"].dtype == torch.float64
    with pytest.raises(JiTInputError, match=r"batch sizes \[4, 5\]"):
        batch_size({"input_ids": x["input_ids"], "attention_mask": x["attention_mask"][:4]})


def test_structured_forget_input_is_checked_field_by_field():
    good = {"x": torch.zeros(2, 3), "mask": torch.ones(2, 3, dtype=torch.long)}
    assert check_forget_input(good, structured=True) is good
    with pytest.raises(JiTInputError, match="one input tensor"):
        check_forget_input(good)  # a caller that takes one tensor says so, naming input_key
    with pytest.raises(JiTInputError, match="NaN or Inf"):
        check_forget_input({"x": torch.tensor([[float("nan")], [0.0]]), "mask": torch.ones(2, 1)}, structured=True)


def test_float_labels():
    fmt = BatchFormat()
    x = torch.zeros(3, 2)
    assert fmt.labels((x, torch.tensor([2.0, 0.0, 1.0]))).tolist() == [2, 0, 1]
    assert fmt.labels((x, torch.tensor([2.0, 0.0, 1.0]))).dtype == torch.int64
    with pytest.raises(JiTInputError, match="label_key.*whole class numbers.*2.5"):
        fmt.labels((x, torch.tensor([2.5, 0.0, 1.0])))
    with pytest.raises(JiTInputError, match="argmax"):
        fmt.labels((x, torch.tensor([0.3, 0.7, 1.0])))


def test_logits_found_by_class_count():
    features, logits = torch.randn(4, 64), torch.randn(4, 10)
    assert select_output((features, logits), num_classes=10) is logits
    assert select_output((logits, torch.randn(4, 2, 5, 5))) is logits  # the only 2-D tensor
    with pytest.raises(JiTInputError, match="output_selector.*") as err:
        select_output((features, logits))
    assert "num_classes" in str(err.value) and "(4, 64)" in str(err.value)
    with pytest.raises(JiTInputError, match="2 of them are \\(batch, 10\\).*output_selector"):
        select_output((logits, torch.randn(4, 10)), num_classes=10)

    class Net(nn.Module):
        num_classes = 10

    fmt = BatchFormat().for_model(Net())
    assert isinstance(fmt.output_selector, LogitsByClassCount) and fmt.output_selector((features, logits)) is logits
    assert fmt.hparams()["output_selector"] is None and fmt.hparams()["num_classes"] == 10
    assert BatchFormat(output_selector=0).for_model(Net()).output_selector == 0  # an explicit selector wins


def test_hugging_face_model_output():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    logits = torch.randn(3, 4)
    out = outputs.SequenceClassifierOutput(logits=logits, hidden_states=(torch.randn(3, 5, 8),))
    assert select_output(out) is logits


def test_extra_input_dimension_is_blamed_on_the_input_shape():
    model = nn.Linear(30, 4)
    x = torch.randn(5, 1, 30)
    with pytest.raises(JiTInputError) as err:
        check_logits(model(x), 5, x)
    message = str(err.value)
    assert "(5, 1, 30)" in message and "input shape" in message
    with pytest.raises(JiTInputError, match="(5, 1, 30)"):
        BatchFormat().model_logits(model, x)


class _TupleNet(nn.Module):
    """Returns ``(features, logits)`` and states its class count."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.body(x)
        return f, self.head(f)


def test_wrapper_finds_tuple_logits_without_output_selector():
    # The same run with the logits found by the class count and with `output_selector=1` moves the weights alike.
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    forget = list(zip(x, torch.zeros(8, dtype=torch.long), strict=True))  # a class request: class 0
    weights = {}
    for name, kwargs in (("auto", {}), ("explicit", {"output_selector": 1})):
        model = _TupleNet()
        before = [p.detach().clone() for p in model.parameters()]
        wrapper = JiTUnlearning(model, sigma=0.1, lr=0.01, n_perturbations=2, epochs=1, on_unverified="keep", **kwargs)
        quiet_trainer(max_epochs=1).fit(wrapper, DataLoader(forget, batch_size=4))
        weights[name] = [p.detach() for p in model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, weights[name], strict=True)), name
    assert all(torch.equal(a, b) for a, b in zip(weights["auto"], weights["explicit"], strict=True))


class _TokenSet(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.batch = _tokens(n, seed=seed)

    def __len__(self) -> int:
        return len(self.batch["labels"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.batch.items() if k != "id"}


def test_evaluation_reads_dict_batches_as_the_model_takes_them():
    torch.manual_seed(0)
    original, unlearned = MaskedBag(), MaskedBag()
    forget = DataLoader(_TokenSet(8, seed=1), batch_size=3)
    report = evaluate_unlearning(original, unlearned, forget)
    # Against a per-sample loop over the same samples.
    data = _TokenSet(8, seed=1)
    want = {}
    for name, model in (("original", original), ("unlearned", unlearned)):
        hits = [
            int(call_model(model, {k: v[None] for k, v in data[i].items() if k != "labels"}).argmax(1))
            == int(data[i]["labels"])
            for i in range(len(data))
        ]
        want[name] = 100.0 * sum(hits) / len(hits)
    got = {m: report.accuracy[m]["forget"] for m in want}
    assert got == pytest.approx(want)


def test_forget_classes_read_float_labels():
    from torch.utils.data import TensorDataset

    from lightning_jit.cli.errors import JiTUsageError
    from lightning_jit.cli.forget import dataset_labels

    y = torch.tensor([2.0, 0.0, 1.0])
    assert torch.equal(dataset_labels(TensorDataset(torch.zeros(3, 2), y)), torch.tensor([2, 0, 1]))
    assert torch.equal(dataset_labels([(torch.zeros(2), 2.0), (torch.zeros(2), torch.tensor(1))]), torch.tensor([2, 1]))
    with pytest.raises(JiTUsageError, match="--batch.label_key.*2.5"):
        dataset_labels(TensorDataset(torch.zeros(3, 2), torch.tensor([2.5, 0.0, 1.0])))


def test_evaluate_reuses_the_recorded_output_selector():
    from lightning_jit.lightning.checkpoint import JIT_HPARAMS_KEY, recorded_batch_format

    checkpoint = {JIT_HPARAMS_KEY: BatchFormat(output_selector=1, label_key="digit").hparams()}
    assert recorded_batch_format(BatchFormat(), checkpoint).output_selector == 1
    assert recorded_batch_format(BatchFormat(output_selector=0), checkpoint).output_selector == 0  # the config wins
    auto = {JIT_HPARAMS_KEY: BatchFormat().for_model(_TupleNet()).hparams()}  # recorded as automatic
    assert recorded_batch_format(BatchFormat(), auto).output_selector is None
