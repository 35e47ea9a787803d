"""Batches of one epoch: slices of the data in a random order, never a last batch of one row
(BatchNorm cannot train on a single row).
"""
from __future__ import annotations

import math

import torch


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch; a trailing batch of one row is merged into the one before,
    since BatchNorm cannot train on a single row."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if steps > 1 and n % batch_size == 1 else steps


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    steps = steps_per_epoch(n, batch_size)
    bounds = [i * batch_size for i in range(steps)] + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def shuffled_batches(X: torch.Tensor, y: torch.Tensor, batch_size: int,
                     generator: torch.Generator | None = None, order: torch.Tensor | None = None):
    """(inputs, targets) batches of one epoch in a random order (or the rows `order` gives, in
    that order): one gather, then views."""
    perm = torch.randperm(len(X), generator=generator) if order is None else order
    perm = perm.to(X.device)
    X, y = X[perm], y[perm]
    return [(X[a:b], y[a:b]) for a, b in batch_bounds(len(X), batch_size)]
