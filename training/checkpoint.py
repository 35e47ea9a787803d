"""The training loop's state, saved after every epoch and restored by --resume, in one place.

A checkpoint holds only tensors and plain values, so it loads with `weights_only=True`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from training.config import RUN_DEFINING, TEST_SIZE, ConfigError


@dataclass
class Progress:
    """How far training got, and the best epoch so far."""
    epoch: int = 0                          # epochs done
    history: list[dict] = field(default_factory=list)
    best: dict | None = None                # the best epoch's validation metrics
    best_epoch: int = 0
    best_state: dict | None = None          # and its weights, on the CPU
    elapsed: float = 0.0                    # training seconds so far
    lr: float | None = None                 # the peak learning rate (--lr, or what --lr auto chose)
    lr_sweep: dict | None = None            # --lr auto: the range test (lr_finder.Sweep.to_dict)


@dataclass
class Checkpoint:
    config: dict          # the run's config: a checkpoint resumes only the run that made it
    world_size: int
    version: str          # the model version the run will write
    progress: Progress
    model: dict           # state dicts of the network, optimizer and schedule
    optimizer: dict
    scheduler: dict
    generator: torch.Tensor  # the batch order's and torch's random states
    torch_rng: torch.Tensor

    @classmethod
    def capture(cls, cfg, world_size: int, version: str, progress: Progress, net, optimizer,
                schedule, generator: torch.Generator) -> Checkpoint:
        return cls(config=cfg.to_dict(), world_size=world_size, version=version, progress=progress,
                   model=net.state_dict(), optimizer=optimizer.state_dict(),
                   scheduler=schedule.state_dict(), generator=generator.get_state(),
                   torch_rng=torch.get_rng_state())

    def restore(self, net, optimizer, schedule, generator: torch.Generator) -> Progress:
        net.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        schedule.load_state_dict(self.scheduler)
        generator.set_state(self.generator)
        torch.set_rng_state(self.torch_rng)
        return self.progress

    def save(self, path: Path) -> None:
        """Written to a temporary file and renamed, so a crash mid-write keeps the previous one."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["progress"] = vars(self.progress)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**{**state, "progress": Progress(**state["progress"])})


def checkpoint_path(cfg) -> Path:
    return Path(cfg.models_dir) / cfg.model_name / "checkpoint.pt"


def resume(cfg, world_size: int) -> Checkpoint:
    """The checkpoint of this run, or a ConfigError saying why it cannot be resumed."""
    path = checkpoint_path(cfg)
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint at {path}; start the run without --resume")
    try:
        state = Checkpoint.load(path)
    except Exception as e:
        raise ConfigError(f"--resume: cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None
    # A checkpoint written before an option existed was made with that option's default.
    defaults = {f.name: f.default for f in fields(cfg)}
    saved, now = {**defaults, **state.config}, cfg.to_dict()
    for config in (saved, now):  # a checkpointed run is one network: auto is TEST_SIZE there
        config["test_size"] = TEST_SIZE if config["test_size"] == "auto" else config["test_size"]
    if changed := [k for k in RUN_DEFINING if saved.get(k) != now.get(k)]:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in changed)
        raise ConfigError(f"--resume: checkpoint {path} was made with a different config: {diffs}")
    if state.world_size != world_size:
        raise ConfigError(f"--resume: checkpoint {path} was made by {state.world_size} "
                          f"process(es), this run has {world_size}")
    return state
