"""Covariate shift: what training records about each input feature, and how live inputs are
compared with it. Shared by training and the service (numpy only, no torch).

Training writes a profile of the raw training split into the model's metadata (`drift`): per
numeric feature its mean, standard deviation, quantile bin edges and the training rows' share in
each bin (and the share missing); per categorical feature the share of each category; for images,
each channel's per-image mean brightness as a numeric feature. The service counts live inputs into
the same bins (`Layout`) and compares: a standardized mean shift and the population stability
index (PSI) per feature, each with a verdict.
"""
from __future__ import annotations

import math

import numpy as np

BINS = 10                # quantile bins per numeric feature
MAX_CATEGORIES = 1000    # the most frequent categories get a bin each; any others share "other"
EPSILON = 1e-4           # a bin's share is at least this in the PSI (an empty bin is not infinitely far)
VERDICTS = ("ok", "warn", "retrain")


# ---- training: the profile -------------------------------------------------------------------

def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The bin of each value: how many edges lie below it (bin 0 is (-inf, edges[0]])."""
    return np.searchsorted(edges, values, side="left")


def numeric_profile(name: str, values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    present = values[~np.isnan(values)]
    if len(present) == 0:
        present = np.zeros(1)
    edges = np.unique(np.quantile(present, np.linspace(0, 1, BINS + 1)[1:-1]))
    freqs = np.bincount(bin_index(edges, present), minlength=len(edges) + 1) / len(present)
    return {"name": name, "kind": "numeric", "mean": float(present.mean()),
            "std": float(present.std()), "edges": edges.tolist(), "freqs": freqs.tolist(),
            "missing": float(np.isnan(values).mean())}


def categorical_profile(name: str, values) -> dict:
    """Category shares, most frequent first; past MAX_CATEGORIES the rest are pooled as other
    (live values outside the listed categories, unseen ones included, count as other)."""
    cats, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    top = order[:MAX_CATEGORIES]
    return {"name": name, "kind": "categorical", "categories": cats[top].tolist(),
            "freqs": (counts[top] / counts.sum()).tolist(),
            "other": float(counts[order[MAX_CATEGORIES:]].sum() / counts.sum())}


def image_features(images: np.ndarray) -> np.ndarray:
    """Per image, each channel's mean brightness on the 0..1 scale: [images, channels]."""
    return images.reshape(*images.shape[:2], -1).mean(axis=2, dtype=np.float64) / 255.0


def profile(X, modality: str, feature_names: list[str], columns: list[dict] | None) -> dict:
    """The drift profile of the raw training inputs X (as the split holds them)."""
    if modality == "image":
        means = image_features(X)
        features = [numeric_profile(f"channel_{c}", means[:, c]) for c in range(means.shape[1])]
    elif modality == "mixed":
        features = [numeric_profile(c["name"], X[c["name"]].to_numpy(np.float64))
                    if c["type"] == "numeric" else categorical_profile(c["name"], X[c["name"]])
                    for c in columns]
    else:
        features = [numeric_profile(name, X[:, i]) for i, name in enumerate(feature_names)]
    return {"bins": BINS, "epsilon": EPSILON, "features": features,
            "image_feature": "per-image mean of each channel, 0..1" if modality == "image" else None}


# ---- serving: live counts in the profile's bins ----------------------------------------------

