"""Normalizers (training/normalize.py) and the target rules (training/rules.py), on tiny seeded data."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_frame
from test_mixed import penguins
from training.data import to_table
from training.normalize import (NORMALIZERS, ChannelStats, MixedColumns, NoScaling, QuantileNormal,
                                RobustScaling, StandardScaling, make_normalizer)
from training.rules import DataError, Target


def rows(n=200, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.normal(50_000, 15_000, n), rng.normal(0, 0.01, n), np.full(n, 7.0)])


def apply(normalizer, X) -> np.ndarray:
    with torch.no_grad():
        return normalizer.module()(torch.as_tensor(X, dtype=torch.float32)).numpy()


@pytest.mark.parametrize("method, modality", [(m, kind) for m, (_, image) in NORMALIZERS.items()
                                               for kind in ("table", "mixed", "image")
                                               if (image or kind != "image") and m != "auto"])
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


def test_the_default_is_quantile_for_tables_and_channel_statistics_for_images():
    columns = [{"name": "a", "type": "numeric"}]
    assert isinstance(make_normalizer("auto", "table"), QuantileNormal)
    assert isinstance(make_normalizer("auto", "mixed", columns).numeric, QuantileNormal)
    assert isinstance(make_normalizer("auto", "image"), ChannelStats)


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


def outlier_rows(n=300, seed=0) -> np.ndarray:
    """Skewed, discrete, constant and outlier-ridden features."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.lognormal(10, 1.5, n), rng.integers(0, 3, n).astype(float),
                         np.full(n, 2.0), rng.normal(0, 1, n)])
    X[:5, 3] = [1e6, -1e6, 5e4, 3e3, -8e5]
    return X


def test_robust_scaling_centres_on_the_median_and_clips_outliers_smoothly():
    X = outlier_rows()
    fitted = RobustScaling().fit(X)
    q1, median, q3 = np.quantile(X, [0.25, 0.5, 0.75], axis=0)
    np.testing.assert_allclose(fitted.center_, median)
    np.testing.assert_allclose(fitted.scale_[[0, 3]], (q3 - q1)[[0, 3]])
    assert fitted.scale_[2] == 1.0                           # constant: scale 1
    out = apply(fitted, X)
    assert np.abs(out).max() <= 3.0 and out[0, 3] > 2.99     # outliers end at the bound
    z = (X[5:, 3] - median[3]) / (q3 - q1)[3]                 # ordinary rows: nearly unclipped
    np.testing.assert_allclose(out[5:, 3], z / np.sqrt(1 + (z / 3) ** 2), rtol=1e-5, atol=1e-6)
    assert not np.allclose(RobustScaling().fit(outlier_rows(seed=1)).center_, fitted.center_)


def test_quantile_normal_maps_training_rows_to_normal_scores():
    from sklearn.preprocessing import QuantileTransformer
    X = outlier_rows(2000)
    fitted = QuantileNormal().fit(X)
    out = apply(fitted, X)
    assert np.abs(out).max() < 3.2 and np.isfinite(out).all()
    for j in (0, 3):  # continuous: a standard normal, in the training rows' order
        assert abs(out[:, j].mean()) < 0.02 and abs(out[:, j].std() - 1) < 0.05
        assert (np.argsort(np.argsort(out[:, j], kind="stable")) ==
                np.argsort(np.argsort(X[:, j], kind="stable"))).mean() > 0.99
        reference = QuantileTransformer(output_distribution="normal", n_quantiles=1000).fit(X)
        inner = (X[:, j] > np.quantile(X[:, j], 0.05)) & (X[:, j] < np.quantile(X[:, j], 0.95))
        np.testing.assert_allclose(out[inner, j], reference.transform(X)[inner, j], atol=0.05)
    assert len(np.unique(out[:, 1])) == 3 and np.allclose(out[:, 2], out[0, 2])  # discrete, constant
    # The graph's piecewise-linear map is numpy's interpolation through the knots, outside too.
    probe = np.concatenate([X[:200], [[1e30] * 4, [-1e30] * 4]]).astype(np.float32)
    direct = np.column_stack([np.interp(probe[:, j], fitted.knots_[j], fitted.scores_[j]) for j in range(4)])
    np.testing.assert_allclose(apply(fitted, probe), direct, atol=1e-5)


