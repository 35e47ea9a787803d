"""Mixed tables: text categories and missing values, learned on the training split, inside the graph."""
import json

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from conftest import quick_config
from test_service import request, serving
from training import encoding
from training.data import DataError, to_table
from training.fit import run

ISLANDS = ["Biscoe", "Dream", "Torgersen"]


def penguins(n=500, seed=0, task="classification") -> pd.DataFrame:
    """Numbers with gaps, text categories with gaps, an id column, and a learnable target."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "id": np.arange(1000, 1000 + n),
        "bill": rng.normal(44, 5, n),
        "mass": rng.normal(4200, 800, n),
        "island": rng.choice(ISLANDS, n),
        "sex": rng.choice(["male", "female", None], n, p=[0.45, 0.45, 0.1]),
        "year": rng.choice([2007, 2008, 2009], n),
    })
    frame.loc[rng.choice(n, n // 10, replace=False), "bill"] = np.nan
    signal = ((frame.bill.fillna(44) - 44) / 5 + (frame.island == "Dream") * 1.5
              - (frame.sex == "female") * 0.8 + (frame.mass - 4200) / 800)
    if task == "classification":
        frame["species"] = np.where(signal + rng.normal(0, 0.3, n) > 0.4, "Chinstrap", "Adelie")
    else:
        frame["species"] = 10 + 3 * signal + rng.normal(0, 0.3, n)
    return frame


@pytest.fixture(scope="module")
def mixed_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "penguins.csv"
    penguins().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def mixed_model(mixed_csv, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixedmodel")
    return run(quick_config(tmp, data=str(mixed_csv), target="species", categorical=["year"],
                            epochs=10, normalizer="standard"))


def odd_rows(result) -> pd.DataFrame:
    """Test rows, plus rows with a missing number, a missing category and an unseen one."""
    frame = result.data.split.X_test.head(12).copy()
    frame.loc[0, "bill"] = np.nan
    frame.loc[1, "sex"] = ""
    frame.loc[2, "island"] = "Atlantis"
    frame.loc[3, "year"] = "2031"
    return frame


def torch_reference(result, frame: pd.DataFrame) -> np.ndarray:
    """scikit-learn's fitted encoder, then the trained PyTorch model in eval mode (its fitted
    normalizer in front)."""
    X = result.data.normalizer.encode(frame)
    with torch.no_grad():
        return torch.softmax(result.trained.net.eval()(torch.from_numpy(X)), -1).numpy()


def test_types_are_inferred_forced_and_the_id_is_dropped():
    with pytest.warns(UserWarning, match="dropped row-id column"):
        table = to_table(penguins(), "species", None, "auto", "t", categorical=["year"])
    assert table.modality == "mixed"
    assert {c["name"]: c["type"] for c in table.columns} == {
        "bill": "numeric", "mass": "numeric", "island": "categorical", "sex": "categorical",
        "year": "categorical"}
    assert set(table.X["sex"]) == {"male", "female", ""}  # missing is its own category
    assert set(table.X["year"]) == {"2007", "2008", "2009"}
    with pytest.raises(DataError, match="--numeric column 'island' has 500 rows that are not numbers"):
        to_table(penguins(), "species", None, "auto", "t", numeric=["island"])


def test_statistics_come_from_training_rows_only(mixed_model):
    columns = {c["name"]: c for c in mixed_model.card["columns"]}
    train = mixed_model.data.split.X_train
    assert columns["bill"]["median"] == pytest.approx(np.nanmedian(train["bill"]))
    imputed = train["bill"].fillna(np.nanmedian(train["bill"]))
    assert columns["bill"]["mean"] == pytest.approx(imputed.mean())
    assert columns["bill"]["scale"] == pytest.approx(imputed.std(ddof=0))
    everything = mixed_model.data.table.X["bill"]
    assert columns["bill"]["median"] != pytest.approx(np.nanmedian(everything))
    assert columns["island"]["categories"] == sorted(set(train["island"]))
    assert columns["sex"]["categories"] == ["", "female", "male"]


def test_graph_takes_raw_columns_and_matches_the_pytorch_pipeline(mixed_model):
    session = ort.InferenceSession(str(mixed_model.model_dir / "model.onnx"))
    assert {i.name: i.type for i in session.get_inputs()} == {  # c<position>_<name>
        "c0_bill": "tensor(float)", "c1_mass": "tensor(float)", "c2_island": "tensor(string)",
        "c3_sex": "tensor(string)", "c4_year": "tensor(string)"}
    frame = odd_rows(mixed_model)
    probabilities, _ = session.run(None, encoding.column_feeds(frame, mixed_model.data.table.columns))
    np.testing.assert_allclose(probabilities, torch_reference(mixed_model, frame), atol=1e-5)
    assert mixed_model.card["parity"]["max_abs_diff"] < 1e-4
    assert mixed_model.card["metrics"]["test"]["accuracy"] > 0.85


def test_mixed_regression_trains(tmp_path):
    path = tmp_path / "reg.csv"
    penguins(task="regression", seed=3).to_csv(path, index=False)
    result = run(quick_config(tmp_path, data=str(path), target="species", epochs=10, store=False))
    assert result.card["task"] == "regression" and result.card["metrics"]["test"]["r2"] > 0.6


# --- over HTTP, against a real `bentoml serve` -------------------------------------------------

@pytest.fixture(scope="module")
def mixed_server(mixed_model):
    yield from serving(mixed_model)


def records(frame: pd.DataFrame) -> list[dict]:
    """JSON records as a client would send them: NaN and "" as null."""
    out = []
    for row in frame.to_dict(orient="records"):
        out.append({k: None if (v == "" or (isinstance(v, float) and np.isnan(v))) else v
                    for k, v in row.items()})
    return out


def test_served_records_with_nulls_and_unseen_categories(mixed_server, mixed_model):
    frame = odd_rows(mixed_model)
    status, body = request(mixed_server + "/predict", {"instances": records(frame)})
    assert status == 200, body
    np.testing.assert_allclose(body["probabilities"], torch_reference(mixed_model, frame), atol=1e-5)
    year_as_number = records(frame.head(3))
    for r in year_as_number:
        r["year"] = int(r["year"])  # 2008 and "2008" are the same category
    assert request(mixed_server + "/predict", {"instances": year_as_number})[1]["probabilities"] == \
        body["probabilities"][:3]


@pytest.mark.parametrize("change, message", [
    ({"bill": "long"}, "row 0, column 'bill': expected a number or null, got string 'long'"),
    ({"bill": True}, "row 0, column 'bill': expected a number or null, got boolean true"),
    ({"island": [1]}, "row 0, column 'island': expected text, a number or null, got a list"),
    ({"beak": 3}, "row 0: unknown feature(s): beak"),
])
def test_records_that_cannot_be_mapped_get_4xx(mixed_server, mixed_model, change, message):
    row = {**records(mixed_model.data.split.X_test.head(1))[0], **change}
    status, body = request(mixed_server + "/predict", {"instances": [row]})
    assert status == 400 and message in body["error"]


def test_missing_column_is_named(mixed_server, mixed_model):
    row = records(mixed_model.data.split.X_test.head(1))[0]
    del row["sex"]
    status, body = request(mixed_server + "/predict", {"instances": [row]})
    assert status == 400 and "missing feature(s): sex" in body["error"]


def test_bentoml_python_client_sends_mixed_records(mixed_server, mixed_model):
    import bentoml
    rows = records(odd_rows(mixed_model))
    with bentoml.SyncHTTPClient(mixed_server) as client:
        answer = client.predict(instances=rows)
    assert answer == request(mixed_server + "/predict", {"instances": rows})[1]


def test_near_unique_text_is_left_out_and_rare_categories_are_pooled(tmp_path, capsys):
    """An e-mail column (all distinct) is dropped with a notice unless forced; a 1,500-category
    column keeps only categories with enough training rows, so the width stays bounded."""
    from training.encoding import MAX_CATEGORIES, MIN_CATEGORY_ROWS
    from training.fit import main
    n, rng = 3000, np.random.default_rng(5)
    frame = penguins(n)
    frame["email"] = [f"user{i}@example.org" for i in range(n)]
    shares = 1 / np.arange(1, 1501)
    frame["city"] = rng.choice([f"city-{i}" for i in range(1500)], n, p=shares / shares.sum())
    path = tmp_path / "wide.csv"
    frame.to_csv(path, index=False)
    args = ["--data", str(path), "--target", "species", "--epochs", "2", "--no-progress", "--no-store",
            "--hidden", "16"]
    assert main(args + ["--models-dir", str(tmp_path / "a")]) == 0
    assert "note: dropped near-unique text column(s) email" in capsys.readouterr().err
    card = json.loads(next((tmp_path / "a").rglob("card.json")).read_text())
    columns = {c["name"]: c for c in card["columns"]}
    assert "email" not in columns and 5 < len(columns["city"]["categories"]) <= MAX_CATEGORIES
    counts = frame["city"].value_counts()  # the training split's counts are at most these
    assert all(counts[c] >= MIN_CATEGORY_ROWS for c in columns["city"]["categories"])
    session = ort.InferenceSession(str(next((tmp_path / "a").rglob("model.onnx"))))
    assert "email" not in {i.name for i in session.get_inputs()}

    assert main(args + ["--models-dir", str(tmp_path / "b"), "--categorical", "email,year"]) == 0
    card = json.loads(next((tmp_path / "b").rglob("card.json")).read_text())
    email = next(c for c in card["columns"] if c["name"] == "email")
    assert len(email["categories"]) == 1  # forced in, yet one column: no address repeats 5 times
    width = sum(1 if c["type"] == "numeric" else len(c["categories"]) for c in card["columns"])
    assert width <= 2 + 3 * 4 + 1 + MAX_CATEGORIES


def stores(n=3000, seed=0) -> pd.DataFrame:
    """Sales by store: 200 store codes (about 15 rows each) whose effects follow no order of the
    codes, a number, and a few-valued integer."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(np.arange(10_000, 60_000), 200, replace=False)
    effect = dict(zip(codes, rng.normal(0, 1, 200)))
    frame = pd.DataFrame({"store": rng.choice(codes, n), "price": rng.normal(0, 1, n),
                          "weekday": rng.integers(0, 7, n)})
    frame["sales"] = frame.store.map(effect) + 0.5 * frame.price + rng.normal(0, 0.3, n)
    return frame


