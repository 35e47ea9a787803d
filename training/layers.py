"""The pieces of graph the normalizers put in front of the network (training/normalize.py):
torch modules with their statistics as buffers, so they export as constants.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class Standardize(nn.Module):
    """(x - mean) / scale with fixed statistics: buffers, so they export as graph constants. Per
    feature of [rows, features], or per channel of [images, channels, height, width]."""

    def __init__(self, mean, scale, per_channel: bool = False):
        super().__init__()
        shape = (-1, 1, 1) if per_channel else (-1,)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(shape))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale), dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class FirstColumns(nn.Module):
    """Applies `inner` to the first `n` columns and passes the others through (mixed tables: the
    numeric columns come first, then the one-hot columns)."""

    def __init__(self, inner: nn.Module, n: int):
        super().__init__()
        self.inner, self.n = inner, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n == x.shape[1]:
            return self.inner(x)
        return torch.cat([self.inner(x[:, :self.n]), x[:, self.n:]], dim=1)


class SmoothClip(nn.Module):
    """x / sqrt(1 + (x / bound)^2): about x near 0, tending to +-bound far out (RealMLP)."""

    def __init__(self, bound: float):
        super().__init__()
        self.bound = float(bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(1 + (x / self.bound) ** 2)


class PiecewiseLinear(nn.Module):
    """Per feature, a piecewise-linear map through knots (x_k, y_k), flat beyond the first and last
    knot. Segment s of feature f starts at start[f, s] with width[f, s] (> 0), value y0[f, s] and
    rise dy[f, s]; a value's segment is the number of the feature's inner knots at or below it
    (`inner`, sorted), found by binary search: log2(knots) steps of a Gather and a comparison per
    value, instead of comparing every value with every knot (several times slower for 1000 rows
    in onnxruntime)."""

    def __init__(self, inner, start, width, y0, dy):
        super().__init__()
        # One row per (feature, segment): start, width, value, rise; one Gather fetches all four.
        self.register_buffer("segments", torch.as_tensor(
            np.stack([start, width, y0, dy], axis=-1).reshape(-1, 4), dtype=torch.float32))
        features, segments = np.shape(start)
        depth = max(1, math.ceil(math.log2(np.shape(inner)[1] + 1)))
        padded = np.full((features, 2 ** depth - 1), np.inf)  # +inf: never at or below a value
        padded[:, :np.shape(inner)[1]] = inner
        self.register_buffer("inner", torch.as_tensor(padded, dtype=torch.float32).flatten())
        self.register_buffer("inner_offset", torch.arange(features, dtype=torch.float32) * padded.shape[1])
        self.register_buffer("offset", torch.arange(features) * segments)
        self.steps = [2 ** k for k in reversed(range(depth))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The count is kept in float32 (small whole numbers, exact): onnxruntime's float
        # arithmetic is faster here than its int64 Where (1000 rows: 384 vs 239 runs/s).
        count = torch.zeros_like(x)  # inner knots at or below x, so far
        for step in self.steps:
            knot = self.inner[(self.inner_offset + count + (step - 1)).long()]
            count = count + step * (x >= knot).to(x.dtype)
        segment = count.long() + self.offset
        start, width, y0, dy = self.segments[segment].unbind(-1)  # [rows, features] each
        return y0 + torch.clamp((x - start) / width, 0.0, 1.0) * dy


class PiecewiseEncoding(nn.Module):
    """Each of the first `len(edges)` columns as its piecewise-linear encoding (PLE; Gorishniy,
    Rubachev, Babenko, NeurIPS 2022) over bins [e_t, e_t+1) fitted on training values: 1 for a bin
    below the value, 0 for one above it, the fraction of the bin for the value's own, the first bin
    extended below and the last above (linear there). A feature has as many numbers as it has real
    bins (len(e) - 1: fewer where training values tie; a constant feature one, x - its value), so a
    column of a few values costs the first layer no more than it needs. Other columns (a mixed
    table's one-hot ones) pass through after them. Fixed buffers: plain graph arithmetic.

    Each bin's (x - e_t) / width: for up to SPREAD_MAX_COLUMNS columns one matrix product,
    x @ scale + shift (scale: [columns, bins], each bin's 1 / width in its column's row), a Gemm in
    onnxruntime, where fetching each bin's column with a Gather took 0.43-0.48 ms for 1000 rows of
    9 columns (2026-12-07, three profiles); for more columns that Gather, since the matrix grows
    with columns x bins (2,000 columns: a 265 MB graph)."""

    SPREAD_MAX_COLUMNS = 64

    def __init__(self, edges: list[np.ndarray]):
        super().__init__()
        feature, left, width, low, high = [], [], [], [], []
        for f, e in enumerate(edges):
            m = max(len(e) - 1, 1)
            feature += [f] * m
            left += list(e[:m])
            width += list(np.diff(e)) if len(e) > 1 else [1.0]
            low += [-np.inf] + [0.0] * (m - 1)
            high += [1.0] * (m - 1) + [np.inf]
        inv_width = 1 / np.asarray(width, dtype=np.float64)
        self.n, self.spread_form = len(edges), len(edges) <= self.SPREAD_MAX_COLUMNS
        if self.spread_form:
            scale = np.zeros((len(edges), len(feature)))
            scale[feature, np.arange(len(feature))] = inv_width
        else:
            scale = inv_width
            self.register_buffer("feature", torch.as_tensor(feature, dtype=torch.long))  # each bin's column
        for name, value in (("scale", scale), ("shift", -np.asarray(left) * inv_width),
                            ("low", low), ("high", high)):
            self.register_buffer(name, torch.as_tensor(np.asarray(value), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., columns] (stacked members: [k, rows, columns])
        numeric = x if self.n == x.shape[-1] else x[..., :self.n]
        scaled = numeric @ self.scale if self.spread_form else numeric.index_select(-1, self.feature) * self.scale
        encoded = torch.minimum(torch.maximum(scaled + self.shift, self.low), self.high)
        return encoded if self.n == x.shape[-1] else torch.cat([encoded, x[..., self.n:]], dim=-1)
