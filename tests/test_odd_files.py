"""Tables and image folders as people have them (the corpus in tests/odd_files/, written by its
make.py): each trains and its model answers the file's own rows, or the run stops with one line.
docs/data.md lists what happens to each kind of column."""
import tempfile
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from PIL import Image

from file_rows import assert_serves_file_rows, file_records, scorer_of
from test_service import request, serving
from training.fit import cli
from training.images import typical_size

ODD = Path(__file__).resolve().parent / "odd_files"
QUICK = ["--epochs", "3", "--hidden", "16", "--folds", "1", "--no-progress", "--no-store"]


def train(capsys, tmp_path, data: str, *extra: str, target: str = "label"):
    """`python -m training.fit` in process: (exit code, result, the notes and errors printed)."""
    models = Path(tempfile.mkdtemp(dir=tmp_path, prefix="models-"))
    code, result = cli(["--data", data, "--target", target, "--models-dir", str(models), *QUICK, *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("note: ", "error: "))]
    if code != 0:
        assert code == 2 and err.endswith("\n") and err.splitlines()[-1].startswith("error: "), err
        assert not any(models.rglob("*")), "a half-written model"
    return code, result, lines


TABLES = [  # (file, notes the run must print)
    ("empty_numeric_column.csv", ["left out empty column(s) empty"]),
    ("empty_mixed_column.csv", ["left out empty column(s) empty"]),
    ("unicode_names.csv", []),
    ("semicolon_decimal_comma.csv", ["is read as semicolon-separated with decimal commas"]),
    ("semicolon_decimal_comma_text.csv", ["is read as semicolon-separated with decimal commas",
                                          "read as numbers with the text as missing: y (3 text values)"]),
    ("tab_separated.csv", ["is read as tab-separated"]),
    ("utf8_bom.csv", []),
    ("quoted_newlines.csv", []),
    ("compressed.csv.gz", []),
    ("dates_ids_constants.csv", ["dropped row-id column(s) id", "left out constant column(s) constant",
                                 "left out date/time column(s) day, when"]),
    ("parquet_types.parquet", ["left out date/time column(s) seen, born"]),
    ("parquet_parts", []),
    ("parquet_nested.parquet", ["left out column(s) tags, place (lists or nested values"]),
    ("numbers_with_text.csv", ["read as numbers with the text as missing: y (2 text values)"]),
    ("infinities_and_huge.csv", ["read as missing: x (2 values), y (1 value)"]),
    ("single_row_class.csv", ["class(es) with a single row: rare"]),
    ("single_feature.csv", []),
    ("booleans.csv", []),
]


@pytest.mark.parametrize("name, notes", TABLES, ids=[t[0] for t in TABLES])
def test_odd_table_trains_and_its_model_answers_the_files_own_rows(capsys, tmp_path, name, notes):
    code, result, printed = train(capsys, tmp_path, str(ODD / name))
    assert code == 0, printed
    for note in notes:
        assert any(note in line for line in printed), (note, printed)
    assert_serves_file_rows(result, str(ODD / name), "label")


@pytest.mark.parametrize("name", ["single_row_class.csv", "unicode_names.csv", "parquet_types.parquet"])
def test_odd_table_trains_with_the_default_recipe(capsys, tmp_path, name):
    """What a user runs: no options, five networks over five folds and the linear candidate."""
    models = Path(tempfile.mkdtemp(dir=tmp_path))
    code, result = cli(["--data", str(ODD / name), "--target", "label", "--models-dir", str(models),
                        "--no-progress", "--no-store"])
    assert code == 0, capsys.readouterr().err
    assert result.card["training"]["cross_validation"]
    assert_serves_file_rows(result, str(ODD / name), "label")


def test_unicode_names_are_served_under_the_files_own_names(capsys, tmp_path):
    code, result, _ = train(capsys, tmp_path, str(ODD / "unicode_names.csv"))
    columns = result.card["columns"]
    assert [c["name"] for c in columns] == ["âge (années)", "名前", "a b", "a_b"]
    # The graph's inputs: safe names, distinct even where the names' safe forms collide.
    assert [c["input"] for c in columns] == ["c0_age_annees", "c1", "c2_a_b", "c3_a_b"]


