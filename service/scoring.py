"""What the service does with a request: check the raw inputs, run the ONNX graph (which carries
its own normalization), count the answered inputs for the drift monitor, and write the answer.

One `Scorer` per worker process. The JSON/.npy fast path (service/middleware.py) and the
@bentoml.api method (service/service.py) both call it, so every request takes one code path.
"""
from __future__ import annotations

import time

import numpy as np
import orjson

from service import monitor
from service.version_metrics import VersionRequests
from service.inputs import BadRequest, parse_body, parse_images, parse_instances, parse_npy, parse_records
from training.contract import OUTPUTS
from training.images import ImageError, read_image

PUBLIC_METADATA = ("model", "task", "modality", "input", "outputs", "feature_names", "columns", "left_out", "image",
                   "classes", "normalization", "target_normalization", "metrics", "versions",
                   "created_at", "schema_version")


def input_signature(meta: dict) -> tuple:
    """What a request to a model must carry: two versions with the same signature take the same
    requests."""
    if meta.get("image"):
        im = meta["image"]
        return "image", im["channels"], im["height"], im["width"], bool(im.get("resize"))
    if meta.get("columns"):
        return "mixed", tuple((c["name"], c["type"], c.get("text")) for c in meta["columns"])
    return "table", tuple(meta["feature_names"])


class Scorer:
    def __init__(self, session, meta: dict, max_rows: int):
        self.session, self.meta, self.max_rows = session, meta, max_rows
        self.tag, self.task = meta["model"], meta["task"]
        self.feature_names, self.classes = meta["feature_names"], meta["classes"]
        self.input, self.image = meta["input"], meta.get("image")
        self.columns = meta.get("columns")  # mixed tables: one graph input per column
        # Columns of the training file that the model does not take: a record may carry them.
        self.ignored = frozenset(c["name"] for c in meta.get("left_out") or ())
        self.outputs = OUTPUTS[self.task]
        self.shape = ((self.image["channels"], self.image["height"], self.image["width"]) if self.image
                      else (len(self.feature_names),))
        self.metadata = {**{k: meta.get(k) for k in PUBLIC_METADATA}, "max_rows": max_rows}
        self.monitor: monitor.Monitor | None = None
        self.requests: VersionRequests | None = None  # this version's request metrics (start())
        self.protocol = None  # what the Open Inference Protocol says of this model (service/oip.py)
        self.shadow = None    # the shadow of this version, while it is its model's default (service/shadow.py)

    def start(self) -> None:
        """In a worker: start the drift monitor (its counts live in a per-process file) and run
        the graph once, since the first run allocates."""
        if monitor.ENABLED and self.meta.get("drift"):
            self.monitor = monitor.Monitor(self.meta)
        self.requests = VersionRequests(self.tag)
        if self.image:
            example = {self.input: np.zeros((1, *self.shape), np.uint8)}
        elif self.columns:
            example = parse_records([[None] * len(self.columns)], self.columns, 1)
        else:
            example = {self.input: np.zeros((1, *self.shape), np.float32)}
        self.session.run(self.outputs, example)

    # ---- checks: a request's body as the graph's inputs, or BadRequest ------------------------

    def check(self, instances) -> dict[str, np.ndarray]:
        """The `instances` of a JSON request as the graph's inputs."""
        if self.image:
            return {self.input: parse_images(instances, self.shape, self.max_rows)}
        if self.columns:
            return parse_records(instances, self.columns, self.max_rows, self.ignored)
        return {self.input: parse_instances(instances, self.feature_names, self.max_rows, self.ignored)}

    def check_npy(self, body: bytes) -> dict[str, np.ndarray]:
        if self.columns:
            raise BadRequest("this model takes records with text columns: send JSON")
        return {self.input: parse_npy(body, self.shape, self.max_rows, image=bool(self.image))}

    # ---- scoring ------------------------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph on checked raw inputs and count them for the drift monitor."""
        out = self.session.run(self.outputs, feeds)
        finite = np.isfinite(out[0].reshape(len(out[0]), -1)).all(axis=1)
        if not finite.all():  # float32 overflow inside the graph: never answer NaN as null
            rows = np.flatnonzero(~finite)
            raise BadRequest(f"row {rows[0]}: the model's output overflows for these values (far "
                             f"outside the training data?); {len(rows)} row(s) affected")
        if self.monitor is not None:  # only answered inputs are counted
            self.monitor.observe(feeds)
        if self.shadow is not None:
            self.shadow.offer(feeds, out)
        return out

    def score(self, feeds: dict[str, np.ndarray]) -> bytes:
        """Run the graph on checked raw inputs; the answer as JSON bytes."""
        out = self.run(feeds)
        if self.task == "classification":
            probabilities, labels = out
            body = {"predictions": [self.classes[i] for i in labels.tolist()],
                    "probabilities": probabilities, "classes": self.classes, "model": self.tag}
        else:
            body = {"predictions": out[0], "model": self.tag}
        # orjson writes numpy arrays directly (float32 in its shortest exact form).
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    def answer(self, inputs) -> tuple[int, bytes]:
        """(HTTP status, JSON body) for a prediction; `inputs()` returns the checked graph inputs
        or raises BadRequest."""
        started = time.perf_counter()
        try:
            status, body = 200, self.score(inputs())
        except BadRequest as e:
            status, body = e.status, orjson.dumps({"error": str(e)})
        self.observe(status, started)
        return status, body

    def observe(self, status: int, started: float) -> None:
        """Count an answered prediction request in this version's request metrics."""
        if self.requests is not None:  # None: not started (an in-process caller)
            self.requests.add(status, time.perf_counter() - started)

    def answer_json(self, body: bytes) -> tuple[int, bytes]:
        """A JSON request body {"instances": [...]}."""
        return self.answer(lambda: self.check(parse_body(body)))

    def answer_npy(self, body: bytes) -> tuple[int, bytes]:
        """A .npy request body (numpy.save) of rows or images."""
        return self.answer(lambda: self.check_npy(body))

    def answer_image(self, data: bytes) -> tuple[int, bytes]:
        """An uploaded PNG/JPEG file, read by the code training read its images with."""
        return self.answer(lambda: self.check_image(data))

    def check_image(self, data: bytes) -> dict[str, np.ndarray]:
        if not self.image:
            raise BadRequest("this model takes table rows, not images: POST them to /predict")
        c, h, w = self.shape
        try:
            pixels = read_image(data, c, (h, w) if self.image["resize"] else None,
                                self.image.get("fit", "stretch"))
        except ImageError as e:
            raise BadRequest(str(e)) from None
        if pixels.shape != self.shape:
            raise BadRequest(f"the image is {pixels.shape[2]}x{pixels.shape[1]} pixels; this model takes "
                             f"{w}x{h} (it was trained on images of one size, so uploads are not resized)")
        return {self.input: pixels[None]}

    def drift(self) -> dict:
        """Live inputs vs. the training profile (GET /drift), or why there is no monitor."""
        if self.monitor is None:
            return {"enabled": False, "verdict": "not_monitored",
                    "reason": "DRIFT=0" if not monitor.ENABLED else
                    "this model carries no drift profile (trained before it was recorded)"}
        report = self.monitor.report()
        self.monitor.export(report)
        return {"model": self.tag, **report}
