"""The Open Inference Protocol (KServe "V2", REST) on the same server as /predict, with its binary
tensor extension: what tritonclient, KServe's and Seldon's clients speak.

    GET  /v2, /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/{version}], .../ready
    POST /v2/models/{name}[/versions/{version}]/infer

{name} and {version} are a loaded model's in the BentoML store (service/registry.py); without a
version, the model's default version answers, and every answer names the version that scored it. Inputs are the graph's: one FP32
[-1, features] tensor for a table; one [-1, 1] tensor per column for a mixed table (FP32 numbers,
NaN for a gap; BYTES text); UINT8 [-1, channels, height, width] for images. Outputs: classification
`probabilities` FP32 [-1, classes], `label` INT64 [-1] (the class's index) and `prediction` BYTES
[-1] (the class as text); the model metadata's `parameters.classes` lists the classes in index
order. Regression: `prediction` FP32. The inputs go through the same checks as /predict (the JSON
rows are handed to the same parsers), the same row limit and the same drift monitor.
"""
from __future__ import annotations

import math
import re
import struct
import time

import numpy as np
import orjson

from service.inputs import BadRequest, first_bad_cell, parse_records

DTYPES = {"FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8}
ROUTE = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?")
HEADER_LENGTH = b"inference-header-content-length"
SERVER_PATHS = ("/v2", "/v2/health/live", "/v2/health/ready")


def endpoint_template(path: str) -> str | None:
    """A protocol path as its route template (the `endpoint` label of request metrics)."""
    if path in SERVER_PATHS:
        return path
    if (route := ROUTE.fullmatch(path)) is None:
        return None
    return ("/v2/models/{model}" + ("/versions/{version}" if route["version"] else "")
            + (route["action"] or ""))


class NotFound(BadRequest):
    def __init__(self, message: str):
        super().__init__(message, status=404)


class View:
    """What the protocol says of one loaded model version: its name and version, its input and
    output tensors. Made once per version (kept on its scorer)."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.name, self.version = scorer.tag.split(":", 1)
        if scorer.columns:
            self.inputs = [{"name": c["name"], "datatype": "FP32" if c["type"] == "numeric" else "BYTES",
                            "shape": [-1, 1]} for c in scorer.columns]
        else:
            self.inputs = [{"name": scorer.input, "datatype": "UINT8" if scorer.image else "FP32",
                            "shape": [-1, *scorer.shape]}]
        self.outputs = ([{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(scorer.classes)]},
                         {"name": "label", "datatype": "INT64", "shape": [-1]},
                         {"name": "prediction", "datatype": "BYTES", "shape": [-1]}]
                        if scorer.task == "classification" else
                        [{"name": "prediction", "datatype": "FP32", "shape": [-1]}])
        self.datatypes = {o["name"]: o["datatype"] for o in self.outputs}
        self.class_texts = [str(c) for c in scorer.classes or ()]  # `prediction` of classification


def view(scorer) -> View:
    if scorer.protocol is None:
        scorer.protocol = View(scorer)
    return scorer.protocol


class Protocol:
    """The protocol's paths for every model version the registry serves (service/registry.py);
    /v2/repository/... is service/repository.py's."""

    def __init__(self, registry, version: str):
        self.registry, self.server_version = registry, version

    # ---- metadata ---------------------------------------------------------------------------

    def server_metadata(self) -> dict:
        return {"name": "normserve", "version": self.server_version,
                "extensions": ["binary_tensor_data", "model_repository"]}

    def model(self, name: str, version: str | None) -> View:
        from service.registry import NotLoaded
        try:
            return view(self.registry.find(name, version))
        except NotLoaded as e:
            raise NotFound(str(e)) from None

    def model_metadata(self, v: View) -> dict:
        served = self.registry.current()
        return {"name": v.name, "versions": served.versions(v.name),
                "platform": "onnxruntime_onnx", "inputs": v.inputs, "outputs": v.outputs,
                "parameters": {"task": v.scorer.task, "classes": v.scorer.classes,
                               "default_version": served.defaults.get(v.name)}}

    def handle(self, method: str, path: str, body: bytes, header_length: bytes | None) -> tuple[int, list, bytes]:
        """(status, extra headers, body) for a request to a /v2 path."""
        try:
            if path in SERVER_PATHS:
                allow(method, "GET")
                return 200, [], orjson.dumps(self.server_metadata() if path == "/v2" else
                                             {path.rsplit("/", 1)[1]: True})
            route = ROUTE.fullmatch(path)
            if route is None:
                raise NotFound(f"no such path {path}; the protocol's paths are /v2, /v2/health/live|ready, "
                               "/v2/models/{name}[/versions/{version}][/ready|/infer] and "
                               "/v2/repository/index|models/{name}/load|unload")
            v = self.model(route["name"], route["version"])
            if route["action"] == "/infer":
                allow(method, "POST")
                return self.infer(v, body, header_length)
            allow(method, "GET")
            return 200, [], orjson.dumps({"name": v.name, "version": v.version, "ready": True}
                                         if route["action"] else self.model_metadata(v))
        except BadRequest as e:
            return e.status, [], orjson.dumps({"error": str(e)})

    # ---- inference --------------------------------------------------------------------------

    def infer(self, v: View, body: bytes, header_length: bytes | None) -> tuple[int, list, bytes]:
        """(status, extra headers, body) for POST .../infer, counted in the version's request
        metrics; raises BadRequest."""
        started, status = time.perf_counter(), 400
        try:
            head, binary = split_body(body, header_length)
            request = loads(head)
            tensors = self.read_inputs(v, request, binary)
            out = v.scorer.run(self.feeds(v, tensors))
            answer = 200, *self.write_outputs(v, request, out)
            status = 200
            return answer
        except BadRequest as e:
            status = e.status
            raise
        finally:
            v.scorer.observe(status, started)

    def read_inputs(self, v: View, request: dict, binary: bytes) -> dict:
        given = request.get("inputs")
        if not isinstance(given, list) or not all(isinstance(t, dict) for t in given):
            raise BadRequest("'inputs' must be a list of tensors ({\"name\", \"datatype\", \"shape\", \"data\"})")
        expected = {t["name"]: t for t in v.inputs}
        names = [t.get("name") for t in given]
        if not all(isinstance(n, str) for n in names):
            raise BadRequest("every input needs a 'name' (a string)")
        if unknown := [str(n) for n in names if n not in expected]:
            raise BadRequest(f"unknown input(s) {', '.join(unknown)}; the model takes "
                             f"{', '.join(expected)} (GET /v2/models/{v.name})")
        if missing := [n for n in expected if n not in names]:
            raise BadRequest(f"missing input(s) {', '.join(missing)}")
        if len(set(names)) != len(names):
            raise BadRequest("an input is given twice")
        tensors, offset, max_rows = {}, 0, v.scorer.max_rows
        for t in given:
            spec, name = expected[t["name"]], t["name"]
            if t.get("datatype") != spec["datatype"]:
                raise BadRequest(f"input {name}: datatype {t.get('datatype')!r}, expected {spec['datatype']}")
            shape = t.get("shape")
            if (not isinstance(shape, list) or len(shape) != len(spec["shape"])
                    or not all(type(d) is int and d >= 0 for d in shape) or shape[1:] != spec["shape"][1:]):
                raise BadRequest(f"input {name}: shape {shape}, expected {spec['shape']} (-1: any number of rows)")
            if not 1 <= shape[0] <= max_rows:
                raise BadRequest(f"input {name}: {shape[0]} rows; send 1 to {max_rows} "
                                 "per request (or raise MAX_ROWS)")
            count = math.prod(shape)
            size = parameters(t, f"input {name}").get("binary_data_size")
            if size is not None:
                if type(size) is not int or size < 0 or offset + size > len(binary):
                    raise BadRequest(f"input {name}: binary_data_size {size!r} overruns the "
                                     f"{len(binary)} bytes of binary data after the JSON header")
                values = from_binary(binary[offset:offset + size], spec["datatype"], count, name)
                offset += size
            else:
                values = flatten(t.get("data"), name)
                if len(values) != count:
                    raise BadRequest(f"input {name}: shape {shape} holds {count} values, data has {len(values)}")
            tensors[name] = (values, shape)
        if offset != len(binary):
            raise BadRequest(f"{len(binary) - offset} bytes of binary data that no input's binary_data_size claims")
        if len({shape[0] for _, shape in tensors.values()}) > 1:
            raise BadRequest("the inputs have different numbers of rows")
        return tensors

    def feeds(self, v: View, tensors: dict) -> dict[str, np.ndarray]:
        """The checked graph inputs, by the parsers /predict uses."""
        s = v.scorer
        if s.columns:  # records, with NaN (binary FP32) and null as gaps
            columns = [as_list(tensors[c["name"]][0]) for c in s.columns]
            return parse_records([list(row) for row in zip(*columns)], s.columns, s.max_rows)
        values, shape = tensors[s.input]
        if isinstance(values, np.ndarray):  # binary: check the array itself
            array = values.reshape(shape)
            if not s.image and (bad := first_bad_cell(array)) is not None:
                raise BadRequest(f"row {bad[0]}, feature {s.feature_names[bad[1]]!r}: expected a finite "
                                 f"number, got {array[bad]}")
            return {s.input: array}
        return s.check(nest(values, shape))  # JSON: the rows (or images) as /predict takes them

    def write_outputs(self, v: View, request: dict, out: list[np.ndarray]) -> tuple[list, bytes]:
        s = v.scorer
        if s.task == "classification":
            probabilities, labels = out
            tensors = {"probabilities": np.asarray(probabilities, np.float32),
                       "label": np.asarray(labels, np.int64), "prediction": [v.class_texts[i] for i in labels.tolist()]}
        else:
            tensors = {"prediction": np.asarray(out[0], np.float32).reshape(len(out[0]))}
        wanted = request.get("outputs")
        all_binary = bool(parameters(request, "the request").get("binary_data_output"))
        if wanted is None:
            wanted = [{"name": name} for name in tensors]
        if not isinstance(wanted, list) or not all(isinstance(w, dict) and isinstance(w.get("name"), str)
                                                   for w in wanted):
            raise BadRequest("'outputs' must be a list of {\"name\": ...}")
        if unknown := [str(w.get("name")) for w in wanted if w.get("name") not in tensors]:
            raise BadRequest(f"unknown output(s) {', '.join(unknown)}; the model gives {', '.join(tensors)}")
        answers, blobs = [], []
        for w in wanted:
            name, value = w["name"], tensors[w["name"]]
            shape = list(value.shape) if isinstance(value, np.ndarray) else [len(value)]
            entry = {"name": name, "datatype": v.datatypes[name], "shape": shape}
            if parameters(w, f"output {name}").get("binary_data", all_binary):
                blob = to_binary(value)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = value.ravel() if isinstance(value, np.ndarray) else value
            answers.append(entry)
        doc = {"model_name": v.name, "model_version": v.version, "outputs": answers}
        if "id" in request:
            doc["id"] = request["id"]
        head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        if not blobs:
            return [], head
        return [(HEADER_LENGTH, str(len(head)).encode())], head + b"".join(blobs)


# ---- the wire format ------------------------------------------------------------------------

def allow(method: str, expected: str) -> None:
    if method != expected:
        raise BadRequest(f"{method} is not allowed here; use {expected}", status=405)


def split_body(body: bytes, header_length: bytes | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length.decode(errors='replace')!r} "
                         f"is not a length within the {len(body)}-byte body")
    return body[:int(header_length)], body[int(header_length):]


