"""Input normalizers, one per input kind, each in scikit-learn's shape.

`__init__` stores parameters; `fit(X)` (and `partial_fit(X)`, for the streamed path) learns from
the training split only and returns self; what is learned ends in `_`. Each normalizer then says
what it is (`metadata()`, for the card and the ONNX metadata) and gives the piece of the exported
graph that applies it (`module()`, in front of the network), so the service never re-implements
it. `encode(X)` is what the network is fed during training: the raw inputs, except for mixed
tables, whose text columns are one-hot encoded (training/encoding.py) before the network.

    numeric table   StandardScaling, RobustScaling,      float [rows, features]
                    QuantileNormal, NoScaling
    mixed table     MixedColumns(<numeric normalizer>)   one column each, numbers and text
    images          ChannelStats, NoScaling              uint8 [images, channels, height, width]

A new normalizer is one class here plus its entry in NORMALIZERS.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from training import encoding
from training.contract import column_input
from training.layers import FirstColumns, PiecewiseEncoding, PiecewiseLinear, SmoothClip, Standardize


class Normalizer:
    """What every normalizer shares: by default the network takes the raw inputs, and the exported
    graph is the network's own, fed the raw inputs under its input name."""
    name: str

    def encode(self, X):
        return X

    def graph(self, net, net_input: str):
        return net

    def feeds(self, X, input_name: str) -> dict[str, np.ndarray]:
        return {input_name: X if X.dtype == np.uint8 else X.astype(np.float32)}

    def embedding_module(self) -> nn.Module | None:
        """The network's first layer on the normalized inputs, if --embedding fitted one."""
        return None

    def compact(self, X) -> np.ndarray:
        """Rows as a streamed run buffers them (float32); `expand` (on a batch tensor) gives
        `encode`'s rows. Numeric tables: the rows themselves."""
        return np.asarray(X, dtype=np.float32)

    def expand(self, X):
        return X


class StandardScaling(Normalizer):
    """(x - mean) / std per feature, scikit-learn's StandardScaler (ddof=0; a constant feature
    gets scale 1). partial_fit over chunks gives the statistics fit gives on the whole."""
    name = "standard"

    def __init__(self):
        from sklearn.preprocessing import StandardScaler
        self.scaler = StandardScaler()

    def fit(self, X: np.ndarray) -> StandardScaling:
        self.scaler.fit(X)
        return self._learned()

    def partial_fit(self, X: np.ndarray) -> StandardScaling:
        self.scaler.partial_fit(X)
        return self._learned()

    def _learned(self) -> StandardScaling:
        self.mean_, self.scale_ = self.scaler.mean_, self.scaler.scale_
        return self

    def subset(self, features: list[int]) -> StandardScaling:
        """The statistics of some of the features (each feature's are its own)."""
        out = StandardScaling()
        out.mean_, out.scale_ = self.mean_[features], self.scale_[features]
        return out

    def per_feature(self) -> list[dict]:
        return [{"mean": float(m), "scale": float(s)} for m, s in zip(self.mean_, self.scale_)]

    def metadata(self) -> dict:
        return {"normalization": {"method": self.name, "enabled": True, "mean": self.mean_.tolist(),
                                  "scale": self.scale_.tolist()}}

    def module(self) -> nn.Module:
        return Standardize(self.mean_, self.scale_)


class NoScaling(Normalizer):
    """The identity, for ablation: mean 0, scale 1, so the graph keeps its shape."""
    name = "none"

    def fit(self, X: np.ndarray) -> NoScaling:
        self.image_ = np.ndim(X) == 4
        self.mean_, self.scale_ = np.zeros(np.shape(X)[1]), np.ones(np.shape(X)[1])
        return self

    partial_fit = fit

    def per_feature(self) -> list[dict]:
        return [{"mean": 0.0, "scale": 1.0} for _ in self.mean_]

    def metadata(self) -> dict:
        spread = "std" if self.image_ else "scale"
        pixels = {"pixel_scale": "1/255"} if self.image_ else {}
        return {"normalization": {"method": self.name, "enabled": False, "mean": self.mean_.tolist(),
                                  spread: self.scale_.tolist(), **pixels}}

    def module(self) -> nn.Module:
        return Standardize(self.mean_, self.scale_, per_channel=self.image_)


