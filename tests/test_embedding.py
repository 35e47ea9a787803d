"""--embedding ple: the piecewise-linear encoding of numeric features (training/layers.py,
training/normalize.py Embedded), fitted on training rows only and exported inside the graph."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import make_frame, quick_config
from test_mixed import penguins, stores
from test_normalize import trained_on_outliers_answers_as_torch
from training.encoding import column_feeds
from training.fit import run
from training.layers import PiecewiseEncoding
from training.normalize import Embedded, QuantileNormal, StandardScaling


def encode(module, X) -> np.ndarray:
    with torch.no_grad():
        return module(torch.as_tensor(np.asarray(X), dtype=torch.float32)).numpy()


def test_a_value_is_ones_below_its_bin_its_fraction_in_it_and_zeros_above():
    ple = PiecewiseEncoding([np.array([0.0, 1.0, 3.0, 4.0]), np.array([5.0])])  # 3 bins; a constant feature
    got = encode(ple, [[2.0, 5.0], [-1.0, 6.0], [9.0, 5.0], [1.0, 4.0]])  # 3 + 1 numbers a row
    np.testing.assert_allclose(got[0], [1, 0.5, 0, 0])      # 2.0: past bin 1, half through bin 2
    np.testing.assert_allclose(got[1], [-1, 0, 0, 1])       # below the first edge: linear, below 0
    np.testing.assert_allclose(got[2], [1, 1, 6, 0])        # above the last edge: linear, above 1
    np.testing.assert_allclose(got[3, :3], [1, 0, 0])       # an edge belongs to the bin above
    assert got[3, 3] == -1  # the constant feature: x - its value
    # a mixed table's other columns pass through after the encoded ones
    np.testing.assert_allclose(encode(ple, [[2.0, 5.0, 7.0, 0.0]]), [[1, 0.5, 0, 0, 7, 0]])


def test_a_wide_table_encodes_as_a_narrow_one_does(monkeypatch):
    """Over PiecewiseEncoding.SPREAD_MAX_COLUMNS columns the bins are fetched with a Gather instead
    of one matrix product (whose size grows with columns x bins): the same numbers."""
    rng = np.random.default_rng(0)
    n = PiecewiseEncoding.SPREAD_MAX_COLUMNS + 6
    edges = [np.unique(np.quantile(rng.normal(size=200), np.linspace(0, 1, 9))) for _ in range(n)]
    X = rng.normal(size=(50, n + 2)) * 3  # two pass-through columns after them
    wide = PiecewiseEncoding(edges)
    monkeypatch.setattr(PiecewiseEncoding, "SPREAD_MAX_COLUMNS", n)
    narrow = PiecewiseEncoding(edges)
    assert not wide.spread_form and narrow.spread_form
    np.testing.assert_allclose(encode(wide, X), encode(narrow, X), atol=1e-5)


def test_the_bins_come_from_the_normalized_training_rows_only():
    rng = np.random.default_rng(0)
    train, other = rng.lognormal(3, 1, (500, 3)), rng.normal(1e6, 1, (500, 3))
    fitted = Embedded(StandardScaling(), bins=8).fit(train)
    again = Embedded(StandardScaling(), bins=8).fit(train)
    z = (train - train.mean(0)) / train.std(0)
    for f, edges in enumerate(fitted.edges_):
        np.testing.assert_allclose(edges, np.quantile(z[:, f].astype(np.float32).astype(np.float64),
                                                      np.linspace(0, 1, 9)), rtol=1e-6)
        np.testing.assert_array_equal(edges, again.edges_[f])
    assert encode(fitted.embedding_module(), encode(fitted.module(), other)).shape == (500, 3 * 8)  # features x bins
    # ties (a feature of a few values) merge into fewer real bins
    few = Embedded(QuantileNormal(), bins=16).fit(np.repeat([[1.0], [2.0], [3.0]], 50, axis=0))
    assert len(few.edges_[0]) <= 4
    assert encode(few.embedding_module(), [[0.0]]).shape == (1, len(few.edges_[0]) - 1)  # no empty bins


@pytest.mark.parametrize("extra", [{}, {"folds": 5}, {"hidden": []}])
def test_a_numeric_model_with_the_embedding_exports_with_parity_on_outliers(tmp_path, extra):
    from training.model import TabularNet
    result = trained_on_outliers_answers_as_torch(tmp_path, embedding="ple", **extra)
    card = result.card
    assert card["parity"]["max_abs_diff"] < 1e-4
    assert card["normalization"]["embedding"]["method"] == "ple" and card["config"]["embedding"] == "ple"
    if extra.get("folds"):  # five networks and the linear bag: the graph encodes once, not per network
        import onnx
        ops = [n.op_type for n in onnx.load(str(result.model_dir / "model.onnx")).graph.node]
        (tmp_path / "none").mkdir()
        reference = trained_on_outliers_answers_as_torch(tmp_path / "none", embedding="none", **extra)
        plain = [n.op_type for n in onnx.load(str(reference.model_dir / "model.onnx")).graph.node]
        assert ops.count("Max") - plain.count("Max") == 1 and ops.count("Min") - plain.count("Min") == 1
        # --embedding ple: the best candidate of all is exported (the rule is auto's)
        from training.engine import monitor
        cv = card["training"]["cross_validation"]
        metric, higher = monitor(card["task"])
        scores = [c[metric] for c in cv["candidates"].values()]
        assert "encoding" not in cv and cv["metrics"][metric] == (max(scores) if higher else min(scores))
    nets = [m for m in result.trained.net.modules() if isinstance(m, TabularNet)]
    # the networks (and a linear model asked for) take the encoding; the linear candidate does not
    assert nets and all((m.embed is not None) == (len(m.body) > 1 or not extra.get("folds")) for m in nets)


@pytest.mark.parametrize("table, target", [(penguins, "species"), (stores, "sales")])
def test_mixed_tables_and_code_columns_take_the_embedding_on_their_numbers(tmp_path, table, target):
    path = tmp_path / "mixed.csv"
    table(n=3000 if table is stores else 400).to_csv(path, index=False)
    result = run(quick_config(tmp_path, data=str(path), target=target, embedding="ple", store=False))
    assert result.card["parity"]["max_abs_diff"] < 1e-4
    numeric = [c for c in result.card["columns"] if c["type"] == "numeric"]
    assert len(result.card["normalization"]["embedding"]["edges"]) == len(numeric)
    frame = result.data.split.X_test.head(20).copy()
    name = numeric[0]["name"]
    frame.loc[frame.index[0], name], frame.loc[frame.index[1], name] = np.nan, 1e12  # a gap, an outlier
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    encoded = torch.from_numpy(result.data.normalizer.encode(frame))
    output = "probabilities" if target == "species" else "prediction"
    with torch.no_grad():
        raw = result.trained.net.eval()(encoded)
        expected = (torch.softmax(raw, -1) if output == "probabilities"
                    else raw.squeeze(-1) * result.data.y_scale + result.data.y_mean).numpy()
    got = session.run([output], column_feeds(frame, result.data.table.columns))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_streamed_run_fits_the_bins_on_its_training_sample(tmp_path):
    from training import stream
    path = tmp_path / "s.csv"
    make_frame(n=1200, seed=2).to_csv(path, index=False)
    cfg = quick_config(tmp_path, data=str(path), target="label", stream=True, chunk_rows=100, embedding="ple",
                       normalizer="quantile")
    s = stream.scan(cfg)
    reference = Embedded(QuantileNormal()).fit(s.split.X_train)
    for a, b in zip(s.normalizer.edges_, reference.edges_):
        np.testing.assert_array_equal(a, b)
    result = run(cfg)
    assert result.card["parity"]["max_abs_diff"] < 1e-4 and "embedding" in result.card["normalization"]


def test_images_refuse_the_embedding(tmp_path):
    from training.config import ConfigError
    with pytest.raises(ConfigError, match="--embedding is for tables"):
        quick_config(tmp_path, dataset="digits-images", embedding="ple")


def test_the_service_answers_a_model_with_the_embedding(tmp_path):
    """The graph is an ordinary graph: the service's Scorer opens and answers it."""
    from service.scoring import Scorer
    from training.contract import decode_metadata
    path = tmp_path / "t.csv"
    frame = make_frame(n=300)
    frame.to_csv(path, index=False)
    result = run(quick_config(tmp_path, data=str(path), target="label", embedding="ple", store=False))
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    scorer = Scorer(session, decode_metadata(session.get_modelmeta().custom_metadata_map), 1000)
    X = frame.drop(columns="label").head(5)
    probabilities = scorer.run(scorer.check(X.to_dict(orient="records")))[0]
    expected = session.run(["probabilities"], {"features": X.to_numpy(np.float32)})[0]
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    assert probabilities.shape == (5, 2)


