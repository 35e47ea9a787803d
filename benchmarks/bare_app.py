"""The bare-server reference: the same ONNX file behind a minimal Starlette app on uvicorn.

    MODEL_PATH=models/<name>/<version>/model.onnx uvicorn benchmarks.bare_app:app --port 3001

No validation, no metrics, no tracing: what serving costs with nothing but HTTP, JSON and
onnxruntime. Used by benchmarks/serve_load.py for comparison only.
"""
import json
import os

import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "1"))
options.inter_op_num_threads = 1
session = ort.InferenceSession(os.environ["MODEL_PATH"], options, providers=["CPUExecutionProvider"])
meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
outputs = [o.name for o in session.get_outputs()]


async def predict(request: Request) -> Response:
    X = np.asarray((await request.json())["instances"], dtype=np.float32)
    out = session.run(outputs, {meta["input"]: X})
    if meta["task"] == "classification":
        body = {"predictions": [meta["classes"][i] for i in out[1].tolist()],
                "probabilities": out[0].tolist(), "classes": meta["classes"], "model": meta["model"]}
    else:
        body = {"predictions": out[0].tolist(), "model": meta["model"]}
    return Response(json.dumps(body), media_type="application/json")


async def readyz(request: Request) -> Response:
    return PlainTextResponse("\n")


async def metadata(request: Request) -> Response:
    return Response(json.dumps(meta), media_type="application/json")


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", readyz),
                        Route("/metadata", metadata)])
