"""`--lr auto`: a learning-rate range test before training.

The rate grows exponentially from START to END over STEPS optimizer steps on training batches;
the loss is smoothed with a debiased moving average, and the sweep stops once it passes
DIVERGE x the best smoothed loss. The network's weights (BatchNorm statistics included) are
restored afterwards and the sweep's own optimizer is thrown away, so training starts from the
same point it would have without it. The suggestion is the "valley" rule (fastai): the middle of
the longest stretch over which the smoothed loss keeps falling, a little past its start.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

START, END, STEPS = 1e-7, 10.0, 100
BETA = 0.98      # smoothing of the loss
DIVERGE = 4.0    # stop when the smoothed loss exceeds this multiple of the best one


@dataclass
class Sweep:
    lrs: list[float]
    losses: list[float]       # smoothed, debiased
    suggestion: float
    rule: str
    stopped_early: bool       # the loss diverged before END

    def to_dict(self) -> dict:
        return {"suggestion": self.suggestion, "rule": self.rule, "steps": len(self.lrs),
                "stopped_at_divergence": self.stopped_early, "lrs": self.lrs, "losses": self.losses}


def sweep(net: torch.nn.Module, batches, compute_loss, make_optimizer, steps: int = STEPS,
          rule: str = "valley") -> Sweep:
    """Run the range test on `batches` (an iterable of (inputs, targets), cycled as needed) and
    return the rates, the smoothed losses and the suggested rate. `make_optimizer(params, lr)`
    builds the optimizer the run will use."""
    saved = copy.deepcopy(net.state_dict())
    optimizer = make_optimizer(net.parameters(), START)
    factor = (END / START) ** (1 / max(steps - 1, 1))
    lrs, losses, average, best, diverged = [], [], 0.0, math.inf, False
    net.train()
    try:
        for i, (xb, yb) in enumerate(itertools.islice(itertools.cycle(batches), steps)):
            lr = START * factor ** i
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = compute_loss(net(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss)
            average = BETA * average + (1 - BETA) * value
            smoothed = average / (1 - BETA ** (i + 1))
            if not math.isfinite(smoothed) or (i > 0 and smoothed > DIVERGE * best):
                diverged = True
                break
            best = min(best, smoothed)
            lrs.append(lr)
            losses.append(smoothed)
    finally:
        net.load_state_dict(saved)
    return Sweep(lrs, losses, suggest(lrs, losses, rule), rule, diverged)


def suggest(lrs: list[float], losses: list[float], rule: str = "valley") -> float:
    """The suggested rate: "valley" (fastai), or "steepest" (Lightning: the most negative slope
    of the smoothed loss against log lr)."""
    if len(lrs) < 3:
        return lrs[-1] if lrs else START
    if rule == "steepest":
        return lrs[int(np.argmin(np.gradient(np.asarray(losses), np.log(lrs))))]
    # Valley: the longest decreasing subsequence of the loss, then a point 1/2 of a third into it.
    n = len(losses)
    runs = [1] * n
    end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and runs[i] < runs[j] + 1:
                runs[i] = runs[j] + 1
        if runs[i] > runs[end]:
            end = i
    start = end - runs[end]
    third = (end - start) / 3
    return lrs[max(0, min(n - 1, start + int(third) + int(third / 2)))]


def plot(result: dict, path: Path) -> None:
    """The sweep (Sweep.to_dict()): smoothed loss against the rate, the suggestion marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(result["lrs"], result["losses"])
    ax.axvline(result["suggestion"], color="tab:red", linestyle="--",
               label=f"{result['rule']}: {result['suggestion']:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)",
           title="learning-rate range test")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
