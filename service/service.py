"""BentoML service: scores raw inputs with the exported ONNX graph, which carries its own normalization.

The service does no arithmetic on the inputs: it checks them (table rows, or uint8 images read by
the same code training used), hands them to onnxruntime, and maps class indices to the training
data's labels. `bentoml serve` (from the repository root) serves the model trained last;
MODEL_TAG=<name>:<version> picks another.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
import orjson
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.inputs import BadRequest, parse_images, parse_instances, parse_npy, parse_records
from service.middleware import BodyLimit, FastPredict, UploadGuard, cancel_request_timers
from service import monitor
from service.schema import example, instances_type
from training.contract import (MODALITY_METADATA, OUTPUTS, PIPELINE_LABEL, REQUIRED_METADATA,
                               decode_metadata)
from training.images import ImageError, read_image

MAX_ROWS = int(os.environ.get("MAX_ROWS", "10000"))
MAX_BODY_MB = float(os.environ.get("MAX_BODY_MB", "64"))
WORKERS = int(os.environ.get("WORKERS", "1"))


def fail(message: str):
    """Stop start-up with one line (an exception here would make BentoML restart workers forever)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def packaged_model() -> str | None:
    """In a built Bento (<bento>/src/service/service.py), the model it was built with."""
    bento_yaml = Path(__file__).resolve().parents[2] / "bento.yaml"
    if not bento_yaml.is_file():
        return None
    import yaml
    info = yaml.safe_load(bento_yaml.read_text())
    models = [m["tag"] for svc in info.get("services", []) for m in svc.get("models", [])]
    return models[0] if models else None


def resolve_model_tag() -> str:
    """MODEL_TAG if set; else, in a built Bento, its own model; else the newest model that
    `python -m training.fit` saved in the store."""
    if tag := os.environ.get("MODEL_TAG") or packaged_model():
        try:
            return str(bentoml.models.get(tag).tag)
        except bentoml.exceptions.NotFound:
            fail(f"MODEL_TAG={tag} is not in the BentoML model store; `bentoml models list` shows "
                 "what is there")
    ours = [m for m in bentoml.models.list() if m.info.labels.get("pipeline") == PIPELINE_LABEL]
    if not ours:
        fail("no trained model in the BentoML model store; run `python -m training.fit` first")
    return str(max(ours, key=lambda m: m.info.creation_time).tag)


