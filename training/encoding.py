"""Mixed tables (text categories, missing values): imputing and one-hot encoding as a scikit-learn
ColumnTransformer fitted on the training split, exported with skl2onnx into the same ONNX graph as
the network. (Scaling the numeric columns is the normalizer's job: training/normalize.py.)

Numeric columns: a missing value -> the training median. Categorical columns (text; a missing
value is its own category, ""): one-hot over the training categories that have enough rows; a
rare category, or one never seen in training, is all zeros, not an error. Integer code columns
(training/rules.py: a person, a store) are numeric columns that are also one-hot encoded over their
frequent training values, as a category column is (a missing or unseen value: all zeros). The
output has the numeric columns first, then the categories' one-hot columns, then the codes'. The
graph takes one input per column (training/columns.py: graph_input names it): float32 [batch, 1]
(NaN = missing) or string [batch, 1]. The encoder is fitted and run on frames whose columns carry
those input names, so that its ONNX conversion takes them unchanged.
"""
from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

from training.contract import column_input


def names(columns: list[dict], kind: str) -> list[str]:
    """The graph inputs of the columns of one kind."""
    return [column_input(c) for c in columns if c["type"] == kind]


def by_input(frame: pd.DataFrame, columns: list[dict]) -> pd.DataFrame:
    """The table's columns under their graph input names."""
    return pd.DataFrame({column_input(c): frame[c["name"]] for c in columns})


# A column's categories get a one-hot column each when they have at least MIN_CATEGORY_ROWS training
# rows, at most MAX_CATEGORIES per column (the most frequent; MAX_CODES for a code column, whose
# values are the point); rarer ones are pooled with the unseen ones as all zeros. The width stays
# bounded whatever the cardinality.
MIN_CATEGORY_ROWS, MAX_CATEGORIES, MAX_CODES = 5, 100, 1000


def kept_categories(rows: pd.Series, most: int = MAX_CATEGORIES) -> list:
    """`rows`: training rows per value. The most frequent values with enough rows (ties by value),
    sorted; the most frequent one if none has enough."""
    ranked = sorted(rows.items(), key=lambda item: (-item[1], item[0]))
    kept = [value for value, n in ranked if n >= MIN_CATEGORY_ROWS][:most]
    return sorted(kept or [ranked[0][0]]) if ranked else []


def code_names(columns: list[dict]) -> list[str]:
    return [column_input(c) for c in columns if c.get("codes")]


def value_rows(frame: pd.DataFrame, columns: list[dict]) -> dict[str, pd.Series]:
    """Rows per value of each categorical column (its texts) and code column (its integers):
    what the vocabularies are chosen from (a streamed scan counts them chunk by chunk)."""
    by_name = by_input(frame, columns)
    out = {c: by_name[c].value_counts() for c in names(columns, "categorical")}
    out.update({c: by_name[c].dropna().astype(np.int64).value_counts() for c in code_names(columns)})
    return out


def fit_encoder(frame: pd.DataFrame, columns: list[dict], rows: dict[str, pd.Series] | None = None
                ) -> ColumnTransformer:
    """Fitted on the rows given (the training split) only; the vocabularies from `rows`
    (value_rows of the whole training split, where `frame` is a sample of it)."""
    rows = value_rows(frame, columns) if rows is None else rows
    frame = by_input(frame, columns)
    # keep_empty_features: a column with no value in these rows (a forced --numeric column, or
    # one whose few values all fell outside the training rows) keeps its place, imputed as 0.
    numeric = SimpleImputer(strategy="median", keep_empty_features=True)
    categorical = OneHotEncoder(categories=[kept_categories(rows[c]) for c in names(columns, "categorical")],
                                handle_unknown="ignore", sparse_output=True, dtype=np.float64)
    # Codes: a missing value is imputed as one below the smallest code, which has no column. (The
    # graph casts a code to int64 before the lookup, so a fractional value, never seen in
    # training, counts as its integer part there.)
    codes = [np.array(kept_categories(rows[c], MAX_CODES), dtype=np.int64) for c in code_names(columns)]
    below = min((int(c[0]) - 1 for c in codes), default=0)
    coded = make_pipeline(SimpleImputer(strategy="constant", fill_value=float(below)),
                          OneHotEncoder(categories=[c.astype(np.float64) for c in codes],
                                        handle_unknown="ignore", sparse_output=True, dtype=np.float64))
    steps = [("numeric", numeric, names(columns, "numeric")),
             ("categorical", categorical, names(columns, "categorical")),
             ("codes", coded, code_names(columns))]
    # Sparse output: fitting transforms the rows, and a dense block of every one-hot column would
    # cost more memory than anything else a streamed run holds (`transform` below is dense).
    return ColumnTransformer([s for s in steps if s[2]], sparse_threshold=1.0).fit(frame)


def transform(pre: ColumnTransformer, frame: pd.DataFrame, columns: list[dict]) -> np.ndarray:
    """The fitted encoder's output rows, float32: `compact` expanded (equal to pre.transform's,
    tested, without its float64 copy of every one-hot column)."""
    import torch
    return expand(torch.from_numpy(compact(pre, frame, columns)), one_hot_sizes(pre)).numpy()


