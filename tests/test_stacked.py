"""The fold networks trained at once (training/stacked.py) train as runs of their own would."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_frame, quick_config
from training import dataset, engine, stacked
from training.data import to_table
from training.distributed import World
from training.ensemble import fold_data


def _folds(tmp_path, n: int, k: int, **options):
    cfg = quick_config(tmp_path, data="loans.csv", target="label", folds=k, store=False,
                       normalizer="standard", **options)
    table = to_table(make_frame(n), "label", None, "auto", "loans")
    data = dataset.prepare(cfg, World(), table)
    return cfg, fold_data(data, k, cfg.seed)


def test_stacked_batchnorm_is_k_batchnorms():
    torch.manual_seed(0)
    norms = [nn.BatchNorm1d(6) for _ in range(3)]
    for m in norms:
        nn.init.uniform_(m.weight), nn.init.uniform_(m.bias)
    stack = stacked.StackedBatchNorm(norms)
    x = torch.randn(3, 20, 6) * torch.tensor([1.0, 5.0, 0.1])[:, None, None]
    out = stack(x)
    for i, m in enumerate(norms):
        torch.testing.assert_close(out[i], m(x[i]))
        torch.testing.assert_close(stack.member(i)["running_mean"], m.running_mean)
        torch.testing.assert_close(stack.member(i)["running_var"], m.running_var)
    stack.eval(), [m.eval() for m in norms]
    torch.testing.assert_close(stack(x)[1], norms[1](x[1]))


@pytest.mark.parametrize("embedding", ["none", "ple"])
def test_each_member_trains_as_its_own_run_would(tmp_path, embedding):
    # 400 rows, no test split: 5 folds of 80, so every member has 320 rows and nothing is
    # padded: member i must end where engine.train on fold i (seed + i) ends.
    cfg, folds = _folds(tmp_path, 400, 5, epochs=6, patience=0, embedding=embedding)
    assert len({len(f.split.y_train) for f in folds}) == 1
    (bag,), seconds = stacked.train(cfg, folds, World())
    members = bag.members
    assert bag.blend is None  # no partner
    assert seconds > 0
    for i, (member, fold) in enumerate(zip(members, folds)):
        alone = engine.train(dataclasses.replace(cfg, seed=cfg.seed + i), fold, World(), checkpoints=False)
        if embedding == "ple":
            # 64 encoded inputs instead of 4: the stacked and the single products round apart
            # (1e-7), which some members' training grows to 1e-3 of the loss within a few epochs.
            np.testing.assert_allclose([h["val_loss"] for h in member.progress.history],
                                       [h["val_loss"] for h in alone.progress.history], rtol=1e-2)
            continue
        ours, theirs = member.net.state_dict(), alone.net.state_dict()
        for name in theirs:
            if not name.endswith("num_batches_tracked"):
                torch.testing.assert_close(ours[name], theirs[name], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("scheduler", ["onecycle", "plateau"])
def test_each_member_keeps_its_own_best_epoch_and_stops_on_its_own(tmp_path, scheduler):
    # 3 folds of 400 rows: 134, 133 and 133 validation rows, so members differ in size.
    cfg, folds = _folds(tmp_path, 400, 3, epochs=40, patience=4, scheduler=scheduler)
    members = stacked.train(cfg, folds, World())[0][0].members
    for member, fold in zip(members, folds):
        p = member.progress
        # The exported weights are the member's best epoch: they score its fold as recorded then.
        again = engine.evaluate(member.net, *engine.tensors(fold, "validation", "cpu"), "classification")
        assert again == pytest.approx(p.best, abs=1e-6)
        assert len(p.history) == p.best_epoch + 4 if member.stopped_early else len(p.history) == 40
        assert not member.net.training and next(member.net.parameters()).device.type == "cpu"
    assert any(m.stopped_early for m in members)  # patience 4 of 40 epochs on an easy table


def test_lr_auto_sweeps_a_copy_of_the_first_member_and_sets_every_members_rate(tmp_path):
    cfg, folds = _folds(tmp_path, 400, 3, epochs=2, patience=0, lr="auto")
    bags, _ = stacked.train(cfg, folds, World(), embeddings=("none", "ple"))
    members = [m for bag in bags for m in bag.members]
    sweep = members[0].progress.lr_sweep
    assert sweep and sweep["lrs"][0] < sweep["suggestion"] < sweep["lrs"][-1]
    assert all(m.progress.lr == sweep["suggestion"] for m in members)
    for bag in bags:  # each bag's record carries the sweep once (the card of whichever is exported)
        assert bag.members[0].progress.lr_sweep is sweep
        assert all(m.progress.lr_sweep is None for m in bag.members[1:])


def test_beside_a_partner_each_member_keeps_its_best_epoch_in_the_blend_too(tmp_path):
    cfg, folds = _folds(tmp_path, 400, 3, epochs=40, patience=4)
    (linear,), _ = stacked.train(dataclasses.replace(cfg, hidden=[]), folds, World())
    partner = [engine.predict(m.net, engine.tensors(f, "validation", "cpu")[0]) for m, f in
               zip(linear.members, folds)]
    (bag,), _ = stacked.train(cfg, folds, World(), partner)
    members, blend = bag.members, bag.blend
    alone = stacked.train(cfg, folds, World())[0][0].members
    for i, (member, fold) in enumerate(zip(members, folds)):
        X, y = engine.tensors(fold, "validation", "cpu")
        # The partner only adds a record: the member trains as it does without one (for longer,
        # while the blend still improves), and its own best is the best of its longer history.
        ours, theirs = member.progress.history, alone[i].progress.history
        assert len(ours) >= len(theirs)
        np.testing.assert_allclose([h["val_loss"] for h in ours[:len(theirs)]],
                                   [h["val_loss"] for h in theirs], rtol=1e-4)
        assert not engine.is_better(alone[i].progress.best, member.progress.best, "classification")
        # Its weights at the blend's best epoch, averaged with the partner, score the fold as recorded.
        net = copy_of(member.net, blend["states"][i])
        mixed = (engine.predict(net, X) + partner[i]) / 2
        assert engine.metrics_of(mixed, y, "classification") == pytest.approx(blend["members"][i], abs=1e-6)
        assert 1 <= blend["epochs"][i] <= len(member.progress.history)
        # It ran until its patience was out both alone and in the blend.
        last = len(member.progress.history)
        assert last == 40 or last >= max(member.progress.best_epoch, blend["epochs"][i]) + 4
        best_alone = engine.metrics_of(engine.predict(member.net, X), y, "classification")
        assert best_alone == pytest.approx(member.progress.best, abs=1e-6)


@pytest.mark.parametrize("linear_skip", [False, True])
def test_bags_trained_together_train_as_bags_of_their_own(tmp_path, linear_skip):
    # --embedding auto: the plain and the encoded bag in the same steps, beside a plain linear
    # partner. Each member's history, best epochs (alone and blended), weights and sweep record are
    # those of its own bag's run.
    cfg, folds = _folds(tmp_path, 400, 3, epochs=12, patience=3, linear_skip=linear_skip)
    (linear,), _ = stacked.train(dataclasses.replace(cfg, hidden=[], embedding="none"), folds, World())
    partner = [engine.predict(m.net, engine.tensors(f, "validation", "cpu")[0]) for m, f in
               zip(linear.members, folds)]
    together, _ = stacked.train(cfg, folds, World(), partner, embeddings=("none", "ple"))
    for embedding, bag in zip(("none", "ple"), together):
        (alone,), _ = stacked.train(dataclasses.replace(cfg, embedding=embedding), folds, World(), partner)
        for ours, theirs in zip(bag.members, alone.members):
            np.testing.assert_allclose([h["val_loss"] for h in ours.progress.history],
                                       [h["val_loss"] for h in theirs.progress.history], rtol=1e-3)
            assert ours.progress.best_epoch == theirs.progress.best_epoch
            assert ours.stopped_early == theirs.stopped_early
            assert (ours.net.embed is None) == (embedding == "none")
            for name, value in theirs.net.state_dict().items():
                torch.testing.assert_close(ours.net.state_dict()[name], value, atol=1e-4, rtol=1e-3)
        assert bag.blend["epochs"] == alone.blend["epochs"]


def copy_of(net: nn.Module, state: dict) -> nn.Module:
    import copy
    other = copy.deepcopy(net)
    other.load_state_dict({**other.state_dict(), **state})
    return other.eval()
