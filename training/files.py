"""Reading a CSV or Parquet file, whole (`read_table`) or in chunks (`ChunkReader`), with one set of
checks and one-line errors for both.
"""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import numpy as np
import pandas as pd

from training.rules import DataError, check_rows

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


def separator(path: str) -> str:
    """Tabs for .tsv files, commas otherwise."""
    return "\t" if Path(path).suffix.lower() == ".tsv" else ","


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


def header(path: str) -> list[str]:
    """The column names as written: pandas renames duplicate names (a, a.1) instead of reporting
    them, so CSV headers are read with the csv module."""
    with read_errors(path):
        if check_file(path) in PARQUET:
            import pyarrow.parquet as pq
            return list(pq.ParquetFile(path).schema_arrow.names)
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f, delimiter=separator(path)), [])


def check_header(path: str) -> list[str]:
    names = header(path)
    if dupes := sorted({c for c in names if names.count(c) > 1}):
        raise DataError(f"{path}: duplicate column names: {', '.join(dupes)}")
    return names


def read_table(path: str) -> pd.DataFrame:
    """The whole file as a DataFrame."""
    parquet = check_file(path) in PARQUET
    with read_errors(path):
        frame = pd.read_parquet(path) if parquet else pd.read_csv(path, sep=separator(path))
    check_header(path)
    check_rows(path, len(frame), len(frame), "")
    return frame


class ChunkReader:
    """A CSV or Parquet file as (position of the first row, DataFrame) chunks."""

    def __init__(self, path: str, chunk_rows: int):
        self.path, self.chunk_rows = path, chunk_rows
        self.parquet = check_file(path) in PARQUET
        self.header = check_header(path)
        self.rows = self._parquet().metadata.num_rows if self.parquet else None

    def _parquet(self):
        import pyarrow.parquet as pq
        return pq.ParquetFile(self.path)

    def chunks(self, columns: list[str] | None = None, order_seed=None):
        """Chunks in file order; Parquet row groups in a shuffled order when order_seed is given."""
        with read_errors(self.path):
            if not self.parquet:
                start = 0
                for frame in pd.read_csv(self.path, sep=separator(self.path), usecols=columns,
                                         chunksize=self.chunk_rows):
                    yield start, frame
                    start += len(frame)
                return
            f = self._parquet()
            sizes = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
            groups = (range(len(sizes)) if order_seed is None
                      else np.random.default_rng(order_seed).permutation(len(sizes)))
            for g in groups:
                start = int(starts[g])
                for batch in f.iter_batches(self.chunk_rows, row_groups=[int(g)], columns=columns):
                    yield start, batch.to_pandas()
                    start += batch.num_rows
