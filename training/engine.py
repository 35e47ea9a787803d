"""The training loop: batch sources, one epoch, evaluation, and `train`, which runs epochs with
early stopping and a checkpoint after each, and returns the best epoch's network.

In memory the data sit on the device as whole tensors, and each epoch takes batches as slices of
one permutation (training/batches.py); streamed runs read them from the file (training/stream.py).
"""
from __future__ import annotations

import datetime as dt
import math
import secrets
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from training import lr_finder, stream
from training.batches import shuffled_batches, steps_per_epoch
from training.checkpoint import Checkpoint, Progress, checkpoint_path, resume
from training.config import ConfigError
from training.dataset import Data
from training.distributed import World
from training.model import build_network
from training.rules import DataError
from training.schedules import LRSchedule


def memory_batches(X: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
    """One process, data in memory: a new random order every epoch."""
    steps = steps_per_epoch(len(X), batch_size)
    return steps, lambda epoch: shuffled_batches(X, y, batch_size, generator)


def sharded_batches(X: torch.Tensor, y: torch.Tensor, batch_size: int, world: World, seed: int):
    """Under torchrun, data in memory: this rank's shard, reshuffled every epoch
    (DistributedSampler pads the shards to one length)."""
    steps = steps_per_epoch(math.ceil(len(X) / world.size), batch_size)
    return steps, lambda epoch: shuffled_batches(X, y, batch_size,
                                                 order=world.sampler_order(len(X), seed, epoch))


def streamed_batches(cfg, data: Data, world: World, batch_size: int, device: torch.device):
    """--stream: this rank's rows read from the file every epoch; every rank takes as many steps
    as the smallest shard allows."""
    steps = min(steps_per_epoch(n, batch_size) for n in data.scan.rows_per_rank)
    return steps, lambda epoch: stream.train_batches(cfg, data.scan, world.rank, world.size, epoch,
                                                     batch_size, steps, device, data.y_mean,
                                                     data.y_scale)


def make_optimizer(params, name: str, lr: float, weight_decay: float, momentum: float = 0.0):
    """AdamW uses the fused kernel: one call per step instead of a loop over parameters."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def loss_fn(task: str, label_smoothing: float = 0.0, reduction: str = "mean"):
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing,
                                              reduction=reduction)
    return lambda out, y: F.mse_loss(out.squeeze(-1), y, reduction=reduction)


def train_one_epoch(model: nn.Module, batches, task: str, optimizer, schedule: LRSchedule,
                    label_smoothing: float = 0.0) -> tuple[float, int]:
    """One pass over (inputs, targets) batches; returns the summed training loss and the rows."""
    model.train()
    compute_loss = loss_fn(task, label_smoothing)
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
    return metrics_of(predict(model, X), y, task, y_mean, y_scale)


def metrics_of(out: torch.Tensor, y: torch.Tensor, task: str, y_mean: float = 0.0,
               y_scale: float = 1.0) -> dict[str, float]:
    """Loss and metrics of outputs `out` (logits, or standardized predictions) for targets `y`."""
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


def is_better(metrics: dict, best: dict | None, task: str, stop_on: str = "metric") -> bool:
    """Better on the monitored metric (or, stop_on="loss", on the validation loss); on a tie
    (accuracy is coarse), lower validation loss wins."""
    if best is None:
        return True
    name, higher = monitor(task) if stop_on == "metric" else ("loss", False)
    a, b = metrics[name], best[name]
    if a != b:
        return a > b if higher else a < b
    return metrics["loss"] < best["loss"]


def to_device(arrays, device, dtypes) -> list[torch.Tensor]:
    return [torch.as_tensor(np.ascontiguousarray(a), dtype=d).to(device) for a, d in zip(arrays, dtypes)]


def new_version() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


@dataclass
class Trained:
    """The best epoch's network (eval mode, on the CPU) and how it was trained."""
    net: nn.Module
    version: str
    progress: Progress        # history, best epoch, training seconds
    stopped_early: bool
    device: str
    resumed: bool
    distributed: dict | None  # under torchrun: world size, backend, batch per rank
    members: list[dict] | None = None  # --ensemble / --refit: each member's seed and epochs
    refit: bool = False       # trained again on train + validation (training/ensemble.py)
    cross_validation: dict | None = None  # --folds: the bag's held-out metrics (training/ensemble.py)


def train(cfg, data: Data, world: World, checkpoints: bool = True,
          epochs: int | None = None) -> Trained | None:
    """Train with early stopping (a checkpoint after every epoch, unless `checkpoints` is False)
    and restore the best epoch's weights; or, given `epochs`, train exactly that many epochs of
    the cfg.epochs schedule and keep the last weights (a refit). Under torchrun every rank trains
    its shard; rank 0 gets the result, the other ranks None."""
    if cfg.batch_size < 2 * world.size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch: it needs at least 2 "
                          f"rows for each of the {world.size} ranks (BatchNorm)")
    batch_size = cfg.batch_size // world.size  # per rank; the global batch is the same as one process's
    state = resume(cfg, world.size) if cfg.resume else None
    version = state.version if state else world.share(new_version)
    task, device = data.table.task, world.device
    n_out = len(data.table.classes) if task == "classification" else 1

    def make_net() -> nn.Module:
        return build_network(cfg, data.table.modality, data.width, n_out, data.normalizer.module(),
                             data.normalizer.embedding_module())

    torch.manual_seed(cfg.seed)
    net = make_net().to(device)
    X_val, y_val = tensors(data, "validation", device)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.stream:
        steps, batches = streamed_batches(cfg, data, world, batch_size, device)
    elif world.size > 1:
        steps, batches = sharded_batches(*tensors(data, "train", device), batch_size, world, cfg.seed)
    else:
        steps, batches = memory_batches(*tensors(data, "train", device), batch_size, generator)
    if steps == 0:
        raise DataError("too few training rows for one batch on every rank")

    progress = state.progress if state else Progress(lr=cfg.lr)
    if progress.lr == "auto":  # rank 0 sweeps, on the plain network; every rank trains at its rate
        progress.lr_sweep = world.share(lambda: range_test(cfg, net, batches, task, generator))
        progress.lr = progress.lr_sweep["suggestion"]
    model = world.wrap(net)  # DistributedDataParallel under torchrun; the network itself otherwise
    if world.size > 1:
        torch.manual_seed(cfg.seed + world.rank)  # each rank its own dropout and augmentation
    optimizer = make_optimizer(model.parameters(), cfg.optimizer, progress.lr, cfg.weight_decay,
                               cfg.momentum)
    metric, higher = monitor(task)
    schedule = LRSchedule(cfg.scheduler, optimizer, progress.lr, cfg.epochs, steps, cfg.patience, higher)
    if state:
        state.restore(net, optimizer, schedule, generator)
    path = checkpoint_path(cfg) if checkpoints and world.main else None  # rank 0 writes
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    started, elapsed_before = time.perf_counter(), progress.elapsed
    bar = tqdm(range(progress.epoch, epochs or cfg.epochs), desc=f"train {cfg.model_name}",
               unit="epoch", initial=progress.epoch, total=epochs or cfg.epochs,
               disable=not (cfg.progress and world.main), file=sys.stderr)
    stopped_early = False
    for epoch in bar:
        lr = optimizer.param_groups[0]["lr"]
        train_loss = world.mean(*train_one_epoch(model, batches(epoch), task, optimizer, schedule,
                                                 cfg.label_smoothing))
        # Rank 0 evaluates and every rank follows its verdict, so all stop at the same epoch.
        val = world.share(lambda: evaluate(net, X_val, y_val, task, data.y_mean, data.y_scale))
        schedule.after_epoch(val[metric])
        out_of_patience = record_epoch(
            progress, cfg, task, train_loss, val, lr, elapsed_before + time.perf_counter() - started,
            lambda: {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
            keep=epoch + 1 == epochs)
        bar.set_postfix(loss=f"{train_loss:.4f}", **{f"val_{metric}": f"{val[metric]:.4f}"},
                        lr=f"{lr:.2e}")
        stopped_early = out_of_patience and not epochs
        if path:
            Checkpoint.capture(cfg, world.size, version, progress, net, optimizer, schedule,
                               generator).save(path)
        if stopped_early:
            break
    bar.close()
    if not world.main:
        return None
    best = make_net()  # a plain network (BatchNorm, not SyncBatchNorm; no DDP wrapper)
    best.load_state_dict(progress.best_state)
    return Trained(net=best.eval(), version=version, progress=progress, stopped_early=stopped_early,
                   device=str(device), resumed=state is not None,
                   distributed=world.describe(batch_size))


def record_epoch(progress: Progress, cfg, task: str, train_loss: float, val: dict, lr: float,
                 elapsed: float, state, keep: bool = False) -> bool:
    """One more epoch in `progress`: its history row, and its weights (`state()`) kept if it is the
    best so far, or if `keep`. Returns whether the patience has run out."""
    metric, epoch = monitor(task)[0], progress.epoch + 1
    progress.epoch, progress.elapsed = epoch, elapsed
    progress.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
                             f"val_{metric}": val[metric], "lr": lr, "seconds": round(elapsed, 4)})
    if is_better(val, progress.best, task, cfg.stop_on) or keep:
        progress.best, progress.best_epoch, progress.best_state = val, epoch, state()
    return bool(cfg.patience and epoch - progress.best_epoch >= cfg.patience)


