"""The promise of issue 24, as one check: a model trained on a file answers that file's own rows,
sent as JSON records the way a client holding the file would send them, as the trained PyTorch
model answers the same rows read by training."""
from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import orjson
import pandas as pd
import torch

from service.rows import records
from service.scoring import Scorer
from training.contract import decode_metadata
from training.data import to_table
from training.files import read_file
from training.model import serving_model


def file_records(frame: pd.DataFrame) -> list[dict]:
    return records(frame)


def scorer_of(result) -> Scorer:
    """The service's scorer (its checks, then onnxruntime) on a run's model.onnx."""
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    return Scorer(session, decode_metadata(session.get_modelmeta().custom_metadata_map), 10**6)


def assert_serves_file_rows(result, path: str, target: str, **options) -> None:
    """The service's Scorer (checks, then the ONNX graph) on the file's rows as JSON records, vs.
    PyTorch on the same rows as training reads them. `options`: the run's --features,
    --categorical, --numeric and --drop."""
    scorer = scorer_of(result)
    how, frame = read_file(path)
    frame = frame[frame[target].notna()].reset_index(drop=True)
    status, body = scorer.answer_json(orjson.dumps({"instances": file_records(frame)}))
    assert status == 200, body
    answer = orjson.loads(body)

    data = result.data
    with warnings.catch_warnings():  # the run printed its notes already
        warnings.simplefilter("ignore")
        table = to_table(frame, target, options.get("features"), data.table.task, "check",
                         options.get("categorical"), options.get("numeric"), options.get("drop"),
                         how.decimal)
    X = data.normalizer.encode(table.X) if data.table.modality == "mixed" else table.X
    head = serving_model(result.trained.net.cpu(), data.table.task, data.y_mean, data.y_scale)
    with torch.no_grad():
        out = head(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
    if data.table.task == "classification":
        np.testing.assert_allclose(answer["probabilities"], out[0].numpy(), atol=1e-4)
    else:
        np.testing.assert_allclose(answer["predictions"], out.numpy(), atol=1e-4 * data.y_scale,
                                   rtol=1e-5)