class RobustScaling(Normalizer):
    """(x - median) / interquartile range per feature, then smooth clipping of outliers to about
    +-`clip` (RealMLP's robust scaling). A feature whose quartiles coincide is scaled by half its
    range; a constant one by 1. Quantiles need every training row at once: the streamed path fits
    it on its uniform sample of the training split (--eval-rows)."""
    name = "robust"

    def __init__(self, clip: float = 3.0):
        self.clip = clip

    def fit(self, X: np.ndarray) -> RobustScaling:
        X = np.asarray(X, dtype=np.float64)
        q1, median, q3 = np.quantile(X, [0.25, 0.5, 0.75], axis=0)
        half_range = (X.max(axis=0) - X.min(axis=0)) / 2
        self.center_ = median
        self.scale_ = np.where(q3 > q1, q3 - q1, np.where(half_range > 0, half_range, 1.0))
        return self

    def per_feature(self) -> list[dict]:
        return [{"center": float(c), "scale": float(s)} for c, s in zip(self.center_, self.scale_)]

    def metadata(self) -> dict:
        return {"normalization": {"method": self.name, "enabled": True, "center": self.center_.tolist(),
                                  "scale": self.scale_.tolist(), "clip": self.clip}}

    def module(self) -> nn.Module:
        return nn.Sequential(Standardize(self.center_, self.scale_), SmoothClip(self.clip))


class QuantileNormal(Normalizer):
    """Each feature through its training quantiles to a standard normal score: a piecewise-linear
    map through `n_quantiles` knots (the training quantile at level (k + 0.5) / n, and the normal
    score of that level), flat beyond the outer knots (about +-3 sd). Tied knots (a discrete
    feature) become one knot with their mean score. scikit-learn's QuantileTransformer cannot be
    converted by skl2onnx; this map is plain graph arithmetic. Quantiles need every training row
    at once: the streamed path fits it on its uniform sample of the training split (--eval-rows)."""
    name = "quantile"

    def __init__(self, n_quantiles: int = 128):
        self.n_quantiles = n_quantiles

    def fit(self, X: np.ndarray) -> QuantileNormal:
        from scipy.special import ndtri
        X = np.asarray(X, dtype=np.float64)
        n = max(1, min(self.n_quantiles, len(X)))
        levels = (np.arange(n) + 0.5) / n
        quantiles, scores = np.quantile(X, levels, axis=0), ndtri(levels)
        self.knots_, self.scores_ = [], []
        for column in quantiles.T:  # ties: one knot, the mean score of the tied levels
            knots, group = np.unique(column, return_inverse=True)
            self.knots_.append(knots)
            self.scores_.append(np.bincount(group, scores) / np.bincount(group))
        return self

    def per_feature(self) -> list[dict]:
        return [{"knots": k.tolist(), "scores": s.tolist()} for k, s in zip(self.knots_, self.scores_)]

    def metadata(self) -> dict:
        return {"normalization": {"method": self.name, "enabled": True,
                                  "n_quantiles": self.n_quantiles, "features": self.per_feature()}}

    def module(self) -> nn.Module:
        segments = max(max(len(k) for k in self.knots_) - 1, 1)
        shape = (len(self.knots_), segments)
        start, width, y0, dy = np.zeros(shape), np.ones(shape), np.zeros(shape), np.zeros(shape)
        inner = np.full((shape[0], max(segments - 1, 1)), np.inf)
        for f, (k, s) in enumerate(zip(self.knots_, self.scores_)):
            m = len(k) - 1  # real segments; beyond them, flat at the last score
            start[f], y0[f] = k[-1], s[-1]
            start[f, :m], width[f, :m], y0[f, :m], dy[f, :m] = k[:-1], np.diff(k), s[:-1], np.diff(s)
            inner[f, :max(m - 1, 0)] = k[1:-1]
        return PiecewiseLinear(inner, start, width, y0, dy)


class Embedded(Normalizer):
    """A numeric normalizer whose networks encode each normalized feature piecewise-linearly
    (--embedding ple; embedding_module() is the network's first layer, so an ensemble still
    normalizes once and the linear candidate takes the plain normalized features): `bins` bins per feature between its training quantiles (ties merged), so
    the network sees where a value lies, not only how large it is (a step-like effect is one
    weight). Fitted on the same training rows as the normalizer, after it; unsupervised, so the
    bins use no target and the folds' cross-validation stays honest. No partial_fit: quantiles
    need every row, so a streamed run fits it on its uniform training sample (--eval-rows)."""

    def __init__(self, inner, bins: int = 16):
        self.inner, self.bins, self.name = inner, bins, inner.name

    def fit(self, X) -> Embedded:
        import torch
        self.inner.fit(X)
        with torch.no_grad():
            Z = self.inner.module()(torch.as_tensor(np.asarray(X, dtype=np.float32))).double().numpy()
        levels = np.linspace(0, 1, self.bins + 1)
        self.edges_ = [np.unique(np.quantile(z, levels)) for z in Z.T]
        return self

    def per_feature(self) -> list[dict]:
        return self.inner.per_feature()

    def embedding(self) -> dict:
        return {"method": "ple", "bins": self.bins, "of": "the normalized values",
                "edges": [e.tolist() for e in self.edges_]}

    def metadata(self) -> dict:
        meta = self.inner.metadata()
        meta["normalization"]["embedding"] = self.embedding()
        return meta

    def module(self) -> nn.Module:
        return self.inner.module()

    def embedding_module(self) -> nn.Module:
        return PiecewiseEncoding(self.edges_)


