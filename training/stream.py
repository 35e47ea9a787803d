"""Tables larger than memory (`--stream`): the file is read in chunks, never whole.

A first pass fits the normalization with StandardScaler.partial_fit (the same statistics as a fit
on the whole training split), counts the rows, settles the task and classes, and keeps a bounded
uniform sample of each split for the metrics. Each epoch reads the file again and trains from a
bounded shuffle buffer. A row's split comes from a hash of its position in the file: no shuffle of
the file, and the same split on every read and every rank. Under torchrun, rank r trains on the
training rows whose position is r modulo the number of ranks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from training.contract import category_text
from training.data import (CSV, MAX_CLASSES_FROM_NUMBERS, MIN_TRAIN_ROWS, DataError, Split,
                           _csv_header, _json_label, check_file, check_header, select_features)
from training.engine import batch_bounds

TRAIN, VALIDATION, TEST = 0, 1, 2
MAX_CLASSES = 1000
_MASK = (1 << 64) - 1


def row_hash(positions: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per row position (splitmix64 of the position plus a seeded
    offset): a fixed function, so a row gets the same number on every read."""
    offset = np.uint64((seed * 0x9E3779B97F4A7C15 + salt * 0xD1B54A32D192ED03) & _MASK)
    z = np.asarray(positions).astype(np.uint64) + offset  # uint64 arithmetic wraps, as intended
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_of(positions: np.ndarray, seed: int, val_size: float, test_size: float) -> np.ndarray:
    """TRAIN, VALIDATION or TEST per row position."""
    h = row_hash(positions, seed)
    return np.where(h < test_size, TEST, np.where(h < test_size + val_size, VALIDATION, TRAIN))


class ChunkReader:
    """A CSV or Parquet file as (position of the first row, DataFrame) chunks."""

    def __init__(self, path: str, chunk_rows: int):
        self.path, self.chunk_rows = path, chunk_rows
        self.parquet = check_file(path) not in CSV
        self.sep = "\t" if path.lower().endswith(".tsv") else ","
        with self._errors():
            self.header = (list(self._parquet().schema_arrow.names) if self.parquet
                           else _csv_header(Path(path)))
        check_header(path, self.header)
        self.rows = self._parquet().metadata.num_rows if self.parquet else None

    def _parquet(self):
        import pyarrow.parquet as pq
        return pq.ParquetFile(self.path)

    @contextlib.contextmanager
    def _errors(self):
        """Errors of pandas and pyarrow as one-line DataErrors."""
        try:
            yield
        except DataError:
            raise
        except UnicodeDecodeError:
            raise DataError(f"{self.path} is not UTF-8 text") from None
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot read {self.path}: {first}") from None

    def chunks(self, columns: list[str] | None = None, order_seed=None):
        """Chunks in file order; Parquet row groups in a shuffled order when order_seed is given."""
        with self._errors():
            if self.parquet:
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
            else:
                start = 0
                for frame in pd.read_csv(self.path, sep=self.sep, usecols=columns,
                                         chunksize=self.chunk_rows):
                    yield start, frame
                    start += len(frame)


def labelled_chunks(reader: ChunkReader, cfg, features: list[str], order_seed=None):
    """Each chunk's rows that have a target: (positions in the file, the rows, their split, and
    how many rows were dropped for a missing target)."""
    for start, frame in reader.chunks(features + [cfg.target], order_seed):
        keep = frame[cfg.target].notna().to_numpy()
        positions = start + np.flatnonzero(keep)
        yield (positions, frame[keep], split_of(positions, cfg.seed, cfg.val_size, cfg.test_size),
               int((~keep).sum()))


def numeric_features(frame: pd.DataFrame, features: list[str], positions: np.ndarray) -> np.ndarray:
    """The feature columns as float64. Streaming takes complete numeric columns only: imputing and
    one-hot encoding are fitted on the whole table, in memory."""
    X = frame[features].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(X).all():
        row, col = map(int, np.argwhere(~np.isfinite(X))[0])
        raw, name = frame[features[col]].iloc[row], features[col]
        what = ("is missing" if pd.isna(raw) else "is infinite" if np.isinf(X[row, col])
                else f"is not a number ({raw!r})")
        raise DataError(f"--stream: column {name!r} in data row {positions[row] + 1} {what}; "
                        "streaming takes complete numeric feature columns (train without --stream "
                        "to impute missing values and encode categories)")
    if np.abs(X).max(initial=0) > np.finfo(np.float32).max:
        raise DataError("feature values exceed the float32 range the model computes in")
    return X


