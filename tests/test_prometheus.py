"""The fleet's drift through Prometheus: the shipped rule files pass promtool's checks and unit
tests, and a real Prometheus server scraping two `bentoml serve` replicas computes the same
verdicts as the monitor's own statistics on the two replicas' counts combined."""
import subprocess
import time
import urllib.parse

import numpy as np
import pytest

from conftest import make_frame
from test_drift import FEATURES, counted, model, report, send  # noqa: F401  (model: the fixture)
from test_service import ROOT, free_port, request, start_server
from training.drift import Layout
from training.drift_stats import VERDICTS, Comparison, Settings

RULES = ROOT / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True, timeout=120)


def test_rule_files_pass_promtool_check_and_unit_tests():
    check = promtool("check", "rules", "normserve.rules.yml")
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    unit = promtool("test", "rules", "normserve.rules.test.yml")
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


@pytest.fixture
def prometheus_for(tmp_path):
    """A real Prometheus server (scrapes and evaluates the rules every second) for given targets."""
    started = []

    def start(targets: list[str]) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{RULES / 'normserve.rules.yml'}']\n"
            "scrape_configs:\n"
            f"  - {{job_name: normserve, static_configs: [{{targets: {targets}}}]}}\n")
        proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if request(url + "/-/ready")[0] == 200:
                    return url
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready in 30 s")

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


def query(prometheus: str, expr: str) -> dict[tuple, float]:
    status, body = request(f"{prometheus}/api/v1/query?query={urllib.parse.quote(expr)}")
    assert status == 200 and body["status"] == "success", body
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in body["data"]["result"]}


def test_prometheus_sums_two_replicas_into_the_fleet_verdict(model, prometheus_for):
    env = {"MODEL_TAG": model.tag, "WORKERS": "2", "DRIFT_MIN_ROWS": "200"}
    replicas = [start_server(env), start_server(env)]
    try:
        calm, shifted = (url for _, url in replicas)
        prometheus = prometheus_for([url.removeprefix("http://") for _, url in replicas])
        # increase() counts from a replica's first scrape: the counters exist at 0 from start-up.
        deadline = time.time() + 30
        while sorted(query(prometheus, "normserve_drift_counted_rows_total").values()) != [0.0, 0.0]:
            assert time.time() < deadline, query(prometheus, "up")
            time.sleep(0.2)
        send(calm, make_frame(n=1200, seed=31)[FEATURES].to_numpy().tolist())
        moved = make_frame(n=1200, seed=32)
        moved["income"] += 2 * model.card["drift"]["features"][0]["std"]
        send(shifted, moved[FEATURES].to_numpy().tolist())
        reports = [report(calm, counted(1200)), report(shifted, counted(1200))]
        assert reports[0]["since_start"]["verdict"] == "ok" and reports[1]["since_start"]["verdict"] == "retrain"

        # Each replica's /drift alone; combined, what the fleet should say.
        first = reports[0]
        settings = Settings(alpha=first["alpha"], min_rows=first["min_rows"], **first["thresholds"])
        combined = np.sum([r["since_start"]["counts"] for r in reports], axis=0)
        expected = Comparison(Layout(model.card["drift"]), settings, model.card["drift"]["rows"]).compare(combined)
        assert {f["name"]: f["verdict"] for f in expected["features"]} == {
            "income": "retrain", "ratio": "ok", "age": "ok", "score": "ok"}

        # Prometheus has every worker's counts (workers export within 5 s), then evaluates the rules.
        deadline = time.time() + 30
        while query(prometheus, "sum(normserve_drift_counted_rows_total)") != {(): float(combined[0])}:
            assert time.time() < deadline, query(prometheus, "normserve_drift_counted_rows_total")
            time.sleep(0.5)
        time.sleep(3)  # a few rule evaluations after the last scrape
        fleet = {dict(k)["feature"]: v for k, v in query(prometheus, "normserve:drift_verdict:1h").items()}
        assert fleet == {f["name"]: float(VERDICTS.index(f["verdict"])) for f in expected["features"]}
        assert list(query(prometheus, "normserve:drift_overall:1h").values()) == [2.0]
        psi = {dict(k)["feature"]: v for k, v in query(prometheus, "normserve:drift_psi:1h").items()}
        shift = {dict(k)["feature"]: v for k, v in query(prometheus, "normserve:drift_mean_shift:1h").items()}
        # increase() extrapolates each replica's counts from its last scrape to the evaluation
        # time: negligible over an hour of 15 s scrapes, up to ~10% of a replica's weight over
        # the few seconds this test runs.
        for f in expected["features"]:
            assert psi[f["name"]] == pytest.approx(f["psi"], rel=0.2, abs=0.005)
            assert shift[f["name"]] == pytest.approx(f["mean_shift"], rel=0.2, abs=0.02)
    finally:
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(timeout=30)
