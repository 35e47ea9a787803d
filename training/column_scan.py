"""What a pass over a file learns about each feature column, chunk by chunk (`--stream`): the
facts that judge the column as an in-memory table's is judged (training/columns.py: Facts), and
the training rows per value that its vocabulary is chosen from (training/encoding.py).

Memory stays bounded: a column's values are counted up to MAX_DISTINCT distinct ones. A column
with more is not a code column, and as text it is near-unique (left out, with the in-memory
notice); nested values and dates are judged by the first chunk.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from training.columns import Facts, graph_numbers, is_date_column, is_nested, present, texts
from training.rules import DataError, is_number_column

MAX_DISTINCT = 100_000


class ValueRows:
    """Rows per distinct value (missing ones apart), until more than MAX_DISTINCT values."""

    def __init__(self):
        self.rows, self.missing, self.full = pd.Series(dtype=np.int64), 0, False

    def add(self, values: pd.Series) -> None:
        if self.full:
            return
        self.missing += int(values.isna().sum())
        counts = values.value_counts()
        self.rows = self.rows.add(counts[counts > 0], fill_value=0)  # (a categorical's unused ones: 0)
        if len(self.rows) > MAX_DISTINCT:
            self.full, self.rows = True, None

    def by_text(self) -> pd.Series:
        """Rows per category text ("" for missing ones, and texts that mean missing)."""
        keys = texts(pd.Series(self.rows.index.to_numpy(object)))
        rows = pd.Series(self.rows.to_numpy(np.int64), index=keys).groupby(level=0).sum()
        if self.missing:
            rows[""] = rows.get("", 0) + self.missing
        return rows

    def by_number(self, decimal: str) -> pd.Series:
        """Rows per distinct number (values that are not numbers left out)."""
        keys = graph_numbers(pd.Series(self.rows.index.to_numpy(object)), decimal)
        rows = pd.Series(self.rows.to_numpy(np.int64), index=keys)
        return rows[~np.isnan(keys)].groupby(level=0).sum()


class ColumnScan(Facts):
    """A column's facts over every chunk (rows with a target), and its training rows per value."""

    def __init__(self, name: str, first: pd.Series, decimal: str):
        self.name, self.decimal = name, decimal
        self.rows = self.present = self.read = self.missing_read = 0
        self.number_type, self.category_type = True, isinstance(first.dtype, pd.CategoricalDtype)
        self.nested = is_nested(first)
        self.dates = not self.nested and is_date_column(first)
        self.low, self.high = np.inf, -np.inf
        self.all, self.train = ValueRows(), ValueRows()

    def add(self, values: pd.Series, train: np.ndarray) -> np.ndarray:
        """One chunk's values (`train`: which rows are training rows); returns them read as numbers."""
        if self.nested:
            self.rows += len(values)
            return np.full(len(values), np.nan)
        x, there = graph_numbers(values, self.decimal), present(values)
        read = there & ~np.isnan(x)
        self.rows += len(values)
        self.present += int(there.sum())
        self.read += int(read.sum())
        self.missing_read += int((there & ~read).sum())
        self.number_type = self.number_type and is_number_column(values)
        if read.any():
            self.low, self.high = min(self.low, x[read].min()), max(self.high, x[read].max())
        self.all.add(values)
        self.train.add(values[train])
        return x

    def one_number(self) -> bool:
        return not self.low < self.high

    # Beyond the cap the values are not counted: the column is taken as all distinct (as text:
    # near-unique, left out).
    def distinct_texts(self) -> int:
        return self.rows if self.all.full else len(self.all.by_text())

    def distinct_present(self) -> int:
        return self.rows if self.all.full else int((self.all.by_text().index != "").sum())

    def number_rows(self) -> pd.Series:
        return pd.Series(dtype=np.int64) if self.all.full else self.all.by_number(self.decimal)

    def vocabulary_rows(self, codes: bool) -> pd.Series:
        """Training rows per category text, or per integer code (training/encoding.py: value_rows)."""
        if self.train.full:
            raise DataError(f"--stream: column {self.name!r} has more than {MAX_DISTINCT:,} distinct "
                            "values; a streamed run chooses categories from exact counts up to that "
                            "many (leave it out with --drop, or train in memory)")
        if codes:
            numbers = self.train.by_number(self.decimal)
            return numbers.groupby(numbers.index.astype(np.int64)).sum()
        return self.train.by_text()
