"""Reading a table file as people have them, whole (`read_file`) or in chunks (`ChunkReader`),
with one set of checks and one-line errors for both.

CSV: comma, semicolon, tab or pipe separated (detected, with a notice when it is not a comma;
decimal commas detected beside semicolons), UTF-8 with or without a byte-order mark, quoted fields
with newlines, plain or compressed (.gz, .bz2, .xz). Parquet: one file, or a directory of part
files (as Spark and pandas write them), with decimals read as numbers.
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import lzma
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.contract import MISSING_TEXTS
from training.rules import DataError, DataNote, check_rows

PARQUET, CSV = (".parquet", ".pq"), (".csv", ".txt", ".tsv")
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
SEPARATORS = (",", ";", "\t", "|")  # the first that fits best wins a tie
ENCODING = "utf-8-sig"  # UTF-8, with or without a byte-order mark
SNIFF_BYTES = 1 << 16
SEPARATOR_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
DECIMAL_COMMA = re.compile(r"-?\d{1,3}(?:\.\d{3})*,\d+|-?\d+,\d+")
DECIMAL_POINT = re.compile(r"-?\d+\.\d+")
THOUSANDS_DOT = re.compile(r"-?\d{1,3}(?:\.\d{3})+(?:,\d+)?")


@dataclass(frozen=True)
class TableFile:
    """A checked table file and how to read it."""
    path: str
    parquet: bool
    parts: tuple[str, ...] = ()  # Parquet: the file, or the directory's part files in order
    sep: str = ","
    decimal: str = "."
    thousands: str | None = None

    def csv_options(self) -> dict:
        return {"sep": self.sep, "decimal": self.decimal, "thousands": self.thousands,
                "encoding": ENCODING, "na_values": MISSING_TEXTS, "keep_default_na": False}


def parquet_parts(directory: Path) -> list[Path]:
    """A directory's Parquet files, in name order (Spark's _SUCCESS and hidden files left out)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in PARQUET
                  and not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts))


