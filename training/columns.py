"""What each column of a table is: a number, a category, or left out and why. Decided once per
table (in memory: the whole table; streamed: the first chunk), with a notice for everything left
out or changed. docs/data.md lists the rules with examples.

    nested                lists, maps or arrays in the cells (Parquet)          left out
    empty                 every value missing                                  left out
    constant              one value (numbers: one value and gaps)               left out
    date or time          datetime types, or text in date/time formats          left out
    row id / --drop / ... (training/data.py: select_features)                   left out
    numeric               numbers; infinities and numbers beyond float32 are missing
    numbers with text     text columns whose values are mostly numbers: the     numeric, text as missing
                          text that is not a number reads as missing
    near-unique text      text whose values are nearly all distinct             left out
    categorical           text, booleans, Parquet categories
    codes                 integer codes (training/rules.py: is_code_column)     numeric + one-hot

Left-out columns are recorded in the model (`left_out`), and the service accepts them in a
record and ignores them, so a client can send the file's own rows.
"""
from __future__ import annotations

import datetime as dt
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from training.contract import MISSING_TEXTS, category_text, finite_float32, number_or_nan
from training.rules import (CODE_MIN_VALUES, DataError, DataNote, count, is_code_column,
                            is_near_unique, is_number_column, names)

# A text column whose present values are at least this share numbers is a numeric column with
# some text in it ("n/a", "?", "-"): the text reads as missing.
NUMBERS_SHARE = 0.9
# Dates and times people write: ISO 8601 (2024-01-31, 2024-01-31T08:15:00Z, 2024-01-31 08:15),
# a time of day (08:15, 08:15:30), and day/month/year forms (31/01/2024, 31.01.24, 2024/01/31).
DATE_TEXT = re.compile(r"""\s*(?:
      \d{4}-\d{1,2}-\d{1,2}(?:[T\ ]\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:Z|[+-]\d{2}:?\d{2})?)?
    | \d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?
    | (?:\d{1,2}[/.]\d{1,2}[/.](?:\d{4}|\d{2})|\d{4}[/.]\d{1,2}[/.]\d{1,2})(?:\ \d{1,2}:\d{2}(?::\d{2})?)?
    )\s*""", re.X)
DATE_SAMPLE = 1000  # distinct values looked at to call a text column dates


def graph_input(index: int, name: str) -> str:
    """The graph input of a mixed table's index-th column: ONNX converters rewrite names that are
    not identifiers (spaces, accents, other scripts), and two names can become one, so the graph
    takes c<index>_<name in ASCII letters and digits>, unique by its index; the service maps the
    file's own column names onto these (the model's `columns` list both)."""
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()  # âge -> age
    ascii_name = re.sub(r"[^0-9A-Za-z]+", "_", plain).strip("_")[:40]
    return f"c{index}_{ascii_name}" if ascii_name else f"c{index}"


@dataclass
class Column:
    """A kept feature and its values as the graph takes them: float64 numbers (NaN: missing) or
    category texts ("": missing)."""
    name: str
    type: str                    # "numeric" | "categorical"
    values: np.ndarray | None    # None until read (a streamed scan reads them chunk by chunk)
    codes: bool = False          # integer codes, also one-hot encoded (training/encoding.py)
    text: bool = False           # numbers with some text in it: the text reads as missing
    decimal: str = "."           # the file's decimal mark, for numbers written as text
    gaps: bool = False           # numbers: some rows read as missing


@dataclass
class Columns:
    kept: list[Column]
    left_out: dict[str, str] = field(default_factory=dict)  # column -> why (for the model and docs)


NESTED = (list, tuple, dict, set, np.ndarray)


def is_nested(values: pd.Series) -> bool:
    """Lists, maps or arrays in the cells (Parquet list and struct columns)."""
    return values.dtype == object and any(isinstance(v, NESTED) for v in values.to_numpy())


def present(values: pd.Series) -> np.ndarray:
    """Which values are there: not missing, and not a text that means missing."""
    there = values.notna().to_numpy()
    if not is_number_column(values):
        there = there & ~values.isin(MISSING_TEXTS).to_numpy()
    return there


def is_date_column(values: pd.Series) -> bool:
    """Datetime and duration types, date/time objects, or text that is all dates or times."""
    dtype = values.dtype
    if (pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_timedelta64_dtype(dtype)
            or isinstance(dtype, pd.PeriodDtype)):
        return True
    if is_number_column(values) or pd.api.types.is_bool_dtype(dtype):
        return False
    sample = pd.unique(values[present(values)].to_numpy(object))[:DATE_SAMPLE]
    if not len(sample):
        return False
    if all(isinstance(v, (dt.date, dt.time, dt.timedelta)) for v in sample):
        return True
    return all(isinstance(v, str) and DATE_TEXT.fullmatch(v) for v in sample)


