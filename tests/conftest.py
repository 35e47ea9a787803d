"""Shared fixtures: small seeded tables, and a temporary BentoML store for the whole session."""
import os
import tempfile

# Before anything imports bentoml: every test run gets its own model store.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-home-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np
import pandas as pd
import pytest
import torch

from training.config import make_config
from training.fit import run


def make_frame(n: int = 400, seed: int = 0, task: str = "classification") -> pd.DataFrame:
    """Features on very different scales (the case normalization exists for) and a learnable target."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "income": rng.normal(50_000, 15_000, n),
        "ratio": rng.normal(0.0, 0.01, n),
        "age": rng.integers(18, 90, n).astype(float),
        "score": rng.normal(5, 2, n),
    })
    signal = (frame.income - 50_000) / 15_000 + frame.ratio * 100 - (frame.age - 54) / 20
    if task == "classification":
        frame["label"] = np.where(signal + rng.normal(0, 0.3, n) > 0, "approved", "declined")
    else:
        frame["label"] = 300 + 40 * signal + rng.normal(0, 5, n)
    return frame


@pytest.fixture(scope="session")
def csv_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "loans.csv"
    make_frame().to_csv(path, index=False)
    return path


def quick_config(tmp_path, **overrides):
    """A short run of one network on tiny data: a few epochs, no progress bar."""
    values = {"epochs": 8, "patience": 0, "batch_size": 32, "hidden": [16, 8], "progress": False, "folds": 1,
              "models_dir": str(tmp_path / "models"), **overrides}
    return make_config(values)


@pytest.fixture(scope="session")
def classifier(csv_path, tmp_path_factory):
    """One trained classifier shared by the export, parity and serving tests."""
    tmp = tmp_path_factory.mktemp("clf")
    return run(quick_config(tmp, data=str(csv_path), target="label", epochs=12, normalizer="standard"))


@pytest.fixture(scope="session")
def regressor(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    path = tmp / "prices.csv"
    make_frame(task="regression", seed=1).to_csv(path, index=False)
    return run(quick_config(tmp, data=str(path), target="label", epochs=12, normalizer="standard"))


def torch_reference(result, X):
    """What the trained PyTorch model in eval mode gives for raw rows, normalized with the
    training statistics (applied here by hand, independently of the graph; --normalizer standard)."""
    card, net = result.card, result.trained.net.eval()
    mean = np.asarray(card["normalization"]["mean"])
    scale = np.asarray(card["normalization"]["scale"])
    with torch.no_grad():
        out = net.from_normalized(torch.as_tensor((X - mean) / scale, dtype=torch.float32))
    if card["task"] == "classification":
        return torch.softmax(out, -1).numpy()
    t = card["target_normalization"]
    return out.squeeze(-1).numpy() * t["scale"] + t["mean"]
