"""Load the data (a built-in set, a user's CSV/Parquet table or image folder), check it, and split
it train/validation/test.

Built-in tables go through the same path as user files: they are turned into a DataFrame first.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn import datasets as skdatasets
from sklearn.model_selection import train_test_split

from training.columns import Column, graph_input, sort_columns
from training.files import read_file
from training.rules import (MIN_TRAIN_ROWS, DataError, DataNote, Target, check_rows, json_label,
                            names, too_few_to_split)


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
    left_out: list[dict] | None = None  # the file's other columns: [{"name", "reason"}] (tables)


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
    labels = getattr(bunch, "target_names", None)
    if name != "diabetes" and labels is not None:  # classification: use the label names, not 0..k-1
        frame["target"] = np.asarray(labels)[frame["target"].to_numpy()]
        if name == "digits":
            frame["target"] = frame["target"].astype(int)
    return frame, "target"


def infer_task(y: pd.Series) -> str:
    """classification or regression, as the target's values suggest (training/rules.py)."""
    return Target(str(y.name)).add(y.dropna()).infer_task()


ID_NAMES = {"id", "index", "row", "row_id", "unnamed: 0"}


def is_row_id(name: str, values: pd.Series) -> bool:
    """An obvious row id: named like one, and a distinct value in every row."""
    name = str(name).lower()
    return (name in ID_NAMES or name.endswith("_id")) and values.is_unique and len(values) > 1


def check_forced(features: list, categorical, numeric) -> None:
    """--categorical and --numeric name features, and no column both."""
    categorical, numeric = set(categorical or ()), set(numeric or ())
    if unknown := sorted((categorical | numeric) - set(features), key=str):
        raise DataError(f"--categorical/--numeric name column(s) that are not features: {names(unknown)}")
    if both := sorted(categorical & numeric, key=str):
        raise DataError(f"column(s) both --categorical and --numeric: {names(both)}")


def select_features(frame: pd.DataFrame, target: str, features: list[str] | None, drop) -> list:
    """The feature columns: the ones named, else all but the target, less --drop and obvious row
    ids (judged on `frame`: the whole table, or a streamed file's first chunk)."""
    if target not in frame.columns:
        raise DataError(f"target column {target!r} not found; columns are: {names(frame.columns)}")
    if features:
        if unknown := [f for f in features if f not in frame.columns]:
            raise DataError(f"feature column(s) not found: {names(unknown)}; "
                            f"columns are: {names(frame.columns)}")
        if target in features:
            raise DataError(f"the target {target!r} is also listed as a feature")
    else:
        features = [c for c in frame.columns if c != target]
        ids = [c for c in features if c not in (drop or ()) and is_row_id(c, frame[c])]
        if ids:
            warnings.warn(f"dropped row-id column(s) {', '.join(map(str, ids))} "
                          "(keep with --features)", DataNote)
        features = [c for c in features if c not in ids]
    if unknown := [d for d in (drop or ()) if d not in frame.columns]:
        raise DataError(f"--drop names column(s) not found: {names(unknown)}")
    features = [c for c in features if c not in (drop or ())]
    if not features:
        raise DataError("no feature columns: the table has only the target")
    return features


def not_features(frame: pd.DataFrame, target: str, features: list, drop) -> dict[str, str]:
    """Why each column of the file that is not a feature is not one (the service accepts these
    in a record and ignores them)."""
    def reason(c) -> str:
        if c == target:
            return "target"
        if c in (drop or ()):
            return "--drop"
        return "row id" if is_row_id(c, frame[c]) else "not in --features"
    return {str(c): reason(c) for c in frame.columns if c not in features}


def to_table(frame: pd.DataFrame, target: str, features: list[str] | None, task: str,
             source: str, categorical=None, numeric=None, drop=None, decimal: str = ".") -> Table:
    """Check the frame and encode it; every problem is a DataError naming the columns. `decimal`:
    the file's decimal mark (for numbers written as text)."""
    features = select_features(frame, target, features, drop)
    check_forced(features, categorical, numeric)
    left_out = not_features(frame, target, features, drop)

    missing_target = frame[target].isna()
    dropped = int(missing_target.sum())
    frame = frame.loc[~missing_target]
    check_rows(source, dropped + len(frame), len(frame), target)
    if len(frame) < MIN_TRAIN_ROWS:
        raise DataError(f"too few rows ({len(frame)}) to train on; need at least {MIN_TRAIN_ROWS + 2}")

    sorted_columns = sort_columns(frame, features, categorical, numeric, decimal)
    kept = sorted_columns.kept
    left_out.update(sorted_columns.left_out)
    columns = describe(kept)
    X = table_rows({c.name: c.values for c in kept}, mixed=columns is not None)

    target_summary = Target(target).add(frame[target])
    task, classes = target_summary.settle(task)
    y = target_summary.encode(frame[target], task)
    if task == "classification" and (single := np.flatnonzero(np.bincount(y, minlength=len(classes)) == 1)).size:
        warnings.warn(f"class(es) with a single row: {names(classes[i] for i in single)}; such a class "
                      "cannot be validated (one row cannot be both trained on and held out)", DataNote)
    return Table(X=X, y=y, feature_names=[c.name for c in kept], task=task, classes=classes,
                 source=source, dropped_rows=dropped, modality="mixed" if columns else "table",
                 columns=columns, left_out=[{"name": c, "reason": r} for c, r in left_out.items()])