def test_parquet_types_are_read_as_what_they_mean(capsys, tmp_path):
    code, result, _ = train(capsys, tmp_path, str(ODD / "parquet_types.parquet"))
    types = {c["name"]: c["type"] for c in result.card["columns"]}
    assert types == {"x": "numeric", "y": "numeric", "colour": "categorical", "price": "numeric",
                     "count": "numeric", "member": "categorical", "city": "categorical"}
    left_out = {c["name"]: c["reason"] for c in result.card["left_out"]}
    assert left_out == {"label": "target", "seen": "date or time", "born": "date or time"}


def test_numbers_with_text_take_text_as_missing_in_training_and_serving(capsys, tmp_path):
    code, result, _ = train(capsys, tmp_path, str(ODD / "numbers_with_text.csv"))
    y = next(c for c in result.card["columns"] if c["name"] == "y")
    assert y["type"] == "numeric" and y["text"] == "missing"
    code, result, _ = train(capsys, tmp_path, str(ODD / "semicolon_decimal_comma_text.csv"))
    y = next(c for c in result.card["columns"] if c["name"] == "y")
    assert y == {**y, "type": "numeric", "text": "missing", "decimal": ","}
    scorer = scorer_of(result)
    row = {"x": 0.5, "y": "10,5", "colour": "red"}  # text as in the file: read as training read it
    same = {"x": 0.5, "y": 10.5, "colour": "red"}
    assert scorer.answer_json(orjson.dumps({"instances": [row]}))[1] == \
        scorer.answer_json(orjson.dumps({"instances": [same]}))[1]


def test_forced_numeric_empty_column_and_boolean_texts(capsys, tmp_path):
    """A column forced --numeric with no value keeps its place; "true" and True are one category."""
    frame = pd.read_csv(ODD / "booleans.csv").assign(blank=np.nan)
    frame.to_csv(tmp_path / "b.csv", index=False)
    code, result, printed = train(capsys, tmp_path, str(tmp_path / "b.csv"), "--numeric", "blank")
    assert code == 0, printed
    assert {c["name"]: c["type"] for c in result.card["columns"]}["blank"] == "numeric"
    scorer = scorer_of(result)
    rows = [{"x": 0.1, "y": 9.0, "member": v, "blank": None} for v in (True, "true", "TRUE", "True")]
    answer = orjson.loads(scorer.answer_json(orjson.dumps({"instances": rows}))[1])
    assert len({tuple(p) for p in answer["probabilities"]}) == 1


@pytest.mark.parametrize("name, message", [
    ("target_all_missing.csv", "every row's target 'label' is missing"),
    ("header_only.csv", "has no data rows"),
])
def test_odd_file_that_cannot_train_is_one_line(capsys, tmp_path, name, message):
    code, _, printed = train(capsys, tmp_path, str(ODD / name))
    assert code == 2 and message in printed[-1]


STREAMED = [t for t in TABLES if t[0] != "single_row_class.csv"]  # (its note is about the in-memory split)


@pytest.mark.parametrize("name", [t[0] for t in STREAMED])
def test_odd_table_streams_as_it_trains_in_memory(capsys, tmp_path, name):
    """--stream reads the file in chunks of a few rows (types differ from chunk to chunk) and
    judges its columns as a run in memory does: the same notes, columns and left-out ones."""
    code, memory, printed_memory = train(capsys, tmp_path, str(ODD / name))
    code_streamed, streamed, printed = train(capsys, tmp_path, str(ODD / name), "--stream", "--chunk-rows", "7")
    assert code == code_streamed == 0, printed
    assert printed == printed_memory
    for key in ("feature_names", "modality", "left_out"):
        assert streamed.card[key] == memory.card[key], key
    what = ("name", "input", "type", "codes", "text", "decimal")  # (not what each split's rows taught)
    assert [{k: c.get(k) for k in what} for c in streamed.card["columns"] or []] == \
        [{k: c.get(k) for k in what} for c in memory.card["columns"] or []]
    assert_serves_file_rows(streamed, str(ODD / name), "label")


