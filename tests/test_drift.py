"""Covariate shift: the training profile, and a real `bentoml serve` comparing live rows with it."""
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from conftest import make_frame, quick_config
from test_mixed import penguins, records
from test_service import ROOT, request, start_server
from service.monitor import sample_step
from training import drift, drift_stats
from training.contract import decode_metadata
from training.fit import run

FEATURES = ["income", "ratio", "age", "score"]
WINDOW = 600
ENV = {"WORKERS": "2", "DRIFT_WINDOWS": f"{WINDOW // 2},{WINDOW}", "DRIFT_MIN_ROWS": "200", "MAX_ROWS": "1000"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    path = tmp / "loans.csv"
    make_frame(n=3000, seed=5).to_csv(path, index=False)
    return run(quick_config(tmp, data=str(path), target="label", epochs=3))


@pytest.fixture
def server(model):
    """A fresh server (two workers) per test: the statistics start at zero."""
    proc, url = start_server({"MODEL_TAG": model.tag, **ENV})
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def send(url: str, rows: list, per_request: int = 50) -> None:
    """Requests of 50 rows are counted row by row; of larger ones, a sample is counted."""
    for i in range(0, len(rows), per_request):
        status, body = request(url + "/predict", {"instances": rows[i:i + per_request]})
        assert status == 200, body


def counted(rows: int, per_request: int = 50) -> int:
    """How many of `rows` rows sent in requests of `per_request` the monitor counts."""
    sizes = [min(per_request, rows - i) for i in range(0, rows, per_request)]
    return sum(len(range(0, n, sample_step(n))) for n in sizes)


def report(url: str, rows: int) -> dict:
    """GET /drift once every worker has counted `rows` rows (they count within half a second)."""
    deadline = time.time() + 10
    while True:
        status, body = request(url + "/drift")
        assert status == 200 and body["enabled"], body
        if body["since_start"]["rows"] >= rows or time.time() > deadline:
            assert body["since_start"]["rows"] == rows
            return body


def metric(url: str, line_start: str, value: float) -> None:
    """Wait until /metrics has the line `line_start value` (workers export within 5 s)."""
    deadline = time.time() + 12
    while True:
        status, text = request(url + "/metrics")
        assert status == 200
        found = [line for line in text.splitlines() if line.startswith(line_start + " ")]
        if found == [f"{line_start} {value}"] or time.time() > deadline:
            assert found == [f"{line_start} {value}"], found
            return
        time.sleep(0.3)


def verdicts(window: dict) -> dict:
    return {f["name"]: f["verdict"] for f in window["features"]}


def test_profile_travels_in_the_model_and_uses_the_service_bins(model):
    proto = onnx.load(model.model_dir / "model.onnx")
    profile = decode_metadata({p.key: p.value for p in proto.metadata_props})["drift"]
    assert [f["name"] for f in profile["features"]] == FEATURES
    X = model.data.split.X_train
    income = profile["features"][0]
    assert income["mean"] == pytest.approx(X[:, 0].mean()) and income["std"] == pytest.approx(X[:, 0].std())
    assert len(income["edges"]) == drift.BINS - 1 and sum(income["freqs"]) == pytest.approx(1)
    assert profile["rows"] == len(X)  # the training sample size: the test accounts for it
    # The service's vectorized counting puts the training rows in the bins training recorded.
    layout = drift.Layout(profile)
    counts = layout.count(X.astype(np.float32))
    for f, start in zip(profile["features"], layout.offsets):
        slots, shares, _ = drift_stats.profile_bins(f, start)
        np.testing.assert_allclose(counts[slots] / len(X), shares,
                                   atol=2 / len(X))  # float32 rounding may move a row at an edge
    # Groups of rows counted in one pass add up to the rows counted at once.
    groups = layout.count_groups(X[:100].astype(np.float32), None, [0, 30, 31, 70])
    np.testing.assert_allclose(groups.sum(axis=0), layout.count(X[:100].astype(np.float32)))
    np.testing.assert_allclose(groups[1], layout.count(X[30:31].astype(np.float32)))


def test_in_distribution_rows_are_ok_and_rejected_rows_are_not_counted(server):
    for bad in ({"instances": [[1.0, 2.0, "x", 4.0]]}, {"instances": [[1.0, 2.0]]},
                {"instances": [[1e39, 0, 0, 0]]}):
        assert request(server + "/predict", bad)[0] == 400
    before = request(server + "/drift")[1]
    assert before["since_start"]["rows"] == 0 and before["verdict"] == "not_enough_data"

    live = make_frame(n=1200, seed=11)  # the training distribution, other rows
    send(server, live[FEATURES].to_numpy().tolist())
    body = report(server, 1200)
    assert body["answered_rows"] == 1200 and body["not_monitored"] == []
    assert body["verdict"] == body["since_start"]["verdict"] == "ok"
    assert set(verdicts(body["recent"]).values()) == set(verdicts(body["since_start"]).values()) == {"ok"}
    # The newest rows: whole buckets (75 answered rows: a quarter of the shortest window) of
    # whole requests (50 rows), enough to hold each window.
    for w in body["windows"]:
        assert w["window_rows"] <= w["answered_rows"] < w["window_rows"] + 150 + 50
    assert body["recent"]["window_rows"] == WINDOW  # all ok: the longest window tells
    assert all(f["psi"] < 0.1 and abs(f["mean_shift"]) < 0.25 for f in body["recent"]["features"])


def test_bulk_requests_are_sampled_and_rest_on_the_rows_counted(server, model):
    """Of a request over 64 rows, a sample is counted, each counted row the evidence of one row:
    in-distribution bulk traffic stays ok, a shift in it is seen, and the answered rows are told."""
    send(server, make_frame(n=8000, seed=14)[FEATURES].to_numpy().tolist(), per_request=1000)
    body = report(server, counted(8000, 1000))
    assert body["answered_rows"] == 8000 and body["since_start"]["rows"] == 8 * 250  # every 4th row
    assert body["since_start"]["verdict"] == "ok"
    shifted = make_frame(n=8000, seed=15)
    shifted["income"] += 2 * model.card["drift"]["features"][0]["std"]
    send(server, shifted[FEATURES].to_numpy().tolist(), per_request=1000)
    since = report(server, 2 * counted(8000, 1000))["since_start"]
    assert verdicts(since) == {"income": "retrain", "ratio": "ok", "age": "ok", "score": "ok"}
    assert 0.8 < since["features"][0]["mean_shift"] < 1.2  # half the rows moved by 2 sd


def test_a_shifted_feature_is_flagged_alone_and_the_window_forgets_it(server, model, tmp_path):
    income_std = model.card["drift"]["features"][0]["std"]
    shifted = make_frame(n=WINDOW, seed=12)
    shifted["income"] += 2 * income_std
    send(server, shifted[FEATURES].to_numpy().tolist())
    body = report(server, WINDOW)
    assert body["verdict"] == "retrain"
    assert verdicts(body["recent"]) == {"income": "retrain", "ratio": "ok", "age": "ok", "score": "ok"}
    income = body["recent"]["features"][0]
    assert 1.8 < income["mean_shift"] < 2.2 and income["psi"] > 1

    status, metrics = request(server + "/metrics")
    assert status == 200
    assert f'normserve_drift_verdict{{feature="income",model="{model.tag}",window="recent"}} 2.0' in metrics
    assert f'normserve_drift_verdict{{feature="age",model="{model.tag}",window="recent"}} 0.0' in metrics
    assert f'normserve_drift_overall{{model="{model.tag}",window="recent"}} 2.0' in metrics
    # For the fleet: both workers' counts as counters, the training side as gauges.
    tag = f'model="{model.tag}"'
    metric(server, f"normserve_drift_counted_rows_total{{{tag}}}", float(WINDOW))
    assert f'normserve_drift_reference_rows{{{tag}}} {float(model.card["drift"]["rows"])}' in metrics
    assert f'normserve_drift_setting{{{tag},name="alpha"}} 0.01' in metrics

    png = tmp_path / "drift.png"
    proc = subprocess.run([sys.executable, "-m", "service.drift_report", "--url", server, "--out",
                           str(png), "--top", "4"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("retrain  income: PSI")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    # Twice as many in-distribution rows: the recent window (the newest buckets of both workers;
    # a bucket with a few shifted rows may stay newest for a while) forgets the shift, since start
    # does not.
    # The two workers share the requests unevenly (the kernel picks), so the worker that got fewer
    # may keep a shifted bucket in the recent window a while: up to two more windows of rows.
    calm = make_frame(n=4 * WINDOW, seed=13)[FEATURES].to_numpy().tolist()
    send(server, calm[:2 * WINDOW])
    body, sent = report(server, 3 * WINDOW), 2 * WINDOW
    while body["verdict"] != "ok" and sent < len(calm):
        send(server, calm[sent:sent + WINDOW])
        sent += WINDOW
        body = report(server, WINDOW + sent)
    assert body["verdict"] == "ok" and set(verdicts(body["recent"]).values()) == {"ok"}
    assert verdicts(body["since_start"])["income"] != "ok"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift-mixed")
    path = tmp / "penguins.csv"
    penguins(n=1500).to_csv(path, index=False)
    return run(quick_config(tmp, data=str(path), target="species", epochs=3))


def test_unseen_categories_raise_the_categorical_distance(mixed):
    proc, url = start_server({"MODEL_TAG": mixed.tag, "DRIFT_WINDOWS": "200,400", "DRIFT_MIN_ROWS": "200"})
    try:
        live = penguins(n=800, seed=21).drop(columns=["species", "id"])
        send(url, records(live.iloc[:400]))
        before = {f["name"]: f for f in report(url, 400)["recent"]["features"]}
        assert before["island"]["verdict"] == "ok" and before["island"]["unseen"] == 0
        assert before["bill"]["missing"] == pytest.approx(0.1, abs=0.04)  # gaps are counted too

        unseen = live.iloc[400:].copy()
        unseen["island"] = np.where(np.arange(400) % 2, "Atlantis", unseen["island"])
        send(url, records(unseen))
        after = {f["name"]: f for f in report(url, 800)["recent"]["features"]}
        assert after["island"]["unseen"] == pytest.approx(0.5, abs=0.05)
        assert after["island"]["psi"] > before["island"]["psi"] + 0.25 and after["island"]["verdict"] == "retrain"
        assert after["sex"]["verdict"] == after["bill"]["verdict"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_image_profile_is_per_channel_brightness():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    profile = drift.profile(images, "image", [], None)
    assert [f["name"] for f in profile["features"]] == ["channel_0", "channel_1", "channel_2"]
    assert profile["features"][1]["mean"] == pytest.approx(images[:, 1].mean() / 255)
    layout = drift.Layout(profile)
    comparison = drift_stats.Comparison(layout, drift_stats.Settings(min_rows=40), profile["rows"])
    same = rng.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    assert comparison.compare(layout.count(drift.image_features(same)))["verdict"] == "ok"
    brighter = layout.count(drift.image_features(np.minimum(same.astype(int) + 60, 255)))
    assert comparison.compare(brighter)["verdict"] == "retrain"


def test_report_cli_says_when_the_service_is_unreachable():
    proc = subprocess.run([sys.executable, "-m", "service.drift_report", "--url", "http://127.0.0.1:9"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read http://127.0.0.1:9/drift")