def describe(kept: list[Column]) -> list[dict] | None:
    """A mixed table's columns as the model records them (training/contract.py); None for a
    numeric table (numbers only, no gaps, no codes)."""
    if not any(c.type == "categorical" or c.codes or c.text or c.gaps for c in kept):
        return None
    return [{"name": c.name, "input": graph_input(i, c.name), "type": c.type,
             **({"codes": True} if c.codes else {}),
             **({"text": "missing"} if c.text else {}),
             **({"decimal": c.decimal} if c.text and c.decimal != "." else {})}
            for i, c in enumerate(kept)]


def table_rows(values: dict[str, np.ndarray], mixed: bool):
    """The kept columns' values as the network's input rows: a mixed table's as a frame (categories
    as text, "" when missing; numbers as floats, NaN when missing), a numeric table's as float64."""
    return pd.DataFrame(values) if mixed else np.column_stack(list(values.values()))


def image_table(X: np.ndarray, labels: list, classes: list, source: str, resize: bool) -> Table:
    index = {c: i for i, c in enumerate(classes)}
    return Table(X=X, y=np.array([index[label] for label in labels], dtype=np.int64),
                 feature_names=[], task="classification", classes=[json_label(c) for c in classes],
                 source=source, modality="image", resize=resize)


def load_table(cfg) -> Table:
    """The data a config names: --images DIR, --data FILE --target COL, else the built-in --dataset."""
    from training.images import ImageError, digits_images, load_image_folder
    try:
        if cfg.images:
            X, labels, classes, resized = load_image_folder(cfg.images, cfg.image_size,
                                                            cfg.max_broken_images, cfg.progress)
            return image_table(X, labels, classes, cfg.images, resize=resized)
        if cfg.dataset == "digits-images" and not cfg.data:
            return image_table(*digits_images(), "sklearn:digits-images", resize=False)
    except ImageError as e:
        raise DataError(str(e)) from None
    decimal = "."
    if cfg.data:
        how, frame = read_file(cfg.data)
        target, source, decimal = cfg.target, cfg.data, how.decimal
    else:
        frame, target = load_builtin(cfg.dataset)
        source = f"sklearn:{cfg.dataset}"
    return to_table(frame, target, cfg.features, cfg.task, source, cfg.categorical, cfg.numeric,
                    cfg.drop, decimal)


def split_table(table: Table, val_size: float, test_size: float, seed: int) -> Split:
    """Seeded train/validation/test split, stratified for classification where every class allows it."""
    n = len(table.y)
    n_test, n_val = int(np.ceil(n * test_size)), int(np.ceil(n * val_size))
    if n - n_test - n_val < MIN_TRAIN_ROWS:
        raise too_few_to_split(n, val_size, test_size)
    stratify = None
    if table.task == "classification":
        counts = np.bincount(table.y)
        # Each class needs a row in every split and at least as many classes as test rows.
        if counts.min() >= 3 and len(counts) <= min(n_test or n_val, n_val):
            stratify = table.y
        else:
            warnings.warn("some classes have fewer than 3 rows, so the split is not stratified",
                          DataNote)
    idx = np.arange(n)
    rest, test = (train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
                  if n_test else (idx, idx[:0]))  # --test-size 0: no test split
    train, val = train_test_split(rest, test_size=n_val, random_state=seed,
                                  stratify=None if stratify is None else stratify[rest])
    X, y = table.X, table.y
    take = (lambda rows: X.iloc[rows].reset_index(drop=True)) if isinstance(X, pd.DataFrame) \
        else (lambda rows: X[rows])
    return Split(X_train=take(train), y_train=y[train], X_val=take(val), y_val=y[val],
                 X_test=take(test), y_test=y[test], stratified=stratify is not None)
