"""Load the data (a built-in set, a user's CSV/Parquet table or image folder), check it, and split
it train/validation/test.

Built-in tables go through the same path as user files: they are turned into a DataFrame first.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import datasets as skdatasets
from sklearn.model_selection import train_test_split

from training.contract import category_text

MAX_CLASSES_FROM_NUMBERS = 20  # an integer-valued target with more distinct values is a regression
MIN_TRAIN_ROWS = 10  # fewer cannot fit a network, nor give BatchNorm meaningful batch statistics


class DataError(ValueError):
    """The user's data cannot be trained on; the message says why, in one line."""


@dataclass
class Table:
    """Inputs and target, checked and encoded: X float64 [rows, features] for tables, uint8
    [images, channels, height, width] for images; y class indices (int64) or values (float64)."""
    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]    # empty for images
    task: str                   # "classification" | "regression"
    classes: list | None        # class labels in the data's own values; y indexes into it
    source: str
    dropped_rows: int = 0       # rows dropped because their target was missing
    modality: str = "table"     # "table" (numbers, complete) | "mixed" (categories, gaps) | "image"
    resize: bool = False        # images: resized to a fixed size when read
    columns: list[dict] | None = None  # mixed: [{"name", "type": "numeric" | "categorical"}]


@dataclass
class Split:
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    stratified: bool


def load_builtin(name: str) -> tuple[pd.DataFrame, str]:
    """A scikit-learn dataset that ships with the package (no download), as a frame with a `target` column."""
    loader = getattr(skdatasets, f"load_{name}", None)
    if loader is None:
        raise DataError(f"unknown built-in dataset {name!r}")
    bunch = loader(as_frame=True)
    frame = bunch.frame.copy()
    names = getattr(bunch, "target_names", None)
    if name != "diabetes" and names is not None:  # classification: use the label names, not 0..k-1
        frame["target"] = np.asarray(names)[frame["target"].to_numpy()]
        if name == "digits":
            frame["target"] = frame["target"].astype(int)
    return frame, "target"


PARQUET, CSV = (".parquet", ".pq"), (".csv", ".txt", ".tsv")


