"""Turn a request's `instances` into the array the ONNX graph takes, or say exactly what is wrong.

Table rows are lists of raw values in training order, or records keyed by feature name; only real
numbers pass: no strings, booleans, null, NaN or infinity, nothing outside float32. A record may
also carry the columns training left out (the model's `left_out`: the target, empty, constant,
date and id columns, --drop): they are ignored, so a client can send the file's own rows. Mixed
tables take null for a gap, as training read them (training/columns.py). Images are nested lists
[channels][height][width] of integers 0..255.
"""
from __future__ import annotations

import io
import json
import math
from itertools import chain

import numpy as np
import orjson

from training.contract import FLOAT32_MAX, category_text, column_input, finite_float32, number_or_nan

NUMBER_TYPES = {int, float}


class BadRequest(ValueError):
    """A request the service cannot score; `status` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "infinity"
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits, outside the float32 range"
    if isinstance(value, (int, float)):
        return f"{value!r}, outside the float32 range" if abs(value) > FLOAT32_MAX else f"the number {value!r}"
    return type(value).__name__ if not isinstance(value, (list, dict)) else (
        "a list" if isinstance(value, list) else "an object")


def _row_values(i: int, row, feature_names: list[str], ignored: frozenset = frozenset()) -> list:
    n = len(feature_names)
    if type(row) is list:
        if len(row) != n:
            order = (f"[{', '.join(feature_names)}]" if n <= 8 else "GET /metadata lists them")
            raise BadRequest(f"row {i}: expected {n} values in training order ({order}), "
                             f"got {len(row)}")
        return row
    if type(row) is dict:
        if missing := [f for f in feature_names if f not in row]:
            raise BadRequest(f"row {i}: missing feature(s): {', '.join(missing)}")
        if len(row) != n:
            known = set(feature_names)
            if unknown := [str(k) for k in row if k not in known and k not in ignored]:
                raise BadRequest(f"row {i}: unknown feature(s): {', '.join(unknown)}; "
                                 f"expected {', '.join(feature_names)}")
        return [row[f] for f in feature_names]
    raise BadRequest(f"row {i}: expected a list of {n} numbers or an object keyed by feature name, "
                     f"got {_describe(row)}")


def _is_number(v) -> bool:
    if type(v) not in NUMBER_TYPES:
        return False
    try:
        return math.isfinite(v) and abs(float(v)) <= FLOAT32_MAX
    except OverflowError:  # an integer beyond even float64
        return False


def _first_bad_value(rows: list[list], feature_names: list[str]) -> str:
    for i, row in enumerate(rows):
        for name, v in zip(feature_names, row):
            if not _is_number(v):
                return f"row {i}, feature {name!r}: expected a finite number, got {_describe(v)}"
    return "a value is not a finite number"


def parse_body(body: bytes):
    """The `instances` of a JSON request body `{"instances": [...]}`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # the standard parser accepts NaN and Infinity, which the checks then name by row
            doc = json.loads(body)
        except ValueError as e:
            raise BadRequest(f"malformed JSON: {e}") from None
        except RecursionError:
            raise BadRequest("malformed JSON: nested too deeply") from None
    if not isinstance(doc, dict) or "instances" not in doc:
        raise BadRequest('the body must be a JSON object {"instances": [...]}, got '
                         + ("an object without 'instances'" if isinstance(doc, dict) else _describe(doc)))
    if unknown := sorted(set(doc) - {"instances"}):
        raise BadRequest(f"unknown field(s) in the body: {', '.join(map(str, unknown))}")
    return doc["instances"]


def _check_list(instances, max_rows: int, what: str) -> None:
    if not isinstance(instances, list):
        raise BadRequest(f"instances must be a list of {what}s, got {_describe(instances)}")
    _check_count(len(instances), max_rows, what)


def _check_count(n: int, max_rows: int, what: str) -> None:
    if not n:
        raise BadRequest(f"instances is empty: send at least one {what}")
    if n > max_rows:
        raise BadRequest(f"instances has {n} {what}s; the limit is {max_rows} per request "
                         "(split the request, or raise MAX_ROWS)")


def parse_instances(instances, feature_names: list[str], max_rows: int,
                    ignored: frozenset = frozenset()) -> np.ndarray:
    """The rows of a request as float32 [n_rows, n_features]; BadRequest names the first problem.
    `ignored`: keys a record may carry that are not features (training left them out)."""
    _check_list(instances, max_rows, "row")
    rows = [_row_values(i, row, feature_names, ignored) for i, row in enumerate(instances)]
    # Fast path: one C-level pass over the types, then vectorized range checks.
    if not set(map(type, chain.from_iterable(rows))) <= NUMBER_TYPES:
        raise BadRequest(_first_bad_value(rows, feature_names))
    try:
        X = np.array(rows, dtype=np.float64)
    except OverflowError:  # an integer too large even for float64
        raise BadRequest(_first_bad_value(rows, feature_names)) from None
    if not _finite_float32(X):
        raise BadRequest(_first_bad_value(rows, feature_names))
    return X.astype(np.float32)


def _finite_float32(X: np.ndarray) -> bool:
    return bool(np.isfinite(X).all() and np.abs(X).max() <= FLOAT32_MAX)