def check_card(path: Path) -> dict:
    """The model's card, and proof that model.onnx is the file the card describes."""
    card_path = path.with_name("card.json")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as e:
        fail(f"{MODEL_TAG}: cannot read {card_path}: {e}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "(no file)"
    if digest != card.get("onnx_sha256"):
        fail(f"{MODEL_TAG}: model.onnx does not match its card (sha256 {digest[:12]}..., card says "
             f"{str(card.get('onnx_sha256'))[:12]}...): the file is damaged or was altered")
    return card


def inputs_match_card(session, card: dict) -> str | None:
    """What differs between the graph's inputs and the card, if anything."""
    got = {i.name: i.shape[1:] for i in session.get_inputs()}
    if card.get("columns"):
        expected = {c["name"]: [1] for c in card["columns"]}
    elif card.get("image"):
        im = card["image"]
        expected = {card["input"]: [im["channels"], im["height"], im["width"]]}
    else:
        expected = {card["input"]: [len(card["feature_names"])]}
    return None if got == expected else f"graph inputs {got} but the card describes {expected}"


def open_model(path: str, threads: int = 1):
    """An onnxruntime session and the model's metadata, or a one-line exit saying what is wrong."""
    import onnxruntime as ort
    card = check_card(Path(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        meta = decode_metadata(session.get_modelmeta().custom_metadata_map)
    except Exception as e:
        fail(f"{MODEL_TAG}: cannot load {path}: {str(e).strip().splitlines()[0]}")
    required = REQUIRED_METADATA + MODALITY_METADATA.get(meta.get("modality"), ())
    if missing := [k for k in required if k not in meta]:
        fail(f"{MODEL_TAG}: model.onnx lacks metadata {', '.join(missing)}; "
             "was it exported by `python -m training.fit`?")
    if meta["task"] not in OUTPUTS or meta["modality"] not in MODALITY_METADATA:
        fail(f"{MODEL_TAG}: unknown task or modality in the model metadata")
    if problem := inputs_match_card(session, card):
        fail(f"{MODEL_TAG}: model.onnx does not fit its card: {problem}")
    return session, meta


cancel_request_timers()
MODEL_TAG = resolve_model_tag()
# BentoML sets no thread limits: workers each using every core would fight each other. Count the
# cores this process may run on (taskset, cgroups), not the machine's.
THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
# Opened and checked once per process, at import: in the process `bentoml serve` starts from, an
# exit here stops the server with the reason (a worker that fails would be restarted forever);
# in a worker, this is the session the service uses.
MODEL_SESSION, MODEL_META = open_model(bentoml.models.get(MODEL_TAG).path_of("model.onnx"), THREADS)
Instances = instances_type(MODEL_META, MAX_ROWS)  # documents this model's requests in the spec


class Prediction(BaseModel):
    """The response of /predict (probabilities and classes for classification only)."""
    predictions: list[Any] = Field(description="class labels, or values in the target's units")
    probabilities: list[list[float]] | None = Field(None, description="per row, one per class")
    classes: list[Any] | None = Field(None, description="the order of each probabilities row")
    model: str = Field(description="<name>:<version> of the model that answered")


async def metadata_route(request: Request) -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().metadata)


async def drift_route(request: Request) -> Response:
    """Live inputs vs. the training profile, per feature, since start and over the recent window."""
    watcher = bentoml.get_current_service().monitor
    if watcher is None:
        return JSONResponse({"enabled": False, "reason": "DRIFT=0" if not monitor.ENABLED else
                             "this model carries no drift profile (trained before it was recorded)"})
    report = watcher.report()
    watcher.set_gauges(report)
    return Response(orjson.dumps({"model": MODEL_TAG, **report}), media_type="application/json")


@bentoml.asgi_app(Starlette(routes=[Route("/metadata", metadata_route, methods=["GET"]),
                                    Route("/drift", drift_route, methods=["GET"])]), path="/")
@bentoml.service(
    name="normserve", workers=WORKERS, labels={"pipeline": PIPELINE_LABEL},
    traffic={"timeout": 30},
    # One log line per request costs more than scoring a row; errors are still logged.
    logging={"access": {"enabled": os.environ.get("ACCESS_LOG") == "1"}},
    # Spans are recorded even with no exporter configured; TRACING=1 keeps them.
    tracing={"excluded_urls": None if os.environ.get("TRACING") == "1" else ".*"},
)
class Predictor:
    model = bentoml.models.BentoModel(MODEL_TAG)  # a class attribute, so `bentoml build` packages it

    def __init__(self) -> None:
        self.session, meta = MODEL_SESSION, MODEL_META
        self.task, self.feature_names = meta["task"], meta["feature_names"]
        self.classes, self.input, self.image = meta["classes"], meta["input"], meta.get("image")
        self.columns = meta.get("columns")  # mixed tables: one graph input per column
        self.outputs = OUTPUTS[self.task]
        self.metadata = {k: meta.get(k) for k in (
            "model", "task", "modality", "input", "outputs", "feature_names", "columns", "image",
            "classes", "normalization", "target_normalization", "metrics", "versions",
            "created_at", "schema_version")}
        self.metadata["max_rows"] = MAX_ROWS
        self.monitor = (monitor.Monitor(meta) if monitor.ENABLED and meta.get("drift")
                        else None)
        if self.image:
            self.shape = (self.image["channels"], self.image["height"], self.image["width"])
            example = {self.input: np.zeros((1, *self.shape), np.uint8)}
        elif self.columns:
            example = parse_records([[None] * len(self.columns)], self.columns, 1)
        else:
            example = {self.input: np.zeros((1, len(self.feature_names)), np.float32)}
        # Warm-up: the first run allocates; /readyz turns ready only after __init__ returns.
        self.session.run(self.outputs, example)

    def score(self, feeds: dict[str, np.ndarray]) -> bytes:
        """Run the graph on checked raw inputs; the answer as JSON bytes."""
        out = self.session.run(self.outputs, feeds)
        finite = np.isfinite(out[0].reshape(len(out[0]), -1)).all(axis=1)
        if not finite.all():  # float32 overflow inside the graph: never answer NaN as null
            rows = np.flatnonzero(~finite)
            raise BadRequest(f"row {rows[0]}: the model's output overflows for these values (far "
                             f"outside the training data?); {len(rows)} row(s) affected")
        if self.monitor is not None:  # only answered inputs are counted
            self.monitor.observe(feeds)
        if self.task == "classification":
            probabilities, labels = out
            body = {"predictions": [self.classes[i] for i in labels.tolist()],
                    "probabilities": probabilities, "classes": self.classes, "model": MODEL_TAG}
        else:
            body = {"predictions": out[0], "model": MODEL_TAG}
        # orjson writes numpy arrays directly (float32 in its shortest exact form).
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    def check(self, instances) -> dict[str, np.ndarray]:
        """The `instances` of a JSON request as the graph's inputs."""
        if self.image:
            return {self.input: parse_images(instances, self.shape, MAX_ROWS)}
        if self.columns:
            return parse_records(instances, self.columns, MAX_ROWS)
        return {self.input: parse_instances(instances, self.feature_names, MAX_ROWS)}

    def check_npy(self, body: bytes) -> dict[str, np.ndarray]:
        if self.columns:
            raise BadRequest("this model takes records with text columns: send JSON")
        shape = self.shape if self.image else (len(self.feature_names),)
        return {self.input: parse_npy(body, shape, MAX_ROWS, image=bool(self.image))}

    def answer(self, inputs) -> tuple[int, bytes]:
        """(HTTP status, JSON body) for a /predict request; `inputs()` returns the checked graph
        inputs or raises BadRequest. One code path for the API below and its fast path in
        service/middleware.py."""
        try:
            return 200, self.score(inputs())
        except BadRequest as e:
            return e.status, orjson.dumps({"error": str(e)})

    @bentoml.api(route="/predict")
    async def predict(
        self,
        instances: Annotated[Instances, Field(
            description="table models: rows of raw feature values in training order, or records "
                        "keyed by feature name (GET /metadata lists the names); mixed tables: "
                        "records with numbers, text and null; image models: images as "
                        "[channels][height][width] lists of integers 0..255",
            examples=[example(MODEL_META)])],
    ) -> Prediction:
        # JSON bodies are answered by FastPredict before they get here; this serves the other
        # content types BentoML accepts, and documents the endpoint in the OpenAPI spec.
        status, body = self.answer(lambda: self.check(instances))
        # A Response skips BentoML's per-call re-validation of the declared output model.
        return Response(body, status_code=status, media_type="application/json")

    @bentoml.api(route="/predict_image")
    async def predict_image(
        self, image: Annotated[Path, Field(description="a PNG or JPEG file (multipart field 'image')")],
    ) -> Prediction:
        try:
            if not self.image:
                raise BadRequest("this model takes table rows, not images: POST them to /predict")
            c, h, w = self.shape
            pixels = read_image(image.read_bytes(), c, (h, w) if self.image["resize"] else None)
            if pixels.shape != self.shape:
                raise BadRequest(f"the image is {pixels.shape[2]}x{pixels.shape[1]} pixels; this model "
                                 f"takes {w}x{h} (it was trained without --image-size, so uploads "
                                 "are not resized)")
            body = self.score({self.input: pixels[None]})
        except (BadRequest, ImageError) as e:
            return JSONResponse({"error": str(e)}, status_code=getattr(e, "status", 400))
        return Response(body, media_type="application/json")


Predictor.add_asgi_middleware(BodyLimit, max_bytes=int(MAX_BODY_MB * 2 ** 20))
Predictor.add_asgi_middleware(UploadGuard)
Predictor.add_asgi_middleware(FastPredict)