def test_the_suites_tables_where_trees_win_load_with_their_targets():
    """benchmarks/quality.py's TREES: real tables of 2,000+ rows, each with its target."""
    from benchmarks.quality import TREES, load
    from training.data import infer_task
    for source, name, target in TREES:
        frame = load(source, name)
        assert len(frame) >= 2000 and target in frame, name
        assert infer_task(frame[target].dropna()) in ("classification", "regression")


def test_two_benchmark_runs_compare_table_by_table_against_the_first_runs_noise():
    """benchmarks/quality_compare.py: the change, the first run's standard error, the gaps."""
    from benchmarks.quality_compare import compare, markdown

    def run(table, seed, project, chosen=None):
        return {"table": table, "task": "regression", "rows": 100, "seed": seed,
                "project": {"metric": project, "chosen": chosen, "seconds": 1.0},
                "hgb": {"metric": 0.5, "seconds": 0.1}, "linear": {"metric": 0.4, "seconds": 0.1}}
    before = [run("t", s, m) for s, m in enumerate([0.40, 0.50, 0.60])]
    after = [run("t", s, m, c) for s, (m, c) in enumerate([(0.50, "ple network"), (0.50, "network"),
                                                           (0.50, "ple network")])]
    (row,) = compare(before, after)
    assert row["before"] == pytest.approx(0.5) and row["change"] == pytest.approx(0.0, abs=1e-12)
    assert row["se"] == pytest.approx(0.1 / np.sqrt(3))  # std 0.1 over 3 seeds
    assert row["gap_before"] == pytest.approx(0.0) and row["chosen"] == {"ple network": 2, "network": 1}
    after[0]["project"]["metric"] = 0.2  # mean 0.4: a loss of 0.1, 1.7 se
    assert "-0.1000 (1.7 se)" in markdown(compare(before, after))


