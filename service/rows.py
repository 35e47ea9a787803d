"""A file's rows as the service receives them, scored by the service's own checks and graph: in
chunks, and row by row in a chunk that holds a row the model cannot take, so that one bad row is
reported with its reason and the others are scored (the offline gate, training/compare.py).
"""
from __future__ import annotations

import datetime as dt
import decimal
import math
from dataclasses import dataclass

import numpy as np

from service.inputs import BadRequest

CHUNK_ROWS = 1000


def json_value(v):
    """A cell as a JSON client sends it: missing values (and infinities, which JSON cannot carry)
    as null, timestamps as ISO text, numpy scalars as Python numbers."""
    import pandas as pd
    if v is None or v is pd.NaT or v is pd.NA:
        return None
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(v) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (np.ndarray, list, tuple)):
        return [json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (dt.date, dt.time, pd.Timestamp)):
        return v.isoformat()
    if isinstance(v, (dt.timedelta, pd.Timedelta)):
        return str(v)
    return v


def records(frame) -> list[dict]:
    """A DataFrame's rows as JSON records keyed by the file's own column names."""
    names = [str(c) for c in frame.columns]
    return [{k: json_value(v) for k, v in zip(names, row)} for row in frame.itertuples(index=False, name=None)]


@dataclass
class Scored:
    """The graph's outputs for every row (NaN where a row could not be scored), and why not."""
    outputs: list[np.ndarray]
    errors: dict[int, str]

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.outputs[0]), bool)
        mask[list(self.errors)] = False
        return mask


def score(scorer, rows: list, check=None) -> Scored:
    """Score `rows` (JSON records or rows; with `check`, e.g. scorer.check_image, anything it takes
    one at a time) as /predict would, a chunk at a time."""
    check_many = (lambda chunk: scorer.check(chunk)) if check is None else \
        (lambda chunk: concat([check(item) for item in chunk]))
    parts, errors = [], {}
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start:start + CHUNK_ROWS]
        try:
            parts.append(scorer.run(check_many(chunk)))
            continue
        except BadRequest:
            pass
        for i, row in enumerate(chunk):  # find the rows it cannot take; score the others
            try:
                parts.append(scorer.run(check_many([row])))
            except BadRequest as e:
                errors[start + i] = str(e).removeprefix("row 0, ").removeprefix("row 0: ")
                parts.append(None)
    return Scored(assemble(parts, len(rows)), errors)


def concat(feeds: list[dict]) -> dict:
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def assemble(parts: list, n: int) -> list[np.ndarray]:
    """Chunk outputs in row order, a row that was not scored as NaN (its label as -1)."""
    template = next((p for p in parts if p is not None), None)
    if template is None:
        return [np.full(n, np.nan)]
    out = []
    for j, example in enumerate(template):
        filler = -1 if example.dtype.kind in "iu" else np.nan
        blocks = [p[j] if p is not None else np.full((1, *example.shape[1:]), filler, example.dtype
                                                     if example.dtype.kind in "iu" else np.float64)
                  for p in parts]
        out.append(np.concatenate(blocks))
    return out


# ---- a table's columns as the graph's inputs, each row passed or marked (the batch job) -----------

def check_frame(scorer, frame) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A batch of a table file's rows (the model's columns, numbers written as text already read as
    numbers) as the graph's inputs for the rows /predict would take, and for each row that it
    would refuse, /predict's own message for it (None: taken). The rules are decided column by
    column, vectorized; a row they refuse is sent through the service's check as a JSON record,
    which words the reason (tests/test_batch.py holds the two to agree on every row)."""
    from training.columns import text_numbers, texts
    from training.contract import FLOAT32_MAX, column_input, finite_float32
    from training.rules import is_number_column
    columns = scorer.columns or [{"name": n, "type": "numeric", "strict": True} for n in scorer.feature_names]
    bad, values = np.zeros(len(frame), bool), {}
    for c in columns:
        name, raw = c["name"], frame[c["name"]]
        if c["type"] != "numeric":  # any single value (text, a number, ...) or a gap; not a list
            if raw.dtype == object:
                nested = raw.map(lambda v: isinstance(v, NOT_A_CATEGORY)).to_numpy(bool)
                raw, bad = raw.where(~nested, None), bad | nested
            values[name] = texts(raw)
            continue
        if is_number_column(raw):
            x = raw.to_numpy(np.float64, na_value=np.nan)
        else:  # what is not a number is text, taken as a gap by a column of numbers with text
            allowed = NUMBER_CELLS | {str} if c.get("text") == "missing" else NUMBER_CELLS
            fine = raw.map(type).isin(allowed).to_numpy()
            bad |= ~fine & raw.notna().to_numpy()
            x = text_numbers(raw.where(fine, None), c.get("decimal", "."))
        if not scorer.columns:  # a table model: a finite float32 number in every column
            with np.errstate(invalid="ignore"):
                bad |= ~(np.abs(x) <= FLOAT32_MAX)
        values[name] = finite_float32(x)
    ok = None if not bad.any() else ~bad  # the rows taken (None: all)
    if scorer.columns:
        feeds = {column_input(c): (values[c["name"]].astype(np.float32) if c["type"] == "numeric"
                                   else values[c["name"]]).reshape(-1, 1) for c in columns}
    else:
        X = np.empty((len(frame), len(scorer.feature_names)), np.float32)
        for j, n in enumerate(scorer.feature_names):
            X[:, j] = values[n]
        feeds = {scorer.input: X}
    if ok is not None:
        feeds = {k: v[ok] for k, v in feeds.items()}
    reasons = np.full(len(frame), None, dtype=object)
    names = [c["name"] for c in columns]
    for i in np.flatnonzero(bad):
        reasons[i] = refusal(scorer, {k: cell(frame[k].iat[i]) for k in names})
    return feeds, reasons


NUMBER_CELLS = frozenset({int, float, np.int64, np.float64, np.float32, np.int32})
NOT_A_CATEGORY = (list, tuple, dict, set, np.ndarray, bytes)


def cell(v):
    """A file's cell as a JSON client sends it, infinities kept (so the service names them)."""
    return float(v) if isinstance(v, float) and math.isinf(v) else json_value(v)


def refusal(scorer, record: dict) -> str:
    """Why /predict refuses a row, in its own words."""
    try:
        scorer.check([record])
    except BadRequest as e:
        return str(e).removeprefix("row 0, ").removeprefix("row 0: ")
    return "the service takes this row, the batch checks did not (please report it)"