def compact(pre: ColumnTransformer, frame: pd.DataFrame, columns: list[dict]) -> np.ndarray:
    """`transform`'s rows with each categorical and code column as one number, the index of its
    value among the column's one-hot columns (-1: none of them), instead of the one-hot columns:
    what a streamed run holds in its shuffle buffer (`expand` gives transform's rows back)."""
    frame, parts = by_input(frame, columns), [np.zeros((len(frame), 0))]
    steps = pre.named_transformers_
    if not len(frame):  # (scikit-learn refuses no rows: a streamed run's ranks but the first hold none)
        return np.zeros((0, len(names(columns, "numeric")) + len(one_hot_sizes(pre))), np.float32)
    if "numeric" in steps:
        parts.append(steps["numeric"].transform(frame[names(columns, "numeric")]))
    if "categorical" in steps:
        for name, values in zip(names(columns, "categorical"), steps["categorical"].categories_):
            parts.append(pd.Index(values).get_indexer(frame[name])[:, None])
    if "codes" in steps:
        imputer, encoder = steps["codes"]
        filled = imputer.transform(frame[code_names(columns)])
        for j, values in enumerate(encoder.categories_):
            parts.append(pd.Index(values).get_indexer(filled[:, j])[:, None])
    return np.hstack(parts).astype(np.float32)


def one_hot_sizes(pre: ColumnTransformer) -> list[int]:
    """How many one-hot columns each categorical, then each code column has."""
    steps = pre.named_transformers_
    return ([len(v) for v in steps["categorical"].categories_] if "categorical" in steps else []) + \
        ([len(v) for v in steps["codes"][-1].categories_] if "codes" in steps else [])


def expand(X, sizes: list[int]):
    """`compact`'s rows (a float32 torch tensor) as `transform`'s: each index as its one-hot
    columns, written into one float32 block (no wider intermediate)."""
    import torch
    numeric = X.shape[1] - len(sizes)
    out = torch.zeros(X.shape[0], numeric + sum(sizes), dtype=X.dtype, device=X.device)
    out[:, :numeric] = X[:, :numeric]
    offset = numeric
    for j, k in enumerate(sizes):
        index = X[:, numeric + j].long()
        rows = torch.nonzero(index >= 0).squeeze(1)
        out[rows, offset + index[rows]] = 1
        offset += k
    return out


def column_feeds(frame: pd.DataFrame, columns: list[dict]) -> dict[str, np.ndarray]:
    """The graph's inputs for the rows of a frame: one [n, 1] array per column."""
    return {column_input(c): (frame[[c["name"]]].to_numpy(np.float32) if c["type"] == "numeric"
                              else frame[[c["name"]]].to_numpy(str).astype(object))
            for c in columns}


def learned(pre: ColumnTransformer, columns: list[dict]) -> dict[str, dict]:
    """What was learned from the training split, per column input: a median or the categories
    (and for a code column, how many codes have a one-hot column)."""
    out = {}
    if "numeric" in pre.named_transformers_:
        medians = pre.named_transformers_["numeric"].statistics_
        out.update({name: {"median": float(m)} for name, m in zip(names(columns, "numeric"), medians)})
    if "categorical" in pre.named_transformers_:
        categories = pre.named_transformers_["categorical"].categories_
        out.update({name: {"categories": [str(c) for c in cats]}
                    for name, cats in zip(names(columns, "categorical"), categories)})
    if "codes" in pre.named_transformers_:
        encoder = pre.named_transformers_["codes"][-1]
        for name, values in zip(code_names(columns), encoder.categories_):
            out[name]["codes"] = len(values)  # one-hot columns beside the number
    return out


ENCODED = "encoded"  # the name of the encoder's output inside the joined graph


def export_encoder(pre: ColumnTransformer, columns: list[dict], like: onnx.ModelProto) -> onnx.ModelProto:
    """The fitted encoder as ONNX, at the opset and IR version of `like` (the network's graph),
    its output renamed so the two graphs can be joined."""
    from onnx import version_converter
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    opset = next(o.version for o in like.opset_import if o.domain in ("", "ai.onnx"))
    types = [(column_input(c), FloatTensorType([None, 1]) if c["type"] == "numeric"
              else StringTensorType([None, 1])) for c in columns]
    proto = convert_sklearn(pre, initial_types=types, target_opset={"": min(opset, 18), "ai.onnx.ml": 3})
    proto = version_converter.convert_version(proto, opset)
    proto.ir_version = like.ir_version
    proto = onnx.compose.add_prefix(proto, "pre_", rename_inputs=False, rename_outputs=False)
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [ENCODED if o == old else o for o in node.output]
    proto.graph.output[0].name = ENCODED
    return proto


def join(pre: onnx.ModelProto, net: onnx.ModelProto, net_input: str) -> onnx.ModelProto:
    """One graph: the encoder's output feeds the network's input."""
    return onnx.compose.merge_models(pre, net, io_map=[(pre.graph.output[0].name, net_input)])
