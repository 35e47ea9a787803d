"""k tabular networks of one shape trained at once (--folds): each layer's weights stacked along a
leading member axis, so one optimizer step runs every member's batch through batched matmuls.

A small network's step costs mostly Python and kernel launches, not arithmetic, so the five fold
networks train in about the time one took (docs/quality.md). Each member keeps what a run of its
own has: its initial weights (seed + i), its rows in its own order (its own generator), its own
BatchNorm statistics, early stopping on its own fold and its best epoch's weights (and, beside a
partner model, its best epoch as half of the blend: see train). AdamW's update
is elementwise, so one optimizer over the stacked weights steps each member as its own optimizer
would, and the summed loss gives each member its own gradient. What they share: the learning
rate schedule (--scheduler plateau follows the running members' mean validation metric) and the number
of steps per epoch (a member with fewer rows than the largest repeats a few random rows of its
own to fill the epoch). After training the members are taken apart into ordinary networks
(training/model.py): those are what is exported.

Bags of networks that differ only in their inputs (--embedding auto: one bag on the normalized
features, one on their encoding) train in the same steps too: each bag has its own first layer on
its own inputs, the layers after it are stacked over every member of every bag, and member i of
each bag sees fold i's rows in the same order. So the second bag costs little more than its
arithmetic (docs/quality.md). They then also share the rate (--lr auto: the first bag's first
member's range test) and, with --scheduler plateau, the mean metric the schedule follows.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from training import engine
from training.batches import batch_bounds, steps_per_epoch
from training.checkpoint import Progress
from training.dataset import Data
from training.model import TabularNet, build_network
from training.schedules import LRSchedule


class StackedLinear(nn.Module):
    """k Linear layers: [k, rows, in] -> [k, rows, out]."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach().t() for m in layers]))
        has_bias = layers[0].bias is not None
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers])[:, None]) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weight) if self.bias is None else torch.baddbmm(self.bias, x, self.weight)

    def member(self, i: int) -> dict[str, torch.Tensor]:
        state = {"weight": self.weight[i].t()}
        return state if self.bias is None else {**state, "bias": self.bias[i, 0]}


