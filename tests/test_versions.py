"""Model versions in one running server: loaded, switched, rolled back and unloaded through the
model repository extension (as tritonclient speaks it), without downtime, by the operator only.

One server with two workers serves the module's tests; the restart test starts its own."""
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from conftest import make_frame, quick_config
from test_service import alter_one_byte, request, start_server, strip_metadata, truncate, widen_card
from training.fit import run

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROW = {"income": 52000.0, "ratio": 0.001, "age": 40.0, "score": 5.0}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """In the store, in this order: versioned v1 and v2 (the same inputs) and v3 (one feature
    fewer); other o1 and o2; fragile: a good version, then four damaged copies of it."""
    import bentoml
    tmp = tmp_path_factory.mktemp("versions")
    path = tmp / "loans.csv"
    make_frame(n=300, seed=5).to_csv(path, index=False)

    def train(name, seed, **extra):
        return run(quick_config(tmp / f"{name}{seed}", data=str(path), target="label", name=name,
                                seed=seed, epochs=3, **extra)).tag
    tags = {"v1": train("versioned", 0), "v2": train("versioned", 1),
            "v3": train("versioned", 2, features=["income", "ratio", "age"]),
            "o1": train("other", 0), "o2": train("other", 1), "good": train("fragile", 0)}
    good = Path(bentoml.models.get(tags["good"]).path)
    for damage in (truncate, alter_one_byte, strip_metadata, widen_card):
        label = damage.__name__.replace("_", "-")
        with bentoml.models.create(f"fragile:{label}", labels={"pipeline": "normserve"}) as ref:
            for f in good.iterdir():
                shutil.copy2(f, Path(ref.path) / f.name)
            damage(Path(ref.path))
        tags[label] = f"fragile:{label}"
    return tags


def version(tag: str) -> str:
    return tag.split(":", 1)[1]