class ChannelStats(Normalizer):
    """Per-channel mean and standard deviation (population, ddof=0) of uint8 training images on the
    0..1 scale; a constant channel gets std 1. Applied by torchvision's Normalize."""
    name = "standard"

    def fit(self, images: np.ndarray) -> ChannelStats:
        x = images.astype(np.float64) / 255.0
        std = x.std(axis=(0, 2, 3))
        self.mean_, self.std_ = x.mean(axis=(0, 2, 3)), np.where(std > 0, std, 1.0)
        return self

    def metadata(self) -> dict:
        return {"normalization": {"method": self.name, "enabled": True, "mean": self.mean_.tolist(),
                                  "std": self.std_.tolist(),
                                  "pixel_scale": "1/255, then (x - mean) / std"}}

    def module(self) -> nn.Module:
        from torchvision.transforms import v2
        return v2.Normalize([float(m) for m in self.mean_], [float(s) for s in self.std_])


class MixedColumns(Normalizer):
    """Mixed tables (text categories, missing values): numeric columns get the training median for
    a missing value, then `numeric` (a numeric-table normalizer); text columns are one-hot over
    the training categories (a missing value is its own category, ""; a rare category, or one
    never seen in training, is all zeros: training/encoding.py); integer code columns are also
    one-hot over their frequent codes, after the number. Imputing and encoding run in the graph as scikit-learn converted by
    skl2onnx; the numeric normalizer runs in front of the network like a numeric table's."""

    def __init__(self, numeric, columns: list[dict]):
        self.numeric, self.columns = numeric, columns

    def fit(self, frame, rows: dict | None = None) -> MixedColumns:
        """`rows`: the training rows per value of each categorical and code column, when `frame`
        is a sample of the training rows (a streamed run); otherwise counted in `frame`."""
        self.encoder_ = encoding.fit_encoder(frame, self.columns, rows)
        self.n_numeric_ = len(encoding.names(self.columns, "numeric"))
        if self.n_numeric_:
            self.numeric.fit(self.encode(frame)[:, :self.n_numeric_])
        return self

    def encode(self, frame) -> np.ndarray:
        return encoding.transform(self.encoder_, frame, self.columns)

    def compact(self, frame) -> np.ndarray:  # categories as indices, not one-hot
        return encoding.compact(self.encoder_, frame, self.columns)

    def expand(self, X):
        return encoding.expand(X, encoding.one_hot_sizes(self.encoder_))

    def metadata(self) -> dict:
        numeric = iter(self.numeric.per_feature() if self.n_numeric_ else [])
        learned = encoding.learned(self.encoder_, self.columns)
        columns = [{**c, **learned[column_input(c)], **(next(numeric) if c["type"] == "numeric" else {})}
                   for c in self.columns]
        return {"columns": columns, "normalization": {
            "method": self.numeric.name, "enabled": self.numeric.name != "none",
            "per_column": "see columns: numeric -> training median for missing values, then "
                          f"{self.numeric.name} scaling; categorical -> one-hot over the training "
                          f"categories with at least {encoding.MIN_CATEGORY_ROWS} rows (at most "
                          f"{encoding.MAX_CATEGORIES}), rarer or unseen ones -> all zeros; a code "
                          "column (codes: n) is numeric and also one-hot over its n codes with at "
                          f"least {encoding.MIN_CATEGORY_ROWS} rows",
            **({"embedding": self.numeric.embedding()} if self.n_numeric_ and hasattr(self.numeric, "embedding")
               else {})}}

    def module(self) -> nn.Module:
        return FirstColumns(self.numeric.module() if self.n_numeric_ else nn.Identity(),
                            self.n_numeric_)

    def embedding_module(self) -> nn.Module | None:  # on the numeric columns, which come first
        return self.numeric.embedding_module() if self.n_numeric_ else None

    def graph(self, net, net_input: str):
        """The network's ONNX graph with the imputing and encoding in front of it."""
        return encoding.join(encoding.export_encoder(self.encoder_, self.columns, like=net),
                             net, net_input)

    def feeds(self, frame, input_name: str) -> dict[str, np.ndarray]:
        return encoding.column_feeds(frame, self.columns)


# method -> the normalizer for numeric tables and for images (None: tables only); mixed tables
# wrap the numeric one.
NORMALIZERS = {"auto": (QuantileNormal, ChannelStats),  # the default: benchmarks/quality.py chose it
               "standard": (StandardScaling, ChannelStats), "none": (NoScaling, NoScaling),
               "robust": (RobustScaling, None), "quantile": (QuantileNormal, None)}


def make_normalizer(method: str, modality: str, columns: list[dict] | None = None, embedding: str = "none",
                    bins: int = 16):
    """An unfitted normalizer for this kind of input (tables: with --embedding's encoding after it)."""
    numeric, image = NORMALIZERS[method]
    if modality == "image":
        return image()
    numeric = Embedded(numeric(), bins) if embedding == "ple" else numeric()
    return MixedColumns(numeric, columns) if modality == "mixed" else numeric

