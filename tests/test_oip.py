"""The Open Inference Protocol (KServe V2 REST, with the binary tensor extension) on a real
`bentoml serve`, called by tritonclient (a client nobody here wrote) and by hand-made bodies:
answers equal /predict's, bad requests get a 4xx naming the problem."""
import json
import re
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton

from test_images import folder, image_model, image_server  # noqa: F401  (fixtures)
from test_mixed import mixed_csv, mixed_model, mixed_server, odd_rows, records  # noqa: F401
from test_service import MAX_ROWS, regression_server, request, server  # noqa: F401


def client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"))


def infer_path(result) -> str:
    name, version = result.tag.split(":")
    return f"/v2/models/{name}/versions/{version}/infer"


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/octet-stream", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def infer(url: str, name: str, inputs: dict[str, tuple[np.ndarray, str]], binary: bool, outputs=None):
    """tritonclient's infer with numpy inputs {name: (array, datatype)}."""
    tensors = []
    for input_name, (array, datatype) in inputs.items():
        t = triton.InferInput(input_name, list(array.shape), datatype)
        t.set_data_from_numpy(array, binary_data=binary)
        tensors.append(t)
    wanted = [triton.InferRequestedOutput(o, binary_data=binary) for o in outputs] if outputs else None
    return client(url).infer(name, tensors, outputs=wanted, request_id="req-7")


def test_health_and_metadata(server, classifier):
    name, version = classifier.tag.split(":")
    c = client(server)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(name) and c.is_model_ready(name, version) and not c.is_model_ready("other")
    assert c.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_repository"]
    meta = c.get_model_metadata(name, version)
    features = request(server + "/metadata")[1]["feature_names"]
    assert meta["versions"] == [version]
    assert meta["inputs"] == [{"name": classifier.card["input"], "datatype": "FP32", "shape": [-1, len(features)]}]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
        ("probabilities", "FP32"), ("label", "INT64"), ("prediction", "BYTES")]
    assert meta["parameters"]["classes"] == request(server + "/metadata")[1]["classes"]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_on_a_table_equals_predict(server, classifier, binary):
    X = classifier.data.split.X_test[:20].astype(np.float32)
    name = classifier.tag.split(":")[0]
    answer = infer(server, name, {classifier.card["input"]: (X, "FP32")}, binary,
                   outputs=["probabilities", "label", "prediction"])
    expected = request(server + "/predict", {"instances": X.tolist()})[1]
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6)
    classes = expected["classes"]
    assert [classes[i] for i in answer.as_numpy("label")] == expected["predictions"]
    assert [v.decode() if isinstance(v, bytes) else v for v in answer.as_numpy("prediction")] == \
        [str(p) for p in expected["predictions"]]
    assert answer.get_response()["id"] == "req-7"


def test_regression_and_the_outputs_asked_for(regression_server, regressor):
    X = regressor.data.split.X_test[:7].astype(np.float32)
    answer = infer(regression_server, regressor.tag.split(":")[0], {regressor.card["input"]: (X, "FP32")}, True)
    expected = request(regression_server + "/predict", {"instances": X.tolist()})[1]["predictions"]
    np.testing.assert_allclose(answer.as_numpy("prediction"), np.ravel(expected), rtol=1e-6)


def test_only_the_outputs_asked_for(server, classifier):
    body = {"id": "5", "inputs": [{"name": classifier.card["input"], "datatype": "FP32",
                                 "shape": [1, classifier.data.split.X_test.shape[1]],
                                 "data": classifier.data.split.X_test[0].tolist()}],
            "outputs": [{"name": "label"}]}
    status, answer = post(server + infer_path(classifier), json.dumps(body).encode())
    assert status == 200 and answer["id"] == "5"
    assert [o["name"] for o in answer["outputs"]] == ["label"] and answer["outputs"][0]["shape"] == [1]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_on_a_mixed_table_with_text_and_gaps(mixed_server, mixed_model, binary):
    frame = odd_rows(mixed_model)  # a missing number, a missing category, unseen ones
    if not binary:  # JSON has no NaN (a gap is null there, below): the rows without the missing number
        frame = frame[frame.notna().all(axis=1)]
    columns = request(mixed_server + "/metadata")[1]["columns"]
    inputs = {}
    for c in columns:
        values = frame[c["name"]]
        inputs[c["name"]] = ((values.to_numpy(np.float32), "FP32") if c["type"] == "numeric" else
                             (values.astype(str).to_numpy(object), "BYTES"))
        inputs[c["name"]] = (inputs[c["name"]][0].reshape(-1, 1), inputs[c["name"]][1])
    answer = infer(mixed_server, mixed_model.tag.split(":")[0], inputs, binary)
    expected = request(mixed_server + "/predict", {"instances": records(frame)})[1]
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6)


