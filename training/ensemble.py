"""--ensemble k and --refit: the engine's training loop run several times, one exported network.

`--ensemble k` trains k networks from seeds seed .. seed + k - 1 (each with early stopping on the
validation split) and averages their outputs (logits, or standardized predictions) inside one
module, so the exported graph is one graph. `--refit` then trains each member again from scratch
on the training and validation rows together, for as many epochs as its best one, on the same
schedule; its validation metrics are then no longer held out (the card says so).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from torch import nn

from training import engine
from training.dataset import Data
from training.distributed import World


class Ensemble(nn.Module):
    """The mean of its members' outputs."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def merged(data: Data) -> Data:
    """The data with the validation rows added to the training rows (for a refit)."""
    s = data.split
    if isinstance(s.X_train, pd.DataFrame):
        X = pd.concat([s.X_train, s.X_val]).reset_index(drop=True)
    else:
        X = np.concatenate([s.X_train, s.X_val])
    split = dataclasses.replace(s, X_train=X, y_train=np.concatenate([s.y_train, s.y_val]))
    return dataclasses.replace(data, split=split)


def train(cfg, data: Data, world: World, checkpoints: bool = True) -> engine.Trained | None:
    if cfg.ensemble == 1 and not cfg.refit:
        return engine.train(cfg, data, world, checkpoints)
    members, lr, seconds = [], cfg.lr, 0.0
    for k in range(cfg.ensemble):
        # Members after the first reuse the rate the first one's range test found (--lr auto).
        member_cfg = dataclasses.replace(cfg, seed=cfg.seed + k, lr=lr)
        trained = engine.train(member_cfg, data, world, checkpoints=checkpoints and cfg.ensemble == 1)
        lr = world.share(lambda: trained.progress.lr)  # every rank: the rate the first one used
        if trained is not None:
            seconds += trained.progress.elapsed
        if cfg.refit:
            best = world.share(lambda: trained.progress.best_epoch)
            refit_cfg = dataclasses.replace(member_cfg, lr=lr)
            refitted = engine.train(refit_cfg, merged(data), world, checkpoints=False, epochs=best)
            if trained is not None:
                trained.net, seconds = refitted.net, seconds + refitted.progress.elapsed
        members.append(trained)
    if not world.main:
        return None
    first = members[0]
    first.progress.elapsed = seconds  # the card's training seconds: every member and refit
    net = first.net if len(members) == 1 else Ensemble([m.net for m in members]).eval()
    return dataclasses.replace(first, net=net, members=[
        {"seed": cfg.seed + k, "best_epoch": m.progress.best_epoch, "epochs_run": len(m.progress.history)}
        for k, m in enumerate(members)], refit=cfg.refit)
