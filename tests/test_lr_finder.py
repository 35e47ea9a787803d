"""--lr auto: the learning-rate range test (training/lr_finder.py)."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import quick_config
from training import lr_finder
from training.batches import shuffled_batches
from training.fit import run
from training.model import TabularNet


def batches(n=256, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g) * scale
    y = (X[:, 0] - X[:, 1] > 0).long()
    return shuffled_batches(X, y, 32, g)


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)


def test_the_sweep_stops_when_the_loss_diverges():
    torch.manual_seed(0)
    net = nn.Linear(4, 1)  # no BatchNorm to tame it: SGD on large inputs blows up well before lr 10
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 4, generator=g) * 30
    data = shuffled_batches(X, X.sum(1), 32, g)
    result = lr_finder.sweep(net, data, lambda out, y: F.mse_loss(out.squeeze(-1), y), sgd)
    assert result.stopped_early and len(result.lrs) < lr_finder.STEPS
    assert result.lrs[-1] < lr_finder.END
    best = min(result.losses)
    assert max(result.losses) <= lr_finder.DIVERGE * max(best, result.losses[0])  # nothing past the stop


def test_the_weights_and_batchnorm_statistics_are_restored():
    torch.manual_seed(0)
    net = TabularNet(4, 2, [8, 8])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lr_finder.sweep(net, batches(), F.cross_entropy, sgd)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("rule", ["valley", "steepest"])
def test_the_chosen_rate_lies_inside_the_sweep_where_the_loss_falls(rule):
    torch.manual_seed(0)
    net = TabularNet(4, 2, [16])
    result = lr_finder.sweep(net, batches(), F.cross_entropy, sgd, rule=rule)
    assert lr_finder.START <= result.suggestion <= result.lrs[-1]
    i = result.lrs.index(result.suggestion)
    assert result.losses[min(i + 10, len(result.losses) - 1)] < result.losses[max(i - 10, 0)]


def test_lr_auto_trains_at_the_rate_it_found_and_draws_the_sweep(tmp_path, csv_path):
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", lr="auto", store=False))
    training = result.card["training"]
    assert training["lr"] == training["lr_find"]["suggestion"] and result.card["config"]["lr"] == "auto"
    assert lr_finder.START <= training["lr"] <= max(training["lr_find"]["lrs"])
    # One-cycle starts at the peak / 5 and the first epoch is recorded at that rate.
    assert math.isclose(result.card["history"][0]["lr"], training["lr"] / 5, rel_tol=1e-6)
    assert (result.model_dir / "lr_find.png").stat().st_size > 0
    assert result.card["metrics"]["test"]["accuracy"] > 0.85
