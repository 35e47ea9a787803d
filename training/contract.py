"""The exported model's contract, shared by training and the service (no heavy imports here).

Graph input: `features` float32 [batch, n_features] of raw values (tables), `images` uint8
[batch, channels, height, width] (images), or, for mixed tables, one input per column named after
it: float32 [batch, 1] (NaN = missing) or string [batch, 1] ("" = missing). Outputs: `probabilities` float32 [batch, n_classes] and
`label` int64 [batch] (an index into the `classes` metadata), or `prediction` float32 [batch] in the
target's units. Every metadata entry is a JSON value.
"""
import json

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


def category_text(value) -> str:
    """A categorical value as the text the graph compares: the same in training and serving
    (5, 5.0 and "5" are one category; a missing value is "")."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
