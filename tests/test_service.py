"""The service over HTTP: a real `bentoml serve` process on 127.0.0.1, a model trained by the tests."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import quick_config, torch_reference
from training.fit import run
from training.contract import decode_metadata

ROOT = Path(__file__).resolve().parents[1]
MAX_ROWS = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body=None, method: str | None = None, content_type="application/json"):
    """(status, parsed JSON or text) for one HTTP call."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def start_server(env_extra: dict, home: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` on a free port. Each server gets its own BENTOML_HOME (or `home`, kept
    across restarts: the record of loaded models lives there) sharing the model store: at start
    BentoML empties $BENTOML_HOME/prometheus_multiproc_dir, which would break the /metrics of a
    server already running on the same home."""
    port = free_port()
    home = Path(home or tempfile.mkdtemp(prefix="bentoml-serve-"))
    if not (home / "models").exists():
        home.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(os.environ["BENTOML_HOME"]) / "models", home / "models")
    inherited = {k: v for k, v in os.environ.items() if k not in ("MODEL_TAG", "NORMSERVE_ADMIN_TOKEN")}
    env = {**inherited, "MAX_ROWS": str(MAX_ROWS), "MAX_BODY_MB": "1", "BENTOML_HOME": str(home),
           **env_extra}
    # SERVER_LOG=<file> keeps what the servers print (for a failing test); else it is piped away
    log = open(os.environ["SERVER_LOG"], "ab") if os.environ.get("SERVER_LOG") else subprocess.PIPE
    proc = subprocess.Popen(["bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if request(url + "/readyz")[0] == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("bentoml serve did not become ready in 90 s")


SERVER_PROCESSES: dict[str, subprocess.Popen] = {}  # url -> process, for memory readings


def serving(result):
    proc, url = start_server({"MODEL_TAG": result.tag})
    SERVER_PROCESSES[url] = proc
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(classifier):
    yield from serving(classifier)


@pytest.fixture(scope="module")
def regression_server(regressor):
    yield from serving(regressor)


def test_predictions_over_http_equal_the_trained_model(server, classifier):
    X = classifier.data.split.X_test
    status, body = request(server + "/predict", {"instances": X.tolist()})
    assert status == 200
    expected = torch_reference(classifier, X)
    assert np.abs(np.array(body["probabilities"]) - expected).max() <= 1e-5
    assert body["classes"] == ["approved", "declined"]
    assert body["predictions"] == [body["classes"][i] for i in expected.argmax(1)]
    assert body["model"] == classifier.tag


def test_record_form_equals_row_form(server, classifier):
    X = classifier.data.split.X_test[:10]
    names = classifier.card["feature_names"]
    records = [dict(zip(reversed(names), reversed(row))) for row in X.tolist()]  # any key order
    assert request(server + "/predict", {"instances": records}) == \
        request(server + "/predict", {"instances": X.tolist()})


def test_one_row_alone_equals_the_row_in_a_batch(server, classifier):
    X = classifier.data.split.X_test[:8].tolist()
    batch = request(server + "/predict", {"instances": X})[1]["probabilities"]
    alone = [request(server + "/predict", {"instances": [row]})[1]["probabilities"][0] for row in X]
    assert np.abs(np.array(batch) - np.array(alone)).max() <= 1e-6


GOOD = [50_000.0, 0.001, 40.0, 5.0]
BAD_REQUESTS = [
    ({"instances": [GOOD, GOOD[:3]]}, "row 1: expected 4 values"),
    ({"instances": [{"income": 1, "ratio": 0, "age": 30, "score": 1, "height": 2}]},
     "row 0: unknown feature(s): height"),
    ({"instances": [{"income": 1, "ratio": 0, "score": 1}]}, "row 0: missing feature(s): age"),
    ({"instances": [GOOD, ["a", 0, 30, 1]]}, "row 1, feature 'income': expected a finite number, got string"),
    ({"instances": [[True, 0, 30, 1]]}, "row 0, feature 'income': expected a finite number, got boolean"),
    ({"instances": [[1, None, 30, 1]]}, "row 0, feature 'ratio': expected a finite number, got null"),
    (b'{"instances": [[1, NaN, 30, 1]]}', "row 0, feature 'ratio': expected a finite number, got NaN"),
    (b'{"instances": [[1, 0, Infinity, 1]]}', "row 0, feature 'age': expected a finite number, got infinity"),
    ({"instances": [[1, 0, 1e300, 1]]}, "outside the float32 range"),
    ({"instances": []}, "instances is empty"),
    ({"instances": [GOOD, [1.0, 3.4e38, 30, 1]]}, "row 1: the model's output overflows"),
    ({"instances": [GOOD] * (MAX_ROWS + 1)}, f"limit is {MAX_ROWS}"),
    ({"instances": "1,2,3,4"}, "instances must be a list of rows, got string '1,2,3,4'"),
    ({"rows": [GOOD]}, "an object without 'instances'"),
    ({"instances": [GOOD], "extra": 1}, "unknown field(s) in the body: extra"),
    (b'{"instances": [[1, 2', "malformed JSON"),
    (b'[[1, 2, 3, 4]]', 'the body must be a JSON object {"instances": [...]}'),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_naming_the_problem(server, body, message):
    status, answer = request(server + "/predict", body)
    assert 400 <= status < 500
    assert isinstance(answer, dict) and message in answer["error"]
    assert request(server + "/predict", {"instances": [GOOD]})[0] == 200  # nothing spills over


def test_bad_requests_do_not_disturb_concurrent_good_ones(server):
    bodies = [{"instances": [GOOD]}, {"instances": [[None] * 4]}] * 40
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda b: request(server + "/predict", b)[0], bodies))
    assert statuses == [200, 400] * 40


def test_metadata_comes_from_the_onnx_file(server, classifier):
    status, meta = request(server + "/metadata")
    assert status == 200
    onnx_meta = decode_metadata(ort.InferenceSession(str(classifier.model_dir / "model.onnx"))
                                .get_modelmeta().custom_metadata_map)
    for key in ("model", "task", "feature_names", "classes", "normalization", "metrics"):
        assert meta[key] == onnx_meta[key], key
    assert meta["max_rows"] == MAX_ROWS


def test_bentoml_routes_keep_working(server):
    assert request(server + "/livez")[0] == 200
    assert request(server + "/readyz")[0] == 200
    status, metrics = request(server + "/metrics")
    assert status == 200 and "bentoml_service_request_total" in metrics
    status, spec = request(server + "/docs.json")
    assert status == 200 and "/predict" in spec["paths"]


def test_regression_answers_in_target_units(regression_server, regressor):
    X = regressor.data.split.X_test
    status, body = request(regression_server + "/predict", {"instances": X.tolist()})
    assert status == 200 and set(body) == {"predictions", "model"}
    np.testing.assert_allclose(body["predictions"], torch_reference(regressor, X), rtol=1e-5, atol=1e-3)


def test_serve_without_a_model_stops_with_one_line(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path)}
    env.pop("MODEL_TAG", None)
    proc = subprocess.run(["bentoml", "serve", "--port", str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "error: no trained model in the BentoML model store; run `python -m training.fit` first" \
        in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_serves_the_newest_model_without_model_tag(tmp_path, csv_path):
    newest = run(quick_config(tmp_path, data=str(csv_path), target="label", epochs=1))
    code = "import service.service as s; print(s.MODEL_TAG)"
    env = {k: v for k, v in os.environ.items() if k != "MODEL_TAG"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == newest.tag


def test_the_api_method_answers_in_process_as_the_http_route_does(server, classifier):
    """Over HTTP the fast path answers POST /predict; the @bentoml.api method serves in-process
    callers (bentoml.depends, tests) with the same scorer: the same answers and the same errors."""
    good, bad = classifier.data.split.X_test[:3].tolist(), [[1.0, 2.0]]
    code = ("import asyncio, json, service.service as s\n"
            "p = s.Predictor()\n"
            f"for rows in ({good!r}, {bad!r}):\n"
            "    r = asyncio.run(p.predict(instances=rows))\n"
            "    print(json.dumps([r.status_code, json.loads(r.body)]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "MODEL_TAG": classifier.tag})
    assert out.returncode == 0, out.stderr
    in_process = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    over_http = [list(request(server + "/predict", {"instances": rows})) for rows in (good, bad)]
    assert in_process == over_http
    assert over_http[0][0] == 200 and over_http[1][0] == 400


def test_an_unsupported_bentoml_version_stops_start_up_in_one_line(classifier):
    code = "import bentoml; bentoml.__version__ = '1.5.2'; import service.service"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "MODEL_TAG": classifier.tag})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: BentoML 1.5.2 is installed, but service/bentoml_patches.py was written for "
        "1.4 <= version < 1.5; install bentoml>=1.4,<1.5 (pyproject.toml)"]


def test_bentoml_build_packages_the_model_and_serves_it(classifier, tmp_path, csv_path):
    env = {**os.environ, "MODEL_TAG": classifier.tag}
    build = subprocess.run(["bentoml", "build", "--output", "tag"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    bento_tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = subprocess.run(["bentoml", "get", bento_tag, "-o", "json"], env=env,
                          capture_output=True, text=True, timeout=120)
    (service,) = json.loads(info.stdout)["services"]
    assert [m["tag"] for m in service["models"]] == [classifier.tag]
    # A newer model in the store does not change what the Bento serves.
    run(quick_config(tmp_path, data=str(csv_path), target="label", epochs=1))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MODEL_TAG"}
    proc = subprocess.Popen(["bentoml", "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 90
        while time.time() < deadline:
            try:
                if request(url + "/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.25)
        assert request(url + "/metadata")[1]["model"] == classifier.tag
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_image_upload_to_a_table_model_is_refused(server):
    boundary = "b"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
            f"PNG\r\n--{boundary}--\r\n").encode()
    status, answer = request(server + "/predict_image", body,
                             content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 400 and "this model takes table rows, not images" in answer["error"]


def npy_bytes(array) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_npy_bulk_path_equals_json(server, classifier):
    X = classifier.data.split.X_test
    status, body = request(server + "/predict", npy_bytes(X), content_type="application/x-npy")
    assert status == 200
    assert body == request(server + "/predict", {"instances": X.tolist()})[1]


@pytest.mark.parametrize("payload, message", [
    (npy_bytes(np.ones((3, 5))), "expected an array of shape [rows, 4], got [3, 5]"),
    (npy_bytes(np.array([[1.0, np.inf, 0, 0]])), "row 0, column 1: expected a finite number"),
    (npy_bytes(np.array([["a"] * 4])), "expected a float or integer array"),
    (b"1,2,3,4", "not a .npy array"),
])
def test_bad_npy_gets_a_4xx(server, payload, message):
    status, answer = request(server + "/predict", payload, content_type="application/x-npy")
    assert status == 400 and message in answer["error"]


def test_metrics_count_predictions(server):
    """BentoML's request metrics, as the service records them for its fast routes: the count and
    duration per status code, the requests in progress, the time of the last request."""
    def series() -> dict[str, float]:
        text = request(server + "/metrics")[1]
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("bentoml_service_") and ('endpoint="/predict"' in line
                                                            or "last_request" in line)}

    def total(found: dict, name: str, code: str | None = None) -> float:
        return sum(v for k, v in found.items() if k.startswith(name + "{")
                   and (code is None or f'http_response_code="{code}"' in k))

    before, started = series(), time.time()
    for _ in range(5):
        request(server + "/predict", {"instances": [GOOD]})
    assert request(server + "/predict", {"instances": 3})[0] == 400
    after = series()
    for code, n in (("200", 5), ("400", 1)):
        assert total(after, "bentoml_service_request_total", code) - \
            total(before, "bentoml_service_request_total", code) == n
        assert total(after, "bentoml_service_request_duration_seconds_count", code) - \
            total(before, "bentoml_service_request_duration_seconds_count", code) == n
    assert total(after, "bentoml_service_request_duration_seconds_sum", "200") > \
        total(before, "bentoml_service_request_duration_seconds_sum", "200")
    assert total(after, "bentoml_service_request_in_progress") == 0
    assert max(v for k, v in after.items() if "last_request" in k) >= started - 1


def raw_post(url: str, body, content_type: str, chunked: bool = False) -> tuple[int, bytes]:
    """A POST through http.client, which can send a chunked body of unknown length."""
    import http.client
    from urllib.parse import urlparse
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    if chunked:
        chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
        conn.request("POST", u.path, body=chunks, headers={"Content-Type": content_type},
                     encode_chunked=True)
    else:
        conn.request("POST", u.path, body=body, headers={"Content-Type": content_type})
    response = conn.getresponse()
    return response.status, response.read()


HOSTILE = [
    ("deep nesting", b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json",
     False, 400, "nested too deeply"),
    ("long string", json.dumps({"instances": [["x" * 200_000] * 4]}).encode(), "application/json",
     False, 400, "expected a finite number, got string"),
    ("huge integer", b'{"instances": [[1' + b"0" * 400 + b', 0, 30, 1]]}', "application/json",
     False, 400, "outside the float32 range"),
    ("xml", b"<instances/>", "application/xml", False, 400, "unsupported Content-Type 'application/xml'"),
    ("form", b"instances=1", "application/x-www-form-urlencoded", False, 400, "unsupported Content-Type"),
    ("multipart without boundary", b"x", "multipart/form-data", False, 400, "unsupported Content-Type"),
    ("oversized", b'{"instances": [' + b"[1.0, 2.0, 3.0, 4.0]," * 60_000 + b"[1]]}",
     "application/json", False, 413, "over 1 MB"),
    ("oversized, chunked", b'{"instances": [' + b"[1.0, 2.0, 3.0, 4.0]," * 60_000 + b"[1]]}",
     "application/json", True, 413, "over 1 MB"),
    ("oversized upload", b"--b\r\n" + b"0" * 2_000_000, "multipart/form-data; boundary=b", False,
     413, "over 1 MB"),
]


@pytest.mark.parametrize("name, body, content_type, chunked, status, message", HOSTILE,
                         ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_4xx_and_the_server_keeps_answering(server, name, body, content_type,
                                                                 chunked, status, message):
    path = "/predict_image" if "upload" in name else "/predict"
    got, answer = raw_post(server + path, body, content_type, chunked)
    assert got == status and message in answer.decode(errors="replace")
    assert request(server + "/predict", {"instances": [GOOD]})[0] == 200


def damaged_copy(result, name: str, damage) -> str:
    """A copy of a trained model in the store, with `damage(folder)` applied to its files."""
    import shutil

    import bentoml
    with bentoml.models.create(f"{name}:v1", labels={"pipeline": "normserve"}) as ref:
        for f in result.model_dir.iterdir():
            shutil.copy2(f, Path(ref.path) / f.name)
        damage(Path(ref.path))
    return f"{name}:v1"


def truncate(folder: Path):
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])


def alter_one_byte(folder: Path):
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))


def strip_metadata(folder: Path):
    import hashlib

    import onnx
    proto = onnx.load(folder / "model.onnx")
    del proto.metadata_props[:]
    onnx.save(proto, folder / "model.onnx")
    card = json.loads((folder / "card.json").read_text())
    card["onnx_sha256"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    (folder / "card.json").write_text(json.dumps(card))


def widen_card(folder: Path):
    card = json.loads((folder / "card.json").read_text())
    card["feature_names"].append("extra")
    (folder / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize("damage, message", [
    (truncate, "model.onnx does not match its card (sha256"),
    (alter_one_byte, "model.onnx does not match its card (sha256"),
    (strip_metadata, "model.onnx lacks metadata schema_version"),
    (widen_card, "model.onnx does not fit its card: graph inputs {'features': [4]} but the card "
                 "describes {'features': [5]}"),
], ids=["truncated", "altered", "no metadata", "width differs"])
def test_damaged_model_refuses_to_start_with_one_line(classifier, damage, message):
    tag = damaged_copy(classifier, f"damaged-{damage.__name__.replace('_', '-')}", damage)
    proc = subprocess.run(["bentoml", "serve", "--port", str(free_port())], cwd=ROOT,
                          env={**os.environ, "MODEL_TAG": tag}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tag}: ") and message in lines[0], proc.stderr


def test_openapi_fuzz_finds_no_server_error_and_no_schema_violation(server):
    """schemathesis generates requests from the service's own OpenAPI spec (valid and invalid);
    every answer must be documented, conform to its schema, and not be a 5xx."""
    import shutil
    st = shutil.which("st") or shutil.which("schemathesis")
    proc = subprocess.run(
        [st, "run", server + "/docs.json", "--max-examples", "500", "--seed", "7",
         "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
                     "content_type_conformance"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    import re
    generated = re.search(r"(\d+) generated", proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert generated and int(generated.group(1)) >= 1000, proc.stdout[-1000:]
    assert request(server + "/predict", {"instances": [GOOD]})[0] == 200


def test_bentoml_python_client_sends_rows_and_records(server, classifier):
    import bentoml
    X = classifier.data.split.X_test[:5].tolist()
    names = classifier.card["feature_names"]
    with bentoml.SyncHTTPClient(server) as client:
        rows = client.predict(instances=X)
        records = client.predict(instances=[dict(zip(names, r)) for r in X])
    assert rows == records == request(server + "/predict", {"instances": X})[1]


def test_short_soak_has_no_errors_and_flat_memory(server):
    """The CI-sized soak: 5,000 requests from 32 concurrent clients (the 100,000-request soak is
    `python -m benchmarks.serve_load --soak 100000`, figures in docs/benchmarks.md)."""
    import asyncio

    from benchmarks.serve_load import load, tree_rss_mb
    body = json.dumps({"instances": [GOOD]}).encode()
    asyncio.run(load(server, body, 32, requests=2000))  # warm-up: allocator and caches settle
    before = tree_rss_mb(SERVER_PROCESSES[server])
    result = asyncio.run(load(server, body, 32, requests=5000))
    grown = tree_rss_mb(SERVER_PROCESSES[server]) - before
    assert result["requests"] == 5000 and result["errors"] == 0
    assert grown < 5, f"server memory grew {grown:.1f} MB over 5,000 requests"