def range_test(cfg, net: nn.Module, batches, task: str, generator: torch.Generator) -> dict:
    """--lr auto: the learning-rate range test on the first epoch's batches. The batch order and
    torch's random state are put back afterwards, so training goes on as it would have."""
    rng, order = torch.get_rng_state(), generator.get_state()
    result = lr_finder.sweep(
        net, batches(0), loss_fn(task, cfg.label_smoothing),
        lambda params, lr: make_optimizer(params, cfg.optimizer, lr, cfg.weight_decay, cfg.momentum))
    torch.set_rng_state(rng)
    generator.set_state(order)
    return result.to_dict()


def tensors(data: Data, split: str, device) -> list[torch.Tensor]:
    """A split's inputs and targets on the device, as the network takes them."""
    X_dtype = torch.uint8 if data.table.modality == "image" else torch.float32
    y_dtype = torch.int64 if data.table.task == "classification" else torch.float32
    return to_device([data.inputs(split), data.targets(split)], device, [X_dtype, y_dtype])


def evaluate_splits(net: nn.Module, data: Data) -> dict[str, dict[str, float]]:
    """Loss and metrics of the network on each split that has rows (--folds: no test split)."""
    return {split: evaluate(net, *tensors(data, split, "cpu"), data.table.task, data.y_mean,
                            data.y_scale)
            for split in ("train", "validation", "test") if len(data.targets(split))}
