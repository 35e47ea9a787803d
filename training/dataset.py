"""The data a run trains on: loaded, split, and with its normalizer fitted on the training split.

In memory the table is read whole (training/data.py); `--stream` scans it chunk by chunk
(training/stream.py), fitting the same normalizer with partial_fit (or, for one that needs
quantiles, on the scan's uniform sample of the training rows). Under torchrun rank 0 does
this once and hands the result to the other ranks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training import stream
from training.data import Split, Table, load_table, split_table
from training.distributed import World
from training.normalize import Normalizer, StandardScaling, make_normalizer

SPLITS = {"train": "train", "validation": "val", "test": "test"}  # split name -> Split field suffix


@dataclass
class Data:
    table: Table            # streamed: the description only, no rows
    split: Split            # raw rows; streamed: a uniform sample of each split (rank 0 only)
    rows: dict[str, int]    # rows in each split (streamed: in the file, not in the samples)
    normalizer: Normalizer  # fitted on the training split (with --folds: training + validation)
    y_mean: float = 0.0     # a regression target is learned standardized (training split),
    y_scale: float = 1.0    # and answered in its own units
    scan: stream.Scan | None = None  # streamed: what the first pass found
    folds: int = 1          # --folds settled for this data (training/ensemble.py)

    def inputs(self, split: str) -> np.ndarray:
        """A split's rows as the network takes them."""
        return self.normalizer.encode(getattr(self.split, f"X_{SPLITS[split]}"))

    def targets(self, split: str) -> np.ndarray:
        """A split's targets as the network learns them: class indices, or standardized values."""
        y = getattr(self.split, f"y_{SPLITS[split]}")
        return y if self.table.task == "classification" else (y - self.y_mean) / self.y_scale

    @property
    def width(self) -> int:
        """The network's input width (channels, for images): one training row encoded is enough."""
        return self.normalizer.encode(self.split.X_train[:1]).shape[1]


def prepare(cfg, world: World, table: Table | None = None) -> Data:
    """Load and split the data (unless `table` is given) and fit the normalizer, once (rank 0)."""
    if cfg.stream:
        return _streamed(cfg, world)
    table = table or load_table(cfg)
    folds = cfg.folds_for(len(table.y))
    split = split_table(table, cfg.val_size, cfg.test_share(folds), cfg.seed)
    # With --folds the networks train on the validation rows too (all folds but one each).
    fitted_on = pooled(split) if folds > 1 else split
    normalizer = world.share(lambda: make_normalizer(cfg.normalizer, table.modality, table.columns,
                                                             cfg.fitted_embedding(), cfg.embedding_bins)
                             .fit(fitted_on.X_train))
    rows = {name: len(getattr(split, f"y_{key}")) for name, key in SPLITS.items()}
    y_scaling = StandardScaling().fit(fitted_on.y_train[:, None]) if table.task == "regression" else None
    return Data(table=table, split=split, rows=rows, normalizer=normalizer, folds=folds,
                **target_scaling(y_scaling))


def pooled(split: Split) -> Split:
    """The split with the validation rows added to the training rows (--refit, --folds)."""
    if isinstance(split.X_train, pd.DataFrame):
        X = pd.concat([split.X_train, split.X_val]).reset_index(drop=True)
    else:
        X = np.concatenate([split.X_train, split.X_val])
    return dataclasses.replace(split, X_train=X, y_train=np.concatenate([split.y_train, split.y_val]))


def _streamed(cfg, world: World) -> Data:
    s = world.share(lambda: stream.scan(cfg, world.size),
                    public=lambda s: dataclasses.replace(s, split=None))
    names = [c.name for c in s.kept]
    table = Table(X=np.empty((0, len(names))), y=np.empty(0), feature_names=names, task=s.task,
                  classes=s.classes, source=cfg.data, dropped_rows=s.dropped_rows,
                  modality="mixed" if s.columns else "table", columns=s.columns, left_out=s.left_out)
    split = s.split or no_rows(s)  # ranks other than 0
    y_scaling = s.y_scaling if s.task == "regression" else None
    return Data(table=table, split=split, rows=s.rows, normalizer=s.normalizer, scan=s,
                **target_scaling(y_scaling))


def no_rows(s: stream.Scan) -> Split:
    X = s.inputs(pd.DataFrame({f: pd.Series([], dtype=object if c.type == "categorical" else float)
                               for f, c in zip(s.features, s.kept)}))
    empty = {"X": X, "y": np.empty(0, np.int64)}
    return Split(**{f"{a}_{b}": empty[a] for b in ("train", "val", "test") for a in "Xy"}, stratified=False)


def target_scaling(y_scaling: StandardScaling | None) -> dict[str, float]:
    """A regression target's mean and scale on the training rows; none for classification."""
    if y_scaling is None:
        return {"y_mean": 0.0, "y_scale": 1.0}
    return {"y_mean": float(y_scaling.mean_[0]), "y_scale": float(y_scaling.scale_[0])}
