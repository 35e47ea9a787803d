"""One epoch of training, evaluation, the learning-rate schedule and checkpoints.

The data sit on the device as whole tensors. Each epoch permutes them once and takes batches as
contiguous slices (views, no copy): much less per-step work than a per-row DataLoader, or than
gathering each batch by index (benchmarks/train_speed.py).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


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


def make_optimizer(params, name: str, lr: float, weight_decay: float, momentum: float = 0.0):
    """AdamW uses the fused kernel: one call per step instead of a loop over parameters."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


# One-cycle shape: a short warm-up (the first 5% of steps) from lr / 5, then a long cosine
# anneal. With BatchNorm the network tolerates a high rate early, and a short warm-up reaches the
# validation targets in 2-4 epochs where torch's default (30% from lr / 25) takes 6-17
# (benchmarks/convergence.py, docs/benchmarks.md).
ONECYCLE_WARMUP = 0.05
ONECYCLE_DIV = 5.0


def warmup_share(total_steps: int) -> float:
    """ONECYCLE_WARMUP, but at least 1.5 steps (torch divides by zero when the warm-up rounds to
    exactly one step) and at most 45% for very short runs."""
    return min(0.45, max(ONECYCLE_WARMUP, 1.5 / total_steps))


class LRSchedule:
    """A torch scheduler plus the granularity it is stepped at: per optimizer step for one-cycle,
    per epoch for cosine and step, per epoch on the validation metric for plateau."""

    def __init__(self, name: str, optimizer, lr: float, epochs: int, steps: int, patience: int,
                 higher_is_better: bool):
        S = torch.optim.lr_scheduler
        self.name = name
        self.per_batch = name == "onecycle"
        self.scheduler = {
            "onecycle": lambda: S.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps,
                                             pct_start=warmup_share(epochs * steps),
                                             div_factor=ONECYCLE_DIV),
            "cosine": lambda: S.CosineAnnealingLR(optimizer, T_max=epochs),
            "step": lambda: S.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1),
            "plateau": lambda: S.ReduceLROnPlateau(optimizer, mode="max" if higher_is_better else "min",
                                                   factor=0.5, patience=max(1, patience // 3)),
            "none": lambda: None,
        }[name]()

    def after_batch(self):
        if self.per_batch:
            self.scheduler.step()

    def after_epoch(self, val_metric: float):
        if self.name == "plateau":
            self.scheduler.step(val_metric)
        elif self.scheduler is not None and not self.per_batch:
            self.scheduler.step()

    @property
    def steps_taken(self) -> int:
        return 0 if self.scheduler is None else self.scheduler.last_epoch

    def state_dict(self):
        return {} if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state):
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def loss_fn(task: str):
    return F.cross_entropy if task == "classification" else lambda out, y: F.mse_loss(out.squeeze(-1), y)


def train_one_epoch(model: nn.Module, batches, task: str, optimizer,
                    schedule: LRSchedule) -> tuple[float, int]:
    """One pass over (inputs, targets) batches; returns the summed training loss and the rows."""
    model.train()
    compute_loss = loss_fn(task)
    device = next(model.parameters()).device
    total, rows = torch.zeros((), device=device), 0
    # bf16 autocast on CUDA: no gradient scaler needed, unlike fp16.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for xb, yb in batches:
            loss = compute_loss(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.after_batch()
            total += loss.detach() * len(xb)  # stays on the device: no sync per batch
            rows += len(xb)
    return float(total), rows


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Eval-mode outputs (logits or standardized regression values) in float32."""
    model.eval()
    return torch.cat([model(X[i:i + batch_size]).float() for i in range(0, len(X), batch_size)])


def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, task: str,
             y_mean: float = 0.0, y_scale: float = 1.0) -> dict[str, float]:
    """Loss and metrics; regression metrics are in the target's original units."""
    out = predict(model, X)
    loss = float(loss_fn(task)(out, y))
    if task == "classification":
        return {"loss": loss, "accuracy": float((out.argmax(-1) == y).float().mean())}
    pred, true = out.squeeze(-1) * y_scale + y_mean, y * y_scale + y_mean
    err = pred - true
    ss_tot = float(((true - true.mean()) ** 2).sum())
    return {"loss": loss, "rmse": float(err.pow(2).mean().sqrt()), "mae": float(err.abs().mean()),
            "r2": 1 - float(err.pow(2).sum()) / ss_tot if ss_tot > 0 else 0.0}


def monitor(task: str) -> tuple[str, bool]:
    """The validation metric early stopping watches, and whether higher is better."""
    return ("accuracy", True) if task == "classification" else ("rmse", False)


def is_better(metrics: dict, best: dict | None, task: str) -> bool:
    """Better on the monitored metric; on a tie (accuracy is coarse), lower validation loss wins."""
    if best is None:
        return True
    name, higher = monitor(task)
    a, b = metrics[name], best[name]
    if a != b:
        return a > b if higher else a < b
    return metrics["loss"] < best["loss"]


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file and renamed, so a crash mid-write keeps the previous one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def to_device(arrays, device, dtypes) -> list[torch.Tensor]:
    return [torch.as_tensor(np.ascontiguousarray(a), dtype=d).to(device) for a, d in zip(arrays, dtypes)]
