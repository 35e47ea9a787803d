"""Training in several processes under torchrun, with PyTorch's DistributedDataParallel.

torchrun starts one process per rank and sets RANK, WORLD_SIZE and LOCAL_RANK; without it there is
one rank and everything here is a no-op. Rank 0 computes what must be computed once (the
normalization statistics) and hands it to the others; only rank 0 writes checkpoints and exports.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
from torch import distributed as dist
from torch import nn

from training.config import ConfigError
from training.rules import DataError


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if choice == "cuda" \
        else torch.device("cpu")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" on CUDA, "gloo" on CPU; None for a single process

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def launched(cls) -> World:
        """This process's rank and the number of ranks, as torchrun set them (no process group
        joined, no device picked): one process alone is rank 0 of 1."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @classmethod
    def start(cls, device_choice: str) -> World:
        """This process's rank; joins the process group when torchrun started several."""
        size, local = cls.launched().size, int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_choice, local)
        if size == 1:
            return cls(device=device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():  # a long streaming pass on rank 0 keeps the others waiting
            dist.init_process_group(backend, timeout=dt.timedelta(hours=4))
        return cls(dist.get_rank(), size, device, backend)

    def share(self, compute, public=lambda value: value):
        """compute() on rank 0 only; every other rank gets public(result), or rank 0's error."""
        if self.size == 1:
            return compute()
        box: list = [None]
        if self.main:
            error = None
            try:
                value = compute()
                box[0] = ("ok", public(value))
            except BaseException as e:
                error = e
                box[0] = ("error", e if isinstance(e, (DataError, ConfigError))
                          else RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}"))
            dist.broadcast_object_list(box, src=0)
            if error is not None:
                raise error
            return value
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def wrap(self, net: nn.Module) -> nn.Module:
        """DistributedDataParallel over the network. On CUDA its BatchNorm layers become
        SyncBatchNorm (statistics over the global batch); on CPU with gloo, where SyncBatchNorm does
        not run, each rank normalizes by its own share of the batch and DDP hands rank 0's running
        statistics to every rank at each step."""
        if self.size == 1:
            return net
        if self.device.type == "cuda":
            return nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(net),
                                                       device_ids=[self.device.index])
        return nn.parallel.DistributedDataParallel(net)

    def mean(self, total: float, count: int) -> float:
        """The mean over all ranks of a quantity each rank summed over its own rows."""
        if self.size == 1:
            return total / count
        t = torch.tensor([total, count], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0] / t[1])

    def sampler_order(self, n: int, seed: int, epoch: int) -> torch.Tensor:
        """This rank's rows for one epoch: torch's DistributedSampler, re-shuffled every epoch, its
        shards disjoint (padded by repeating a few rows so every rank takes the same steps)."""
        sampler = torch.utils.data.DistributedSampler(range(n), self.size, self.rank, shuffle=True,
                                                      seed=seed)
        sampler.set_epoch(epoch)
        return torch.as_tensor(list(sampler))

    def describe(self, batch_size: int) -> dict | None:
        if self.size == 1:
            return None
        return {"world_size": self.size, "backend": self.backend, "batch_per_rank": batch_size,
                "sync_batchnorm": self.device.type == "cuda"}

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.barrier()  # gloo aborts a process that leaves while a peer still talks to it
            dist.destroy_process_group()
