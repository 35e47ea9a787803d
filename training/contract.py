"""The exported model's contract, shared by training and the service (no heavy imports here).

Graph input: `features` float32 [batch, n_features] of raw values (tables), `images` uint8
[batch, channels, height, width] (images), or, for mixed tables, one input per column named after
it: float32 [batch, 1] (NaN = missing) or string [batch, 1] ("" = missing). Outputs: `probabilities` float32 [batch, n_classes] and
`label` int64 [batch] (an index into the `classes` metadata), or `prediction` float32 [batch] in the
target's units. Every metadata entry is a JSON value.
"""
import json
import math

import numpy as np

SCHEMA_VERSION = 1
PIPELINE_LABEL = "normserve"  # the BentoML store label of models this project trained
INPUTS = {"table": "features", "image": "images", "mixed": None}  # mixed: per column
OUTPUTS = {"classification": ["probabilities", "label"], "regression": ["prediction"]}
# What a model file must carry for the service to use it, and what each modality adds.
REQUIRED_METADATA = ("schema_version", "model", "task", "modality", "input", "feature_names", "classes",
                     "normalization")
MODALITY_METADATA = {"table": (), "image": ("image",), "mixed": ("columns",)}


def encode_metadata(metadata: dict) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in metadata.items()}


def decode_metadata(custom_map: dict[str, str]) -> dict:
    """Metadata read back from onnx or onnxruntime (`session.get_modelmeta().custom_metadata_map`)."""
    return {k: json.loads(v) for k, v in custom_map.items()}


FLOAT32_MAX = float(np.finfo(np.float32).max)


def column_input(column: dict) -> str:
    """A mixed table's column: the name of its graph input (models from before the graph's own
    input names were recorded take the column's name)."""
    return column.get("input", column["name"])


def finite_float32(values) -> np.ndarray:
    """Numbers as a numeric column feeds them to the graph, in training and serving alike: NaN
    (missing) for a value that is missing, infinite or beyond the float32 range."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(values) <= FLOAT32_MAX, values, np.nan)


def number_or_nan(value, decimal: str = ".") -> float:
    """One value of a numeric column (a number, null, or, in a column of numbers with some text in
    it, text) as a float; NaN when it is missing or text that is not a number. With decimal ","
    (a file written with decimal commas), text such as "1.234,5" reads as 1234.5."""
    if value is None:
        return math.nan
    if decimal == "," and isinstance(value, str) and "," in value:
        value = value.replace(".", "").replace(",", ".")
    try:
        return float(value)
    except (ValueError, TypeError, OverflowError):  # not a number (text, a date); beyond float64
        return math.nan


# Texts that mean a missing value (pandas' defaults when it reads a CSV file): training reads them
# as missing in every file, and the service in every request.
MISSING_TEXTS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                           "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


BOOLEAN_TEXTS = {"true": "True", "false": "False"}  # pandas reads true, TRUE, True as a boolean


def category_text(value) -> str:
    """A categorical value as the text the graph compares: the same in training and serving
    (5, 5.0 and "5" are one category; true, "true" and "TRUE" are "True"; a missing value, or a
    text in MISSING_TEXTS, is "")."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, str):
        return "" if value in MISSING_TEXTS else BOOLEAN_TEXTS.get(value.lower(), value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