def test_the_wall_ratio_is_the_ratio_of_each_recipes_median_run(tmp_path):
    """benchmarks/wall_ratio.py: per table, the default's median seconds over the other's."""
    from benchmarks.wall_ratio import plot, spread, summary
    row = summary("t", default=[3.0, 9.0, 4.0], other=[2.0, 2.5, 8.0])
    assert row["ratio"] == pytest.approx(4.0 / 2.5)
    assert spread(row["default"]) == "3.0 / 4.0 / 9.0"
    plot([row], {"embedding": "none"}, tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 0


def test_two_torchrun_ranks_share_the_fitted_bins_and_write_one_model(tmp_path):
    import json

    from test_scale import torchrun
    path = tmp_path / "t.csv"
    make_frame(n=1500, seed=3).to_csv(path, index=False)
    proc = torchrun("--data", str(path), "--target", "label", "--stream", "--chunk-rows", "300",
                    "--embedding", "ple", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = list((tmp_path / "models").rglob("model.onnx"))
    card = json.loads((models[0].parent / "card.json").read_text())
    assert len(models) == 1 and card["training"]["distributed"]["world_size"] == 2
    assert card["parity"]["max_abs_diff"] < 1e-4 and card["normalization"]["embedding"]["method"] == "ple"


# ---- --embedding auto: the folds judge the networks with and without the encoding ---------------

def steps_table(n: int, seed: int) -> "pd.DataFrame":
    """A regression with step-like effects (what trees and the encoding are good at) and a noise
    column: y jumps at 0.25 and 0.6 of `a` and at the median of `b`."""
    import pandas as pd
    rng = np.random.default_rng(seed)
    a, b, noise = rng.uniform(0, 1, n), rng.lognormal(0, 1, n), rng.normal(0, 1, n)
    y = 3.0 * (a > 0.25) - 2.0 * (a > 0.6) + 2.0 * (b > 1.0) * (a > 0.4) + 0.3 * rng.normal(0, 1, n)
    return pd.DataFrame({"a": a, "b": b, "noise": noise, "y": y})


@pytest.mark.parametrize("table", ["steps", "linear"])
def test_auto_exports_the_candidate_that_cross_validates_best_with_or_without_the_encoding(tmp_path, table):
    frame = steps_table(1200, seed=4)
    if table == "linear":  # a plain linear relation: nothing for the encoding to add
        frame["y"] = frame["a"] + np.log(frame["b"]) + 0.5 * np.random.default_rng(5).normal(0, 1, len(frame))
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    result = run(quick_config(tmp_path, data=str(path), target="y", embedding="auto", folds=5,
                              hidden=[32, 16], epochs=30, patience=6, store=False))
    cv = result.card["training"]["cross_validation"]
    candidates = cv["candidates"]
    assert set(candidates) == {"network", "network + linear", "ple network", "ple network + linear", "linear"}
    assert cv["metrics"] == candidates[cv["chosen"]]
    # The best of the plain candidates or the best of the encoded ones; the encoded one only where
    # its gain over the plain one, per fold, is more than one standard error.
    e = cv["encoding"]
    for kind in ("plain", "encoded"):
        same = [c for name, c in candidates.items() if name.startswith("ple") == (kind == "encoded")]
        assert all(candidates[e[kind]]["rmse"] <= c["rmse"] for c in same)
    assert cv["chosen"] == (e["encoded"] if e["gain"] > e["se"] else e["plain"])
    from training.report import summary
    assert f"standard error {e['se']:.4f}), so {cv['chosen']} " in summary(result.card, result.model_dir, None)
    assert e["gain"] == pytest.approx(candidates[e["plain"]]["rmse"] - candidates[e["encoded"]]["rmse"],
                                      abs=1e-3)  # (folds of nearly equal size: about their mean)
    encodes = any(isinstance(m, PiecewiseEncoding) for m in result.trained.net.modules())
    assert encodes == cv["chosen"].startswith("ple") == ("embedding" in result.card["normalization"])
    assert result.card["parity"]["max_abs_diff"] < 1e-4
    if table == "steps":  # the steps: the encoded networks validate better than the plain ones
        assert cv["chosen"].startswith("ple"), candidates
    else:
        assert not cv["chosen"].startswith("ple"), candidates


@pytest.mark.parametrize("embedding", ["auto", "none"])
def test_without_folds_auto_trains_the_encoded_network_and_none_the_plain_one(tmp_path, embedding):
    path = tmp_path / "t.csv"
    steps_table(600, seed=6).to_csv(path, index=False)
    result = run(quick_config(tmp_path, data=str(path), target="y", embedding=embedding, store=False))
    encodes = any(isinstance(m, PiecewiseEncoding) for m in result.trained.net.modules())
    assert result.card["config"]["embedding"] == embedding
    assert encodes == (embedding == "auto") == ("embedding" in result.card["normalization"])
    assert result.card["parity"]["max_abs_diff"] < 1e-4
