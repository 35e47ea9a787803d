"""BentoML service: scores raw inputs with the exported ONNX graph, which carries its own normalization.

The service does no arithmetic on the inputs: it checks them (table rows, or uint8 images read by
the same code training used), hands them to onnxruntime, and maps class indices to the training
data's labels (service/scoring.py). `bentoml serve` (from the repository root) serves the model
trained last; MODEL_TAG=<name>:<version> picks another.

How a request is answered: POST /predict (JSON or .npy) by the FastPredict middleware, which calls
the scorer directly, skipping BentoML's generic parsing; POST /predict_image by the @bentoml.api
method below; GET /metadata and /drift by a small Starlette app. The @bentoml.api `predict`
method is never reached over HTTP: it declares the request schema for the OpenAPI spec
(/docs.json) and answers in-process callers (a service that composes this one with
bentoml.depends, or a test) through the same scorer, with a Starlette Response carrying the
status and JSON body HTTP would (errors come back as a 4xx Response, not raised).
"""
from __future__ import annotations

import gc
import os
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import bentoml
import orjson
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import bentoml_patches
from service.inputs import BadRequest
from service.loading import open_model, resolve_model_tag
from service.middleware import BodyLimit, FastPredict, OpenInference, UploadGuard
from service.oip import Protocol
from service.schema import example, instances_type
from service.scoring import Scorer
from training.contract import PIPELINE_LABEL
from training.images import ImageError, read_image

MAX_ROWS = int(os.environ.get("MAX_ROWS", "10000"))
MAX_BODY_MB = float(os.environ.get("MAX_BODY_MB", "64"))
WORKERS = int(os.environ.get("WORKERS", "1"))
TRACING = os.environ.get("TRACING") == "1"  # OpenTelemetry spans (off: BentoML records them unexported)
PREDICT_ROUTE, UPLOAD_ROUTE, UPLOAD_FIELD = "/predict", "/predict_image", "image"
TIMEOUT_S = 30  # a request not answered by then gets a 504

bentoml_patches.apply(routes=(PREDICT_ROUTE, UPLOAD_ROUTE, "/metadata", "/drift"), tracing=TRACING,
                      front=(BodyLimit, FastPredict, OpenInference))
MODEL_TAG = resolve_model_tag()
# BentoML sets no thread limits: workers each using every core would fight each other. Count the
# cores this process may run on (taskset, cgroups), not the machine's.
THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
SCORER = Scorer(*open_model(MODEL_TAG, THREADS), MAX_ROWS)
Instances = instances_type(SCORER.meta, MAX_ROWS)  # documents this model's requests in the spec


class Prediction(BaseModel):
    """The response of /predict (probabilities and classes for classification only)."""
    predictions: list[Any] = Field(description="class labels, or values in the target's units")
    probabilities: list[list[float]] | None = Field(None, description="per row, one per class")
    classes: list[Any] | None = Field(None, description="the order of each probabilities row")
    model: str = Field(description="<name>:<version> of the model that answered")


async def metadata_route(request: Request) -> JSONResponse:
    return JSONResponse(SCORER.metadata)


async def drift_route(request: Request) -> Response:
    """Live inputs vs. the training profile, per feature, since start and over the recent window."""
    return Response(orjson.dumps(SCORER.drift()), media_type="application/json")


@bentoml.asgi_app(Starlette(routes=[Route("/metadata", metadata_route, methods=["GET"]),
                                    Route("/drift", drift_route, methods=["GET"])]), path="/")
@bentoml.service(
    name="normserve", workers=WORKERS, labels={"pipeline": PIPELINE_LABEL},
    traffic={"timeout": TIMEOUT_S},
    # One log line per request costs more than scoring a row; errors are still logged.
    logging={"access": {"enabled": os.environ.get("ACCESS_LOG") == "1"}},
    # Spans are recorded even with no exporter configured; TRACING=1 keeps them.
    tracing={"excluded_urls": None if TRACING else ".*"},
)
class Predictor:
    model = bentoml.models.BentoModel(MODEL_TAG)  # a class attribute, so `bentoml build` packages it

    def __init__(self) -> None:
        # /readyz turns ready only after this returns: the monitor is started and the graph warm.
        SCORER.start()
        # Start-up leaves ~100,000 objects that live as long as the worker: out of the garbage
        # collector's way, so that its full collections do not walk them (50-70 ms pauses).
        gc.freeze()

    @bentoml.api(route=PREDICT_ROUTE)
    async def predict(
        self,
        instances: Annotated[Instances, Field(
            description="table models: rows of raw feature values in training order, or records "
                        "keyed by feature name (GET /metadata lists the names); mixed tables: "
                        "records with numbers, text and null; image models: images as "
                        "[channels][height][width] lists of integers 0..255",
            examples=[example(SCORER.meta)])],
    ) -> Prediction:
        # Over HTTP, FastPredict answers first (see the module docstring); in process, this.
        status, body = SCORER.answer(lambda: SCORER.check(instances))
        # A Response skips BentoML's per-call re-validation of the declared output model.
        return Response(body, status_code=status, media_type="application/json")

    @bentoml.api(route=UPLOAD_ROUTE)
    async def predict_image(
        self, image: Annotated[Path, Field(description=f"a PNG or JPEG file (multipart field "
                                                       f"'{UPLOAD_FIELD}')")],
    ) -> Prediction:
        try:
            if not SCORER.image:
                raise BadRequest(f"this model takes table rows, not images: POST them to {PREDICT_ROUTE}")
            c, h, w = SCORER.shape
            pixels = read_image(image.read_bytes(), c, (h, w) if SCORER.image["resize"] else None,
                                SCORER.image.get("fit", "stretch"))
            if pixels.shape != SCORER.shape:
                raise BadRequest(f"the image is {pixels.shape[2]}x{pixels.shape[1]} pixels; this model "
                                 f"takes {w}x{h} (it was trained without --image-size, so uploads "
                                 "are not resized)")
            body = SCORER.score({SCORER.input: pixels[None]})
        except (BadRequest, ImageError) as e:
            return JSONResponse({"error": str(e)}, status_code=getattr(e, "status", 400))
        return Response(body, media_type="application/json")


Predictor.add_asgi_middleware(BodyLimit, max_bytes=int(MAX_BODY_MB * 2 ** 20))
Predictor.add_asgi_middleware(UploadGuard, route=UPLOAD_ROUTE, field=UPLOAD_FIELD)
Predictor.add_asgi_middleware(FastPredict, route=PREDICT_ROUTE, json=SCORER.answer_json,
                              npy=SCORER.answer_npy, timeout=TIMEOUT_S)
Predictor.add_asgi_middleware(OpenInference, protocol=Protocol(SCORER, version("normserve")),
                              timeout=TIMEOUT_S)