def serve(home: Path, env_extra: dict) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` with its own BENTOML_HOME, kept across restarts (its record lives there)."""
    return start_server(env_extra, home)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


PROCESSES: dict[str, subprocess.Popen] = {}  # url -> `bentoml serve`, for memory readings


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    proc, url = serve(tmp_path_factory.mktemp("home"), {"MODEL_TAG": store["v1"], "WORKERS": "2",
                                                         "NORMSERVE_ADMIN_TOKEN": TOKEN})
    PROCESSES[url] = proc
    yield url
    stop(proc)


def client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"))


def predict(url: str, model: str | None = None, row: dict = ROW) -> tuple[int, dict]:
    query = f"?model={model}" if model else ""
    return request(f"{url}/predict{query}", {"instances": [row]})


def load(url: str, name: str, versions=None, latest=None, allow_input_change=False, token=TOKEN):
    """POST .../load as tritonclient sends it (the config as JSON text): (status, answer)."""
    cfg = {}
    if versions:
        cfg["version_policy"] = {"specific": {"versions": versions}}
    if latest:
        cfg["version_policy"] = {"latest": {"num_versions": latest}}
    if allow_input_change:
        cfg["allow_input_change"] = True
    body = json.dumps({"parameters": {"config": json.dumps(cfg)}} if cfg else {}).encode()
    return post(url, f"/v2/repository/models/{name}/load", body, token)


def post(url: str, path: str, body: bytes = b"", token: str | None = TOKEN, header: str | None = None):
    import urllib.error
    import urllib.request
    headers = {"Content-Type": "application/json"}
    if header is not None or token:
        headers["Authorization"] = header if header is not None else f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def answers_from_every_worker(url: str, model: str | None = None, n: int = 40) -> set[str]:
    """The versions that answer n requests in a row, a second after a change (two workers share
    them; the one that did not take the change follows the record within a second)."""
    time.sleep(1.0)
    return {predict(url, model)[1]["model"] for _ in range(n)}


def index(url: str) -> dict[str, tuple[str, str]]:
    return {f"{e['name']}:{e['version']}": (e["state"], e["reason"])
            for e in client(url).get_model_repository_index(headers=AUTH)}


# ---- the repository extension, as tritonclient speaks it -------------------------------------

def test_index_lists_every_stored_version_and_what_is_loaded(server, store):
    listed = index(server)
    assert listed[store["v1"]] == ("READY", "")
    assert listed[store["o1"]] == ("UNAVAILABLE", "not loaded")
    assert set(store.values()) <= set(listed)
    ready = client(server).get_model_repository_index(headers=AUTH)
    status, only_ready = post(server, "/v2/repository/index", b'{"ready": true}')
    assert status == 200 and [f"{e['name']}:{e['version']}" for e in only_ready] == [store["v1"]]
    assert len(ready) == len(listed)
    assert client(server).get_server_metadata()["extensions"] == ["binary_tensor_data", "model_repository"]


def test_load_newest_specific_and_latest_then_unload(server, store):
    c, o1, o2 = client(server), version(store["o1"]), version(store["o2"])
    c.load_model("other", headers=AUTH)  # no parameters: the newest stored version
    assert c.is_model_ready("other", o2) and not c.is_model_ready("other", o1)
    assert predict(server, "other")[1]["model"] == store["o2"]
    assert c.get_model_metadata("other")["versions"] == [o2]

    c.load_model("other", headers=AUTH, config=json.dumps({"version_policy": {"specific": {"versions": [o1]}}}))
    assert c.is_model_ready("other", o1) and c.is_model_ready("other", o2)  # the other stays loaded
    assert answers_from_every_worker(server, "other") == {store["o1"]}     # o1 is the default now
    assert predict(server, store["o2"])[1]["model"] == store["o2"]          # o2 by name and version

    c.load_model("other", headers=AUTH, config=json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
    assert c.is_model_ready("other", o2) and not c.is_model_ready("other", o1)
    c.unload_model("other", headers=AUTH)
    assert not c.is_model_ready("other") and not c.is_model_ready("other", o2)
    status, body = predict(server, "other")
    assert status == 404 and "model 'other' is not loaded" in body["error"]
    assert predict(server)[1]["model"] == store["v1"]  # the server's default answered throughout


def test_each_request_names_the_model_and_version_it_wants(server, store):
    assert load(server, "other", versions=[version(store["o1"])])[0] == 200
    try:
        assert predict(server)[1]["model"] == store["v1"]
        assert predict(server, "other")[1]["model"] == store["o1"]
        assert predict(server, store["o1"])[1]["model"] == store["o1"]
        for missing in ("nope", "other:no-such-version", f"versioned:{version(store['v2'])}"):
            status, body = predict(server, missing)
            assert status == 404 and "not loaded" in body["error"] or "no loaded version" in body["error"]
        X = np.array([list(ROW.values())], np.float32)
        inp = triton.InferInput("features", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        answer = client(server).infer("other", [inp], model_version=version(store["o1"]))
        assert answer.get_response()["model_version"] == version(store["o1"])
        assert answer.get_response()["model_name"] == "other"
        assert request(server + "/metadata?model=other")[1]["model"] == store["o1"]
        assert request(server + "/drift?model=other")[1]["model"] == store["o1"]
        assert request(server + "/drift?model=nope")[0] == 404
    finally:
        post(server, "/v2/repository/models/other/unload")


def test_the_servers_default_model_cannot_be_unloaded(server, store):
    status, body = post(server, "/v2/repository/models/versioned/unload")
    assert status == 400 and "the server's default model" in body["error"]
    with pytest.raises(triton.InferenceServerException):
        client(server).unload_model("versioned", headers=AUTH)
    assert predict(server)[1]["model"] == store["v1"]


# ---- no downtime ---------------------------------------------------------------------------

async def steady_load(url: str, clients: int, stop: asyncio.Event, seen: list):
    """Half the clients on /predict, half on the protocol's infer, until `stop`: (start time,
    status, version, end time) of every answer."""
    import aiohttp
    body = json.dumps({"instances": [ROW]}).encode()
    infer = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4],
                                    "data": list(ROW.values())}]}).encode()

    async def one(session, protocol: bool):
        path = "/v2/models/versioned/infer" if protocol else "/predict"
        while not stop.is_set():
            started = time.monotonic()
            async with session.post(url + path, data=infer if protocol else body,
                                    headers={"Content-Type": "application/json"}) as r:
                answer = await r.json(content_type=None)
                tag = (f"versioned:{answer.get('model_version')}" if protocol else answer.get("model"))
                seen.append((started, r.status, tag, time.monotonic()))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(one(session, i % 2 == 1) for i in range(clients)))


def test_switching_the_default_under_load_drops_no_request(server, store):
    """Two workers, 16 clients on /predict and on the protocol: the default switched between two
    versions 6 times. Every answer is a 200, and from one second after a load returns every
    answer, from every worker, comes from the new version."""
    import aiohttp
    v1, v2 = version(store["v1"]), version(store["v2"])

    async def scenario():
        stop, seen, switches = asyncio.Event(), [], []
        load_task = asyncio.create_task(steady_load(server, 16, stop, seen))
        await asyncio.sleep(1.0)
        async with aiohttp.ClientSession() as session:
            for target in [v2, v1] * 3:
                cfg = json.dumps({"version_policy": {"specific": {"versions": [target]}}})
                sent = time.monotonic()
                async with session.post(server + "/v2/repository/models/versioned/load", headers=AUTH,
                                        json={"parameters": {"config": cfg}}) as r:
                    assert r.status == 200, await r.text()
                switches.append((sent, time.monotonic(), f"versioned:{target}"))
                await asyncio.sleep(1.6)
        stop.set()
        await load_task
        return seen, switches

    seen, switches = asyncio.run(scenario())
    assert len(seen) > 500
    assert [s for s in seen if s[1] != 200] == []
    for (_, answered, tag), following in zip(switches, switches[1:] + [(float("inf"), None, None)]):
        # sent 1 s or more after the load returned, answered before the next load was sent (a
        # request still in flight when the next load is sent may get either version)
        late = [s for s in seen if answered + 1.0 <= s[0] and s[3] < following[0]]
        old = [s[0] - answered for s in late if s[2] != tag]
        assert late and not old, (f"{tag}: {len(old)} of {len(late)} answers sent 1 s or more after the "
                                  f"load returned came from another version, the last {max(old, default=0):.2f} s after")


# ---- a bad candidate never replaces a good model ----------------------------------------------

@pytest.mark.parametrize("label, reason", [
    ("truncate", "model.onnx does not match its card (sha256"),
    ("alter-one-byte", "model.onnx does not match its card (sha256"),
    ("strip-metadata", "model.onnx lacks metadata schema_version"),
    ("widen-card", "model.onnx does not fit its card"),
])
def test_a_bad_candidate_is_refused_and_the_default_keeps_answering(server, store, label, reason):
    assert load(server, "fragile", versions=[version(store["good"])])[0] == 200
    try:
        before = [request(server + "/predict?model=fragile", {"instances": [ROW] * 3}) for _ in range(4)]
        status, body = load(server, "fragile", versions=[label])
        assert status == 400 and reason in body["error"]
        after = [request(server + "/predict?model=fragile", {"instances": [ROW] * 3}) for _ in range(4)]
        assert after == before and {b[1]["model"] for b in after} == {store["good"]}  # byte-identical
        state, why = index(server)[f"fragile:{label}"]
        assert state == "UNAVAILABLE" and reason in why
    finally:
        post(server, "/v2/repository/models/fragile/unload")


def test_a_version_with_other_inputs_needs_allow_input_change(server, store):
    v3 = version(store["v3"])
    status, body = load(server, "versioned", versions=[v3])
    assert status == 400 and "takes other inputs than" in body["error"] and "allow_input_change" in body["error"]
    assert answers_from_every_worker(server) == {store["v1"]}
    assert index(server)[store["v3"]][0] == "UNAVAILABLE"
    assert load(server, "versioned", versions=[v3], allow_input_change=True)[0] == 200
    try:
        time.sleep(1.0)
        row = {k: ROW[k] for k in ("income", "ratio", "age")}
        assert {predict(server, row=row)[1]["model"] for _ in range(20)} == {store["v3"]}
    finally:
        assert load(server, "versioned", versions=[version(store["v1"])], allow_input_change=True)[0] == 200
        assert answers_from_every_worker(server) == {store["v1"]}


# ---- only the operator ----------------------------------------------------------------------

@pytest.mark.parametrize("header, status", [
    (None, 401), ("Basic b3BlcmF0b3I6cHc=", 401), ("Bearer", 401), ("Bearer wrong-token", 403),
    (f"Bearer {TOKEN}", 200)])
def test_the_repository_needs_the_operators_token(server, header, status):
    # a model that is not in the store: past the token, the call changes nothing
    calls = {"/v2/repository/index": 200, "/v2/repository/models/no-such-model/unload": 404,
             "/v2/repository/models/no-such-model/load": 404}
    for path, allowed in calls.items():
        got, body = post(server, path, b"", token=None, header=header)
        assert got == (allowed if status == 200 else status), (path, got, body)
        assert TOKEN not in json.dumps(body)
    # predictions, health, metadata and drift stay open
    assert predict(server)[0] == 200 and request(server + "/readyz")[0] == 200
    assert request(server + "/metadata")[0] == 200 and request(server + "/drift")[0] == 200


# ---- monitoring per version -----------------------------------------------------------------

def metric(url: str, series: str) -> float:
    """A series' value on /metrics (0 if absent)."""
    for line in request(url + "/metrics")[1].splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_request_metrics_and_drift_are_per_model_version(server, store):
    o1 = store["o1"]
    series = {"ok": f'normserve_model_requests_total{{code="200",model="{o1}"}}',
              "bad": f'normserve_model_requests_total{{code="400",model="{o1}"}}',
              "timed": f'normserve_model_request_duration_seconds_count{{model="{o1}"}}',
              "default": f'normserve_model_requests_total{{code="200",model="{store["v1"]}"}}'}
    time.sleep(1.0)  # what earlier tests' requests counted has reached the metrics
    before = {k: metric(server, s) for k, s in series.items()}
    assert load(server, "other", versions=[version(o1)])[0] == 200
    try:
        time.sleep(1.0)  # the worker that did not take the load has opened o1 too
        answers = [predict(server, "other") for _ in range(5)]
        assert [(status, body.get("model")) for status, body in answers] == [(200, o1)] * 5, answers
        assert predict(server, "other", row={"income": "x"})[0] == 400
        time.sleep(1.0)  # each worker adds what it counted to the metrics within half a second
        after = {k: metric(server, s) - before[k] for k, s in series.items()}
        assert after == {"ok": 5, "bad": 1, "timed": 6, "default": 0}
        time.sleep(1.0)  # each worker counts what it staged within half a second
        drift = request(server + "/drift?model=other")[1]  # a loaded version counts anew
        assert drift["model"] == o1 and drift["answered_rows"] == 5
        assert metric(server, f'normserve_drift_rows{{model="{o1}",window="since_start"}}') == 5
    finally:
        post(server, "/v2/repository/models/other/unload")


# ---- for people: python -m service.models ------------------------------------------------------

def test_the_models_command_lists_switches_rolls_back_and_unloads(server, store):
    def cli(*args, token=TOKEN):
        env = {**os.environ, "NORMSERVE_ADMIN_TOKEN": token} if token else \
            {k: v for k, v in os.environ.items() if k != "NORMSERVE_ADMIN_TOKEN"}
        return subprocess.run([sys.executable, "-m", "service.models", "--url", server, *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
    listed = cli("list")
    assert listed.returncode == 0 and re.search(rf"versioned +{version(store['v1'])} +READY +default",
                                                listed.stdout), listed.stdout
    assert cli("load", "other").returncode == 0  # the newest: o2
    assert cli("rollback", "other").returncode == 0
    assert answers_from_every_worker(server, "other") == {store["o1"]}
    refused = cli("rollback", "other")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "oldest" in refused.stderr
    assert cli("unload", "other").returncode == 0
    assert predict(server, "other")[0] == 404
    no_token = cli("list", token=None)
    assert no_token.returncode == 2 and "NORMSERVE_ADMIN_TOKEN" in no_token.stderr


# ---- memory and restarts ----------------------------------------------------------------------

def test_memory_is_flat_over_load_and_unload_cycles(server, store):
    from benchmarks.serve_load import tree_rss_mb
    proc = PROCESSES[server]

    def cycle():
        assert load(server, "other", versions=[version(store["o1"]), version(store["o2"])])[0] == 200
        predict(server, "other")
        assert post(server, "/v2/repository/models/other/unload")[0] == 200
    for _ in range(3):  # warm-up: the allocator and the metric files settle
        cycle()
    before = tree_rss_mb(proc)
    for _ in range(20):
        cycle()
    time.sleep(1.0)
    grown = tree_rss_mb(proc) - before
    assert grown < 50, f"the server's processes grew {grown:.1f} MB over 20 load/unload cycles"


def test_a_restart_serves_the_default_it_served_before(store, tmp_path):
    home = tmp_path / "home"
    proc, url = serve(home, {"MODEL_TAG": store["v1"], "NORMSERVE_ADMIN_TOKEN": TOKEN})
    try:
        assert load(url, "versioned", versions=[version(store["v2"])])[0] == 200
        assert load(url, "other")[0] == 200  # o2
        assert load(url, "other", versions=[version(store["o1"])])[0] == 200  # o1, o2 kept
        assert shadow(url, {"model": "other", "version": version(store["o2"]), "share": 0.5})[0] == 200
        assert load(url, "other", versions=[version(store["o2"])])[0] == 200  # o2: no shadow of itself
        assert not [p for p in shadow(url, method="GET")[1] if p["active"]]
        assert load(url, "other", versions=[version(store["o1"])])[0] == 200
        assert shadow(url, {"model": "other", "version": version(store["o2"]), "share": 0.5})[0] == 200
    finally:
        stop(proc)
    proc, url = serve(home, {})  # no MODEL_TAG, no token: the record decides
    try:
        assert answers_from_every_worker(url, n=5) == {store["v2"]}
        assert predict(url, "other")[1]["model"] == store["o1"]
        predict(url, "other")
        time.sleep(1.0)
        (pair,) = [p for p in shadow(url, method="GET")[1] if p["active"]]  # the shadow too
        assert (pair["model"], pair["shadow"], pair["share"]) == (store["o1"], store["o2"], 0.5)
        status, body = post(url, "/v2/repository/index")
        assert status == 403 and "NORMSERVE_ADMIN_TOKEN" in body["error"]  # off without a token
    finally:
        stop(proc)
    proc, url = serve(home, {"MODEL_TAG": store["v1"]})  # MODEL_TAG comes first at start-up
    try:
        assert answers_from_every_worker(url, n=5) == {store["v1"]}
        assert predict(url, "other")[1]["model"] == store["o1"]
    finally:
        stop(proc)


def test_a_worker_restarted_within_the_run_serves_what_the_others_serve(store, tmp_path):
    """BentoML starts a worker again after it dies: it follows the record written in this run,
    not MODEL_TAG, which only chose the default when the server started."""
    import signal

    import psutil
    proc, url = serve(tmp_path / "home", {"MODEL_TAG": store["v1"], "NORMSERVE_ADMIN_TOKEN": TOKEN})
    try:
        assert load(url, "versioned", versions=[version(store["v2"])])[0] == 200
        assert answers_from_every_worker(url, n=5) == {store["v2"]}
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
        assert workers
        for w in workers:
            os.kill(w.pid, signal.SIGKILL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if request(url + "/readyz")[0] == 200 and predict(url)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert answers_from_every_worker(url, n=5) == {store["v2"]}
    finally:
        stop(proc)


def test_the_gate_promotes_through_the_repository_or_leaves_the_server_as_it_was(server, store, tmp_path):
    """`python -m training.compare --promote`: a promoted candidate becomes its model's default; a
    promotion the server refuses (a wrong token) exits 2 and changes nothing."""
    data = tmp_path / "labelled.csv"
    make_frame(n=200, seed=9).to_csv(data, index=False)
    assert load(server, "other", versions=[version(store["o2"])])[0] == 200
    try:
        def gate(token):
            env = {**os.environ, "NORMSERVE_ADMIN_TOKEN": token}
            return subprocess.run(
                [sys.executable, "-m", "training.compare", "--champion", store["o2"], "--candidate",
                 store["o1"], "--data", str(data), "--target", "label", "--bootstrap", "50",
                 "--min-change", "-1", "--tolerance", "1", "--secondary-margin", "1",  # promote whatever
                 "--promote", "--server", server], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        refused = gate("wrong-token")
        assert refused.returncode == 2 and "promotion refused" in refused.stderr
        assert answers_from_every_worker(server, "other") == {store["o2"]}
        promoted = gate(TOKEN)
        assert promoted.returncode == 0, promoted.stderr
        assert f"promoted   {store['o1']} is the default version" in promoted.stdout
        assert answers_from_every_worker(server, "other") == {store["o1"]}
    finally:
        post(server, "/v2/repository/models/other/unload")


# ---- shadow traffic -------------------------------------------------------------------------

def shadow(url: str, body: dict | None = None, method: str = "POST", query: str = "", token=TOKEN):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(f"{url}/shadow{query}", data=json.dumps(body).encode() if body else None,
                                 method=method, headers={"Content-Type": "application/json",
                                                         **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def offline_pair(store, rows: list[dict]):
    """Both versions of `other` scored offline on the same rows: (label agreement, mean |Δp|)."""
    from training.compare import open_scorer
    a, b = (open_scorer(store[k]).scorer for k in ("o1", "o2"))
    (pa, la), (pb, lb) = a.run(a.check(rows)), b.run(b.check(rows))
    return float(np.mean(la == lb)), float(np.abs(pa - pb).mean(axis=1).mean())


def test_a_shadow_scores_a_share_of_live_requests_off_the_request_path(server, store):
    o1, o2 = version(store["o1"]), version(store["o2"])
    assert load(server, "other", versions=[o2, o1])[0] == 200  # the default: o2, the newer
    assert load(server, "other", versions=[o1])[0] == 200      # o1 the default, o2 still loaded
    frame = make_frame(n=600, seed=21).drop(columns="label")
    rows = frame.to_dict(orient="records")
    requests = [rows[i:i + 3] for i in range(0, 600, 3)]  # 200 requests of 3 rows
    try:
        without = [request(server + "/predict?model=other", {"instances": r}) for r in requests[:40]]
        assert shadow(server, {"model": "other", "version": o2, "share": 1.0}, token=None)[0] == 401
        assert shadow(server, {"model": "other", "version": o1, "share": 1.0})[0] == 400  # the default
        assert shadow(server, {"model": "other", "version": o2, "share": 1.5})[0] == 400
        assert shadow(server, {"model": "other", "version": o2, "share": 1.0})[0] == 200
        time.sleep(1.0)
        answers = [request(server + "/predict?model=other", {"instances": r}) for r in requests]
        assert answers[:40] == without  # the caller's answers, byte for byte the same
        assert all(status == 200 and body["model"] == store["o1"] for status, body in answers)
        time.sleep(1.0)
        (pair,) = [p for p in shadow(server, method="GET")[1] if p["model"] == store["o1"]]
        agreement, prob_diff = offline_pair(store, rows)
        assert pair["shadow"] == store["o2"] and pair["active"] and pair["share"] == 1.0
        assert pair["requests"] == 200 and pair["rows_compared"] == 600 and pair["dropped_rows"] == 0
        assert pair["error_rows"] == 0
        assert pair["label_agreement"] == pytest.approx(agreement, abs=1e-9)
        assert pair["mean_abs_probability_diff"] == pytest.approx(prob_diff, rel=1e-4)
        _, metrics = request(server + "/metrics")
        assert f'normserve_shadow_rows_total{{model="{store["o1"]}",shadow="{store["o2"]}"}} 600.0' in metrics

        assert shadow(server, {"model": "other", "version": o2, "share": 0.25})[0] == 200
        time.sleep(1.0)
        for r in requests:
            request(server + "/predict?model=other", {"instances": r})
        time.sleep(1.0)
        (pair,) = [p for p in shadow(server, method="GET")[1] if p["model"] == store["o1"]]
        sampled = pair["requests"] - 200
        assert 20 <= sampled <= 80, sampled  # a quarter of 200, give or take four sd
        assert shadow(server, method="DELETE", query="?model=other")[0] == 200
        assert shadow(server, method="DELETE", query="?model=other")[0] == 404  # none left
        assert not [p for p in shadow(server, method="GET")[1] if p["active"]]
    finally:
        post(server, "/v2/repository/models/other/unload")


def test_a_failing_or_overrun_shadow_never_fails_a_request():
    """The shadow's own failures and a full queue are counted, never raised (in process: a shadow
    whose graph raises, and a queue with no room)."""
    from types import SimpleNamespace

    from service import shadow as shadows

    class Broken:
        def run(self, *_):
            raise RuntimeError("the shadow's graph fails")
    default = SimpleNamespace(tag="m:1", task="classification")
    failing = SimpleNamespace(tag="m:2", session=Broken(), outputs=["probabilities", "label"])
    worker = shadows.ShadowWorker()
    pair = shadows.Shadow(default, failing, 1.0, worker)
    out = [np.full((3, 2), 0.5, np.float32), np.zeros(3, np.int64)]
    before = {k: s._value.get() for k, s in pair.series.items()}
    for _ in range(shadows.QUEUE_REQUESTS + 1):  # the last one finds no room: dropped
        pair.offer({"features": np.zeros((3, 4), np.float32)}, out)
    shadows.ShadowWorker.score([worker.waiting.popleft()])         # the graph raises: counted
    grown = {k: s._value.get() - before[k] for k, s in pair.series.items()}
    assert grown["dropped"] == 3 and grown["errors"] == 3 and grown["requests"] == 1 and grown["rows"] == 0
