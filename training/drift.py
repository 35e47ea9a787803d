"""Covariate shift: what training records about each input feature, and how the service counts
live inputs in the same terms. Shared by training and the service (numpy only, no torch).

Training writes a profile of the raw training split into the model's metadata (`drift`): how many
rows it has; per numeric feature its mean, standard deviation, quantile bin edges and the training
rows' share in each bin (and the share missing); per categorical feature the share of each
category; for images, each channel's per-image mean brightness as a numeric feature. The service
counts live inputs into the same bins (`Layout`); training/drift_stats.py compares the counts with
the profile.
"""
from __future__ import annotations


import numpy as np

BINS = 10                # quantile bins per numeric feature
MAX_CATEGORIES = 1000    # the most frequent categories get a bin each; any others share "other"
EPSILON = 1e-4           # a bin's share is at least this in the PSI (an empty bin is not infinitely far)


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
    return {"bins": BINS, "epsilon": EPSILON, "rows": len(X), "features": features,
            "image_feature": "per-image mean of each channel, 0..1" if modality == "image" else None}


# ---- serving: live counts in the profile's bins ----------------------------------------------

class Layout:
    """Where each feature's live counts sit in one flat float64 vector.

    Slot 0 counts rows. A numeric feature has [values seen, sum of the deviations above the
    training mean, sum of those below it (as positive numbers), sum of squared deviations, missing,
    one count per bin]; a categorical one [values seen, one count per category, other]. Every slot
    only grows, so a worker's totals can be exported as Prometheus counters; vectors add: a
    worker's, a window's and the whole fleet's counts are sums of such vectors.
    """

    def __init__(self, reference: dict):
        self.features = reference["features"]
        self.offsets, size = [], 1
        for f in self.features:
            self.offsets.append(size)
            size += 5 + len(f["freqs"]) if f["kind"] == "numeric" else 2 + len(f["freqs"])
        self.size = size
        numeric = [i for i, f in enumerate(self.features) if f["kind"] == "numeric"]
        widest = max([len(self.features[i]["edges"]) for i in numeric], default=0)
        # Edge j of every numeric feature in row j (padded with +inf), float32 like the inputs:
        # one comparison per edge bins every value of a batch.
        self.edges = np.full((widest, len(numeric)), np.inf, dtype=np.float32)
        for col, i in enumerate(numeric):
            self.edges[:len(self.features[i]["edges"]), col] = self.features[i]["edges"]
        self.base = np.array([self.offsets[i] for i in numeric], dtype=np.intp)
        self.moments = np.concatenate([self.base + k for k in range(5)])
        # Bin b of numeric feature col (b = 0 .. its edges) and its slot in the counts vector.
        self.bin_b, self.bin_col = map(np.array, zip(*[(b, col) for col, i in enumerate(numeric)
                                                       for b in range(len(self.features[i]["edges"]) + 1)]
                                                     or [(0, 0)]))
        self.bin_slot = self.base[self.bin_col] + 5 + self.bin_b if numeric else np.zeros(0, np.intp)
        self.means = np.array([self.features[i]["mean"] for i in numeric], dtype=np.float32)
        self.lookup = {i: {c: k for k, c in enumerate(f["categories"])}
                       for i, f in enumerate(self.features) if f["kind"] == "categorical"}

    def count(self, numeric: np.ndarray | None, categorical: dict[int, list] | None = None) -> np.ndarray:
        """The counts of a batch of rows: `numeric` [rows, numeric features] (NaN = missing), and
        for each categorical feature (by index) its values as text."""
        return self.count_groups(numeric, categorical)[0]

    def count_groups(self, numeric, categorical=None, starts=(0,)) -> np.ndarray:
        """count() for consecutive groups of rows at once (group g starts at row starts[g]):
        [groups, size]. One pass, whatever the number of groups, with temporaries no larger than
        the batch (the monitor counts often: its cost is mostly memory traffic)."""
        rows = len(numeric) if numeric is not None else len(next(iter(categorical.values())))
        starts = np.asarray(starts, dtype=np.intp)
        sizes = np.diff(np.append(starts, rows))
        out = np.zeros((len(starts), self.size))
        out[:, 0] = sizes
        if numeric is not None and numeric.size:
            X = np.asarray(numeric, dtype=np.float32)
            gaps = np.isnan(X)

            def per_group(values, dtype=np.float64):  # one pass, whatever the number of groups
                if values.dtype == bool:  # counts: summed as bytes, a third faster than as bools
                    values, dtype = values.view(np.uint8), np.int32
                return np.add.reduceat(values, starts, axis=0, dtype=dtype)
            missing = per_group(gaps).astype(float)
            # above[j]: per group and feature, the values above edge j - 1 (above[0]: all present
            # values, the last: none); the values in bin b are above[b] - above[b + 1].
            above = np.zeros((len(self.edges) + 2, len(starts), X.shape[1]))
            above[0] = sizes[:, None] - missing
            for j, edge in enumerate(self.edges, start=1):
                np.greater(X, edge, out=gaps)  # NaN is above no edge
                above[j] = per_group(gaps)
            in_bin = above[:-1] - above[1:]
            out[:, self.bin_slot] += in_bin[self.bin_b, :, self.bin_col].T
            deviation = X - self.means  # float32, the batch's size
            if missing.any():
                np.nan_to_num(deviation, copy=False)  # a missing value deviates by 0
            total, up = per_group(deviation), per_group(np.maximum(deviation, 0))
            squares = per_group(np.square(deviation, dtype=np.float64))  # a float32 square overflows past 1.8e19
            # Per feature: values seen, deviations above and below the training mean, squared
            # deviations, missing values.
            out[:, self.moments] += np.concatenate([above[0], up, up - total, squares, missing], axis=1)
        if categorical:
            group = np.repeat(np.arange(len(starts)), sizes)
        for i, values in (categorical or {}).items():
            start, known = self.offsets[i], self.lookup[i]
            other = len(known)
            idx = np.fromiter((known.get(v, other) for v in values), dtype=np.intp, count=len(values))
            width = other + 1
            counted = np.bincount(group * width + idx, minlength=len(starts) * width)
            out[:, start] += sizes
            out[:, start + 1:start + 1 + width] += counted.reshape(len(starts), width)
        return out
