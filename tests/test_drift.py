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
from training import drift
from training.contract import decode_metadata
from training.fit import run

FEATURES = ["income", "ratio", "age", "score"]
WINDOW = 600
ENV = {"WORKERS": "2", "DRIFT_WINDOW": str(WINDOW), "DRIFT_MIN_ROWS": "200", "MAX_ROWS": "1000"}


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


def report(url: str, rows: int) -> dict:
    """GET /drift once every worker has counted `rows` rows (they count within half a second)."""
    deadline = time.time() + 10
    while True:
        status, body = request(url + "/drift")
        assert status == 200 and body["enabled"], body
        if body["since_start"]["rows"] >= rows or time.time() > deadline:
            assert body["since_start"]["rows"] == rows
            return body


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
    # The service's vectorized counting puts the training rows in the bins training recorded.
    layout = drift.Layout(profile)
    counts = layout.count(X.astype(np.float32))
    for f, start in zip(profile["features"], layout.offsets):
        np.testing.assert_allclose(counts[start + 4:start + 4 + len(f["freqs"])] / len(X), f["freqs"],
                                   atol=2 / len(X))  # float32 rounding may move a row at an edge
    # A sampled row standing for k rows counts as k copies of itself.
    rows, k = X[:40].astype(np.float32), np.arange(1, 41) % 5 + 1
    np.testing.assert_allclose(layout.count(rows, weights=k.astype(float)),
                               layout.count(np.repeat(rows, k, axis=0)))


def test_in_distribution_rows_are_ok_and_rejected_rows_are_not_counted(server):
    for bad in ({"instances": [[1.0, 2.0, "x", 4.0]]}, {"instances": [[1.0, 2.0]]},
                {"instances": [[1e39, 0, 0, 0]]}):
        assert request(server + "/predict", bad)[0] == 400
    before = request(server + "/drift")[1]
    assert before["since_start"]["rows"] == 0 and before["verdict"] == "not_enough_data"

    live = make_frame(n=1200, seed=11)  # the training distribution, other rows
    send(server, live[FEATURES].to_numpy().tolist())
    body = report(server, 1200)
    assert body["verdict"] == body["since_start"]["verdict"] == "ok"
    assert set(verdicts(body["recent"]).values()) == set(verdicts(body["since_start"]).values()) == {"ok"}
    # The newest rows: whole buckets (600 / 9 rows) of whole requests (50 rows).
    assert WINDOW <= body["recent"]["rows"] < WINDOW + 67 + 50
    assert all(f["psi"] < 0.1 and abs(f["mean_shift"]) < 0.25 for f in body["recent"]["features"])


def test_bulk_requests_are_sampled_yet_every_row_is_accounted_for(server, model):
    """Rows of a request over 64 are counted 1 in 32, each standing for 32: the since-start
    statistics still cover every row, in or out of distribution."""
    send(server, make_frame(n=8000, seed=14)[FEATURES].to_numpy().tolist(), per_request=1000)
    body = report(server, 8000)
    assert body["since_start"]["verdict"] == "ok"
    shifted = make_frame(n=8000, seed=15)
    shifted["income"] += 2 * model.card["drift"]["features"][0]["std"]
    send(server, shifted[FEATURES].to_numpy().tolist(), per_request=1000)
    since = report(server, 16000)["since_start"]
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
    assert 'normserve_drift_verdict{feature="income",window="recent"} 2.0' in metrics
    assert 'normserve_drift_verdict{feature="age",window="recent"} 0.0' in metrics
    assert 'normserve_drift_overall{window="recent"} 2.0' in metrics

    png = tmp_path / "drift.png"
    proc = subprocess.run([sys.executable, "-m", "service.drift_report", "--url", server, "--out",
                           str(png), "--top", "4"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("retrain  income: PSI")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    # As many in-distribution rows again: the recent window forgets the shift, since start does not.
    send(server, make_frame(n=WINDOW + 100, seed=13)[FEATURES].to_numpy().tolist())
    body = report(server, 2 * WINDOW + 100)
    assert body["verdict"] == "ok" and set(verdicts(body["recent"]).values()) == {"ok"}
    assert verdicts(body["since_start"])["income"] == "retrain"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift-mixed")
    path = tmp / "penguins.csv"
    penguins(n=1500).to_csv(path, index=False)
    return run(quick_config(tmp, data=str(path), target="species", epochs=3))


def test_unseen_categories_raise_the_categorical_distance(mixed):
    proc, url = start_server({"MODEL_TAG": mixed.tag, "DRIFT_WINDOW": "400", "DRIFT_MIN_ROWS": "200"})
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
        assert after["island"]["psi"] > before["island"]["psi"] + 1 and after["island"]["verdict"] == "retrain"
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
    brighter = drift.Layout(profile)
    counts = brighter.count(drift.image_features(np.minimum(images.astype(int) + 60, 255)))
    result = drift.compare(brighter, counts, {"psi_warn": 0.1, "psi_retrain": 0.25,
                                              "shift_warn": 0.25, "shift_retrain": 0.5}, 10)
    assert result["verdict"] == "retrain"


def test_report_cli_says_when_the_service_is_unreachable():
    proc = subprocess.run([sys.executable, "-m", "service.drift_report", "--url", "http://127.0.0.1:9"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read http://127.0.0.1:9/drift")
