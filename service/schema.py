"""The /predict request schema for the OpenAPI spec, built from the served model's metadata.

Documentation (and the contract the fuzz tests use): what a valid request looks like for this
model. The checks themselves are in service/inputs.py and run on every request.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, create_model

from service.inputs import FLOAT32_MAX
Number = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
Pixel = Annotated[int, Field(ge=0, le=255)]


def _exactly(item, n: int):
    return Annotated[list[item], Field(min_length=n, max_length=n)]


def _record(name: str, fields: dict[str, Any]):
    """A JSON object with exactly these keys (feature names need not be Python identifiers)."""
    spec = {f"f{i}": (kind, Field(..., alias=key)) for i, (key, kind) in enumerate(fields.items())}
    return create_model(name, __config__=ConfigDict(extra="forbid", populate_by_name=False), **spec)


def instances_type(meta: dict, max_rows: int):
    """The type of `instances` for this model: rows or records of a table, records of a mixed
    table, or [channels][height][width] images."""
    if meta.get("image"):
        im = meta["image"]
        row = _exactly(_exactly(_exactly(Pixel, im["width"]), im["height"]), im["channels"])
    elif meta.get("columns"):
        row = _record("Record", {c["name"]: Number | None if c["type"] == "numeric" else str | None
                                 for c in meta["columns"]})
    else:
        # A row is a list of numbers or a record. Not written as a union: BentoML's Python client
        # coerces every item into the union's first member, which breaks the other form.
        row = Any
    return Annotated[list[row], Field(min_length=1, max_length=max_rows)]


def example(meta: dict) -> list:
    """One plausible request body's instances, for the OpenAPI page."""
    if meta.get("image"):
        im = meta["image"]
        return [[[[0] * im["width"]] * im["height"]] * im["channels"]]
    if meta.get("columns"):
        return [{c["name"]: round(c["median"], 4) if c["type"] == "numeric" else c["categories"][-1]
                 for c in meta["columns"]}]
    # The training means, from the drift profile where the model has one.
    means = {f["name"]: f["mean"] for f in (meta.get("drift") or {}).get("features", [])}
    return [[round(means.get(name, 0.0), 4) for name in meta["feature_names"]]]