def check_file(path: str) -> TableFile:
    """The file, once it is known to be a non-empty CSV or Parquet file (or a directory of
    Parquet parts), with how to read it."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {path}")
    if p.is_dir():
        if parts := parquet_parts(p):
            return TableFile(path, parquet=True, parts=tuple(map(str, parts)))
        raise DataError(f"{path} is a directory without Parquet files; expected a CSV or Parquet "
                        "file, or a directory of Parquet parts")
    if p.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    name = p.name.lower()
    compression = next((c for c in COMPRESSED if name.endswith(c)), "")
    suffix = Path(name.removesuffix(compression)).suffix
    if suffix in PARQUET and not compression:
        return TableFile(path, parquet=True, parts=(path,))
    if suffix not in CSV:
        shown = suffix + compression or "(none)"
        raise DataError(f"{path}: unsupported file type {shown}; use .csv (also .tsv, .txt, each "
                        "may be .gz, .bz2 or .xz compressed), .parquet, or a directory of Parquet parts")
    return sniff(path, tab=suffix == ".tsv")


def open_text(path: str):
    """The file as text, decompressed by its suffix."""
    opener = COMPRESSED.get(Path(path).suffix.lower(), open)
    return opener(path, "rt", encoding=ENCODING, newline="")


def sniff(path: str, tab: bool) -> TableFile:
    """How a CSV file is separated (and, beside semicolons or tabs, whether its decimals are
    commas), from its first rows."""
    with read_errors(path), open_text(path) as f:
        sample = f.read(SNIFF_BYTES)
        cut = len(sample) == SNIFF_BYTES
    sep = "\t" if tab else best_separator(sample, cut)
    decimal, thousands = ".", None
    if sep != ",":
        cells = [c.strip() for row in _rows(sample, sep, cut) for c in row]
        if any(DECIMAL_COMMA.fullmatch(c) for c in cells) and not any(DECIMAL_POINT.fullmatch(c) for c in cells):
            decimal = ","
            thousands = "." if any(THOUSANDS_DOT.fullmatch(c) for c in cells) else None
    if sep != "," and not tab or decimal != ".":
        how = f"{SEPARATOR_NAMES[sep]}-separated" + (" with decimal commas" if decimal == "," else "")
        warnings.warn(f"{Path(path).name} is read as {how}", DataNote)
    return TableFile(path, parquet=False, sep=sep, decimal=decimal, thousands=thousands)


def _rows(sample: str, sep: str, cut: bool) -> list[list[str]]:
    rows = [r for r in csv.reader(io.StringIO(sample), delimiter=sep) if r]
    return rows[:-1] if cut and len(rows) > 1 else rows  # the last row may be cut short


def best_separator(sample: str, cut: bool) -> str:
    """The separator that splits every sampled row into the same number of fields, the most
    fields if several do; else the one that splits the header most."""
    def fit(sep):
        widths = [len(r) for r in _rows(sample, sep, cut)]
        consistent = bool(widths) and widths[0] > 1 and all(w == widths[0] for w in widths)
        return consistent, widths[0] if widths else 0
    scores = {sep: fit(sep) for sep in SEPARATORS}
    return max(SEPARATORS, key=lambda sep: scores[sep])  # max keeps the first of equals


@contextlib.contextmanager
def read_errors(path: str):
    """Errors of pandas, pyarrow and the csv module as one-line DataErrors."""
    try:
        yield
    except DataError:
        raise
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    except Exception as e:  # they raise many kinds; the first line names the problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read {path}: {first}") from None


def header(table: TableFile) -> list[str]:
    """The column names as written: pandas renames duplicate names (a, a.1) instead of reporting
    them, so CSV headers are read with the csv module."""
    with read_errors(table.path):
        if table.parquet:
            import pyarrow.parquet as pq
            return list(pq.ParquetFile(table.parts[0]).schema_arrow.names)
        with open_text(table.path) as f:
            return next(csv.reader(f, delimiter=table.sep), [])


def check_header(table: TableFile) -> list[str]:
    names = header(table)
    if dupes := sorted({c for c in names if names.count(c) > 1}):
        raise DataError(f"{table.path}: duplicate column names: {', '.join(dupes)}")
    return names


def arrow_to_pandas(data) -> pd.DataFrame:
    """An Arrow table or record batch as a DataFrame, decimals as float64 (they are numbers)."""
    import pyarrow as pa
    table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
    for i, f in enumerate(table.schema):
        if pa.types.is_decimal(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(pa.float64()))
    return table.to_pandas(split_blocks=True)  # a block per column: no copy into one 2-D block


def read_file(path: str) -> tuple[TableFile, pd.DataFrame]:
    """The whole file as a DataFrame, and how it was read."""
    table = check_file(path)
    with read_errors(path):
        if table.parquet:
            import pyarrow.dataset as ds
            frame = arrow_to_pandas(ds.dataset(list(table.parts), format="parquet").to_table())
        else:
            frame = pd.read_csv(path, **table.csv_options())
    check_header(table)
    check_rows(path, len(frame), len(frame), "")
    return table, frame


class ChunkReader:
    """A CSV or Parquet file as (position of the first row, DataFrame) chunks."""

    def __init__(self, path: str, chunk_rows: int):
        self.path, self.chunk_rows = path, chunk_rows
        self.table = check_file(path)
        self.parquet = self.table.parquet
        self.header = check_header(self.table)
        self.rows = sum(f.metadata.num_rows for f in self._parquet()) if self.parquet else None

    def _parquet(self) -> list:
        import pyarrow.parquet as pq
        return [pq.ParquetFile(p) for p in self.table.parts]

    def chunks(self, columns: list[str] | None = None, order_seed=None):
        """Chunks in file order; Parquet row groups in a shuffled order when order_seed is given."""
        with read_errors(self.path):
            if not self.parquet:
                start = 0
                for frame in pd.read_csv(self.path, usecols=columns, chunksize=self.chunk_rows,
                                         **self.table.csv_options()):
                    yield start, frame
                    start += len(frame)
                return
            files = self._parquet()
            groups = [(f, g) for f in files for g in range(f.num_row_groups)]
            sizes = [f.metadata.row_group(g).num_rows for f, g in groups]
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
            order = (range(len(groups)) if order_seed is None
                     else np.random.default_rng(order_seed).permutation(len(groups)))
            for i in order:
                f, g = groups[int(i)]
                start = int(starts[i])
                for batch in f.iter_batches(self.chunk_rows, row_groups=[g], columns=columns):
                    yield start, arrow_to_pandas(batch)
                    start += batch.num_rows