class Target:
    """The task, the classes and the regression target's statistics, from the target column
    chunk by chunk: numbers that are whole and few are classes, other numbers a regression
    target, text is always classes."""

    def __init__(self):
        self.numbers, self.texts = set(), set()  # distinct values, kept up to MAX_CLASSES + 1
        self.numeric, self.whole = True, True
        self.scaler = StandardScaler()  # of the training rows, for a regression target

    def add(self, y: pd.Series, train: np.ndarray) -> None:
        if self.numeric and pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y):
            v = y.to_numpy(np.float64)
            if not np.isfinite(v).all():
                raise DataError(f"target {y.name!r} has infinite values")
            self.whole = self.whole and bool(np.all(np.mod(v, 1) == 0))
            if train.any():
                self.scaler.partial_fit(v[train, None])
            if len(self.numbers) <= MAX_CLASSES:
                self.numbers.update(np.unique(v).tolist())
        else:
            self.numeric = False
        if len(self.texts) <= MAX_CLASSES:
            self.texts.update(y.map(category_text).unique().tolist())

    def settle(self, task: str, name: str) -> tuple[str, list | None]:
        if task == "auto":
            few = self.whole and len(self.numbers) <= MAX_CLASSES_FROM_NUMBERS
            task = "classification" if not self.numeric or few else "regression"
        if task == "regression":
            if not self.numeric:
                raise DataError(f"target {name!r} is not numeric, so it cannot be a regression target")
            if not self.scaler.var_[0] > 0:
                raise DataError(f"target {name!r} is constant; there is nothing to learn")
            return task, None
        keys = self.numbers if self.numeric else self.texts
        if len(keys) > MAX_CLASSES:
            raise DataError(f"target {name!r} has more than {MAX_CLASSES} classes")
        if len(keys) < 2:
            raise DataError(f"target {name!r} has a single class; classification needs at least two")
        self.keys = sorted(keys)
        return task, [_json_label(k) for k in self.keys]

    def encode(self, y: np.ndarray, task: str) -> np.ndarray:
        """Class indices (int64), or the raw values (float64) of a regression target."""
        if task == "regression":
            return y.astype(np.float64)
        keys = pd.Series(y).map(category_text) if not self.numeric else y.astype(np.float64)
        return pd.Index(self.keys).get_indexer(keys).astype(np.int64)


