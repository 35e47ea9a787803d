"""`python -m service.batch`: large files scored in process and on Apache Spark (one session
shared by this module's tests, plus a real standalone cluster), against /predict of a real
`bentoml serve` for a numeric, a mixed and a code-column model."""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings

from conftest import make_frame, quick_config
from service import batch
from service.inputs import BadRequest
from service.rows import cell, check_frame
from service.scoring import Scorer
from test_mixed import penguins, stores
from test_service import free_port, request, start_server
from test_versions import TOKEN, load, stop
from training.contract import MISSING_TEXTS, decode_metadata
from training.fit import run

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("numeric", "mixed", "codes")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three models, and rows none of them trained on (with an id column), as CSV and Parquet."""
    tmp = tmp_path_factory.mktemp("batch")
    train = {"numeric": (make_frame(n=400, seed=21), "label", {}),
             "mixed": (penguins(n=400, seed=22), "species", {"categorical": ["year"]}),
             "codes": (stores(n=3000, seed=23), "sales", {})}
    score = {"numeric": make_frame(n=300, seed=31).drop(columns="label"),
             "mixed": penguins(n=300, seed=32).drop(columns="species"),
             "codes": stores(n=300, seed=33).drop(columns="sales")}
    out = {"dir": tmp}
    for kind, (frame, target, extra) in train.items():
        frame.to_csv(tmp / f"train-{kind}.csv", index=False)
        result = run(quick_config(tmp / kind, data=str(tmp / f"train-{kind}.csv"), target=target,
                                  name=f"batch-{kind}", epochs=6, **extra))
        rows = score[kind]
        if "id" not in rows:
            rows.insert(0, "id", np.arange(5000, 5000 + len(rows)))
        rows.to_csv(tmp / f"{kind}.csv", index=False)
        rows.to_parquet(tmp / f"{kind}.parquet", row_group_size=100)
        out[kind] = {"tag": result.tag, "name": f"batch-{kind}", "rows": rows, "card": result.card}
    assert out["codes"]["card"]["columns"][0]["codes"]  # the store column: integer codes, one-hot
    return out


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """One real server: the numeric model its default, the other two loaded beside it."""
    proc, url = start_server({"MODEL_TAG": models["numeric"]["tag"], "NORMSERVE_ADMIN_TOKEN": TOKEN, "MAX_ROWS": "1000"},
                             tmp_path_factory.mktemp("home"))
    for kind in ("mixed", "codes"):
        name, version = models[kind]["tag"].split(":")
        assert load(url, name, versions=[version])[0] == 200
    yield url
    stop(proc)


def score(models, kind, engine="local", source="parquet", *extra, output=None):
    """Run the command in this process (its Spark session shared); (exit code, output frame by id)."""
    out = Path(output or models["dir"] / f"out-{kind}-{engine}-{source}{'.parquet' if engine == 'local' else ''}")
    code = batch.main(["--model", models[kind]["tag"], "--input", str(models["dir"] / f"{kind}.{source}"),
                       "--output", str(out), "--keep", "id", "--engine", engine, "--overwrite",
                       "--no-progress", *extra])
    frame = pd.read_parquet(out) if out.exists() else None
    if frame is not None:
        frame["id"] = frame["id"].astype(int)
        frame = frame.sort_values("id").reset_index(drop=True)
    return code, frame


def predicted(url, models, kind) -> dict:
    """/predict's answer for the rows, sent as JSON records (no id: the numeric model does not know it)."""
    rows = models[kind]["rows"].drop(columns=[] if kind == "mixed" else ["id"])
    body = {"instances": json.loads(rows.to_json(orient="records"))}
    status, answer = request(f"{url}/predict?model={models[kind]['name']}", body)
    assert status == 200, answer
    return answer


def assert_matches_predict(frame: pd.DataFrame, answer: dict, kind: str) -> None:
    assert frame["error"].isna().all() and (frame["model"] == answer["model"]).all()
    if kind == "codes":  # regression
        np.testing.assert_allclose(frame["prediction"], answer["predictions"], rtol=1e-6)
        return
    assert list(frame["prediction"]) == answer["predictions"]
    probabilities = frame[[f"probability_{c}" for c in answer["classes"]]].to_numpy()
    np.testing.assert_allclose(probabilities, answer["probabilities"], atol=1e-6)