def first_bad_cell(X: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first value of a numeric array that is not a finite float32, if any."""
    if _finite_float32(X.astype(np.float64)):
        return None
    return tuple(np.argwhere(~np.isfinite(X) | (np.abs(X.astype(np.float64)) > FLOAT32_MAX))[0])


def parse_npy(body: bytes, shape: tuple[int, ...], max_rows: int, image: bool) -> np.ndarray:
    """A NumPy .npy array (np.save; never pickled objects) of shape [rows, *shape]: float or
    integer values for tables, uint8 for images. The bulk path: no JSON to parse."""
    if not body.startswith(b"\x93NUMPY"):
        raise BadRequest("the body is not a .npy array (write it with numpy.save)")
    try:
        X = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadRequest(f"the body is not a .npy array: {e}") from None
    if X.ndim != 1 + len(shape) or X.shape[1:] != shape:
        raise BadRequest(f"expected an array of shape [rows, {', '.join(map(str, shape))}], "
                         f"got {list(X.shape)}")
    _check_count(len(X), max_rows, "image" if image else "row")
    if image:
        if X.dtype != np.uint8:
            raise BadRequest(f"images must be uint8, got {X.dtype}")
        return X
    if X.dtype.kind not in "iuf":
        raise BadRequest(f"expected a float or integer array, got {X.dtype}")
    if (bad := first_bad_cell(X)) is not None:
        raise BadRequest(f"row {bad[0]}, column {bad[1]}: expected a finite number in the float32 "
                         f"range, got {X[bad]}")
    return X.astype(np.float32)


def _pixels_ok(v) -> bool:
    return type(v) in NUMBER_TYPES and math.isfinite(v) and v == int(v) and 0 <= v <= 255


def _image_problem(img, shape: tuple[int, int, int]) -> str | None:
    c, h, w = shape
    def length(x):
        return len(x) if type(x) is list else _describe(x)
    if type(img) is not list or len(img) != c:
        return f"expected {c} channel(s), got {length(img)}"
    for channel in img:
        if type(channel) is not list or len(channel) != h:
            return f"expected {h} rows per channel, got {length(channel)}"
        for row in channel:
            if type(row) is not list or len(row) != w:
                return f"expected {w} pixels per row, got {length(row)}"
            if not (set(map(type, row)) <= NUMBER_TYPES and all(map(_pixels_ok, row))):
                bad = next(v for v in row if not _pixels_ok(v))
                return f"pixel values must be integers 0..255, got {_describe(bad) if type(bad) not in NUMBER_TYPES else bad}"
    return None


def parse_images(instances, shape: tuple[int, int, int], max_rows: int) -> np.ndarray:
    """Images as nested lists [channels][height][width] of integers 0..255 -> uint8 [n, C, H, W]."""
    _check_list(instances, max_rows, "image")
    for i, img in enumerate(instances):
        if problem := _image_problem(img, shape):
            raise BadRequest(f"image {i} (shape {list(shape)}, channels x height x width): {problem}")
    return np.array(instances, dtype=np.uint8)


def _numbers(values: list, column: dict) -> np.ndarray:
    """Checked numeric values as float64, NaN for null. Text (in a column of numbers with text,
    with the file's decimal mark) and integers beyond float64 go through number_or_nan, as
    training read them."""
    if column.get("text") != "missing":
        try:
            return np.array([math.nan if v is None else v for v in values], dtype=np.float64)
        except OverflowError:
            pass
    decimal = column.get("decimal", ".")
    return np.array([number_or_nan(v, decimal) for v in values], dtype=np.float64)


def parse_records(instances, columns: list[dict], max_rows: int,
                  ignored: frozenset = frozenset()) -> dict[str, np.ndarray]:
    """Rows of a mixed table (records keyed by column name, or lists in training order) as the
    graph's per-column inputs. A numeric column takes a number or null; null, and a number the
    graph cannot hold (beyond float32; NaN or an infinity from a lenient JSON writer), is a gap,
    imputed in the graph, as training read such values. A column of numbers with text in it
    (`"text": "missing"`) also takes text, read as training read it. A categorical column takes
    text, a number (5, 5.0 and "5" are one category) or null (null -> "", the missing category)."""
    _check_list(instances, max_rows, "row")
    names = [c["name"] for c in columns]
    rows = [_row_values(i, row, names, ignored) for i, row in enumerate(instances)]
    feeds = {}
    for j, column in enumerate(columns):
        values = [row[j] for row in rows]
        if column["type"] == "numeric":
            allowed = (NUMBER_TYPES | {str}) if column.get("text") == "missing" else NUMBER_TYPES
            for i, v in enumerate(values):
                if v is not None and type(v) not in allowed:
                    raise BadRequest(f"row {i}, column {column['name']!r}: expected a number or "
                                     f"null, got {_describe(v)}")
            numbers = _numbers(values, column)
            feeds[column_input(column)] = finite_float32(numbers).astype(np.float32).reshape(-1, 1)
        else:
            for i, v in enumerate(values):
                if v is not None and type(v) not in (str, int, float, bool):
                    raise BadRequest(f"row {i}, column {column['name']!r}: expected text, a number or null, "
                                     f"got {_describe(v)}")
            feeds[column_input(column)] = np.array([category_text(v) for v in values],
                                                   dtype=object).reshape(-1, 1)
    return feeds
