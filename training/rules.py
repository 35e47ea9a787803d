"""The rules every table passes, defined once: the in-memory load (training/data.py) and the
streamed scan (training/stream.py) both use them.

A table's target is summarized chunk by chunk (`Target`): an in-memory table is one chunk. The
summary settles the task, the classes and their encoding, and the target's checks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


MAX_CLASSES_FROM_NUMBERS = 20  # an integer-valued target with more distinct values is a regression
MAX_CLASSES = 1000             # more distinct labels than this is not a classification target
MIN_TRAIN_ROWS = 10  # fewer cannot fit a network, nor give BatchNorm meaningful batch statistics
# A text column whose values are nearly all distinct (e-mails, names, free text) cannot be learned
# from as categories: more distinct values than this share of the rows (and than NEAR_UNIQUE_MIN).
NEAR_UNIQUE_SHARE, NEAR_UNIQUE_MIN = 0.5, 20


class DataError(ValueError):
    """The user's data cannot be trained on; the message says why, in one line."""


class DataNote(UserWarning):
    """Something done to the user's data that they should know of (printed as `note: ...`)."""


def check_rows(path: str, rows: int, with_target: int, target: str) -> None:
    """A table's row count: none at all, or none with a target, is one line naming which."""
    if rows == 0:
        raise DataError(f"{path} has no data rows")
    if with_target == 0:
        raise DataError(f"every row's target {target!r} is missing")


def too_few_to_split(n: int, val_size: float, test_size: float) -> DataError:
    need = int(np.ceil((MIN_TRAIN_ROWS + 2) / (1 - val_size - test_size)))
    return DataError(f"too few rows ({n}) to split into train/validation/test; need at least {need}")


def names(columns, limit: int = 8) -> str:
    columns = [str(c) for c in columns]
    more = f", ... ({len(columns) - limit} more)" if len(columns) > limit else ""
    return ", ".join(columns[:limit]) + more


def count(n: int, what: str = "row") -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def json_label(v):
    """A class label as a plain JSON value (numpy scalars are not JSON)."""
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return int(v) if float(v).is_integer() else float(v)
    return str(v)


def is_near_unique(distinct: int, rows: int) -> bool:
    """`distinct` present values in `rows` rows."""
    return distinct > NEAR_UNIQUE_MIN and distinct > NEAR_UNIQUE_SHARE * rows


# An integer column with more distinct values than the quantile map has knots (so the map pools
# neighbouring values), each value in CODE_MIN_ROWS rows or more on average, reads as codes (a
# person, a store, a zip code) as much as a quantity: it is one-hot encoded beside the number.
# Not when the values' row counts vary more than CODE_MAX_SPREAD (their standard deviation over
# their mean): a group id's values come in groups of similar size (a person in each of 8 years),
# a quantity's pile up on some (zeros, round numbers). Nor when every value is a multiple of one
# step (an amount rounded to hundreds is a quantity).
# (128: QuantileNormal's n_quantiles, training/normalize.py.)
CODE_MIN_VALUES, CODE_MIN_ROWS, CODE_MAX_SPREAD = 128, 5, 1.0
FLOAT32_EXACT = 2**24  # every integer below it is exact in float32


def is_code_column(rows: pd.Series) -> bool:
    """`rows`: how many rows hold each distinct number of the column (missing ones not counted)."""
    if rows.empty or len(rows) <= CODE_MIN_VALUES or rows.sum() < CODE_MIN_ROWS * len(rows):
        return False
    if rows.std(ddof=0) > CODE_MAX_SPREAD * rows.mean():
        return False
    numbers = rows.index.to_numpy(np.float64)
    if not np.all(np.mod(numbers, 1) == 0) or np.abs(numbers).max() >= FLOAT32_EXACT:
        return False  # the graph takes float32: larger integers would not arrive exactly
    return int(np.gcd.reduce(np.abs(numbers).astype(np.int64))) == 1


def is_number_column(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


class Target:
    """What the target column says about the task, gathered chunk by chunk: numbers that are
    whole and few are classes, other numbers a regression target, anything else (text, booleans)
    is always classes. `settle` decides; `encode` turns raw values into what the network learns."""

    def __init__(self, name: str):
        self.name = name
        # Distinct values, kept up to MAX_CLASSES + 1: numbers as floats; other labels by their
        # text (True and "True" are one class), each with the label it stands for.
        self.values: set | dict = set()
        self.numeric, self.whole, self.infinite = True, True, False
        self.low, self.high = np.inf, -np.inf

    def add(self, y: pd.Series) -> Target:
        """Take a chunk of the target (rows with a missing target already left out)."""
        if self.numeric and is_number_column(y):
            v = y.to_numpy(np.float64)
            finite = np.isfinite(v)
            self.infinite = self.infinite or not finite.all()
            self.whole = self.whole and bool(np.all(np.mod(v[finite], 1) == 0))
            if finite.any():
                self.low, self.high = min(self.low, v[finite].min()), max(self.high, v[finite].max())
        elif self.numeric:  # the first chunk that is not numbers: every value seen so far is text
            self.numeric, self.values = False, {_text(v): _text(v) for v in self.values}
        if len(self.values) <= MAX_CLASSES:
            if self.numeric:
                self.values.update(np.unique(y.to_numpy(np.float64)).tolist())
            else:
                self.values.update({_text(v): _label(v) for v in y.unique()})
        return self

    def infer_task(self) -> str:
        few = self.whole and not self.infinite and len(self.values) <= MAX_CLASSES_FROM_NUMBERS
        return "classification" if not self.numeric or few else "regression"

    def settle(self, task: str) -> tuple[str, list | None]:
        """The task ("auto" is inferred) and the classes, or a DataError saying why neither fits."""
        task = self.infer_task() if task == "auto" else task
        if task == "regression":
            if not self.numeric:
                raise DataError(f"target {self.name!r} is not numeric, so it cannot be a regression "
                                "target")
            if self.infinite:
                raise DataError(f"target {self.name!r} has infinite values")
            if not self.high > self.low:
                raise DataError(f"target {self.name!r} is constant; there is nothing to learn")
            return task, None
        if len(self.values) > MAX_CLASSES:
            raise DataError(f"target {self.name!r} has more than {MAX_CLASSES} classes")
        self.keys = sorted(self.values)
        classes = [json_label(k) if self.numeric else self.values[k] for k in self.keys]
        if len(classes) < 2:
            raise DataError(f"target {self.name!r} has a single class ({classes[0]!r}); "
                            "classification needs at least two")
        return task, classes

    def encode(self, y, task: str) -> np.ndarray:
        """Class indices (int64), or the raw values (float64) of a regression target."""
        y = pd.Series(np.asarray(y, dtype=object) if not self.numeric else y)
        if task == "regression":
            return y.to_numpy(np.float64)
        keys = y.map(_text) if not self.numeric else y.to_numpy(np.float64)
        return pd.Index(self.keys).get_indexer(keys).astype(np.int64)


def _text(value) -> str:
    """A non-numeric label as text; True and "True" are one class."""
    return value if isinstance(value, str) else str(json_label(value))


def _label(value):
    """A non-numeric label as the class list shows it: booleans stay booleans, the rest is text."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else _text(value)