def test_integer_codes_are_one_hot_encoded_beside_the_number(tmp_path):
    from training.encoding import MAX_CODES, MIN_CATEGORY_ROWS
    frame = stores()
    with pytest.warns(UserWarning, match=r"integer code column\(s\) store: over 128 distinct values"):
        table = to_table(frame, "sales", None, "regression", "t")
    assert table.modality == "mixed"  # numbers only, yet one input per column
    assert table.columns == [{"name": "store", "input": "c0_store", "type": "numeric", "codes": True},
                             {"name": "price", "input": "c1_price", "type": "numeric"},
                             {"name": "weekday", "input": "c2_weekday", "type": "numeric"}]
    assert to_table(frame, "sales", None, "regression", "t", numeric=["store"]).modality == "table"
    few = frame.assign(store=frame.store % 100)  # 100 values: the quantile map resolves each
    assert to_table(few, "sales", None, "regression", "t").modality == "table"
    huge = frame.assign(store=frame.store + 2**24)  # not exact in the graph's float32 input
    assert to_table(huge, "sales", None, "regression", "t").modality == "table"
    rounded = frame.assign(store=frame.store * 100)  # multiples of one step: an amount, not codes
    assert to_table(rounded, "sales", None, "regression", "t").modality == "table"
    rng = np.random.default_rng(1)  # a count piled on zero: its values' row counts vary widely
    count = np.where(rng.random(len(frame)) < 0.4, 0, rng.integers(1, 200, len(frame)))
    assert frame.assign(store=count).store.nunique() > 128
    assert to_table(frame.assign(store=count), "sales", None, "regression", "t").modality == "table"

    path = tmp_path / "stores.csv"
    frame.to_csv(path, index=False)
    options = dict(data=str(path), target="sales", epochs=30, hidden=[32, 16], store=False)
    result = run(quick_config(tmp_path / "codes", **options))
    store = next(c for c in result.card["columns"] if c["name"] == "store")
    train = result.data.split.X_train
    assert store["codes"] == (train.store.value_counts() >= MIN_CATEGORY_ROWS).sum() <= MAX_CODES
    assert store["median"] == pytest.approx(train.store.median())  # the number is kept too
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    assert {i.name: i.type for i in session.get_inputs()} == {
        "c0_store": "tensor(float)", "c1_price": "tensor(float)", "c2_weekday": "tensor(float)"}
    odd = result.data.split.X_test.head(8).copy()
    odd.loc[0, "store"], odd.loc[1, "store"] = np.nan, 99_999  # missing, and a code never seen
    out = session.run(None, encoding.column_feeds(odd, result.data.table.columns))[0]
    X = result.data.normalizer.encode(odd)
    with torch.no_grad():
        reference = result.trained.net.eval()(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(out, reference[:, 0] * result.data.y_scale + result.data.y_mean, atol=1e-4)
    # The codes are what the model learns the stores from: as a number only, it cannot.
    as_number = run(quick_config(tmp_path / "number", **options, numeric=["store"]))
    assert result.card["metrics"]["test"]["r2"] > 0.8 > as_number.card["metrics"]["test"]["r2"] + 0.2
