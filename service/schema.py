"""The /predict request schema for the OpenAPI spec, built from the served model's metadata.

Documentation (and the contract the fuzz tests use): what a valid request looks like for this
model. The checks themselves are in service/inputs.py and run on every request.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, create_model

# Mixed tables: a number beyond float32 is a gap, as training read it (service/inputs.py).
Number = Annotated[float, Field(allow_inf_nan=False)]
Pixel = Annotated[int, Field(ge=0, le=255)]


def _exactly(item, n: int):
    return Annotated[list[item], Field(min_length=n, max_length=n)]


def _record(name: str, fields: dict[str, Any], optional: list[str]):
    """A JSON object with exactly these keys, and any of the optional ones with any value
    (feature names need not be Python identifiers)."""
    spec = {f"f{i}": (kind, Field(..., alias=key)) for i, (key, kind) in enumerate(fields.items())}
    spec.update({f"o{i}": (Any, Field(None, alias=key)) for i, key in enumerate(optional)})
    return create_model(name, __config__=ConfigDict(extra="forbid", populate_by_name=False), **spec)


def _column_type(column: dict):
    if column["type"] != "numeric":
        return str | None
    return Number | str | None if column.get("text") == "missing" else Number | None


def instances_type(meta: dict, max_rows: int):
    """The type of `instances` for this model: rows or records of a table, records of a mixed
    table, or [channels][height][width] images."""
    if meta.get("image"):
        im = meta["image"]
        row = _exactly(_exactly(_exactly(Pixel, im["width"]), im["height"]), im["channels"])
    elif meta.get("columns"):
        row = _record("Record", {c["name"]: _column_type(c) for c in meta["columns"]},
                      [c["name"] for c in meta.get("left_out") or ()])
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
