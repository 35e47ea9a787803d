"""Normalizers (training/normalize.py) and the target rules (training/rules.py), on tiny seeded data."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_frame
from test_mixed import penguins
from training.data import to_table
from training.normalize import (NORMALIZERS, ChannelStats, MixedColumns, NoScaling, StandardScaling,
                                make_normalizer)
from training.rules import DataError, Target


def rows(n=200, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.normal(50_000, 15_000, n), rng.normal(0, 0.01, n), np.full(n, 7.0)])


def apply(normalizer, X) -> np.ndarray:
    with torch.no_grad():
        return normalizer.module()(torch.as_tensor(X, dtype=torch.float32)).numpy()


@pytest.mark.parametrize("method", list(NORMALIZERS))
@pytest.mark.parametrize("modality", ["table", "image", "mixed"])
def test_every_normalizer_has_the_scikit_learn_shape(method, modality):
    """__init__ learns nothing; fit returns self; what is learned ends in `_`; the metadata says
    which method it is."""
    data = {"table": rows(), "image": np.random.default_rng(0).integers(0, 256, (6, 3, 4, 4), np.uint8),
            "mixed": to_table(penguins(), "species", None, "auto", "t").X}[modality]
    columns = [{"name": c, "type": "numeric" if data[c].dtype.kind == "f" else "categorical"}
               for c in data.columns] if modality == "mixed" else None
    normalizer = make_normalizer(method, modality, columns)
    assert not [k for k in vars(normalizer) if k.endswith("_")]
    assert normalizer.fit(data) is normalizer
    assert [k for k in vars(normalizer) if k.endswith("_")]
    assert normalizer.metadata()["normalization"]["method"] == method
    assert normalizer.metadata()["normalization"]["enabled"] is (method != "none")


def test_standard_scaling_gives_zero_mean_unit_spread_from_training_rows_only():
    X = rows()
    out = apply(StandardScaling().fit(X), X)
    np.testing.assert_allclose(out[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, :2].std(0), 1, atol=1e-5)
    np.testing.assert_allclose(out[:, 2], 0)  # a constant feature: scale 1, not a division by 0
    other = StandardScaling().fit(rows(seed=1))
    assert not np.allclose(other.mean_, StandardScaling().fit(X).mean_)


@pytest.mark.parametrize("cls", [StandardScaling, NoScaling])
def test_partial_fit_over_chunks_equals_fit(cls):
    X = rows(997)
    whole = cls().fit(X)
    chunked = cls()
    for start in range(0, len(X), 37):
        chunked.partial_fit(X[start:start + 37])
    np.testing.assert_allclose(chunked.mean_, whole.mean_, rtol=1e-12)
    np.testing.assert_allclose(chunked.scale_, whole.scale_, rtol=1e-12)


def test_no_scaling_is_the_identity_for_rows_and_images():
    X = rows()
    np.testing.assert_array_equal(apply(NoScaling().fit(X), X), X.astype(np.float32))
    images = np.random.default_rng(0).random((5, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(apply(NoScaling().fit(images), images), images)


def test_channel_stats_normalize_each_channel():
    rng = np.random.default_rng(0)
    images = np.stack([rng.integers(0, 100, (20, 8, 8)), rng.integers(100, 256, (20, 8, 8))], 1)
    fitted = ChannelStats().fit(images.astype(np.uint8))
    out = apply(fitted, images / 255.0)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_mixed_columns_scale_the_numbers_and_pass_the_one_hot_columns_through():
    table = to_table(penguins(), "species", None, "auto", "t")
    normalizer = MixedColumns(StandardScaling(), table.columns).fit(table.X)
    encoded = normalizer.encode(table.X)
    n = normalizer.n_numeric_
    out = apply(normalizer, encoded)
    np.testing.assert_allclose(out[:, :n].mean(0), 0, atol=1e-5)
    np.testing.assert_array_equal(out[:, n:], encoded[:, n:])  # one-hot: untouched
    assert set(np.unique(encoded[:, n:])) == {0.0, 1.0}
    bill = next(c for c in normalizer.metadata()["columns"] if c["name"] == "bill")
    assert bill["median"] == pytest.approx(np.nanmedian(table.X["bill"]))
    assert bill["mean"] == pytest.approx(table.X["bill"].fillna(bill["median"]).mean())


@pytest.mark.parametrize("values, task, classes", [
    ([True, False, True, True] * 3, "classification", [False, True]),
    (["b", "a", "c", "a"] * 3, "classification", ["a", "b", "c"]),
    ([2, 0, 1, 1] * 3, "classification", [0, 1, 2]),
    ([2.5, 0.1, 1.7, 9.0] * 3, "regression", None),
])
def test_target_rules_are_the_same_in_chunks_as_whole(values, task, classes):
    """The streamed scan adds a target chunk by chunk; an in-memory table is one chunk."""
    y = pd.Series(values, name="y")
    whole = Target("y").add(y)
    chunked = Target("y")
    for start in range(0, len(y), 5):
        chunked.add(y.iloc[start:start + 5])
    assert whole.settle("auto") == chunked.settle("auto") == (task, classes)
    np.testing.assert_array_equal(whole.encode(y, task), chunked.encode(y.to_numpy(), task))


def test_target_that_turns_to_text_in_a_later_chunk_is_classes():
    chunked = Target("y").add(pd.Series([1, 2, 1])).add(pd.Series(["x", "1"]))
    assert chunked.settle("auto") == ("classification", ["1", "2", "x"])


@pytest.mark.parametrize("values, task, message", [
    ([1.0, np.inf, 2.0] * 4, "regression", "has infinite values"),
    (["a", "b"] * 6, "regression", "is not numeric"),
    ([3.5] * 12, "regression", "is constant"),
    (["yes"] * 12, "auto", "has a single class ('yes')"),
])
def test_target_problems_are_named(values, task, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Target("y").add(pd.Series(values)).settle(task)


def test_in_memory_classes_are_sorted_labels():
    table = to_table(make_frame(), "label", None, "auto", "t")
    assert table.classes == ["approved", "declined"] and set(table.y) == {0, 1}
