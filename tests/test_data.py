"""Loading, checking and splitting tables; the normalizer's statistics."""
import numpy as np
import pytest

from conftest import make_frame
from training.config import BUILTIN_DATASETS, make_config
from training.data import DataError, infer_task, load_table, split_table, to_table
from training.normalize import NoScaling, StandardScaling


def test_split_is_seeded_disjoint_and_stratified():
    table = to_table(make_frame(), "label", None, "auto", "test")
    a, b = split_table(table, 0.2, 0.2, seed=3), split_table(table, 0.2, 0.2, seed=3)
    assert np.array_equal(a.X_train, b.X_train) and np.array_equal(a.y_test, b.y_test)
    assert a.stratified
    rows = [tuple(r) for r in np.vstack([a.X_train, a.X_val, a.X_test])]
    assert len(set(rows)) == len(table.X)  # every row in exactly one split
    overall = table.y.mean()
    for y in (a.y_train, a.y_val, a.y_test):
        assert abs(y.mean() - overall) < 0.05


def test_normalizer_statistics_come_from_training_rows_only():
    table = to_table(make_frame(), "label", None, "auto", "test")
    split = split_table(table, 0.2, 0.2, seed=0)
    fitted = StandardScaling().fit(split.X_train)
    mean, scale = fitted.mean_, fitted.scale_
    np.testing.assert_allclose(mean, split.X_train.mean(axis=0))
    np.testing.assert_allclose(scale, split.X_train.std(axis=0, ddof=0))
    assert not np.allclose(mean, table.X.mean(axis=0))  # all rows would give other statistics
    off = NoScaling().fit(split.X_train)
    off_mean, off_scale = off.mean_, off.scale_
    assert (off_mean == 0).all() and (off_scale == 1).all()


def test_constant_feature_gets_scale_one():
    X = np.column_stack([np.full(10, 7.0), np.arange(10.0)])
    fitted = StandardScaling().fit(X)
    mean, scale = fitted.mean_, fitted.scale_
    assert mean[0] == 7.0 and scale[0] == 1.0


@pytest.mark.parametrize("name", [d for d in BUILTIN_DATASETS if d != "digits-images"])
def test_builtin_datasets_load(name):
    table = load_table(make_config({"dataset": name}))
    assert table.X.shape[1] == len(table.feature_names) > 0
    if name == "diabetes":
        assert table.task == "regression" and table.classes is None
    else:
        assert table.task == "classification" and len(table.classes) >= 2
    if name == "digits":
        # 64 pixels, of which three are 0 in every image: left out, and accepted in a record
        assert table.X.shape[1] == 61 and table.classes == list(range(10))
        constant = {c["name"] for c in table.left_out if c["reason"] == "constant"}
        assert constant == {"pixel_0_0", "pixel_4_0", "pixel_4_7"}
    if name == "breast_cancer":
        assert table.classes == ["benign", "malignant"]


def test_task_inference_and_override():
    frame = make_frame()
    assert infer_task(frame["label"]) == "classification"
    assert infer_task(frame["income"]) == "regression"
    assert infer_task(frame["age"] // 30) == "classification"  # few integer values
    forced = to_table(frame.assign(y=frame["age"] // 30), "y", ["income"], "regression", "t")
    assert forced.task == "regression"


def test_rows_with_missing_target_are_dropped_and_counted():
    frame = make_frame()
    frame.loc[:4, "label"] = None
    table = to_table(frame, "label", None, "auto", "t")
    assert table.dropped_rows == 5 and len(table.y) == len(frame) - 5


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.drop(columns="label"), "target column 'label' not found"),
    (lambda f: f.assign(score=f.score.astype(object).where(f.index > 2, "lots")), None),
    (lambda f: f.assign(label="approved"), "single class"),
    (lambda f: f.head(3), "too few rows (3)"),
])
def test_bad_tables_are_named(mutate, message):
    if message is None:  # a text value in a number column: forced numeric, it is named
        with pytest.raises(DataError, match="--numeric column 'score' has 3 rows that are not numbers"):
            to_table(mutate(make_frame()), "label", None, "auto", "t", numeric=["score"])
        return
    with pytest.raises(DataError) as e:
        table = to_table(mutate(make_frame()), "label", None, "auto", "t")
        split_table(table, 0.15, 0.15, 0)
    assert message in str(e.value)