def _each_distinct(values: pd.Series, convert) -> pd.Series:
    """`convert` applied once per distinct value (missing ones as None), mapped onto the rows.
    Booleans are told apart from the numbers they equal (True == 1 to a hash table)."""
    out = np.empty(len(values), dtype=object)
    flags = values.map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(bool) if values.dtype == object \
        else np.zeros(len(values), bool)
    for part in (flags, ~flags):
        if part.any():  # (a string column is factorized as it is: Arrow's, much faster than objects)
            chosen = values if part.all() and values.dtype != object else values[part].astype(object)
            codes, uniques = pd.factorize(chosen)  # a missing value: -1
            out[part] = np.array([*map(convert, uniques), convert(None)], dtype=object)[codes]
    return pd.Series(out, index=values.index)


def text_numbers(values: pd.Series, decimal: str = ".") -> np.ndarray:
    """A text column's values as numbers (NaN: missing, or text that is not a number). Booleans
    are not numbers."""
    as_number = _each_distinct(values, lambda v: np.nan if isinstance(v, (bool, np.bool_))
                               else number_or_nan(v, decimal))
    return finite_float32(as_number.to_numpy(np.float64))


def numbers(values: pd.Series) -> np.ndarray:
    """A numeric column's values as float64, infinities and values beyond float32 missing."""
    return finite_float32(values.to_numpy(np.float64, na_value=np.nan))


def texts(values: pd.Series) -> np.ndarray:
    """A categorical column's values as the texts the graph compares ("" for missing)."""
    return _each_distinct(values, category_text).to_numpy(object)


def graph_numbers(values: pd.Series, decimal: str = ".") -> np.ndarray:
    """A numeric column's values as the graph takes them, whether stored as numbers or text."""
    return numbers(values) if is_number_column(values) else text_numbers(values, decimal)


class Facts:
    """What judging a column needs to know about its values (rows with a target). In memory
    (`facts_of`) they are read off the whole column; a streamed scan (training/column_scan.py)
    gathers them chunk by chunk."""
    rows: int                 # values looked at
    present: int              # values there (not missing, not a text that means missing)
    read: int                 # present values that read as numbers
    number_type: bool         # stored as numbers
    category_type: bool       # a Parquet categorical column
    nested: bool              # lists, maps or arrays in the cells
    dates: bool               # dates or times (training/columns.py: is_date_column)
    missing_read: int         # present values that read as missing numbers (text, or beyond float32)

    def one_number(self) -> bool:
        """At most one distinct number among the values."""
        raise NotImplementedError

    def distinct_texts(self) -> int:
        """Distinct category texts (training/contract.py: category_text; "" is one)."""
        raise NotImplementedError

    def distinct_present(self) -> int:
        raise NotImplementedError

    def number_rows(self) -> pd.Series:
        """Rows per distinct number (rules.is_code_column decides codes from it)."""
        raise NotImplementedError


class InMemory(Facts):
    """Facts of a whole column in memory, each computed when judging asks for it."""

    def __init__(self, values: pd.Series, decimal: str = "."):
        self.values, self.decimal = values, decimal
        self.rows, self.number_type = len(values), is_number_column(values)
        self.category_type = isinstance(values.dtype, pd.CategoricalDtype)

    @cached_property
    def there(self) -> np.ndarray:
        return present(self.values)

    @cached_property
    def numbers(self) -> np.ndarray:
        return graph_numbers(self.values, self.decimal)

    @cached_property
    def texts(self) -> np.ndarray:
        return texts(self.values)

    present = cached_property(lambda self: int(self.there.sum()))
    read = cached_property(lambda self: int((~np.isnan(self.numbers[self.there])).sum()))
    missing_read = cached_property(lambda self: self.present - self.read)
    nested = cached_property(lambda self: is_nested(self.values))
    dates = cached_property(lambda self: is_date_column(self.values))

    def one_number(self) -> bool:
        return len(pd.unique(self.numbers[~np.isnan(self.numbers)])) <= 1

    def distinct_texts(self) -> int:
        return len(pd.unique(self.texts))

    def distinct_present(self) -> int:
        return int(self.values.nunique(dropna=True))

    def number_rows(self) -> pd.Series:
        return pd.Series(self.numbers).dropna().value_counts()


