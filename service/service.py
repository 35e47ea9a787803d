"""BentoML service: scores raw inputs with the exported ONNX graph, which carries its own normalization.

The service does no arithmetic on the inputs: it checks them (table rows, or uint8 images read by
the same code training used), hands them to onnxruntime, and maps class indices to the training
data's labels (service/scoring.py). `bentoml serve` (from the repository root) serves the model
trained last; MODEL_TAG=<name>:<version> picks another. More models and versions are loaded,
switched and unloaded while it runs (service/registry.py, service/repository.py): a request names
one with ?model=NAME[:VERSION], or gets the server's default model.

How a request is answered: POST /predict (JSON or .npy) by the FastPredict middleware, which calls
the scorer directly, skipping BentoML's generic parsing; POST /predict_image by the ImageUpload
middleware; the Open Inference Protocol and its model repository by the OpenInference middleware;
GET /metadata and /drift by a small Starlette app. The @bentoml.api methods are never reached over
HTTP: they declare the request schemas for the OpenAPI spec (/docs.json) and answer in-process
callers (a service that composes this one with bentoml.depends, or a test) through the default
model's scorer, with a Starlette Response carrying the status and JSON body HTTP would (errors
come back as a 4xx Response, not raised).
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
from service.loading import fail
from service.middleware import BodyLimit, FastPredict, ImageUpload, OpenInference, chosen_model
from service.oip import Protocol
from service.port import check_port_free
from service.registry import NotLoaded, Registry
from service.repository import Repository
from service.schema import example, instances_type
from training.contract import PIPELINE_LABEL

MAX_ROWS = int(os.environ.get("MAX_ROWS", "10000"))
MAX_BODY_MB = float(os.environ.get("MAX_BODY_MB", "64"))
WORKERS = int(os.environ.get("WORKERS", "1"))
TRACING = os.environ.get("TRACING") == "1"  # OpenTelemetry spans (off: BentoML records them unexported)
PREDICT_ROUTE, UPLOAD_ROUTE, UPLOAD_FIELD = "/predict", "/predict_image", "image"
TIMEOUT_S = 30  # a request not answered by then gets a 504

check_port_free(fail)  # in `bentoml serve`'s own process, before it binds
bentoml_patches.apply(routes=(PREDICT_ROUTE, UPLOAD_ROUTE, "/metadata", "/drift", "/shadow"), tracing=TRACING,
                      front=(BodyLimit, FastPredict, OpenInference))
# BentoML sets no thread limits: workers each using every core would fight each other. Count the
# cores this process may run on (taskset, cgroups), not the machine's.
THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
REGISTRY = Registry(THREADS, MAX_ROWS)  # opens the default model (and the record's others) now
REPOSITORY = Repository(REGISTRY)  # what changes what is served: the operator's token
MODEL_TAG = REGISTRY.served.default.tag  # the default model at start-up
Instances = instances_type(REGISTRY.served.default.meta, MAX_ROWS)  # documents its requests in the spec


class Prediction(BaseModel):
    """The response of /predict (probabilities and classes for classification only)."""
    predictions: list[Any] = Field(description="class labels, or values in the target's units")
    probabilities: list[list[float]] | None = Field(None, description="per row, one per class")
    classes: list[Any] | None = Field(None, description="the order of each probabilities row")
    model: str = Field(description="<name>:<version> of the model that answered")


def chosen(request: Request):
    """The scorer of the model a GET names with ?model=NAME[:VERSION] (else the default)."""
    return REGISTRY.find(chosen_model(request.scope))


async def metadata_route(request: Request) -> Response:
    try:
        return JSONResponse(chosen(request).metadata)
    except NotLoaded as e:
        return JSONResponse({"error": str(e)}, status_code=404)


async def shadow_route(request: Request) -> Response:
    """Shadow traffic (service/shadow.py): GET the figures; POST or DELETE with the operator's token."""
    status, body = await REPOSITORY.shadow(request.method, request.query_params.get("model"),
                                           request.headers.get("authorization", "").encode() or None,
                                           await request.body())
    return Response(body, status_code=status, media_type="application/json")


async def drift_route(request: Request) -> Response:
    """Live inputs vs. the training profile, per feature, since start and over the recent window
    (per model version: each version counts its own inputs)."""
    try:
        return Response(orjson.dumps(chosen(request).drift()), media_type="application/json")
    except NotLoaded as e:
        return JSONResponse({"error": str(e)}, status_code=404)


@bentoml.asgi_app(Starlette(routes=[Route("/metadata", metadata_route, methods=["GET"]),
                                    Route("/drift", drift_route, methods=["GET"]),
                                    Route("/shadow", shadow_route, methods=["GET", "POST", "DELETE"])]),
                  path="/")
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
        # /readyz turns ready only after this returns: the monitors are started and the graphs
        # warm; then the record of loads is followed.
        REGISTRY.start()
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
            examples=[example(REGISTRY.served.default.meta)])],
    ) -> Prediction:
        # Over HTTP, FastPredict answers first (see the module docstring); in process, this.
        scorer = REGISTRY.current().default
        status, body = scorer.answer(lambda: scorer.check(instances))
        # A Response skips BentoML's per-call re-validation of the declared output model.
        return Response(body, status_code=status, media_type="application/json")

    @bentoml.api(route=UPLOAD_ROUTE)
    async def predict_image(
        self, image: Annotated[Path, Field(description=f"a PNG or JPEG file (multipart field "
                                                       f"'{UPLOAD_FIELD}')")],
    ) -> Prediction:
        # Over HTTP, ImageUpload answers first; in process, this.
        status, body = REGISTRY.current().default.answer_image(image.read_bytes())
        return Response(body, status_code=status, media_type="application/json")


Predictor.add_asgi_middleware(BodyLimit, max_bytes=int(MAX_BODY_MB * 2 ** 20))
Predictor.add_asgi_middleware(ImageUpload, route=UPLOAD_ROUTE, field=UPLOAD_FIELD, registry=REGISTRY)
Predictor.add_asgi_middleware(FastPredict, route=PREDICT_ROUTE, registry=REGISTRY, timeout=TIMEOUT_S)
Predictor.add_asgi_middleware(OpenInference, protocol=Protocol(REGISTRY, version("normserve")),
                              repository=REPOSITORY, timeout=TIMEOUT_S)
