"""Finding models in the BentoML store and opening them, checked: the card matches the graph,
the graph carries this pipeline's metadata and takes the inputs its card describes.

`open_model` raises ModelError with the reason. At start-up the server's default model must open
(service/registry.py turns the error into `fail`, an exit with one line, in the process `bentoml
serve` starts from: a worker that failed instead would be restarted by BentoML forever); a load
at run time answers it as a 400 and keeps serving what it served.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import bentoml

from training.contract import (MODALITY_METADATA, OUTPUTS, PIPELINE_LABEL, REQUIRED_METADATA,
                               column_input, decode_metadata)


class ModelError(ValueError):
    """A stored model that cannot be served; the message says why."""


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


def named_model_tag() -> str | None:
    """The model start-up is told to serve by default: MODEL_TAG if set, else in a built Bento its
    own model; None if neither (the record, or the newest model, decides: service/registry.py)."""
    if tag := os.environ.get("MODEL_TAG") or packaged_model():
        try:
            return str(bentoml.models.get(tag).tag)
        except bentoml.exceptions.NotFound:
            fail(f"MODEL_TAG={tag} is not in the BentoML model store; `bentoml models list` shows "
                 "what is there")
    return None


def stored_models(name: str | None = None) -> list:
    """The store's models that `python -m training.fit` saved (of one name), oldest first."""
    try:
        listed = bentoml.models.list(name)
    except (ValueError, bentoml.exceptions.BentoMLException):  # not a name the store can hold
        return []
    ours = [m for m in listed if m.info.labels.get("pipeline") == PIPELINE_LABEL]
    return sorted(ours, key=lambda m: m.info.creation_time)


def newest_model_tag() -> str:
    """The model trained last."""
    if not (ours := stored_models()):
        fail("no trained model in the BentoML model store; run `python -m training.fit` first")
    return str(ours[-1].tag)


def resolve_model_tag() -> str:
    """What a server started now serves by default, absent a record of loads: MODEL_TAG, a built
    Bento's model, else the newest model (benchmarks start servers with it)."""
    return named_model_tag() or newest_model_tag()


def check_card(path: Path, tag: str) -> dict:
    """The model's card, and proof that model.onnx is the file the card describes."""
    card_path = path.with_name("card.json")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{tag}: cannot read {card_path}: {e}") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "(no file)"
    if digest != card.get("onnx_sha256"):
        raise ModelError(f"{tag}: model.onnx does not match its card (sha256 {digest[:12]}..., card "
                         f"says {str(card.get('onnx_sha256'))[:12]}...): the file is damaged or was altered")
    return card


def inputs_match_card(session, card: dict) -> str | None:
    """What differs between the graph's inputs and the card, if anything."""
    got = {i.name: i.shape[1:] for i in session.get_inputs()}
    if card.get("columns"):
        expected = {column_input(c): [1] for c in card["columns"]}
    elif card.get("image"):
        im = card["image"]
        expected = {card["input"]: [im["channels"], im["height"], im["width"]]}
    else:
        expected = {card["input"]: [len(card["feature_names"])]}
    return None if got == expected else f"graph inputs {got} but the card describes {expected}"


def open_model(tag: str, threads: int = 1):
    """An onnxruntime session and the model's metadata, or ModelError saying what is wrong."""
    try:
        return _open(tag, threads)
    except ModelError:
        raise
    except Exception as e:  # a card or metadata of another shape: name it, never a traceback
        raise ModelError(f"{tag}: cannot be served: {type(e).__name__}: {str(e).strip()[:200]}") from None


def _open(tag: str, threads: int):
    import onnxruntime as ort
    try:
        path = bentoml.models.get(tag).path_of("model.onnx")
    except (bentoml.exceptions.NotFound, ValueError):
        raise ModelError(f"{tag} is not in the BentoML model store") from None
    card = check_card(Path(path), tag)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        meta = decode_metadata(session.get_modelmeta().custom_metadata_map)
    except Exception as e:
        raise ModelError(f"{tag}: cannot load {path}: {str(e).strip().splitlines()[0]}") from None
    required = REQUIRED_METADATA + MODALITY_METADATA.get(meta.get("modality"), ())
    if missing := [k for k in required if k not in meta]:
        raise ModelError(f"{tag}: model.onnx lacks metadata {', '.join(missing)}; "
                         "was it exported by `python -m training.fit`?")
    if meta["task"] not in OUTPUTS or meta["modality"] not in MODALITY_METADATA:
        raise ModelError(f"{tag}: unknown task or modality in the model metadata")
    if problem := inputs_match_card(session, card):
        raise ModelError(f"{tag}: model.onnx does not fit its card: {problem}")
    return session, meta