def test_thousands_of_columns(capsys, tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 2000)).round(3), columns=[f"f{i}" for i in range(2000)])
    frame["label"] = np.where(frame.f0 > 0, "a", "b")
    frame.to_csv(tmp_path / "wide.csv", index=False)
    code, result, printed = train(capsys, tmp_path, str(tmp_path / "wide.csv"))
    assert code == 0, printed
    assert len(result.card["feature_names"]) == 2000
    assert_serves_file_rows(result, str(tmp_path / "wide.csv"), "label")


# ---- image folders ---------------------------------------------------------------------------

def test_image_folder_with_a_broken_file_and_many_sizes_trains(capsys, tmp_path):
    models = tmp_path / "models"
    code, result = cli(["--images", str(ODD / "images"), "--models-dir", str(models), *QUICK])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "skipped 1 of 141 images that cannot be read: red/truncated.png" in err
    side = typical_size(Image.open(f).size for f in (ODD / "images").glob("*/[0-9]*.png"))
    assert f"scaled and centre-cropped to {side}x{side} (the median shorter side" in err
    assert result.card["image"] == {"channels": 3, "height": side, "width": side, "resize": True,
                                    "fit": "crop"}
    assert result.card["rows"]["train"] + result.card["rows"]["validation"] + result.card["rows"]["test"] == 140


def test_too_many_broken_images_is_one_line(capsys, tmp_path):
    models = tmp_path / "models"
    code, _ = cli(["--images", str(ODD / "images"), "--models-dir", str(models), *QUICK,
                   "--max-broken-images", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: 1 of 141 images in ") and "red/truncated.png" in err


def test_crop_matches_torchvisions_resize_then_centre_crop(tmp_path):
    """What training and the service do to an image of another size is what torchvision users
    expect from Resize(s) then CenterCrop(s) (bilinear; PIL and torchvision round alike)."""
    from torchvision.transforms import v2
    from training.images import read_image
    rng = np.random.default_rng(0)
    for h, w in [(20, 31), (31, 20), (17, 17), (9, 40)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / f"{h}x{w}.png"
        Image.fromarray(pixels).save(path)
        ours = read_image(path, 3, (12, 12))
        theirs = v2.Compose([v2.Resize(12, antialias=True), v2.CenterCrop(12)])(Image.open(path).convert("RGB"))
        theirs = np.asarray(theirs).transpose(2, 0, 1)
        assert ours.shape == theirs.shape == (3, 12, 12)
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


# ---- over HTTP: the file's own rows, against a real `bentoml serve` ----------------------------

@pytest.fixture(scope="module")
def dated_model(tmp_path_factory):
    from training.fit import run
    from conftest import quick_config
    tmp = tmp_path_factory.mktemp("dated")
    return run(quick_config(tmp, data=str(ODD / "dates_ids_constants.csv"), target="label"))


@pytest.fixture(scope="module")
def dated_server(dated_model):
    yield from serving(dated_model)


def test_served_model_takes_the_files_rows_with_the_columns_it_left_out(dated_server, dated_model):
    frame = pd.read_csv(ODD / "dates_ids_constants.csv")
    rows = file_records(frame.head(5))  # id, day, when, constant and label included
    status, body = request(dated_server + "/predict", {"instances": rows})
    assert status == 200, body
    features = [{k: r[k] for k in ("x", "y")} for r in rows]
    assert request(dated_server + "/predict", {"instances": features})[1] == body
    anything = [{**r, "when": v, "constant": None, "label": 5} for r, v in zip(rows, [None, 3, [1], {}, "x"])]
    assert request(dated_server + "/predict", {"instances": anything})[1] == body  # any value: ignored
    status, body = request(dated_server + "/predict", {"instances": [{**rows[0], "never seen": 1}]})
    assert status == 400 and "unknown feature(s): never seen" in body["error"]
    meta = request(dated_server + "/metadata")[1]
    assert {c["name"] for c in meta["left_out"]} == {"id", "day", "when", "constant", "label"}
    spec = request(dated_server + "/docs.json")[1]
    assert spec["paths"]["/predict"]
