"""The exported model's contract, shared by training and the service (no heavy imports here).

Graph input: `features` float32 [batch, n_features] of raw values (tables), or `images` uint8
[batch, channels, height, width] (images). Outputs: `probabilities` float32 [batch, n_classes] and
`label` int64 [batch] (an index into the `classes` metadata), or `prediction` float32 [batch] in the
target's units. Every metadata entry is a JSON value.
"""
import json

SCHEMA_VERSION = 1
INPUTS = {"table": "features", "image": "images"}
OUTPUTS = {"classification": ["probabilities", "label"], "regression": ["prediction"]}
# What a model file must carry for the service to use it.
REQUIRED_METADATA = ("schema_version", "model", "task", "modality", "input", "feature_names", "classes",
                     "normalization", "image")


def encode_metadata(metadata: dict) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in metadata.items()}


def decode_metadata(custom_map: dict[str, str]) -> dict:
    """Metadata read back from onnx or onnxruntime (`session.get_modelmeta().custom_metadata_map`)."""
    return {k: json.loads(v) for k, v in custom_map.items()}
