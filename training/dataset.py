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
    normalizer: Normalizer  # fitted on the training split
    y_mean: float = 0.0     # a regression target is learned standardized (training split),
    y_scale: float = 1.0    # and answered in its own units
    scan: stream.Scan | None = None  # streamed: what the first pass found

    def inputs(self, split: str) -> np.ndarray:
        """A split's rows as the network takes them."""
        return self.normalizer.encode(getattr(self.split, f"X_{SPLITS[split]}"))

    def targets(self, split: str) -> np.ndarray:
        """A split's targets as the network learns them: class indices, or standardized values."""
        y = getattr(self.split, f"y_{SPLITS[split]}")
        return y if self.table.task == "classification" else (y - self.y_mean) / self.y_scale

    @property
    def width(self) -> int:
        """The network's input width (channels, for images)."""
        return self.inputs("train").shape[1]


def prepare(cfg, world: World, table: Table | None = None) -> Data:
    """Load and split the data (unless `table` is given) and fit the normalizer, once (rank 0)."""
    if cfg.stream:
        return _streamed(cfg, world)
    table = table or load_table(cfg)
    split = split_table(table, cfg.val_size, cfg.test_size, cfg.seed)
    normalizer = world.share(lambda: make_normalizer(cfg.normalizer, table.modality, table.columns)
                             .fit(split.X_train))
    y_mean, y_scale = 0.0, 1.0
    if table.task == "regression":
        y = StandardScaling().fit(split.y_train[:, None])
        y_mean, y_scale = float(y.mean_[0]), float(y.scale_[0])
    rows = {name: len(getattr(split, f"y_{key}")) for name, key in SPLITS.items()}
    return Data(table=table, split=split, rows=rows, normalizer=normalizer, y_mean=y_mean,
                y_scale=y_scale)


def _streamed(cfg, world: World) -> Data:
    s = world.share(lambda: stream.scan(cfg, make_normalizer(cfg.normalizer, "table"), world.size),
                    public=lambda s: dataclasses.replace(s, split=None))
    n = len(s.features)
    table = Table(X=np.empty((0, n)), y=np.empty(0), feature_names=s.features, task=s.task,
                  classes=s.classes, source=cfg.data, dropped_rows=s.dropped_rows)
    empty = {"X": np.empty((0, n)), "y": np.empty(0, np.int64)}  # ranks other than 0
    split = s.split or Split(**{f"{a}_{b}": empty[a] for b in ("train", "val", "test") for a in "Xy"},
                             stratified=False)
    y_mean, y_scale = ((float(s.y_scaling.mean_[0]), float(s.y_scaling.scale_[0]))
                       if s.task == "regression" else (0.0, 1.0))
    return Data(table=table, split=split, rows=s.rows, normalizer=s.normalizer, y_mean=y_mean,
                y_scale=y_scale, scan=s)
