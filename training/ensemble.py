"""Several networks, one exported graph: --folds k (k-fold bagging, the default for tables of up
to 20,000 training + validation rows), --ensemble k and --refit.

`--folds k` pools the training and validation rows and cuts them into k folds (stratified for
classification); network i trains on every fold but fold i and stops early on fold i, so every
row trains k - 1 networks and judges one, and each network's best validation metric is held out.
With --linear-candidate (on tables of up to 5,000 such rows) k linear models are bagged over the
same folds first, and the networks, the networks averaged with them, or the linear models alone
are exported, whichever cross-validates best (each judged at its own best epochs).
`--ensemble k` trains k networks from seeds seed .. seed + k - 1 on the one training split (each
with early stopping on the validation split). `--refit` then trains each member again from scratch
on the training and validation rows together, for as many epochs as its best one, on the same
schedule. Either way the members' outputs (logits, or standardized predictions) are averaged inside
one module, so the exported graph is one graph; the test split is held out from all of them.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from training import engine, stacked
from training.config import AUTO_FOLDS_MAX_ROWS, LINEAR_CANDIDATE_MAX_ROWS
from training.data import Split
from training.dataset import Data, pooled
from training.distributed import World
from training.model import TabularNet
from training.rules import MIN_TRAIN_ROWS, DataError, DataNote


class Ensemble(nn.Module):
    """The mean of its members' outputs. The members share the run's fitted normalizer and
    embedding, so the inputs are normalized once and embedded once (in the graph too: the
    quantile map is most of a small network's serving time); a member without the embedding (the
    linear candidate) takes the normalized inputs."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.normalize = members[0].normalize
        self.embed = next((m.embed for m in members if _embeds(m)), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_normalized(self.normalize(x))

    def from_normalized(self, x: torch.Tensor) -> torch.Tensor:
        embedded = None if self.embed is None else self.embed(x)
        return torch.stack([m.from_inputs(embedded) if _embeds(m) else m.from_normalized(x)
                            for m in self.members]).mean(dim=0)


def _embeds(member: nn.Module) -> bool:
    """A network with the embedding (not the linear candidate, nor an ensemble, which embeds once
    itself)."""
    return isinstance(member, TabularNet) and member.embed is not None


def fold_data(data: Data, k: int, seed: int, repeats: int = 1) -> list[Data]:
    """k copies of the data (k x repeats: the rows cut into k folds `repeats` times, each time
    shuffled anew): in copy i the validation rows are fold i of the pooled training and
    validation rows, the training rows the other folds; the test rows stay as they are."""
    from sklearn.model_selection import KFold, StratifiedKFold
    rows = pooled(data.split)
    X, y = rows.X_train, rows.y_train
    if k > len(y) or len(y) - int(np.ceil(len(y) / k)) < MIN_TRAIN_ROWS:
        raise DataError(f"--folds {k}: {len(y)} training + validation rows cannot make {k} folds "
                        f"that each leave {MIN_TRAIN_ROWS} rows to train on; use fewer folds")
    stratify = rows.stratified and np.bincount(y).min() >= k
    take = (lambda idx: X.iloc[idx].reset_index(drop=True)) if isinstance(X, pd.DataFrame) \
        else (lambda idx: X[idx])
    copies = []
    cuts = [(StratifiedKFold if stratify else KFold)(k, shuffle=True, random_state=seed + r)
            .split(np.zeros(len(y)), y if stratify else None) for r in range(repeats)]
    for train, val in (fold for cut in cuts for fold in cut):
        split = Split(X_train=take(train), y_train=y[train], X_val=take(val), y_val=y[val],
                      X_test=data.split.X_test, y_test=data.split.y_test, stratified=bool(stratify))
        copies.append(dataclasses.replace(data, split=split))
    return copies


def train(cfg, data: Data, world: World, checkpoints: bool = True) -> engine.Trained | None:
    if data.folds > 1:
        return _folds(cfg, data, world)
    if cfg.fold_repeats > 1:
        warnings.warn(f"--fold-repeats {cfg.fold_repeats} is for --folds: this run trains without "
                      f"folds (images, --stream, a table of over {AUTO_FOLDS_MAX_ROWS:,} rows, or "
                      "--folds 1)", DataNote)
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
            merged = dataclasses.replace(data, split=pooled(data.split))  # training + validation rows
            refitted = engine.train(refit_cfg, merged, world, checkpoints=False, epochs=best)
            if trained is not None:
                trained.net, seconds = refitted.net, seconds + refitted.progress.elapsed
        members.append(trained)
    if not world.main:
        return None
    return _combined(members, seconds, [{"seed": cfg.seed + k} for k in range(cfg.ensemble)],
                     refit=cfg.refit)


def _folds(cfg, data: Data, world: World) -> engine.Trained | None:
    """k networks bagged over the folds. With --linear-candidate on a small enough table, k linear
    models are bagged over the same folds first, and beside the networks two more candidates are
    judged: the networks averaged with the linear models, and the linear models alone. With
    --embedding auto the networks are bagged twice, on the plain normalized features and on their
    piecewise-linear encoding (each with its blend). The export is whichever candidate
    cross-validates best (on a tie the plainer one, listed first), an encoded one only where it
    beats the best plain one by more than the folds' noise (_choice). Each candidate is judged at its
    own best epochs, found on the same folds (for a blend, the epoch where each network does best as
    half of it), so that no candidate's figure is more optimistic than another's (docs/quality.md).
    Under torchrun, where the networks train one at a time, a blend is judged with each network at
    its own best epoch."""
    folds = fold_data(data, data.folds, cfg.seed, cfg.fold_repeats)
    pooled_rows = data.rows["train"] + data.rows["validation"]
    tabular, task = data.table.modality != "image", data.table.task
    embeddings = ("none", "ple") if cfg.embedding == "auto" and tabular else (cfg.embedding,)
    linear = partner = None
    if cfg.linear_candidate and cfg.hidden and pooled_rows <= LINEAR_CANDIDATE_MAX_ROWS and tabular:
        [(linear, _)], _ = _bags(dataclasses.replace(cfg, hidden=[]), folds, world, ("none",))  # plain inputs
        if stacked.applies(folds[0], world):  # each linear model's outputs on its own fold
            partner = [engine.predict(m, engine.tensors(f, "validation", "cpu")[0]).to(world.device)
                       for m, f in zip(linear.net.members, folds)]
    bags, seconds = _bags(cfg, folds, world, embeddings, partner)  # seconds: every bag's training
    if not world.main:
        return None
    candidates: dict[str, engine.Trained] = {}
    for embedding, (networks, blend) in zip(embeddings, bags):
        name = "network" if embedding == "none" else f"{embedding} network"
        candidates[name] = networks
        if linear is not None:
            candidates[f"{name} + linear"] = _blended(networks, linear, blend, folds, task,
                                                      cfg.fold_repeats)
    if linear is not None:
        candidates["linear"] = dataclasses.replace(
            linear, members=[{**m, "linear": True} for m in linear.members])
        seconds += linear.progress.elapsed
    if len(candidates) == 1:
        return candidates[name]
    chosen, encoding = (_choice(candidates, task, len(folds)) if len(embeddings) > 1 else
                        (_best(list(candidates), candidates, task), None))
    picked = candidates[chosen]
    picked.progress.elapsed = seconds
    picked.cross_validation = {**picked.cross_validation, "chosen": chosen, "candidates": {
        name: c.cross_validation["metrics"] for name, c in candidates.items()},
        **({"encoding": encoding} if encoding else {})}
    return picked


def _best(names: list[str], candidates: dict[str, engine.Trained], task: str) -> str:
    """The candidate that cross-validates best; on a tie the plainer (listed first)."""
    best = names[0]
    for name in names[1:]:
        if engine.is_better(candidates[name].cross_validation["metrics"],
                            candidates[best].cross_validation["metrics"], task):
            best = name
    return best


def _choice(candidates: dict[str, engine.Trained], task: str, n_folds: int) -> tuple[str, dict]:
    """--embedding auto: the best plain candidate, unless the best encoded one beats it on the
    folds by more than one standard error of their per-fold difference (the one-standard-error
    rule: Hastie, Tibshirani, Friedman, The Elements of Statistical Learning, 7.10). An encoded
    network costs several times a plain one to serve (docs/benchmarks.md, section 12), so a gain
    within the folds' noise does not buy it. (With --embedding ple or none the best candidate of
    all is exported.) Returns the name, and the encoded one's gain per fold and its standard error
    (in the monitored metric; positive: the encoded one is better)."""
    plain = [n for n in candidates if not n.startswith("ple")]
    encoded = [n for n in candidates if n.startswith("ple")]
    p, e = _best(plain, candidates, task), _best(encoded, candidates, task)
    metric, higher = engine.monitor(task)
    # members[i]: fold i's network (in a blend, its figure as half of the blend), or linear model
    diff = np.array([b["validation"][metric] - a["validation"][metric] for a, b in
                     zip(candidates[p].members[:n_folds], candidates[e].members[:n_folds])])
    diff = diff if higher else -diff
    gain, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return (e if gain > se else p), {"encoded": e, "plain": p, "gain": gain, "se": se}


def _blended(networks: engine.Trained, linear: engine.Trained, blend: dict | None, folds: list[Data],
             task: str, repeats: int) -> engine.Trained:
    """The networks averaged with the linear models, each network at its best epoch in the blend
    (stacked.train found them; under torchrun, at its own best epoch): a candidate."""
    if blend is None:
        blend = {"members": [engine.evaluate(Ensemble([n, m]), *engine.tensors(f, "validation", "cpu"),
                                             task, f.y_mean, f.y_scale)
                             for n, m, f in zip(networks.net.members, linear.net.members, folds)]}
    members = [{**m, "validation": metrics, "validation_in": "the blend"}
               for m, metrics in zip(networks.members, blend["members"])]
    nets = networks.net.members
    if "states" in blend:  # each network at its best epoch in the blend: a copy, the bag stays as it was
        nets = [copy.deepcopy(n) for n in nets]
        for net, state, member, epoch in zip(nets, blend["states"], members, blend["epochs"]):
            net.load_state_dict({**net.state_dict(), **state})
            member["best_epoch"] = epoch
    both = cross_validation([{"validation_rows": len(f.split.y_val), "validation": v}
                             for v, f in zip(blend["members"], folds)], repeats)
    return dataclasses.replace(networks, net=Ensemble([Ensemble(nets).eval(), linear.net]).eval(),
                               members=members + [{**m, "linear": True} for m in linear.members],
                               cross_validation=both)


def _bags(cfg, folds: list[Data], world: World, embeddings: tuple[str, ...],
          partner: list[torch.Tensor] | None = None) -> tuple[list[tuple], float]:
    """The fold networks, one bag per embedding, each combined, and beside a partner, its blends'
    best epochs (stacked.train: every bag at once); and the seconds they all took to train (every
    rank but the first: Nones)."""
    if stacked.applies(folds[0], world):
        trained, seconds = stacked.train(cfg, folds, world, partner, embeddings)  # all folds at once
    else:
        trained, seconds = [], 0.0
        for embedding in embeddings:
            members, more = _one_by_one(dataclasses.replace(cfg, embedding=embedding), folds, world)
            trained.append(stacked.Bag(members))
            seconds += more
    if not world.main:
        return [(None, None)] * len(embeddings), seconds
    k, repeats = len(folds) // cfg.fold_repeats, cfg.fold_repeats
    out = []
    for bag in trained:
        described = [{"fold": i % k + 1, **({"repeat": i // k + 1} if repeats > 1 else {}),
                      "seed": cfg.seed + i, "validation_rows": len(fold.split.y_val),
                      "validation": m.progress.best} for i, (m, fold) in enumerate(zip(bag.members, folds))]
        combined = _combined(bag.members, seconds, described, refit=False)
        combined.cross_validation = cross_validation(described, repeats)
        out.append((combined, bag.blend))
    return out, seconds


def _one_by_one(cfg, folds: list[Data], world: World) -> tuple[list, float]:
    """Images, and tables under torchrun: engine.train once per fold (member i seeded seed + i)."""
    members, lr, seconds = [], cfg.lr, 0.0
    for i, fold in enumerate(folds):
        trained = engine.train(dataclasses.replace(cfg, seed=cfg.seed + i, lr=lr), fold, world,
                               checkpoints=False)
        lr = world.share(lambda: trained.progress.lr)  # --lr auto: the first fold's range test
        if trained is not None:
            seconds += trained.progress.elapsed
        members.append(trained)
    return members, seconds


def cross_validation(members: list[dict], repeats: int = 1) -> dict:
    """Each network's best validation metrics on its own fold (rows it never trained on),
    averaged weighted by fold size: the bag's held-out estimate. `members`: per fold (of every
    repeat), {"validation_rows": n, "validation": metrics on that fold}."""
    rows = sum(m["validation_rows"] for m in members)
    return {"folds": len(members) // repeats, "repeats": repeats,
            "note": "each network is stopped early on its own fold (in a blend with the linear "
                    "bag, at its best epoch in the blend; the normalizer was fitted on "
                    "every fold's rows); the validation split's metrics are not held out (every "
                    "row trained all networks but those whose fold it is in)",
            "metrics": {k: sum(m["validation"][k] * m["validation_rows"] for m in members) / rows
                        for k in members[0]["validation"]}}


def _combined(members: list[engine.Trained], seconds: float, described: list[dict],
              refit: bool) -> engine.Trained:
    """One Trained: the first member's record, the members' average as the network."""
    first = members[0]
    first.progress.elapsed = seconds  # the card's training seconds: every member (and refit)
    net = first.net if len(members) == 1 else Ensemble([m.net for m in members]).eval()
    return dataclasses.replace(first, net=net, refit=refit, members=[
        {**d, "best_epoch": m.progress.best_epoch, "epochs_run": len(m.progress.history)}
        for d, m in zip(described, members)])
