"""Scale out: --stream (chunked reads, streamed statistics) and torchrun (DistributedDataParallel)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from conftest import make_frame, quick_config
from training import stream
from training.batches import steps_per_epoch
from training.contract import REQUIRED_METADATA, decode_metadata
from training.distributed import World
from training.fit import main, run

ROOT = Path(__file__).resolve().parents[1]


def scan(cfg, world_size: int = 1) -> stream.Scan:
    """The streamed first pass, fitting a StandardScaling normalizer."""
    return stream.scan(dataclasses.replace(cfg, normalizer="standard", embedding="none"), world_size)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """One seeded table as CSV and as Parquet (small row groups), with its row position as a column."""
    tmp = tmp_path_factory.mktemp("stream")
    frame = make_frame(n=3000, seed=3)
    frame.insert(0, "position", np.arange(len(frame), dtype=float))
    frame.to_csv(tmp / "t.csv", index=False)
    frame.to_parquet(tmp / "t.parquet", row_group_size=400)
    return frame, tmp / "t.csv", tmp / "t.parquet"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_streamed_statistics_equal_in_memory_statistics(tables, tmp_path, fmt):
    frame, csv, parquet = tables
    path = csv if fmt == "csv" else parquet
    cfg = quick_config(tmp_path, data=str(path), target="label", stream=True, chunk_rows=37)
    s = scan(cfg)
    # In memory: the whole file at once, the same rows in the training split.
    split = stream.split_of(np.arange(len(frame)), cfg.seed, cfg.val_size, cfg.test_share(1))
    features = s.features
    whole = StandardScaler().fit(frame.loc[split == stream.TRAIN, features].to_numpy())
    np.testing.assert_allclose(s.normalizer.mean_, whole.mean_, rtol=1e-12)
    np.testing.assert_allclose(s.normalizer.scale_, whole.scale_, rtol=1e-12)
    assert s.rows == {"train": int((split == 0).sum()), "validation": int((split == 1).sum()),
                      "test": int((split == 2).sum())}
    assert s.task == "classification" and s.classes == ["approved", "declined"]
    # The samples hold the split's rows (all of them: eval_rows is larger than the table).
    assert sorted(s.split.X_test[:, 0]) == sorted(np.flatnonzero(split == stream.TEST))


def test_streamed_regression_target_statistics(tmp_path):
    frame = make_frame(n=1500, seed=4, task="regression")
    path = tmp_path / "r.csv"
    frame.to_csv(path, index=False)
    cfg = quick_config(tmp_path, data=str(path), target="label", stream=True, chunk_rows=100)
    s = scan(cfg)
    train = stream.split_of(np.arange(len(frame)), cfg.seed, cfg.val_size, cfg.test_share(1)) == 0
    y = frame.label.to_numpy()[train]
    assert s.task == "regression"
    assert s.y_scaling.mean_[0] == pytest.approx(y.mean(), rel=1e-12)
    assert s.y_scaling.scale_[0] == pytest.approx(y.std(), rel=1e-12)


def test_split_by_position_is_stable_and_proportioned(tables, tmp_path):
    _, csv, _ = tables
    a = scan(quick_config(tmp_path, data=str(csv), target="label", stream=True, chunk_rows=50))
    b = scan(quick_config(tmp_path, data=str(csv), target="label", stream=True, chunk_rows=5000))
    assert a.rows == b.rows  # the chunk size does not move rows between splits
    np.testing.assert_array_equal(a.split.X_val, b.split.X_val)
    codes = stream.split_of(np.arange(200_000), 0, 0.15, 0.15)
    shares = np.bincount(codes) / len(codes)
    np.testing.assert_allclose(shares, [0.70, 0.15, 0.15], atol=0.005)
    other_seed = stream.split_of(np.arange(200_000), 1, 0.15, 0.15)
    assert (codes != other_seed).mean() > 0.3  # the seed reshuffles the split


def test_eval_sample_is_bounded_and_uniform(tables, tmp_path):
    frame, csv, _ = tables
    s = scan(quick_config(tmp_path, data=str(csv), target="label", stream=True, chunk_rows=100,
                                 eval_rows=300))
    positions = s.split.X_train[:, 0]
    assert len(positions) == 300 and len(set(positions)) == 300
    # Spread over the whole file, not its first rows.
    assert positions.min() < 300 and positions.max() > 2700


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_stream_shards_are_disjoint_and_reshuffled_each_epoch(tables, tmp_path, fmt):
    frame, csv, parquet = tables
    cfg = quick_config(tmp_path, data=str(csv if fmt == "csv" else parquet), target="label",
                       stream=True, chunk_rows=128, shuffle_rows=500)
    s = scan(cfg, world_size=2)
    train = np.flatnonzero(stream.split_of(np.arange(len(frame)), cfg.seed, cfg.val_size,
                                           cfg.test_share(1)) == stream.TRAIN)
    seen = {}
    for rank in (0, 1):
        steps = steps_per_epoch(s.rows_per_rank[rank], 16)
        for epoch in (0, 1):
            batches = list(stream.train_batches(cfg, s, rank, 2, epoch, 16, steps,
                                                torch.device("cpu"), 0.0, 1.0))
            assert len(batches) == steps and min(len(xb) for xb, _ in batches) >= 2
            seen[rank, epoch] = torch.cat([xb[:, 0] for xb, _ in batches]).long().tolist()
        assert sorted(seen[rank, 0]) == sorted(seen[rank, 1])  # each epoch: the whole shard once
        assert seen[rank, 0] != seen[rank, 1]                   # in another order
    assert not set(seen[0, 0]) & set(seen[1, 0])
    assert sorted(seen[0, 0] + seen[1, 0]) == train.tolist()
    assert s.rows_per_rank == [len(seen[0, 0]), len(seen[1, 0])]


def test_in_memory_shards_are_disjoint_and_reshuffled_each_epoch():
    n = 101
    orders = {(r, e): World(rank=r, size=2).sampler_order(n, 0, e).tolist() for r in (0, 1) for e in (0, 1)}
    assert len(orders[0, 0]) == len(orders[1, 0]) == 51  # padded to one length
    assert set(orders[0, 0]) | set(orders[1, 0]) == set(range(n))
    assert len(set(orders[0, 0]) & set(orders[1, 0])) <= 1  # only the padding row repeats
    assert orders[0, 0] != orders[0, 1]


def test_streamed_model_is_the_usual_artifact(tables, tmp_path):
    frame, _, parquet = tables
    result = run(quick_config(tmp_path, data=str(parquet), target="label", stream=True, chunk_rows=256,
                              shuffle_rows=700, features=["income", "ratio", "age", "score"],
                              store=False))
    card = result.card
    assert card["rows"] == {k: v for k, v in scan(quick_config(
        tmp_path, data=str(parquet), target="label", stream=True)).rows.items()}
    assert card["parity"]["max_abs_diff"] < 1e-4 and card["metrics"]["test"]["accuracy"] > 0.85
    assert card["training"]["streamed"] is not None and card["modality"] == "table"
    proto = onnx.load(result.model_dir / "model.onnx")
    meta = decode_metadata({p.key: p.value for p in proto.metadata_props})
    assert set(REQUIRED_METADATA) <= set(meta) and meta["input"] == "features"
    # Raw rows in, the trained network's answer out.
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    X = frame[["income", "ratio", "age", "score"]].to_numpy(np.float32)[:50].copy()
    with torch.no_grad():
        expected = torch.softmax(result.trained.net(torch.from_numpy(X)), -1).numpy()
    np.testing.assert_allclose(session.run(["probabilities"], {"features": X})[0], expected, atol=1e-5)


def test_stream_needs_a_file(capsys):
    assert main(["--stream"]) == 2
    assert capsys.readouterr().err == "error: --stream reads a --data CSV or Parquet file\n"


def torchrun(*args, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "training.fit", *args,
                           "--models-dir", str(tmp_path / "models"), "--no-progress", "--no-store",
                           "--epochs", "4", "--hidden", "16,8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["in-memory", "stream"])
def test_two_process_torchrun_writes_one_model_with_parity(tables, tmp_path, mode):
    frame, csv, parquet = tables
    extra = ["--stream", "--chunk-rows", "300", "--shuffle-rows", "900"] if mode == "stream" else []
    proc = torchrun("--data", str(parquet if mode == "stream" else csv), "--target", "label",
                    "--drop", "position", *extra, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("onnx parity") == 1  # rank 0 reports; the other rank is quiet
    models = list((tmp_path / "models").rglob("model.onnx"))
    assert len(models) == 1 and not list((tmp_path / "models").rglob("checkpoint.pt"))
    card = json.loads((models[0].parent / "card.json").read_text())
    assert card["training"]["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_rank": 32,
                                               "sync_batchnorm": False}
    assert card["parity"]["max_abs_diff"] < 1e-4
    # The exported graph answers raw rows, and answers them well.
    session = ort.InferenceSession(str(models[0]))
    X = frame[card["feature_names"]].to_numpy(np.float32)
    labels = np.array(card["classes"])[session.run(["label"], {"features": X})[0]]
    assert (labels == frame.label.to_numpy()).mean() > 0.85


def test_torchrun_error_is_one_line_and_writes_nothing(tmp_path):
    frame = make_frame(n=300).assign(label="approved")
    path = tmp_path / "one_class.csv"
    frame.to_csv(path, index=False)
    proc = torchrun("--data", str(path), "--target", "label", "--stream", tmp_path=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: target 'label' has a single class ('approved'); classification needs "
                      "at least two"]
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("model.onnx"))
