"""Mixed tables (text categories, missing values): a scikit-learn pipeline fitted on the training
split, exported with skl2onnx into the same ONNX graph as the network.

Numeric columns: missing values -> the training median, then standardized. Categorical columns
(text; a missing value is its own category, ""): one-hot over the training categories; a category
never seen in training is all zeros, not an error. The graph takes one input per column, named
after it: float32 [batch, 1] (NaN = missing) or string [batch, 1].
"""
from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

MISSING_CATEGORY = ""


def _names(columns: list[dict], kind: str) -> list[str]:
    return [c["name"] for c in columns if c["type"] == kind]


def fit_preprocessor(frame: pd.DataFrame, columns: list[dict], standardize: bool = True):
    """Fitted on the rows given (the training split) only; `standardize=False` for ablation."""
    numeric = Pipeline([("impute", SimpleImputer(strategy="median")),
                        ("scale", StandardScaler(with_mean=standardize, with_std=standardize))])
    categorical = OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float64)
    steps = [("numeric", numeric, _names(columns, "numeric")),
             ("categorical", categorical, _names(columns, "categorical"))]
    return ColumnTransformer([s for s in steps if s[2]]).fit(frame)


def transform(pre: ColumnTransformer, frame: pd.DataFrame) -> np.ndarray:
    return np.asarray(pre.transform(frame), dtype=np.float32)


def column_feeds(frame: pd.DataFrame, columns: list[dict]) -> dict[str, np.ndarray]:
    """The graph's inputs for the rows of a frame: one [n, 1] array per column."""
    return {c["name"]: (frame[[c["name"]]].to_numpy(np.float32) if c["type"] == "numeric"
                        else frame[[c["name"]]].to_numpy(str).astype(object))
            for c in columns}


def describe(pre: ColumnTransformer, columns: list[dict]) -> list[dict]:
    """Every input column with its type and what was learned from the training split."""
    learned = {}
    if "numeric" in pre.named_transformers_:
        pipe = pre.named_transformers_["numeric"]
        imputer, scaler = pipe.named_steps["impute"], pipe.named_steps["scale"]
        for name, median, mean, scale in zip(_names(columns, "numeric"), imputer.statistics_,
                                             scaler.mean_, scaler.scale_):
            learned[name] = {"median": float(median), "mean": float(mean), "scale": float(scale)}
    if "categorical" in pre.named_transformers_:
        for name, cats in zip(_names(columns, "categorical"),
                              pre.named_transformers_["categorical"].categories_):
            learned[name] = {"categories": [str(c) for c in cats]}
    return [{**c, **learned[c["name"]]} for c in columns]


def export_preprocessor(pre: ColumnTransformer, columns: list[dict], like: onnx.ModelProto,
                        output: str) -> onnx.ModelProto:
    """The fitted pipeline as ONNX, at the opset and IR version of `like` (the network's graph),
    its output renamed to `output` so the two graphs can be joined."""
    from onnx import version_converter
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    opset = next(o.version for o in like.opset_import if o.domain in ("", "ai.onnx"))
    types = [(c["name"], FloatTensorType([None, 1]) if c["type"] == "numeric"
              else StringTensorType([None, 1])) for c in columns]
    proto = convert_sklearn(pre, initial_types=types, target_opset={"": min(opset, 18), "ai.onnx.ml": 3},
                            options={StandardScaler: {"div": "div"}})  # Sub/Div, as the scaler does
    proto = version_converter.convert_version(proto, opset)
    proto.ir_version = like.ir_version
    proto = onnx.compose.add_prefix(proto, "pre_", rename_inputs=False, rename_outputs=False)
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [output if o == old else o for o in node.output]
    proto.graph.output[0].name = output
    return proto


def join(pre: onnx.ModelProto, net: onnx.ModelProto, net_input: str) -> onnx.ModelProto:
    """One graph: the preprocessor's output feeds the network's input."""
    return onnx.compose.merge_models(pre, net, io_map=[(pre.graph.output[0].name, net_input)])