@pytest.mark.parametrize("engine", ["local", "spark"])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_equal_predicts(server, models, kind, engine):
    code, frame = score(models, kind, engine)
    assert code == batch.EXIT_OK and len(frame) == len(models[kind]["rows"])
    assert (frame["id"] == models[kind]["rows"]["id"]).all()
    assert_matches_predict(frame, predicted(server, models, kind), kind)


@pytest.mark.parametrize("engine", ["local", "spark"])
def test_csv_and_parquet_give_the_same_output(models, engine):
    _, parquet = score(models, "mixed", engine, "parquet")
    _, csv = score(models, "mixed", engine, "csv")
    pd.testing.assert_frame_equal(parquet, csv)


def test_the_local_output_keeps_the_input_order_and_types(models):
    out = models["dir"] / "ordered.parquet"
    score(models, "mixed", output=out)
    written = pq.read_table(out)
    assert written.column("id").to_pylist() == models["mixed"]["rows"]["id"].tolist()
    assert str(written.schema.field("id").type) == "int64"
    assert written.schema.names == ["id", "prediction", "probability_Adelie", "probability_Chinstrap",
                                    "model", "error"]
    report = json.loads((models["dir"] / "ordered.parquet.drift.json").read_text())
    assert report["rows_in"] == report["rows_out"] == 300 and report["drift"]["window"] == "the whole file"


@pytest.mark.parametrize("engine", ["local", "spark"])
def test_a_missing_column_fails_before_any_work(models, engine, capsys):
    models["numeric"]["rows"].drop(columns="age").to_parquet(models["dir"] / "no-age.parquet")
    out = models["dir"] / f"no-age-{engine}"
    code = batch.main(["--model", models["numeric"]["tag"], "--input", str(models["dir"] / "no-age.parquet"),
                       "--output", str(out), "--engine", engine, "--no-progress"])
    err = capsys.readouterr().err
    assert code == batch.EXIT_FAILED and err.strip() == "error: the input lacks column(s) the model takes: age"
    assert not out.exists() and not list(models["dir"].glob(f".no-age-{engine}*"))


def test_refusals_before_work(models, capsys):
    def fails(*args):
        code = batch.main(["--model", models["numeric"]["tag"], "--no-progress", *args])
        return code, capsys.readouterr().err.strip()
    existing, data = models["dir"] / "exists.parquet", str(models["dir"] / "numeric.parquet")
    existing.write_bytes(b"keep me")
    assert fails("--input", data, "--output", str(existing)) == (2, f"error: {existing} exists; --overwrite replaces it")
    assert existing.read_bytes() == b"keep me"
    out = str(models["dir"] / "never.parquet")
    assert fails("--input", data, "--output", out, "--keep", "id,prediction") == \
        (2, "error: --keep names column(s) the output writes itself: prediction")
    assert fails("--input", data, "--output", out, "--keep", "customer") == \
        (2, "error: --keep names column(s) the input does not have: customer")
    code, err = fails("--input", str(models["dir"] / "nothing.csv"), "--output", out)
    assert code == 2 and "not found" in err
    assert batch.main(["--model", "no-such-model", "--input", data, "--output", out]) == 2
    assert "not in the BentoML model store" in capsys.readouterr().err
    assert not Path(out).exists()