class Sample:
    """A uniform sample of at most `size` rows: those with the smallest hash of their position (a
    second hash, independent of the split's). Bounded memory, and the same rows on every run."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.parts = size, seed, []

    def add(self, positions: np.ndarray, X: np.ndarray, y: np.ndarray) -> None:
        if len(positions):  # float32: what the network computes in
            self.parts.append((row_hash(positions, self.seed, salt=1), X.astype(np.float32), y))
        if sum(len(p[0]) for p in self.parts) > self.size:  # at most size + one chunk held
            self._trim()

    def _trim(self) -> None:
        keys, X, y = (np.concatenate(a) for a in zip(*self.parts))
        keep = np.sort(np.argsort(keys, kind="stable")[:self.size])  # back in file order
        self.parts = [(keys[keep], X[keep], y[keep])]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        self._trim()
        return self.parts[0][1], self.parts[0][2]


@dataclass
class Scan:
    """What the first pass found. `split` holds the uniform samples, on rank 0 only."""
    features: list[str]
    task: str
    classes: list | None
    target: Target
    mean: np.ndarray
    scale: np.ndarray
    y_mean: float
    y_scale: float
    rows: dict[str, int]
    rows_per_rank: list[int]
    dropped_rows: int
    split: Split | None


def scan(cfg, world_size: int = 1) -> Scan:
    """One pass over the file: features, normalization, target, row counts and samples."""
    reader = ChunkReader(cfg.data, cfg.chunk_rows)
    first = next(reader.chunks(), None)
    if first is None or first[1].empty:
        raise DataError(f"{cfg.data} has no data rows")
    features = select_features(first[1], cfg.target, cfg.features, cfg.drop)
    scaler, target = StandardScaler(), Target()
    samples = [Sample(cfg.eval_rows, cfg.seed) for _ in (TRAIN, VALIDATION, TEST)]
    counts, per_rank, dropped = np.zeros(3, int), np.zeros(world_size, int), 0
    bar = tqdm(total=reader.rows, desc="scan (normalization statistics)", unit=" rows",
               unit_scale=True, disable=not cfg.progress)
    for positions, frame, split, missing_target in labelled_chunks(reader, cfg, features):
        bar.update(len(frame) + missing_target)
        dropped += missing_target
        X = numeric_features(frame, features, positions)
        train = split == TRAIN
        if train.any():
            scaler.partial_fit(X[train])
        target.add(frame[cfg.target], train)
        counts += np.bincount(split, minlength=3)
        per_rank += np.bincount(positions[train] % world_size, minlength=world_size)
        y = frame[cfg.target].to_numpy()
        for s, sample in enumerate(samples):
            sample.add(positions[split == s], X[split == s], y[split == s])
    bar.close()

    n = int(counts.sum())
    if n == 0:
        raise DataError(f"every row's target {cfg.target!r} is missing")
    if counts[TRAIN] < MIN_TRAIN_ROWS or counts[VALIDATION] == 0 or counts[TEST] == 0:
        raise DataError(f"too few rows ({n}) to split into train/validation/test")
    task, classes = target.settle(cfg.task, cfg.target)
    arrays = [sample.arrays() for sample in samples]
    split = Split(*(a for X, y in arrays for a in (X, target.encode(y, task))), stratified=False)
    mean, scale = ((scaler.mean_, scaler.scale_) if cfg.normalize
                   else (np.zeros(len(features)), np.ones(len(features))))
    y_mean, y_scale = ((0.0, 1.0) if task == "classification"
                       else (float(target.scaler.mean_[0]), float(target.scaler.scale_[0])))
    return Scan([str(f) for f in features], task, classes, target, mean, scale, y_mean, y_scale,
                dict(zip(("train", "validation", "test"), map(int, counts))),
                per_rank.tolist(), dropped, split)


class ShuffleBuffer:
    """Rows in, random batches out: holds about `rows` rows, shuffles them, hands out all but the
    last batch or two (kept to mix with what comes next, and so that the epoch's last batch is
    never a single row)."""

    def __init__(self, rows: int, batch_size: int, rng: np.random.Generator, device: torch.device,
                 y_dtype: torch.dtype):
        self.rows, self.batch_size, self.rng, self.device, self.y_dtype = rows, batch_size, rng, device, y_dtype
        self.X, self.y, self.held = [], [], 0

    def add(self, X: np.ndarray, y: np.ndarray) -> list:
        self.X.append(X)
        self.y.append(y)
        self.held += len(X)
        return self._drain(final=False) if self.held >= self.rows else []

    def _drain(self, final: bool) -> list:
        X, y = np.concatenate(self.X), np.concatenate(self.y)
        perm = self.rng.permutation(len(X))
        X, y = X[perm], y[perm]
        out = len(X) if final else max(0, len(X) // self.batch_size - 1) * self.batch_size
        self.X, self.y, self.held = [X[out:]], [y[out:]], len(X) - out
        Xt = torch.from_numpy(X[:out]).to(self.device)
        yt = torch.from_numpy(y[:out]).to(self.device, self.y_dtype)
        return [(Xt[a:b], yt[a:b]) for a, b in batch_bounds(out, self.batch_size)] if out else []

    def finish(self) -> list:
        return self._drain(final=True) if self.held else []


def train_batches(cfg, scan: Scan, rank: int, world_size: int, epoch: int, batch_size: int,
                  steps: int, device: torch.device):
    """This rank's training batches for one epoch, exactly `steps` of them, read chunk by chunk
    through a shuffle buffer (a new order every epoch). Targets as the network learns them: class
    indices, or the regression target standardized."""
    reader = ChunkReader(cfg.data, cfg.chunk_rows)
    regression = scan.task == "regression"
    buffer = ShuffleBuffer(cfg.shuffle_rows, batch_size, np.random.default_rng([cfg.seed, epoch, rank]),
                           device, torch.float32 if regression else torch.int64)
    emitted = 0
    chunks = labelled_chunks(reader, cfg, scan.features, order_seed=[cfg.seed, epoch])
    for positions, frame, split, _ in chunks:
        mine = (split == TRAIN) & (positions % world_size == rank)
        if not mine.any():
            continue
        X = numeric_features(frame[mine], scan.features, positions[mine]).astype(np.float32)
        y = scan.target.encode(frame[cfg.target].to_numpy()[mine], scan.task)
        if regression:
            y = (y - scan.y_mean) / scan.y_scale
        for batch in buffer.add(X, y):
            yield batch
            emitted += 1
            if emitted == steps:
                chunks.close()
                return
    for batch in buffer.finish()[:steps - emitted]:
        yield batch
