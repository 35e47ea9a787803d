"""Tables larger than memory (`--stream`): the file is read in chunks, never whole.

A first pass fits the normalizer with partial_fit (the same statistics as a fit on the whole
training split; a normalizer that needs quantiles is fitted on the training sample), summarizes the target with the rules an in-memory table passes
(training/rules.py), counts the rows and keeps a bounded uniform sample of each split for the
metrics. Each epoch reads the file again and trains from a
bounded shuffle buffer. A row's split comes from a hash of its position in the file: no shuffle of
the file, and the same split on every read and every rank. Under torchrun, rank r trains on the
training rows whose position is r modulo the number of ranks.

Columns are judged as in memory where one pass allows (training/columns.py): date/time columns,
by the first chunk, are left out; infinities and numbers beyond float32 read as missing; a column
that turns out empty or constant over the whole file is left out (the file is scanned again
without it). A gap in any other column, or text, is an error: streaming takes complete numeric
columns.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from training.batches import batch_bounds
from training.columns import LEFT_OUT_NOTES, graph_numbers, is_date_column, present
from training.data import Split, not_features, select_features
from training.files import ChunkReader
from training.normalize import Normalizer, StandardScaling
from training.rules import (MIN_TRAIN_ROWS, DataError, DataNote, Target, check_rows,
                            is_number_column, names, too_few_to_split)

TRAIN, VALIDATION, TEST = 0, 1, 2
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


def labelled_chunks(reader: ChunkReader, cfg, features: list[str], order_seed=None):
    """Each chunk's rows that have a target: (positions in the file, the rows, their split, and
    how many rows were dropped for a missing target)."""
    for start, frame in reader.chunks(features + [cfg.target], order_seed):
        keep = frame[cfg.target].notna().to_numpy()
        positions = start + np.flatnonzero(keep)
        yield (positions, frame[keep], split_of(positions, cfg.seed, cfg.val_size, cfg.test_share(folds=1)),
               int((~keep).sum()))


STREAM_ONLY = ("streaming takes complete numeric feature columns (train without --stream to "
               "impute missing values and encode categories, or --drop the column)")


def numeric_features(frame: pd.DataFrame, features: list[str], positions: np.ndarray,
                     decimal: str = ".") -> np.ndarray:
    """The feature columns as float64, read as in memory (training/columns.py): infinities and
    numbers beyond float32 are missing (NaN). Text that is not a number is an error at once."""
    X = np.column_stack([graph_numbers(frame[c], decimal) for c in features])
    for j, c in enumerate(features):
        if not is_number_column(frame[c]):
            if (bad := np.flatnonzero(np.isnan(X[:, j]) & present(frame[c]))).size:
                value = frame[c].iloc[bad[0]]
                raise DataError(f"--stream: column {c!r} in data row {positions[bad[0]] + 1} is not a "
                                f"number ({getattr(value, 'item', lambda: value)()!r}); {STREAM_ONLY}")
    return X


class Gaps:
    """Per feature column over the pass: values present, the smallest and largest, and where the
    first gap is, so that a column can be judged empty, constant or incomplete."""

    def __init__(self, features: list[str]):
        self.features = features
        n = len(features)
        self.present, self.low, self.high = np.zeros(n, int), np.full(n, np.inf), np.full(n, -np.inf)
        self.first_gap: dict[int, tuple[int, str]] = {}

    def add(self, X: np.ndarray, raw: pd.DataFrame, positions: np.ndarray) -> None:
        gap = np.isnan(X)
        self.present += (~gap).sum(axis=0)
        self.low = np.minimum(self.low, np.where(gap, np.inf, X).min(axis=0, initial=np.inf))
        self.high = np.maximum(self.high, np.where(gap, -np.inf, X).max(axis=0, initial=-np.inf))
        for j in np.flatnonzero(gap.any(axis=0)):
            if j not in self.first_gap:
                row = int(np.flatnonzero(gap[:, j])[0])
                self.first_gap[j] = (int(positions[row]), "is missing" if not present(raw.iloc[:, j])[row]
                                     else "is infinite or beyond float32, read as missing")
        for j in self.first_gap:
            if self.present[j]:  # neither empty nor complete
                position, what = self.first_gap[j]
                raise DataError(f"--stream: column {self.features[j]!r} in data row {position + 1} "
                                f"{what}; {STREAM_ONLY}")

    def left_out(self) -> dict[str, str]:
        """Columns empty or constant over the whole pass."""
        return {f: "empty" if not self.present[j] else "constant"
                for j, f in enumerate(self.features) if not self.present[j] or self.low[j] == self.high[j]}


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
    target: Target              # encodes the target column as the network learns it
    normalizer: Normalizer      # fitted on the training rows
    y_scaling: StandardScaling  # a regression target's statistics on the training rows
    rows: dict[str, int]
    rows_per_rank: list[int]
    dropped_rows: int
    split: Split | None
    left_out: list[dict]        # the file's columns that are not features, and why


def scan(cfg, make_normalizer, world_size: int = 1) -> Scan:
    """One pass over the file: features, the normalizer's statistics, target, row counts and
    samples; a second one if some column turns out empty or constant (it is left out).
    `make_normalizer()` gives an unfitted normalizer."""
    reader = ChunkReader(cfg.data, cfg.chunk_rows)
    first = next(reader.chunks(), None)
    check_rows(cfg.data, 0 if first is None else len(first[1]), 1, cfg.target)
    features = select_features(first[1], cfg.target, cfg.features, cfg.drop)
    left_out = not_features(first[1], cfg.target, features, cfg.drop)
    if dates := [c for c in features if is_date_column(first[1][c])]:
        warnings.warn(LEFT_OUT_NOTES["date or time"].format(names(dates)), DataNote)
        left_out.update({str(c): "date or time" for c in dates})
        features = [c for c in features if c not in dates]
        if not features:
            raise DataError(f"no feature columns left: {names(dates)} (date or time)")
    s = _scan(cfg, reader, features, make_normalizer(), world_size)
    if isinstance(s, dict):  # empty or constant columns: scanned again without them
        for reason in ("empty", "constant"):
            if cs := [c for c, r in s.items() if r == reason]:
                warnings.warn(LEFT_OUT_NOTES[reason].format(names(cs)), DataNote)
        if len(s) == len(features):
            raise DataError(f"no feature columns left: {names(s)} (empty or constant)")
        left_out.update(s)
        s = _scan(cfg, reader, [c for c in features if c not in s], make_normalizer(), world_size)
    s.left_out = [{"name": c, "reason": r} for c, r in left_out.items()]
    return s


def _scan(cfg, reader: ChunkReader, features: list[str], normalizer: Normalizer,
          world_size: int) -> Scan | dict[str, str]:
    """The pass itself; the empty or constant columns instead, if there are any."""
    target, y_scaling, gaps = Target(cfg.target), StandardScaling(), Gaps(features)
    # A normalizer without partial_fit (quantiles need every row at once) is fitted on the uniform
    # sample of the training rows instead, after the pass.
    streamed = hasattr(normalizer, "partial_fit")
    samples = [Sample(cfg.eval_rows, cfg.seed) for _ in (TRAIN, VALIDATION, TEST)]
    counts, per_rank, dropped = np.zeros(3, int), np.zeros(world_size, int), 0
    bar = tqdm(total=reader.rows, desc="scan (normalization statistics)", unit=" rows",
               unit_scale=True, disable=not cfg.progress)
    for positions, frame, split, missing_target in labelled_chunks(reader, cfg, features):
        bar.update(len(frame) + missing_target)
        dropped += missing_target
        X, y = numeric_features(frame, features, positions, reader.table.decimal), frame[cfg.target]
        gaps.add(X, frame[features], positions)
        train = split == TRAIN
        target.add(y)
        if train.any() and streamed:
            normalizer.partial_fit(X[train])
        if train.any() and target.numeric and not target.infinite:
            y_scaling.partial_fit(y.to_numpy(np.float64)[train, None])
        counts += np.bincount(split, minlength=3)
        per_rank += np.bincount(positions[train] % world_size, minlength=world_size)
        for s, sample in enumerate(samples):
            sample.add(positions[split == s], X[split == s], y.to_numpy()[split == s])
    bar.close()
    n = int(counts.sum())
    check_rows(cfg.data, n + dropped, n, cfg.target)
    if left_out := gaps.left_out():
        return left_out

    test_share = cfg.test_share(folds=1)  # a streamed run is one network
    if counts[TRAIN] < MIN_TRAIN_ROWS or counts[VALIDATION] == 0 or (counts[TEST] == 0 < test_share):
        raise too_few_to_split(n, cfg.val_size, test_share)
    task, classes = target.settle(cfg.task)
    arrays = [sample.arrays() for sample in samples]
    (X_train, y_train), (X_val, y_val), (X_test, y_test) = arrays
    split = Split(X_train=X_train, y_train=target.encode(y_train, task), X_val=X_val,
                  y_val=target.encode(y_val, task), X_test=X_test, y_test=target.encode(y_test, task),
                  stratified=False)
    if not streamed:
        normalizer.fit(split.X_train)
    return Scan(features=[str(f) for f in features], task=task, classes=classes, target=target,
                normalizer=normalizer, y_scaling=y_scaling,
                rows=dict(zip(("train", "validation", "test"), map(int, counts))),
                rows_per_rank=per_rank.tolist(), dropped_rows=dropped, split=split, left_out=[])


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
                  steps: int, device: torch.device, y_mean: float, y_scale: float):
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
        X = numeric_features(frame[mine], scan.features, positions[mine],
                             reader.table.decimal).astype(np.float32)
        y = scan.target.encode(frame[cfg.target].to_numpy()[mine], scan.task)
        if regression:
            y = (y - y_mean) / y_scale
        for batch in buffer.add(X, y):
            yield batch
            emitted += 1
            if emitted == steps:
                chunks.close()
                return
    for batch in buffer.finish()[:steps - emitted]:
        yield batch