def trained_on_outliers_answers_as_torch(tmp_path, **options):
    """A classifier trained on rows with outliers (and `options`); its graph must answer raw rows,
    one far outside anything seen in training, as the PyTorch model does. Returns the run."""
    import onnxruntime as ort
    from conftest import quick_config
    from training.fit import run
    path = tmp_path / "outliers.csv"
    frame = make_frame(n=400)
    frame.loc[:3, "income"] = [1e9, -1e9, 4e8, 0.0]
    frame.to_csv(path, index=False)
    result = run(quick_config(tmp_path, data=str(path), target="label", store=False, **options))
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    X = frame.drop(columns="label").to_numpy(np.float32).copy()
    X[4] = [3e38, -3e38, 1e30, -1e30]  # far outside anything seen in training
    with torch.no_grad():
        expected = torch.softmax(result.trained.net.eval()(torch.from_numpy(X)), -1).numpy()
    np.testing.assert_allclose(session.run(["probabilities"], {"features": X})[0], expected, atol=1e-5)
    return result


@pytest.mark.parametrize("method", ["robust", "quantile"])
def test_table_normalizers_travel_in_the_graph_with_parity_on_outliers_and_gaps(method, tmp_path):
    import onnxruntime as ort
    from conftest import quick_config
    from training.fit import run
    from training.encoding import column_feeds
    result = trained_on_outliers_answers_as_torch(tmp_path, normalizer=method)
    assert result.card["normalization"]["method"] == method and result.card["parity"]["max_abs_diff"] < 1e-4

    mixed_path = tmp_path / "mixed.csv"
    penguins().to_csv(mixed_path, index=False)
    mixed = run(quick_config(tmp_path, data=str(mixed_path), target="species", normalizer=method,
                             store=False))
    assert mixed.card["parity"]["max_abs_diff"] < 1e-4
    numeric = [c for c in mixed.card["columns"] if c["type"] == "numeric"]
    assert all(("center" in c) if method == "robust" else ("knots" in c) for c in numeric)
    frame = mixed.data.split.X_test.head(20).copy()
    frame.loc[0, "bill"], frame.loc[1, "mass"] = np.nan, 1e12  # a gap, an outlier
    session = ort.InferenceSession(str(mixed.model_dir / "model.onnx"))
    encoded = torch.from_numpy(mixed.data.normalizer.encode(frame))
    with torch.no_grad():
        expected = torch.softmax(mixed.trained.net.eval()(encoded), -1).numpy()
    got = session.run(["probabilities"], column_feeds(frame, mixed.data.table.columns))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_quantile_normalizer_streams_by_fitting_the_training_sample(tmp_path):
    from conftest import quick_config
    from training import stream
    path = tmp_path / "s.csv"
    make_frame(n=1200, seed=2).to_csv(path, index=False)
    cfg = quick_config(tmp_path, data=str(path), target="label", stream=True, chunk_rows=100,
                       normalizer="quantile", embedding="none")
    s = stream.scan(cfg)
    reference = QuantileNormal().fit(s.split.X_train)
    for a, b in zip(s.normalizer.knots_, reference.knots_):
        np.testing.assert_array_equal(a, b)


def test_images_refuse_a_tables_only_normalizer():
    from training.config import ConfigError, make_config
    with pytest.raises(ConfigError, match="--normalizer robust is for tables; images take auto, standard, none"):
        make_config({"dataset": "digits-images", "normalizer": "robust"})


def test_a_streamed_regression_target_is_standardized_whatever_the_normalizer(tmp_path):
    from conftest import quick_config
    from training import stream
    frame = make_frame(n=900, seed=4, task="regression")
    path = tmp_path / "r.csv"
    frame.to_csv(path, index=False)
    cfg = quick_config(tmp_path, data=str(path), target="label", stream=True, chunk_rows=100)
    s = stream.scan(cfg)
    train = stream.split_of(np.arange(len(frame)), cfg.seed, cfg.val_size, cfg.test_share(1)) == stream.TRAIN
    assert s.task == "regression"
    assert s.y_scaling.mean_[0] == pytest.approx(frame.label.to_numpy()[train].mean(), rel=1e-12)


def test_an_unknown_normalizer_in_a_config_file_is_one_line():
    from training.config import ConfigError, make_config
    with pytest.raises(ConfigError, match="option normalizer must be one of auto, standard"):
        make_config({"normalizer": "minmax"})