def test_a_job_that_fails_midway_leaves_the_existing_output_as_it_was(models, capsys):
    """A CSV row that breaks the file's shape late: one error line, exit 2, the output that was
    there untouched and nothing written aside left behind."""
    rows = pd.concat([models["numeric"]["rows"]] * 400, ignore_index=True)  # 120,000 rows: several batches
    path = models["dir"] / "ragged.csv"
    text = rows.to_csv(index=False)
    path.write_text(text + "1,2,3,4,5,6,7,8,9\n" + text.split("\n", 1)[1])
    out = models["dir"] / "ragged-out.parquet"
    out.write_bytes(b"yesterday's output")
    code = batch.main(["--model", models["numeric"]["tag"], "--input", str(path), "--output", str(out),
                       "--overwrite", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == batch.EXIT_FAILED and err.startswith("error: ") and "\n" not in err
    assert out.read_bytes() == b"yesterday's output"
    assert not list(models["dir"].glob(".ragged-out*"))


def dirty_numeric(models) -> pd.DataFrame:
    """The numeric model's rows with five a service refuses: text, a gap, a value beyond float32,
    an infinity and a boolean-like text."""
    rows = models["numeric"]["rows"].astype(object)
    rows.loc[3, "income"] = "abc"
    rows.loc[10, "ratio"] = None
    rows.loc[42, "age"] = 1e39
    rows.loc[77, "score"] = "-inf"
    rows.loc[150, "income"] = "yes"
    return rows


REASONS = {3: "feature 'income': expected a finite number, got string 'abc'",
           10: "feature 'ratio': expected a finite number, got null",
           42: "feature 'age': expected a finite number, got 1e+39, outside the float32 range",
           77: "feature 'score': expected a finite number, got infinity",
           150: "feature 'income': expected a finite number, got string 'yes'"}


@pytest.mark.parametrize("engine", ["local", "spark"])
def test_bad_rows_carry_reasons_and_the_others_match_a_clean_run(models, engine):
    dirty = dirty_numeric(models)
    dirty.to_csv(models["dir"] / "dirty.csv", index=False)
    models["dirty"] = {**models["numeric"]}
    code, frame = score(models, "dirty", engine, "csv", "--max-error-rate", "0.02")
    _, clean = score(models, "numeric", engine, "csv")
    assert code == batch.EXIT_OK and len(frame) == len(dirty)  # 5 of 300 bad: under 2%
    assert frame["error"].dropna().to_dict() == REASONS
    bad = frame["error"].notna()
    assert frame.loc[bad, ["prediction", "probability_approved"]].isna().all().all()
    pd.testing.assert_frame_equal(frame[~bad], clean[~bad])


def test_more_bad_rows_than_allowed_exit_3_with_the_output_written(models, capsys):
    dirty_numeric(models).to_csv(models["dir"] / "dirty.csv", index=False)
    models["dirty"] = {**models["numeric"]}
    code, frame = score(models, "dirty", "local", "csv")  # 5 of 300 is over the default 1%
    printed = capsys.readouterr().out
    assert code == batch.EXIT_ERRORS and len(frame) == 300 and frame["error"].notna().sum() == 5
    assert "300 in, 300 out, 5 without a prediction (1.67%)" in printed and "exit 3" in printed


def test_a_file_that_has_moved_is_flagged_with_the_features_that_moved(models, capsys):
    moved = models["numeric"]["rows"].copy()
    moved["income"] += 40_000  # more than two training standard deviations
    moved.to_parquet(models["dir"] / "moved.parquet")
    models["moved"] = {**models["numeric"]}
    assert score(models, "moved")[0] == batch.EXIT_OK
    report = json.loads((models["dir"] / "out-moved-local-parquet.parquet.drift.json").read_text())
    assert report["drift"]["verdict"] == "retrain" and report["drift"]["rows"] == 300
    flagged = {f["name"] for f in report["drift"]["features"] if f["verdict"] != "ok"}
    assert flagged == {"income"} and "drift      retrain over 300 rows counted (one in 4 of a large batch) (moved: income)" in capsys.readouterr().out
    score(models, "numeric")
    clean = json.loads((models["dir"] / "out-numeric-local-parquet.parquet.drift.json").read_text())
    assert clean["drift"]["verdict"] == "ok"


def test_each_spark_python_worker_opens_one_session(models):
    """Eight part files, eight tasks on local[2]: the Python workers are reused, each opening
    the session once, when its first task needs it."""
    parts = models["dir"] / "parts"
    parts.mkdir(exist_ok=True)
    rows = models["mixed"]["rows"]
    for i, part in enumerate(np.array_split(np.arange(len(rows)), 8)):
        rows.iloc[part].to_parquet(parts / f"part-{i:02d}.parquet")
    scorer = batch.open_scorer(models["mixed"]["tag"], 1)
    out = models["dir"] / "parts-out"
    shutil.rmtree(out, ignore_errors=True)
    spark = batch.spark_session("local[2]", False)
    # a task per file: each file counted as big as a partition, so no two share one
    spark.conf.set("spark.sql.files.openCostInBytes", spark.conf.get("spark.sql.files.maxPartitionBytes"))
    try:
        summary = batch.run_spark(scorer, str(parts), out, ["id"], "local[2]", False)
    finally:
        spark.conf.unset("spark.sql.files.openCostInBytes")
    assert summary.rows_in == summary.rows_out == 300 and summary.errors == 0
    assert 1 <= len(summary.sessions) <= 2 and len(set(summary.sessions)) == len(summary.sessions)
    assert os.getpid() not in summary.sessions  # opened in the workers, not in the driver
    assert len(pq.ParquetDataset(str(out)).files) == 8  # eight tasks


# ---- the vectorized checks agree with /predict's, row by row ------------------------------------

def model_scorer(models, kind) -> Scorer:
    import bentoml
    session = ort.InferenceSession(bentoml.models.get(models[kind]["tag"]).path_of("model.onnx"))
    return Scorer(session, decode_metadata(session.get_modelmeta().custom_metadata_map), 10**6)


CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-2**80, 2**80),
    st.sampled_from(["abc", "5", "1e3", " 7 ", "inf", "true", "", *sorted(MISSING_TEXTS)[:4]]),
    st.none(), st.booleans(), st.just([1, 2]), st.sampled_from([1e39, -3.5e38, 2**70]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_batch_checks_take_and_refuse_exactly_the_rows_predict_does(models, data):
    for kind in ("numeric", "mixed"):
        scorer = model_scorer(models, kind)
        names = batch.needed_columns(scorer)
        n = data.draw(st.integers(1, 12))
        frame = pd.DataFrame({c: pd.Series([data.draw(CELLS) for _ in range(n)], dtype=object) for c in names})
        frame = frame.apply(lambda s: pd.Series(s.tolist()))  # each column typed as pandas would type it
        feeds, reasons = check_frame(scorer, frame)
        taken = []
        for i in range(n):
            record = {c: cell(frame[c].iat[i]) for c in names}
            try:
                scorer.check([record])
                taken.append(record)
                assert reasons[i] is None, (record, reasons[i])
            except BadRequest as e:
                assert reasons[i] == str(e).removeprefix("row 0, ").removeprefix("row 0: ")
        if taken:  # the rows taken reach the graph as the service would feed them
            expected = scorer.check(taken)
            for k, v in expected.items():
                np.testing.assert_array_equal(feeds[k], v)


# ---- a real standalone cluster -------------------------------------------------------------

def spark_class() -> str:
    import pyspark
    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


def test_a_standalone_cluster_scores_as_local(models, tmp_path):
    """A master and one worker (spark-class, 127.0.0.1, 1 GB), the job submitted by the command
    as a user runs it."""
    port, ui = free_port(), free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_WORKER_DIR": str(tmp_path / "work"),
           "SPARK_LOG_DIR": str(tmp_path)}
    log = open(tmp_path / "cluster.log", "wb")
    master = subprocess.Popen([spark_class(), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)], env=env, stdout=log, stderr=log)
    worker = subprocess.Popen([spark_class(), "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
                               "--host", "127.0.0.1", "--cores", "2", "--memory", "1g",
                               "--webui-port", str(free_port())], env=env, stdout=log, stderr=log)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5) as r:
                    if any(w["state"] == "ALIVE" for w in json.load(r)["workers"]):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the standalone cluster did not start: " + (tmp_path / "cluster.log").read_text()[-2000:])
        out = tmp_path / "scored"
        done = subprocess.run([sys.executable, "-m", "service.batch", "--model", models["mixed"]["tag"],
                               "--input", str(models["dir"] / "mixed.parquet"), "--output", str(out),
                               "--keep", "id", "--engine", "spark", "--master", f"spark://127.0.0.1:{port}",
                               "--no-progress"], cwd=ROOT, env={**env, "PYSPARK_PYTHON": sys.executable},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "300 in, 300 out, 0 without a prediction" in done.stdout
        assert list((tmp_path / "work").iterdir()), "no application ran on the worker"
        _, local = score(models, "mixed")
        clustered = pd.read_parquet(out).sort_values("id").reset_index(drop=True)
        pd.testing.assert_frame_equal(clustered, local)
    finally:
        for p in (worker, master):
            p.terminate()
            p.wait(timeout=30)
        log.close()