def check_file(path: str) -> str:
    """The file's lower-case suffix, once it is known to be a non-empty CSV or Parquet file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {path}")
    if p.is_dir():
        raise DataError(f"{path} is a directory; expected a CSV or Parquet file")
    if p.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    suffix = p.suffix.lower()
    if suffix not in PARQUET + CSV:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv or .parquet")
    return suffix


def read_table(path: str) -> pd.DataFrame:
    p, suffix = Path(path), check_file(path)
    try:
        if suffix in PARQUET:
            frame = pd.read_parquet(p)
        else:
            frame = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    except Exception as e:  # pandas/pyarrow raise many kinds; the first line names the problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read {path}: {first}") from None
    check_header(path, _csv_header(p) if suffix in CSV else list(map(str, frame.columns)))
    if frame.empty:
        raise DataError(f"{path} has no data rows")
    return frame


def check_header(path: str, header: list[str]) -> None:
    if dupes := sorted({c for c in header if header.count(c) > 1}):
        raise DataError(f"{path}: duplicate column names: {', '.join(dupes)}")


def _csv_header(path: Path) -> list[str]:
    """The header as written: pandas renames duplicate names (a, a.1) instead of reporting them."""
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        return next(csv.reader(f, delimiter=delimiter), [])


def _delimiter_hint(frame: pd.DataFrame) -> str:
    """A hint when a whole row landed in one column: the file uses another delimiter."""
    if len(frame.columns) == 1:
        for sep in (";", "\t", "|"):
            if sep in str(frame.columns[0]):
                return f" (the file looks {sep!r}-separated; save it comma-separated, or as .tsv for tabs)"
    return ""


def _names(columns, limit: int = 8) -> str:
    columns = [str(c) for c in columns]
    more = f", ... ({len(columns) - limit} more)" if len(columns) > limit else ""
    return ", ".join(columns[:limit]) + more


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def infer_task(y: pd.Series) -> str:
    if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        return "classification"
    values = y.to_numpy(dtype=float)
    if np.all(np.mod(values, 1) == 0) and len(np.unique(values)) <= MAX_CLASSES_FROM_NUMBERS:
        return "classification"
    return "regression"


def _json_label(v):
    """A class label as a plain JSON value (numpy scalars are not JSON)."""
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return int(v) if float(v).is_integer() else float(v)
    return str(v)


ID_NAMES = {"id", "index", "row", "row_id", "unnamed: 0"}


def is_row_id(name: str, values: pd.Series) -> bool:
    """An obvious row id: named like one, and a distinct value in every row."""
    name = str(name).lower()
    return (name in ID_NAMES or name.endswith("_id")) and values.is_unique and len(values) > 1


def column_types(frame: pd.DataFrame, features: list[str], categorical, numeric) -> dict[str, str]:
    """'numeric' or 'categorical' per feature: forced by the options, else by the data."""
    categorical, numeric = set(categorical or ()), set(numeric or ())
    if unknown := sorted((categorical | numeric) - set(features)):
        raise DataError(f"--categorical/--numeric name column(s) that are not features: {_names(unknown)}")
    if both := sorted(categorical & numeric):
        raise DataError(f"column(s) both --categorical and --numeric: {_names(both)}")
    types = {}
    for c in features:
        is_number = pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
        if c in numeric and not is_number:
            converted = pd.to_numeric(frame[c], errors="coerce")
            bad = int((converted.isna() & frame[c].notna()).sum())
            raise DataError(f"--numeric column {c!r} has {_rows(bad)} that are not numbers")
        types[c] = "categorical" if c in categorical or not is_number else "numeric"
    return types


def select_features(frame: pd.DataFrame, target: str, features: list[str] | None, drop) -> list:
    """The feature columns: the ones named, else all but the target, less --drop and obvious row
    ids (judged on `frame`: the whole table, or a streamed file's first chunk)."""
    if target not in frame.columns:
        raise DataError(f"target column {target!r} not found; columns are: {_names(frame.columns)}"
                        + _delimiter_hint(frame))
    if features:
        if unknown := [f for f in features if f not in frame.columns]:
            raise DataError(f"feature column(s) not found: {_names(unknown)}; "
                            f"columns are: {_names(frame.columns)}")
        if target in features:
            raise DataError(f"the target {target!r} is also listed as a feature")
    else:
        features = [c for c in frame.columns if c != target]
        ids = [c for c in features if c not in (drop or ()) and is_row_id(c, frame[c])]
        if ids:
            warnings.warn(f"dropped row-id column(s) {', '.join(map(str, ids))} "
                          "(keep with --features)")
        features = [c for c in features if c not in ids]
    if unknown := [d for d in (drop or ()) if d not in frame.columns]:
        raise DataError(f"--drop names column(s) not found: {_names(unknown)}")
    features = [c for c in features if c not in (drop or ())]
    if not features:
        raise DataError("no feature columns: the table has only the target")
    return features


def to_table(frame: pd.DataFrame, target: str, features: list[str] | None, task: str,
             source: str, categorical=None, numeric=None, drop=None) -> Table:
    """Check the frame and encode it; every problem is a DataError naming the columns."""
    features = select_features(frame, target, features, drop)

    missing_target = frame[target].isna()
    dropped = int(missing_target.sum())
    frame = frame.loc[~missing_target]
    if frame.empty:
        raise DataError(f"every row's target {target!r} is missing")
    if len(frame) < MIN_TRAIN_ROWS:
        raise DataError(f"too few rows ({len(frame)}) to train on; need at least {MIN_TRAIN_ROWS + 2}")

    types = column_types(frame, features, categorical, numeric)
    numbers = [c for c in features if types[c] == "numeric"]
    X_num = frame[numbers].apply(pd.to_numeric).to_numpy(dtype=np.float64)
    if (inf := np.isinf(X_num).sum(axis=0)).any():
        cols = [f"{c} ({_rows(n)})" for c, n in zip(numbers, inf) if n]
        raise DataError(f"feature column(s) have infinite values: {_names(cols)}")
    mixed = len(numbers) < len(features) or bool(np.isnan(X_num).any())
    if mixed:
        # Categories as text (a missing one is its own value, ""); numbers as floats with NaN.
        X = pd.DataFrame({str(c): (frame[c].astype(object).map(category_text)
                                   if types[c] == "categorical"
                                   else pd.to_numeric(frame[c]).astype(np.float64))
                          for c in features})
        X = X.reset_index(drop=True)
        columns = [{"name": str(c), "type": types[c]} for c in features]
    else:
        X, columns = X_num, None
    if len(X_num) and np.nanmax(np.abs(X_num), initial=0) > np.finfo(np.float32).max:
        raise DataError("feature values exceed the float32 range the model computes in")

    y_raw = frame[target]
    task = infer_task(y_raw) if task == "auto" else task
    if task == "classification":
        codes, uniques = pd.factorize(y_raw, sort=True)
        classes = [_json_label(v) for v in uniques]
        if len(classes) < 2:
            raise DataError(f"target {target!r} has a single class ({classes[0]!r}); "
                            "classification needs at least two")
        y = codes.astype(np.int64)
    else:
        if not pd.api.types.is_numeric_dtype(y_raw) or pd.api.types.is_bool_dtype(y_raw):
            raise DataError(f"target {target!r} is not numeric, so it cannot be a regression target")
        y = y_raw.to_numpy(dtype=np.float64)
        if not np.isfinite(y).all():
            raise DataError(f"target {target!r} has infinite values")
        if np.ptp(y) == 0:
            raise DataError(f"target {target!r} is constant; there is nothing to learn")
        classes = None
    return Table(X, y, [str(f) for f in features], task, classes, source, dropped,
                 modality="mixed" if mixed else "table", columns=columns)


def image_table(X: np.ndarray, labels: list, classes: list, source: str, resize: bool) -> Table:
    index = {c: i for i, c in enumerate(classes)}
    return Table(X, np.array([index[label] for label in labels], dtype=np.int64), [],
                 "classification", [_json_label(c) for c in classes], source,
                 modality="image", resize=resize)


def load_table(cfg) -> Table:
    """The data a config names: --images DIR, --data FILE --target COL, else the built-in --dataset."""
    from training.images import ImageError, digits_images, load_image_folder
    try:
        if cfg.images:
            return image_table(*load_image_folder(cfg.images, cfg.image_size), cfg.images,
                               resize=cfg.image_size is not None)
        if cfg.dataset == "digits-images" and not cfg.data:
            return image_table(*digits_images(), "sklearn:digits-images", resize=False)
    except ImageError as e:
        raise DataError(str(e)) from None
    if cfg.data:
        frame, target, source = read_table(cfg.data), cfg.target, cfg.data
    else:
        frame, target = load_builtin(cfg.dataset)
        source = f"sklearn:{cfg.dataset}"
    return to_table(frame, target, cfg.features, cfg.task, source, cfg.categorical, cfg.numeric,
                    cfg.drop)


def split_table(table: Table, val_size: float, test_size: float, seed: int) -> Split:
    """Seeded train/validation/test split, stratified for classification where every class allows it."""
    n = len(table.y)
    n_test, n_val = int(np.ceil(n * test_size)), int(np.ceil(n * val_size))
    if n - n_test - n_val < MIN_TRAIN_ROWS:
        need = int(np.ceil((MIN_TRAIN_ROWS + 2) / (1 - val_size - test_size)))
        raise DataError(f"too few rows ({n}) to split into train/validation/test; need at least {need}")
    stratify = None
    if table.task == "classification":
        counts = np.bincount(table.y)
        # Each class needs a row in every split and at least as many classes as test rows.
        if counts.min() >= 3 and len(counts) <= min(n_test, n_val):
            stratify = table.y
        else:
            warnings.warn("some classes have fewer than 3 rows, so the split is not stratified")
    idx = np.arange(n)
    rest, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
    train, val = train_test_split(rest, test_size=n_val, random_state=seed,
                                  stratify=None if stratify is None else stratify[rest])
    X, y = table.X, table.y
    take = (lambda rows: X.iloc[rows].reset_index(drop=True)) if isinstance(X, pd.DataFrame) \
        else (lambda rows: X[rows])
    return Split(take(train), y[train], take(val), y[val], take(test), y[test], stratify is not None)