class Layout:
    """Where each feature's live counts sit in one flat float64 vector.

    Slot 0 counts rows. A numeric feature has [values seen, sum, sum of squares, missing, one
    count per bin]; a categorical one [values seen, one count per category, other].
    Vectors add: a worker's, a window's and the whole server's counts are sums of such vectors.
    """

    def __init__(self, reference: dict):
        self.features = reference["features"]
        self.offsets, size = [], 1
        for f in self.features:
            self.offsets.append(size)
            size += 4 + len(f["freqs"]) if f["kind"] == "numeric" else 2 + len(f["freqs"])
        self.size = size
        numeric = [i for i, f in enumerate(self.features) if f["kind"] == "numeric"]
        widest = max([len(self.features[i]["edges"]) for i in numeric], default=0)
        # Edge j of every numeric feature in row j (padded with +inf), float32 like the inputs:
        # one comparison per edge bins every value of a batch.
        self.edges = np.full((widest, len(numeric)), np.inf, dtype=np.float32)
        for col, i in enumerate(numeric):
            self.edges[:len(self.features[i]["edges"]), col] = self.features[i]["edges"]
        self.base = np.array([self.offsets[i] for i in numeric], dtype=np.intp)
        self.moments = np.concatenate([self.base, self.base + 1, self.base + 2, self.base + 3])
        self.first_bin = self.base + 4
        self.lookup = {i: {c: k for k, c in enumerate(f["categories"])}
                       for i, f in enumerate(self.features) if f["kind"] == "categorical"}

    def count(self, numeric: np.ndarray | None, categorical: dict[int, list] | None = None,
              weights: np.ndarray | None = None) -> np.ndarray:
        """The counts of a batch of rows: `numeric` [rows, numeric features] (NaN = missing), for
        each categorical feature (by index) its values as text, and optionally how many rows each
        row stands for (a sampled row of a large request stands for several)."""
        return self.count_groups(numeric, categorical, weights)[0]

    def count_groups(self, numeric, categorical=None, weights=None, starts=(0,)) -> np.ndarray:
        """count() for consecutive groups of rows at once (group g starts at row starts[g]):
        [groups, size]. One pass, whatever the number of groups."""
        rows = len(numeric) if numeric is not None else len(next(iter(categorical.values())))
        w = np.ones(rows) if weights is None else np.asarray(weights, dtype=np.float64)
        starts = np.asarray(starts, dtype=np.intp)
        group = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, rows)))
        out = np.zeros((len(starts), self.size))
        out[:, 0] = np.add.reduceat(w, starts)
        if numeric is not None and numeric.size:
            X = np.asarray(numeric, dtype=np.float32)
            bins, above = np.zeros(X.shape, np.int8), np.empty(X.shape, bool)
            for edge in self.edges:  # bins = how many edges lie below each value (= bin_index)
                np.greater(X, edge, out=above)
                bins += above
            slots = bins + self.first_bin + (group * self.size)[:, None]
            out += np.bincount(slots.ravel(), np.broadcast_to(w[:, None], X.shape).ravel(),
                               minlength=out.size).reshape(out.shape)
            wX = w[:, None] * X  # float64
            missing = np.zeros((len(starts), X.shape[1]))
            if np.isnan(wX).any():  # mixed tables: a missing value (NaN), binned as 0 above
                gaps = np.isnan(X)
                missing = np.add.reduceat(w[:, None] * gaps, starts)
                out[:, self.first_bin] -= missing
                X, wX = np.where(gaps, 0, X), np.where(gaps, 0, wX)
            # Per feature: values seen, their sum and sum of squares, and missing values.
            out[:, self.moments] += np.concatenate(
                [out[:, :1] - missing, np.add.reduceat(wX, starts), np.add.reduceat(wX * X, starts),
                 missing], axis=1)
        for i, values in (categorical or {}).items():
            start, known = self.offsets[i], self.lookup[i]
            other = len(known)
            idx = np.fromiter((known.get(v, other) for v in values), dtype=np.intp, count=len(values))
            width = other + 1
            counted = np.bincount(group * width + idx, w, minlength=len(starts) * width)
            out[:, start] += out[:, 0]
            out[:, start + 1:start + 1 + width] += counted.reshape(len(starts), width)
        return out


def psi(expected: np.ndarray, observed: np.ndarray) -> float:
    """Population stability index between two sets of bin shares."""
    e, o = np.maximum(expected, EPSILON), np.maximum(observed, EPSILON)
    return float(np.sum((o - e) * np.log(o / e)))


def verdict(value: float | None, warn: float, retrain: float) -> str:
    if value is None:
        return "ok"
    value = abs(value)
    return "retrain" if value >= retrain else "warn" if value >= warn else "ok"


def worst(verdicts) -> str:
    return max(verdicts, key=VERDICTS.index, default="ok")


def compare(layout: Layout, counts: np.ndarray, thresholds: dict, min_rows: int) -> dict:
    """Each feature's live statistics against its training profile, with verdicts; the overall
    verdict is the worst feature's, or "not_enough_data" below min_rows rows."""
    rows, report = int(counts[0]), []
    for f, start in zip(layout.features, layout.offsets):
        seen = counts[start]
        if f["kind"] == "numeric":
            n, total, squares, missing = counts[start:start + 4]
            bins = counts[start + 4:start + 4 + len(f["freqs"])]
            live_mean = float(total / n) if n else None
            live_std = math.sqrt(max(squares / n - live_mean ** 2, 0.0)) if n else None
            shift = (live_mean - f["mean"]) / (f["std"] or 1.0) if n else None
            expected = np.append(np.asarray(f["freqs"]) * (1 - f["missing"]), f["missing"])
            observed = np.append(bins, missing) / max(rows, 1)
            entry = {"live_mean": live_mean, "live_std": live_std, "train_mean": f["mean"],
                     "train_std": f["std"], "mean_shift": shift, "edges": f["edges"],
                     "missing": float(missing / rows) if rows else None}
        else:
            live = counts[start + 1:start + 2 + len(f["freqs"])]  # the categories, then other
            expected = np.append(f["freqs"], f["other"])
            observed = live / max(seen, 1)
            shift = None
            entry = {"categories": f["categories"],
                     "unseen": float(live[-1] / seen) if seen else None}
        distance = psi(expected, observed) if rows else None
        checks = [verdict(distance, thresholds["psi_warn"], thresholds["psi_retrain"]),
                  verdict(shift, thresholds["shift_warn"], thresholds["shift_retrain"])]
        report.append({"name": f["name"], "kind": f["kind"], "psi": distance,
                       "verdict": worst(checks) if rows >= min_rows else "not_enough_data",
                       **entry, "train_freqs": expected.tolist(), "live_freqs": observed.tolist()})
    enough = rows >= min_rows
    return {"rows": rows, "verdict": worst(f["verdict"] for f in report) if enough else "not_enough_data",
            "features": report}