class StackedBatchNorm(nn.Module):
    """k BatchNorm1d layers: each member's channels normalized over that member's rows."""

    def __init__(self, layers: list[nn.BatchNorm1d]):
        super().__init__()
        self.eps, self.momentum = layers[0].eps, layers[0].momentum
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]))
        self.register_buffer("running_mean", torch.stack([m.running_mean for m in layers]))
        self.register_buffer("running_var", torch.stack([m.running_var for m in layers]))
        self.register_buffer("num_batches_tracked", layers[0].num_batches_tracked.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, rows, width = x.shape
        if self.training:
            self.num_batches_tracked += 1
        # [rows, k * width]: one BatchNorm over all members' channels; the running statistics
        # are updated in place through the flat views.
        flat = x.transpose(0, 1).reshape(rows, k * width)
        out = F.batch_norm(flat, self.running_mean.view(-1), self.running_var.view(-1),
                           self.weight.view(-1), self.bias.view(-1), self.training, self.momentum,
                           self.eps)
        return out.reshape(rows, k, width).transpose(0, 1)

    def member(self, i: int) -> dict[str, torch.Tensor]:
        return {"weight": self.weight[i], "bias": self.bias[i], "running_mean": self.running_mean[i],
                "running_var": self.running_var[i], "num_batches_tracked": self.num_batches_tracked}


def _stacked(layers: list[nn.Module]) -> nn.Module:
    first = layers[0]
    if isinstance(first, nn.Linear):
        return StackedLinear(layers)
    if isinstance(first, nn.BatchNorm1d):
        return StackedBatchNorm(layers)
    return first  # ReLU, Dropout: elementwise, the same for every member


class StackedNet(nn.Module):
    """Bags of k TabularNets (after their normalizer) as one module: a list of [k, rows, width]
    inputs (one per bag, as its first layer takes them) -> [bags x k, rows, outputs]. Each bag's
    first layer (and linear skip) is its own; the layers after it are stacked over every member."""

    def __init__(self, bags: list[list[TabularNet]]):
        super().__init__()
        self.k = len(bags[0])
        self.first = nn.ModuleList(StackedLinear([n.body[0] for n in nets]) for nets in bags)
        nets = [n for bag in bags for n in bag]
        self.body = nn.Sequential(*[_stacked(list(layers)) for layers in zip(*(n.body[1:] for n in nets))])
        self.skip = nn.ModuleList(StackedLinear([n.skip for n in bag]) for bag in bags) \
            if nets[0].skip is not None else None

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        out = self.body(_joined([first(x) for first, x in zip(self.first, xs)]))
        return out if self.skip is None else out + _joined([s(x) for s, x in zip(self.skip, xs)])

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's weights (bag i // k, fold i % k) under TabularNet's state-dict names, copied
        to the CPU."""
        bag, fold = divmod(i, self.k)
        parts = [("body.0.", self.first[bag], fold)]
        parts += [(f"body.{j + 1}.", layer, i) for j, layer in enumerate(self.body) if hasattr(layer, "member")]
        parts += [("skip.", self.skip[bag], fold)] if self.skip is not None else []
        return {prefix + name: value.detach().cpu().clone()
                for prefix, layer, index in parts for name, value in layer.member(index).items()}


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Bags' outputs along the member axis (one bag's as they are: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def applies(data: Data, world) -> bool:
    """Tables in one process (images train one network at a time: a convolution's step is
    arithmetic, which stacking does not save; under torchrun each network is its own DDP run)."""
    return data.table.modality != "image" and world.size == 1


@dataclasses.dataclass
class Bag:
    """One bag's members (fold i's network at i) and, beside a partner, their best epochs in the
    blend: {"members": [the blend's metrics on each fold], "epochs": [...], "states": [each
    member's weights then]}."""
    members: list[engine.Trained]
    blend: dict | None = None


def _padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[k, longest, ...]: each member's rows, zeros after its last."""
    out = tensors[0].new_zeros((len(tensors), max(len(t) for t in tensors), *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, :len(t)] = t
    return out


def train(cfg, folds: list[Data], world, partner: list[torch.Tensor] | None = None,
          embeddings: tuple[str, ...] | None = None) -> tuple[list[Bag], float]:
    """Train one network per fold (member i: seed cfg.seed + i, trained on fold i's training rows,
    stopped early on its validation rows), one bag of them per embedding in `embeddings` (default:
    the one cfg fits); returns each bag, its members as engine.train would return them, and the
    training seconds of them all. Given a `partner` (per fold, another model's outputs on that
    fold's validation rows: the linear bag's), a bag also has each member's best epoch as half of a
    blend with its partner, found the same way as its own (Bag.blend). A member stops when its
    patience has run out both alone and blended; the run, when every member of every bag has."""
    embeddings = embeddings or (cfg.fitted_embedding(),)
    k, data, device = len(folds), folds[0], world.device
    task = data.table.task
    n_out = len(data.table.classes) if task == "classification" else 1
    bags = []
    for embedding in embeddings:
        bag_cfg = dataclasses.replace(cfg, embedding=embedding)
        bags.append([])
        for i in range(k):
            torch.manual_seed(cfg.seed + i)  # as engine.train seeds a member's own run
            bags[-1].append(build_network(bag_cfg, "table", data.width, n_out, data.normalizer.module(),
                                          data.normalizer.embedding_module()))
    nets = [n for bag in bags for n in bag]  # member m: bag m // k, fold m % k
    generators = [torch.Generator().manual_seed(cfg.seed + i) for i in range(k)]
    train_rows = [engine.tensors(f, "train", device) for f in folds]
    val_rows = [engine.tensors(f, "validation", device) for f in folds]
    lr, sweep = cfg.lr, None
    if lr == "auto":  # the first member's range test, on its own batches, sets every member's rate
        probe = copy.deepcopy(nets[0]).to(device)  # the members stay together until stacked
        sweep = engine.range_test(cfg, probe, engine.memory_batches(
            *train_rows[0], cfg.batch_size, generators[0])[1], task, generators[0])
        lr = sweep["suggestion"]

    X_train, X_val = [], []
    for bag in bags:  # statistics only (buffers): normalized, and with an embedding encoded, once, here
        prepare = nn.Sequential(bag[0].normalize, bag[0].embed or nn.Identity()).to(device)
        with torch.no_grad():
            X_train.append(_padded([prepare(X) for X, _ in train_rows]))
            X_val.append(_padded([prepare(X) for X, _ in val_rows]))
    y_train = _padded([y for _, y in train_rows])
    sizes = [len(y) for _, y in train_rows]
    steps = steps_per_epoch(max(sizes), cfg.batch_size)

    def batches():
        """One epoch: each fold's rows in its own random order (the same for every bag's member on
        that fold), a few repeated where it has fewer rows than the largest fold."""
        orders = []
        for n, g in zip(sizes, generators):
            order = torch.randperm(n, generator=g)  # as engine.train's batches draw it
            if n < max(sizes):
                order = torch.cat([order, torch.randperm(n, generator=g)[:max(sizes) - n]])
            orders.append(order)
        rows = torch.stack(orders).to(device)
        member = torch.arange(k, device=device)[:, None]
        for a, b in batch_bounds(max(sizes), cfg.batch_size):  # gathered batch by batch
            yield [X[member, rows[:, a:b]] for X in X_train], y_train[member, rows[:, a:b]].repeat(len(bags), 1)

    model = StackedNet(bags).to(device)
    optimizer = engine.make_optimizer(model.parameters(), cfg.optimizer, lr, cfg.weight_decay,
                                      cfg.momentum)
    metric, higher = engine.monitor(task)
    schedule = LRSchedule(cfg.scheduler, optimizer, lr, cfg.epochs, steps, cfg.patience, higher)
    # the sweep on each bag's first member's record (the rate is the first plain network's)
    progress = [Progress(lr=lr, lr_sweep=sweep if m % k == 0 else None) for m in range(len(nets))]
    blends = [Progress() for _ in nets] if partner is not None else None
    running = list(range(len(nets)))  # members whose patience has not run out (alone and blended)
    version = world.share(engine.new_version)
    started = time.perf_counter()
    kind = " and ".join(f"{k} {'' if e == 'none' else e + ' '}{'networks' if cfg.hidden else 'linear models'}"
                        for e in embeddings)
    bar = tqdm(range(cfg.epochs), desc=f"train {cfg.model_name} ({kind}, one per fold)",
               unit="epoch", disable=not cfg.progress, file=sys.stderr)
    for epoch in bar:
        lr_now = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(model, batches(), task, optimizer, schedule, cfg.label_smoothing)
        out = predict(model, X_val)
        vals = [engine.metrics_of(out[m, :len(val_rows[m % k][1])], val_rows[m % k][1], task,
                                  data.y_mean, data.y_scale) for m in range(len(nets))]
        schedule.after_epoch(sum(vals[m][metric] for m in running) / len(running))
        elapsed = time.perf_counter() - started
        for m in list(running):
            state = functools.cache(lambda: model.member_state(m))  # once, if both records keep it
            done = engine.record_epoch(progress[m], cfg, task, float(train_loss[m]), vals[m], lr_now,
                                       elapsed, state)
            if blends is not None:
                y = val_rows[m % k][1]
                mixed = engine.metrics_of((out[m, :len(y)] + partner[m % k]) / 2, y, task, data.y_mean,
                                          data.y_scale)
                done &= engine.record_epoch(blends[m], cfg, task, float(train_loss[m]), mixed, lr_now,
                                            elapsed, state)
            if done:
                running.remove(m)
        bar.set_postfix(loss=f"{float(train_loss.mean()):.4f}", lr=f"{lr_now:.2e}", running=len(running),
                        **{f"val_{metric}": f"{sum(v[metric] for v in vals) / len(vals):.4f}"})
        if not running:
            break
    bar.close()
    members = []
    for m, (net, p) in enumerate(zip(nets, progress)):
        net = net.cpu()
        net.load_state_dict({**net.state_dict(), **p.best_state})
        p.best_state = net.state_dict()
        members.append(engine.Trained(net=net.eval(), version=version, progress=p,
                                      stopped_early=m not in running, device=str(device),
                                      resumed=False, distributed=None))
    out = []
    for b in range(len(bags)):
        mine = range(b * k, (b + 1) * k)
        blend = None if blends is None else {"members": [blends[m].best for m in mine],
                                             "epochs": [blends[m].best_epoch for m in mine],
                                             "states": [blends[m].best_state for m in mine]}
        out.append(Bag(members[b * k:(b + 1) * k], blend))
    return out, time.perf_counter() - started


@torch.no_grad()
def predict(model: StackedNet, X: list[torch.Tensor], rows: int = 8192) -> torch.Tensor:
    """Eval-mode outputs [bags x k, rows, outputs] in float32, a slice of rows at a time."""
    model.eval()
    return torch.cat([model([x[:, i:i + rows] for x in X]).float() for i in range(0, X[0].shape[1], rows)],
                     dim=1)


def train_one_epoch(model: StackedNet, batches, task: str, optimizer, schedule: LRSchedule,
                    label_smoothing: float) -> torch.Tensor:
    """One pass over batches (a list of [k, rows, ...] inputs, one per bag; [bags x k, rows]
    targets); returns each member's mean training loss."""
    model.train()
    compute_loss = engine.loss_fn(task, label_smoothing, reduction="none")
    device = next(model.parameters()).device
    total, rows = None, 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for xb, yb in batches:
            k, b = yb.shape
            per_member = compute_loss(model(xb).flatten(0, 1), yb.flatten()).view(k, b).mean(dim=1)
            optimizer.zero_grad(set_to_none=True)
            per_member.sum().backward()  # each member's gradient is that of its own mean loss
            optimizer.step()
            schedule.after_batch()
            total = per_member.detach() * b if total is None else total + per_member.detach() * b
            rows += b
    return total.float().cpu() / rows
