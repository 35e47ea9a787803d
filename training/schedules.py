"""Learning-rate schedules, each stepped at its own granularity: per optimizer step for one-cycle,
per epoch for cosine and step, per epoch on the validation metric for plateau.
"""
from __future__ import annotations

import torch

# One-cycle shape: a short warm-up (the first 5% of steps) from lr / 5, then a long cosine
# anneal. With BatchNorm the network tolerates a high rate early, and a short warm-up reaches the
# validation targets in 2-4 epochs where torch's default (30% from lr / 25) takes 6-17
# (benchmarks/convergence.py, docs/benchmarks.md).
SCHEDULERS = ("onecycle", "cosine", "step", "plateau", "none")
ONECYCLE_WARMUP = 0.05
ONECYCLE_DIV = 5.0


def warmup_share(total_steps: int) -> float:
    """ONECYCLE_WARMUP, but at least 1.5 steps (torch divides by zero when the warm-up rounds to
    exactly one step) and at most 45% for very short runs."""
    return min(0.45, max(ONECYCLE_WARMUP, 1.5 / total_steps))


class LRSchedule:
    """A torch scheduler plus the granularity it is stepped at."""

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