def test_mixed_table_json_with_null_gaps(mixed_server, mixed_model):
    frame = odd_rows(mixed_model)
    rows = records(frame)  # gaps as null: a missing number, a missing category ("" in BYTES too)
    types = {c["name"]: c["type"] for c in request(mixed_server + "/metadata")[1]["columns"]}
    inputs = [{"name": c, "datatype": "FP32" if kind == "numeric" else "BYTES", "shape": [len(rows), 1],
               "data": [r[c] if r[c] is not None or kind == "numeric" else "" for r in rows]}
              for c, kind in types.items()]
    status, answer = post(mixed_server + infer_path(mixed_model), json.dumps({"inputs": inputs}).encode())
    assert status == 200, answer
    expected = request(mixed_server + "/predict", {"instances": rows})[1]
    np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (len(rows), -1)),
                               expected["probabilities"], rtol=1e-6)


def test_tritonclient_on_an_image_model(image_server, image_model):
    images = np.random.default_rng(3).integers(0, 256, (4, 3, 12, 12), dtype=np.uint8)
    answer = infer(image_server, image_model.tag.split(":")[0], {image_model.card["input"]: (images, "UINT8")}, True)
    expected = request(image_server + "/predict", {"instances": images.tolist()})[1]
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6)


def binary_body(header: dict, payload: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + payload, {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize("case, message", [
    ("datatype", "datatype 'FP64', expected FP32"),
    ("count", "holds 8 values, data has 7"),  # 2 rows x 4 features
    ("unknown", "unknown input(s) nope"),
    ("overrun", "overruns the"),
    ("header", "Inference-Header-Content-Length '99999' is not a length within"),
    ("short", "28 bytes of binary data for 8 FP32 values (32 bytes)"),
    ("rows", f"{MAX_ROWS + 1} rows; send 1 to {MAX_ROWS}"),
    ("nan", "expected a finite number, got nan"),
    ("output", "unknown output(s) colour"),
    ("json", "malformed JSON"),
])
def test_bad_protocol_requests_get_a_400_naming_the_problem(server, classifier, case, message):
    name, width = classifier.card["input"], classifier.data.split.X_test.shape[1]
    X = classifier.data.split.X_test[:2].astype(np.float32)
    tensor = {"name": name, "datatype": "FP32", "shape": [2, width], "data": X.ravel().tolist()}
    binary = {**tensor, "parameters": {"binary_data_size": X.nbytes}}
    del binary["data"]
    headers = {}
    if case == "datatype":
        body = json.dumps({"inputs": [{**tensor, "datatype": "FP64"}]}).encode()
    elif case == "count":
        body = json.dumps({"inputs": [{**tensor, "data": tensor["data"][:-1]}]}).encode()
    elif case == "unknown":
        body = json.dumps({"inputs": [tensor, {**tensor, "name": "nope"}]}).encode()
    elif case == "overrun":
        body, headers = binary_body({"inputs": [{**binary, "parameters": {"binary_data_size": X.nbytes * 10}}]},
                                    X.tobytes())
    elif case == "header":
        body, _ = binary_body({"inputs": [binary]}, X.tobytes())
        headers = {"Inference-Header-Content-Length": "99999"}
    elif case == "short":
        body, headers = binary_body({"inputs": [{**binary, "parameters": {"binary_data_size": X.nbytes - 4}}]},
                                    X.tobytes()[:-4])
    elif case == "rows":
        big = np.zeros((MAX_ROWS + 1, width), np.float32)
        body = json.dumps({"inputs": [{**tensor, "shape": list(big.shape), "data": big.ravel().tolist()}]}).encode()
    elif case == "nan":
        X[1, 0] = np.nan
        body, headers = binary_body({"inputs": [binary]}, X.tobytes())
    elif case == "output":
        body = json.dumps({"inputs": [tensor], "outputs": [{"name": "colour"}]}).encode()
    else:
        body = b'{"inputs": ['
    status, answer = post(server + infer_path(classifier), body, headers)
    assert status == 400 and message in answer["error"], answer


def test_wrong_model_path_and_method(server, classifier):
    name, version = classifier.tag.split(":")
    assert post(server + "/v2/models/other/infer", b"{}")[0] == 404
    assert post(server + f"/v2/models/{name}/versions/0/infer", b"{}")[0] == 404
    assert request(server + f"/v2/models/{name}/infer")[0] == 405
    assert request(server + "/v2/repository/index")[0] == 405  # POST only
    assert request(server + "/v2/repository/other")[0] == 404


def test_bytes_elements_that_overrun_are_refused(mixed_server, mixed_model):
    columns = request(mixed_server + "/metadata")[1]["columns"]
    text = next(c["name"] for c in columns if c["type"] == "categorical")
    inputs, payload = [], b""
    for c in columns:
        raw = (struct.pack("<I", 50) + b"x" if c["name"] == text else
               b"\0\0\0\0" if c["type"] == "numeric" else struct.pack("<I", 1) + b"a")
        inputs.append({"name": c["name"], "datatype": "BYTES" if c["type"] == "categorical" else "FP32",
                       "shape": [1, 1], "parameters": {"binary_data_size": len(raw)}})
        payload += raw
    status, answer = post(mixed_server + infer_path(mixed_model), *binary_body({"inputs": inputs}, payload))
    assert status == 400 and f"input {text}: a BYTES element of 50 bytes runs past" in answer["error"]


def test_protocol_rows_are_counted_by_the_drift_monitor(server, classifier):
    before = request(server + "/drift")[1]["answered_rows"]
    X = classifier.data.split.X_test[:9].astype(np.float32)
    infer(server, classifier.tag.split(":")[0], {classifier.card["input"]: (X, "FP32")}, True)
    assert request(server + "/drift")[1]["answered_rows"] == before + 9


def test_schemathesis_over_the_protocol_finds_no_server_error(server, classifier, tmp_path):
    """schemathesis generates requests (valid and invalid) from the protocol's OpenAPI document
    as this server serves it (docs/oip-openapi.yaml), here with this model's name and version so
    that the bodies reach inference: no 5xx, only documented codes and bodies."""
    import os
    import shutil
    import subprocess

    import yaml
    from test_service import ROOT
    spec = yaml.safe_load((ROOT / "docs" / "oip-openapi.yaml").read_text())
    name, version = classifier.tag.split(":")
    for param, value in (("model_name", name), ("model_version", version)):
        spec["components"]["parameters"][param]["schema"] = {"type": "string", "enum": [value]}
    (tmp_path / "oip.json").write_text(json.dumps(spec))
    st = shutil.which("st") or shutil.which("schemathesis")
    proc = subprocess.run(
        [st, "run", str(tmp_path / "oip.json"), "--url", server, "--max-examples", "75",
         "--seed", "7", "--checks", "not_a_server_error,response_schema_conformance,"
                                    "status_code_conformance,content_type_conformance"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    generated = re.search(r"(\d+) generated", proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert generated and int(generated.group(1)) >= 800, proc.stdout[-1000:]


def test_request_metrics_are_labelled_by_route_not_by_path(server, classifier):
    """A client's made-up paths must not become new Prometheus series: BentoML labelled each
    request with its raw path (unbounded); now with the route, the protocol's template, or other."""
    name = classifier.tag.split(":")[0]
    for made_up in ("alpha-1", "beta-2"):
        assert request(server + f"/v2/models/{made_up}")[0] == 404
        assert request(server + f"/{made_up}")[0] == 404
    assert request(server + f"/v2/models/{name}/ready")[0] == 200
    metrics = request(server + "/metrics")[1]
    endpoints = set(re.findall(r'bentoml_service_request_total\{endpoint="([^"]*)"', metrics))
    assert not any("alpha" in e or "beta" in e or name in e for e in endpoints), endpoints
    assert {"/v2/models/{model}", "/v2/models/{model}/ready", "other"} <= endpoints