def judge(name: str, facts: Facts, forced: str | None, decimal: str = ".") -> Column | str:
    """What a column is (its values not filled in), or why it is left out. `forced`:
    "categorical" or "numeric" (--categorical, --numeric), which is never left out; a Parquet
    categorical column is categorical. `decimal`: the file's decimal mark."""
    if facts.nested:
        if forced:
            raise DataError(f"column {name!r} holds lists or nested values; the model takes numbers "
                            "and text")
        return "nested"
    if forced == "categorical" or (not forced and facts.category_type):
        return ("constant" if not forced and facts.distinct_texts() <= 1
                else Column(name, "categorical", None))
    if forced != "numeric":
        if not facts.present:
            return "empty"
        if facts.dates:
            return "date or time"
    if forced == "numeric":
        if facts.read < facts.present:
            raise DataError(f"--numeric column {name!r} has {count(facts.present - facts.read)} that are "
                            "not numbers")
        return Column(name, "numeric", None, text=not facts.number_type, decimal=decimal,
                      gaps=facts.read < facts.rows)
    if facts.number_type or facts.read >= NUMBERS_SHARE * facts.present:
        if facts.one_number():
            return "constant"
        return Column(name, "numeric", None, codes=is_code_column(facts.number_rows()),
                      text=not facts.number_type, decimal=decimal, gaps=facts.read < facts.rows)
    if facts.distinct_texts() <= 1:
        return "constant"
    return ("near-unique text" if is_near_unique(facts.distinct_present(), facts.rows)
            else Column(name, "categorical", None))


def graph_values(column: Column, values: pd.Series) -> np.ndarray:
    """A kept column's values as the graph takes them: numbers (NaN: missing) or texts."""
    return graph_numbers(values, column.decimal) if column.type == "numeric" else texts(values)


def sort_columns(frame: pd.DataFrame, features: list, categorical=(), numeric=(),
                 decimal: str = ".") -> Columns:
    """Each feature column of a table in memory judged (`judge`, module docstring), with notices
    for what is left out or changed, and its values as the graph takes them."""
    facts = {c: InMemory(frame[c], decimal) for c in features}
    out = sort_facts(facts, categorical, numeric, decimal)
    by_name = {str(c): f for c, f in facts.items()}
    for column in out.kept:
        f = by_name[column.name]
        column.values = f.numbers if column.type == "numeric" else f.texts
    return out


def sort_facts(facts: dict, categorical=(), numeric=(), decimal: str = ".") -> Columns:
    """Each column judged from its facts, with the notices for what is left out or changed
    (the same for a table in memory and a streamed scan)."""
    out, why, unreadable, text_missing = Columns(kept=[]), {}, {}, {}
    for c, f in facts.items():
        forced = "categorical" if c in (categorical or ()) else "numeric" if c in (numeric or ()) else None
        judged = judge(str(c), f, forced, decimal)
        if isinstance(judged, str):
            why[c] = judged
            continue
        out.kept.append(judged)
        if judged.type == "numeric" and f.missing_read:
            (text_missing if judged.text else unreadable)[c] = f.missing_read
    _notify(why, unreadable, text_missing, [c.name for c in out.kept if c.codes])
    out.left_out = {str(c): reason for c, reason in why.items()}
    if not out.kept:
        raise DataError("no feature columns left: " + "; ".join(
            f"{names(cs)} ({reason})" for reason, cs in _by_reason(why).items()))
    return out


def _by_reason(why: dict) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for c, reason in why.items():
        grouped.setdefault(reason, []).append(c)
    return grouped


LEFT_OUT_NOTES = {
    "empty": "left out empty column(s) {} (every value missing)",
    "constant": "left out constant column(s) {} (one value: nothing to learn)",
    "date or time": "left out date/time column(s) {} (the model takes no dates; derive numbers such "
                    "as the weekday or the hour as columns of their own to use them)",
    "near-unique text": "dropped near-unique text column(s) {}: most values are distinct, nothing "
                        "to learn as categories (keep with --categorical)",
    "nested": "left out column(s) {} (lists or nested values: the model takes numbers and text)",
}


def _notify(why: dict, unreadable: dict, text_missing: dict, codes: list) -> None:
    for reason, cs in _by_reason(why).items():
        warnings.warn(LEFT_OUT_NOTES[reason].format(", ".join(map(str, cs))), DataNote)
    if unreadable:
        warnings.warn("infinite values, or values beyond the float32 range the model computes in, "
                      "read as missing: " + names(f"{c} ({count(n, 'value')})" for c, n in unreadable.items()),
                      DataNote)
    if text_missing:
        warnings.warn("column(s) of numbers with some text, read as numbers with the text as missing: "
                      + names(f"{c} ({count(n, 'text value')})" for c, n in text_missing.items())
                      + " (keep as categories with --categorical)", DataNote)
    if codes:
        warnings.warn(f"integer code column(s) {', '.join(map(str, codes))}: over {CODE_MIN_VALUES} "
                      "distinct values, each in several rows; one-hot encoded beside the number "
                      "(keep a number only with --numeric)", DataNote)