def loads(head: bytes) -> dict:
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    if not isinstance(request, dict):
        raise BadRequest("the request must be a JSON object {\"inputs\": [...]}")
    if not isinstance(request.get("id", ""), str):
        raise BadRequest("'id' must be a string")
    parameters(request, "the request")
    return request


def parameters(obj: dict, what: str) -> dict:
    """An object's `parameters` (an object, if given)."""
    found = obj.get("parameters") or {}
    if not isinstance(found, dict):
        raise BadRequest(f"the parameters of {what} must be an object")
    return found


def flatten(data, name: str) -> list:
    """The data of a JSON tensor, row-major: flat or nested lists."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name}: 'data' must be a list (or binary_data_size given)")
    while data and all(isinstance(d, list) for d in data):
        data = [v for d in data for v in d]
    return data


def from_binary(raw: bytes, datatype: str, count: int, name: str):
    if datatype == "BYTES":
        values, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise BadRequest(f"input {name}: a BYTES element's length runs past its binary data")
            (n,), at = struct.unpack_from("<I", raw, at), at + 4
            if at + n > len(raw):
                raise BadRequest(f"input {name}: a BYTES element of {n} bytes runs past its binary data")
            try:
                values.append(raw[at:at + n].decode())
            except UnicodeDecodeError:
                raise BadRequest(f"input {name}: a BYTES element is not UTF-8 text") from None
            at += n
        if len(values) != count:
            raise BadRequest(f"input {name}: {len(values)} BYTES elements for a shape of {count} values")
        return values
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(f"input {name}: {len(raw)} bytes of binary data for {count} {datatype} values "
                         f"({count * dtype.itemsize} bytes)")
    return np.frombuffer(raw, dtype).astype(DTYPES[datatype])


def to_binary(value) -> bytes:
    if isinstance(value, np.ndarray):
        return value.astype(value.dtype.newbyteorder("<")).tobytes()
    return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in value))


def as_list(values) -> list:
    """A [-1, 1] column as a list, NaN (a gap in binary FP32) as null."""
    if isinstance(values, np.ndarray):
        return [None if v != v else v for v in values.tolist()]
    return list(values)


def nest(values: list, shape: list[int]):
    """Flat row-major values as nested lists of the shape."""
    for size in reversed(shape[1:]):
        values = [values[i:i + size] for i in range(0, len(values), size)]
    return values
