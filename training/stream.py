"""Tables larger than memory (`--stream`): the file is read in chunks, never whole.

A first pass judges each column as an in-memory table's is judged (training/columns.py: numbers,
categories, codes, gaps, what is left out and the same notices), from facts gathered chunk by
chunk with exact value counts up to a bound (training/column_scan.py); summarizes the target with
the rules an in-memory table passes (training/rules.py); counts the rows and keeps a bounded
uniform sample of each split. The preparation is then fitted on the training rows: a mixed
table's categories and codes from the exact training counts, its imputed medians and the numeric
normalizer on the training sample (--eval-rows); a numeric table's standard scaling exactly, by
partial_fit over the pass. The exported graph is the one an in-memory run exports.

Each epoch reads the file again and trains from a bounded shuffle buffer that holds rows compact
(a category as its index, not its one-hot columns). A row's split comes from a hash of its
position in the file: no shuffle of the file, and the same split on every read and every rank.
Under torchrun rank 0 scans and fits once and hands the result to the others; rank r trains on
the training rows whose position is r modulo the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from training.batches import batch_bounds
from training.column_scan import ColumnScan
from training.columns import Column, graph_values, sort_facts
from training.contract import column_input
from training.data import Split, check_forced, describe, not_features, select_features, table_rows
from training.files import ChunkReader
from training.normalize import Normalizer, StandardScaling, make_normalizer
from training.rules import MIN_TRAIN_ROWS, Target, check_rows, too_few_to_split

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


class Sample:
    """A uniform sample of at most `size` rows: those with the smallest hash of their position (a
    second hash, independent of the split's). Bounded memory, and the same rows on every run.
    Rows as read from the file (their columns are judged after the pass)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.parts = size, seed, []

    def add(self, positions: np.ndarray, rows: pd.DataFrame, y: np.ndarray) -> None:
        if len(positions):
            self.parts.append((row_hash(positions, self.seed, salt=1), rows, y))
        if sum(len(p[0]) for p in self.parts) > self.size:  # at most size + one chunk held
            self._trim()

    def _trim(self) -> None:
        keys, y = (np.concatenate([p[i] for p in self.parts]) for i in (0, 2))
        rows = pd.concat([p[1] for p in self.parts], ignore_index=True) if self.parts else pd.DataFrame()
        keep = np.sort(np.argsort(keys, kind="stable")[:self.size])  # back in file order
        self.parts = [(keys[keep], rows.iloc[keep].reset_index(drop=True), y[keep])]

    def rows(self) -> tuple[pd.DataFrame, np.ndarray]:
        self._trim()
        return self.parts[0][1], self.parts[0][2]


@dataclass
class Scan:
    """What the first pass found. `split` holds the uniform samples, on rank 0 only."""
    features: list              # the kept feature columns, as the file names them
    kept: list[Column]          # what each is (its values are read chunk by chunk)
    columns: list[dict] | None  # a mixed table's columns as the model records them; None: numeric
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

    def inputs(self, frame: pd.DataFrame):
        """Rows of the file as the network's input rows (training/data.py: table_rows)."""
        return table_rows({c.name: graph_values(c, frame[f]) for c, f in zip(self.kept, self.features)},
                          mixed=self.columns is not None)


def scan(cfg, world_size: int = 1) -> Scan:
    """One pass over the file: each column judged as in memory (training/columns.py) and its
    vocabulary counted (training/column_scan.py), the target summarized, the rows counted and
    sampled; then the normalizer (--normalizer, --embedding) fitted on the training rows."""
    reader = ChunkReader(cfg.data, cfg.chunk_rows)
    first = next(reader.chunks(), None)
    check_rows(cfg.data, 0 if first is None else len(first[1]), 1, cfg.target)
    features = select_features(first[1], cfg.target, cfg.features, cfg.drop)
    check_forced(features, cfg.categorical, cfg.numeric)
    left_out = not_features(first[1], cfg.target, features, cfg.drop)
    decimal = reader.table.decimal
    facts = {c: ColumnScan(str(c), first[1][c], decimal) for c in features}
    # A numeric table's standard scaling is exact over all training rows (partial_fit, gaps
    # ignored); other normalizers, and any of a mixed table, are fitted on the training sample.
    moments = StandardScaling() if isinstance(normalizer_for(cfg, None), StandardScaling) else None
    target, y_scaling = Target(cfg.target), StandardScaling()
    samples = [Sample(cfg.eval_rows, cfg.seed) for _ in (TRAIN, VALIDATION, TEST)]
    counts, per_rank, dropped = np.zeros(3, int), np.zeros(world_size, int), 0
    bar = tqdm(total=reader.rows, desc="scan (columns and statistics)", unit=" rows",
               unit_scale=True, disable=not cfg.progress)
    for positions, frame, split, missing_target in labelled_chunks(reader, cfg, features):
        bar.update(len(frame) + missing_target)
        dropped += missing_target
        train, y = split == TRAIN, frame[cfg.target]
        X = np.column_stack([facts[c].add(frame[c], train) for c in features])
        target.add(y)
        if train.any() and moments is not None:
            moments.partial_fit(X[train])
        if train.any() and target.numeric and not target.infinite:
            y_scaling.partial_fit(y.to_numpy(np.float64)[train, None])
        counts += np.bincount(split, minlength=3)
        per_rank += np.bincount(positions[train] % world_size, minlength=world_size)
        for s, sample in enumerate(samples):
            sample.add(positions[split == s], frame.loc[split == s, features], y.to_numpy()[split == s])
    bar.close()
    n = int(counts.sum())
    check_rows(cfg.data, n + dropped, n, cfg.target)
    sorted_columns = sort_facts(facts, cfg.categorical, cfg.numeric, decimal)
    left_out.update(sorted_columns.left_out)
    kept = sorted_columns.kept
    names_kept, scanned = {c.name for c in kept}, features
    features = [c for c in features if str(c) in names_kept]

    test_share = cfg.test_share(folds=1)  # a streamed run is one network
    if counts[TRAIN] < MIN_TRAIN_ROWS or counts[VALIDATION] == 0 or (counts[TEST] == 0 < test_share):
        raise too_few_to_split(n, cfg.val_size, test_share)
    task, classes = target.settle(cfg.task)
    s = Scan(features=features, kept=kept, columns=describe(kept), task=task, classes=classes,
             target=target, normalizer=None, y_scaling=y_scaling,
             rows=dict(zip(("train", "validation", "test"), map(int, counts))),
             rows_per_rank=per_rank.tolist(), dropped_rows=dropped, split=None,
             left_out=[{"name": c, "reason": r} for c, r in left_out.items()])
    (X_train, y_train), (X_val, y_val), (X_test, y_test) = (
        (s.inputs(rows), y) for rows, y in (sample.rows() for sample in samples))
    s.split = Split(X_train=X_train, y_train=target.encode(y_train, task), X_val=X_val,
                    y_val=target.encode(y_val, task), X_test=X_test, y_test=target.encode(y_test, task),
                    stratified=False)
    s.normalizer = normalizer_for(cfg, s.columns)
    if s.columns:
        s.normalizer.fit(X_train, rows={column_input(c): facts[f].vocabulary_rows(c.get("codes", False))
                                        for c, f in zip(s.columns, features)
                                        if c["type"] == "categorical" or c.get("codes")})
    elif moments is not None:
        s.normalizer = moments.subset([scanned.index(c) for c in features])
    else:
        s.normalizer.fit(X_train)
    return s


def normalizer_for(cfg, columns: list[dict] | None) -> Normalizer:
    """An unfitted normalizer for a numeric (columns None) or a mixed table."""
    return make_normalizer(cfg.normalizer, "mixed" if columns else "table", columns,
                           cfg.fitted_embedding(), cfg.embedding_bins)


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
        X = scan.normalizer.compact(scan.inputs(frame[mine]))
        y = scan.target.encode(frame[cfg.target].to_numpy()[mine], scan.task)
        if regression:
            y = (y - y_mean) / y_scale
        for X, y in buffer.add(X, y):
            yield scan.normalizer.expand(X), y
            emitted += 1
            if emitted == steps:
                chunks.close()
                return
    for X, y in buffer.finish()[:steps - emitted]:
        yield scan.normalizer.expand(X), y
