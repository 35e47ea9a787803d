"""Streamed mixed tables (--stream with text categories, gaps and codes): the scan prepares the
table as a fit in memory would, the model is the usual mixed graph, and memory stays bounded."""
import json
import warnings

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from conftest import quick_config
from test_scale import torchrun
from training import column_scan, encoding, stream
from training.data import to_table
from training.files import read_file
from training.fit import main, run
from training.normalize import make_normalizer

CITIES = ["Lyon", "Paris", "Nice", "Lille", "Nantes"]


def shop(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Purchases: numbers with gaps, a number column with a few texts in it, text categories with
    gaps and a rare one, a store code column, an e-mail per row (near-unique), a date, a constant
    and a row id; the target depends on the number, the city and the store."""
    rng = np.random.default_rng(seed)
    stores = rng.choice(np.arange(10_000, 60_000), 150, replace=False)
    effect = dict(zip(stores, rng.normal(0, 1, len(stores))))
    frame = pd.DataFrame({
        "id": np.arange(n),
        "basket": rng.gamma(2, 30, n),
        "age": rng.integers(18, 80, n).astype(object),
        "city": rng.choice(CITIES, n).astype(object),
        "store": rng.choice(stores, n),
        "email": [f"user{i}@example.org" for i in range(n)],
        "day": pd.date_range("2024-01-01", periods=n, freq="h").strftime("%Y-%m-%d %H:%M"),
        "flat": 1.0,
    })
    frame.loc[rng.choice(n, n // 10, replace=False), "basket"] = np.nan
    frame.loc[rng.choice(n, 40, replace=False), "age"] = "unknown"
    frame.loc[rng.choice(n, n // 20, replace=False), "city"] = None
    frame.loc[rng.choice(n, 3, replace=False), "city"] = "Brest"  # rarer than MIN_CATEGORY_ROWS
    city = frame.city.map({"Paris": 1.0, "Nice": -1.0}).fillna(0.0)
    frame["spent"] = (frame.basket.fillna(60) / 30 + city + frame.store.map(effect)
                      + rng.normal(0, 0.2, n))
    return frame


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shop")
    frame = shop()
    frame.to_csv(tmp / "shop.csv", index=False)
    frame.astype({"age": str}).to_parquet(tmp / "shop.parquet", row_group_size=700)  # one type a column
    return frame, {"csv": tmp / "shop.csv", "parquet": tmp / "shop.parquet"}


def notes_of(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in caught if type(w.message).__name__ == "DataNote"]


def in_memory_on_the_scans_training_rows(cfg, **forced):
    """The in-memory preparation of the same file, fitted on the rows the scan trains on."""
    frame = read_file(cfg.data)[1]
    table, notes = notes_of(lambda: to_table(frame, "spent", None, "regression", "t", drop=cfg.drop, **forced))
    train = stream.split_of(np.arange(len(frame)), cfg.seed, cfg.val_size, cfg.test_share(1)) == stream.TRAIN
    normalizer = make_normalizer(cfg.normalizer, table.modality, table.columns, cfg.embedding,
                                 cfg.embedding_bins).fit(
        table.X[train].reset_index(drop=True))
    return table, notes, normalizer, train


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("forced", [{}, {"categorical": ["age"], "numeric": ["store"], "drop": ["flat"]}])
def test_the_scan_prepares_the_table_as_a_fit_in_memory(files, tmp_path, fmt, forced):
    frame, paths = files
    cfg = quick_config(tmp_path, data=str(paths[fmt]), target="spent", stream=True, chunk_rows=250,
                       embedding="none", **forced)  # the encoding's bins: test_embedding.py
    s, streamed_notes = notes_of(lambda: stream.scan(cfg))
    table, notes, reference, _ = in_memory_on_the_scans_training_rows(
        cfg, categorical=forced.get("categorical"), numeric=forced.get("numeric"))
    assert streamed_notes == notes and notes  # the same notices, word for word
    assert s.columns == table.columns and [c.name for c in s.kept] == table.feature_names
    left_out = {c["name"]: c["reason"] for c in s.left_out}
    assert left_out == {c["name"]: c["reason"] for c in table.left_out}
    assert {"id": "row id", "email": "near-unique text", "day": "date or time"}.items() <= left_out.items()
    # Vocabularies (the rare city pooled, the missing one its own), codes, medians, and the
    # numeric normalizer: the eval sample holds every training row here, so all are equal.
    assert s.normalizer.metadata() == reference.metadata()
    cities = next(c for c in s.normalizer.metadata()["columns"] if c["name"] == "city")["categories"]
    assert "" in cities and "Brest" not in cities


def test_with_a_smaller_sample_the_vocabularies_stay_exact_and_the_medians_close(files, tmp_path):
    frame, paths = files
    cfg = quick_config(tmp_path, data=str(paths["csv"]), target="spent", stream=True, chunk_rows=250,
                       eval_rows=400)
    s = stream.scan(cfg)
    table, _, reference, train = in_memory_on_the_scans_training_rows(cfg)
    got, expected = (encoding.learned(n.encoder_, s.columns) for n in (s.normalizer, reference))
    assert len(s.split.X_train) == 400 < train.sum()
    for column in s.columns:
        name = column["input"]
        if "median" in expected[name]:  # from the sample: between the 40th and 60th percentiles
            low, high = np.nanquantile(table.X.loc[train, column["name"]], [0.4, 0.6])
            assert low <= got[name].pop("median") <= high, name
            expected[name].pop("median")
        assert got[name] == expected[name], name  # categories and codes: exact counts


def test_a_streamed_mixed_model_answers_raw_records_like_the_network(files, tmp_path):
    from service.scoring import Scorer
    from training.contract import decode_metadata
    frame, paths = files
    cfg = quick_config(tmp_path, data=str(paths["csv"]), target="spent", stream=True, chunk_rows=400,
                       shuffle_rows=1200, epochs=15, hidden=[32, 16], store=False)
    result = run(cfg)
    card = result.card
    assert card["modality"] == "mixed" and card["parity"]["max_abs_diff"] < 1e-4
    assert card["metrics"]["test"]["r2"] > 0.8
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    scorer = Scorer(session, decode_metadata(session.get_modelmeta().custom_metadata_map), 1000)
    rows = frame.drop(columns="spent").head(6).copy()
    rows.loc[0, "basket"], rows.loc[1, "city"], rows.loc[2, "age"] = None, "Atlantis", "unknown"
    records = json.loads(rows.to_json(orient="records"))  # as a client sends them
    answer = scorer.run(scorer.check(records))[0]
    expected_input = result.data.scan.inputs(rows)
    with torch.no_grad():
        expected = result.trained.net.eval()(torch.from_numpy(result.data.normalizer.encode(expected_input)))
    np.testing.assert_allclose(answer.ravel(), expected.numpy().ravel() * result.data.y_scale + result.data.y_mean,
                               rtol=1e-4, atol=1e-4)


def test_two_torchrun_ranks_share_the_prepared_table_and_write_one_model(files, tmp_path):
    _, paths = files
    proc = torchrun("--data", str(paths["parquet"]), "--target", "spent", "--stream", "--chunk-rows", "300",
                    tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = list((tmp_path / "models").rglob("model.onnx"))
    assert len(models) == 1
    card = json.loads((models[0].parent / "card.json").read_text())
    assert card["modality"] == "mixed" and card["training"]["distributed"]["world_size"] == 2
    assert card["parity"]["max_abs_diff"] < 1e-4


def test_memory_is_bounded_by_the_count_cap_and_compact_buffers(files, tmp_path, monkeypatch, capsys):
    frame, _ = files
    monkeypatch.setattr(column_scan, "MAX_DISTINCT", 100)
    path = tmp_path / "wide.csv"  # a text column of 300 values, 10 rows each: categories in memory
    frame.assign(coupon=[f"c{i % 300}" for i in range(len(frame))]).to_csv(path, index=False)
    cfg = quick_config(tmp_path, data=str(path), target="spent", stream=True, chunk_rows=250, drop=["email"])
    s, notes = notes_of(lambda: stream.scan(cfg))
    # Counted up to the cap only: beyond it a text column is near-unique (left out, with the
    # notice), and a number column is no code column (store has 150 codes).
    assert {"name": "coupon", "reason": "near-unique text"} in s.left_out
    assert any(n.startswith("dropped near-unique text column(s) coupon") for n in notes)
    assert [c.codes for c in s.kept if c.name == "store"] == [False]
    # A category column forced beyond the cap is a one-line error, not an unbounded count.
    assert main(["--data", str(path), "--target", "spent", "--stream", "--categorical", "coupon",
                 "--no-progress", "--no-store", "--models-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "column 'coupon' has more than 100 distinct values" in err and err.count("\n") == 1
    # The shuffle buffer holds a category as its index: one number per column, not one-hot;
    # expanded, it is scikit-learn's encoding (which the graph holds).
    compact = s.normalizer.compact(s.split.X_train)
    sklearn = s.normalizer.encoder_.transform(encoding.by_input(s.split.X_train, s.columns)).toarray().astype(np.float32)
    assert compact.shape[1] == len(s.kept) < sklearn.shape[1]
    np.testing.assert_array_equal(s.normalizer.expand(torch.from_numpy(compact)).numpy(), sklearn)
