"""The training loop: batches, schedules, loss, ablation switches, checkpoints and the CLI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_frame, quick_config
from training import engine
from training.batches import shuffled_batches, steps_per_epoch
from training.checkpoint import Checkpoint
from training.schedules import LRSchedule
from training.config import ConfigError, load_config
from training.fit import main, run
from training.model import TabularNet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, batch, expected", [(128, 64, [64, 64]), (129, 64, [64, 65]),
                                                (130, 64, [64, 64, 2]), (5, 64, [5])])
def test_batches_cover_every_row_once_and_never_leave_one_row(n, batch, expected):
    X = torch.arange(n, dtype=torch.float32)[:, None]
    batches = shuffled_batches(X, torch.arange(n), batch, torch.Generator().manual_seed(0))
    assert [len(xb) for xb, _ in batches] == expected
    assert sorted(torch.cat([yb for _, yb in batches]).tolist()) == list(range(n))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in batches)  # rows stay with targets
    assert steps_per_epoch(n, batch) == len(expected)


def _fit_steps(scheduler: str, epochs: int = 5, n: int = 129, batch: int = 32):
    torch.manual_seed(0)
    X, y = torch.randn(n, 4), torch.randint(0, 2, (n,))
    net = TabularNet(4, 2, [8])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    schedule = LRSchedule(scheduler, opt, 0.1, epochs, steps_per_epoch(n, batch), 6, True)
    gen, lrs = torch.Generator().manual_seed(0), []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        engine.train_one_epoch(net, shuffled_batches(X, y, batch, gen), "classification", opt,
                               schedule)
        schedule.after_epoch(engine.evaluate(net, X, y, "classification")["accuracy"])
    return schedule, lrs


@pytest.mark.parametrize("scheduler, expected_steps", [
    ("onecycle", 5 * 4),   # per optimizer step: 129 rows / 32 = 4 steps (the lone last row merged)
    ("cosine", 5), ("step", 5), ("plateau", 5), ("none", 0)])
def test_scheduler_steps_at_its_granularity(scheduler, expected_steps):
    schedule, lrs = _fit_steps(scheduler)
    assert schedule.steps_taken == expected_steps
    if scheduler == "none":
        assert lrs == [0.1] * 5
    elif scheduler in ("onecycle", "cosine", "step"):
        assert len(set(lrs)) > 1


def test_loss_falls(tmp_path, csv_path):
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", epochs=10, store=False))
    history = result.card["history"]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert result.card["metrics"]["test"]["accuracy"] > 0.85


def test_last_batch_of_one_row_trains(tmp_path, csv_path):
    # 400 rows -> 280 train rows; batch 31 leaves 1 row over (280 = 9 * 31 + 1).
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", batch_size=31,
                              epochs=2, store=False))
    assert result.card["rows"]["train"] % 31 == 1
    assert result.card["training"]["epochs_run"] == 2


def test_each_ablation_switch_changes_the_model(tmp_path, csv_path):
    base = dict(data=str(csv_path), target="label", epochs=3, store=False)
    full = run(quick_config(tmp_path, normalizer="standard", **base))
    assert any(isinstance(m, nn.BatchNorm1d) for m in full.trained.net.modules())
    assert not (full.trained.net.normalize.scale == 1).all()
    no_bn = run(quick_config(tmp_path, batchnorm=False, **base)).trained.net
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_bn.modules())
    assert all(m.bias is not None for m in no_bn.modules() if isinstance(m, nn.Linear))
    raw = run(quick_config(tmp_path, normalizer="none", dropout=0.2, scheduler="none", **base))
    assert (raw.trained.net.normalize.mean == 0).all() and (raw.trained.net.normalize.scale == 1).all()
    assert any(isinstance(m, nn.Dropout) for m in raw.trained.net.modules())
    assert len({h["lr"] for h in raw.card["history"]}) == 1
    assert raw.card["normalization"]["enabled"] is False


def test_early_stopping_restores_the_best_epoch(tmp_path, csv_path):
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", epochs=40, patience=3,
                              lr=0.05, store=False))
    t = result.card["training"]
    assert t["stopped_early"] and t["epochs_run"] == t["best_epoch"] + 3
    best = max(result.card["history"], key=lambda h: h["val_accuracy"])["val_accuracy"]
    assert result.card["metrics"]["validation"]["accuracy"] == pytest.approx(best)


def test_config_file_supplies_defaults_that_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\nhidden: [32, 16]\nscheduler: cosine\n")
    cfg = load_config(["--config", str(path), "--lr", "0.02"])
    assert (cfg.epochs, cfg.lr, cfg.hidden, cfg.scheduler) == (7, 0.02, [32, 16], "cosine")
    path.write_text("epoch: 7\n")
    with pytest.raises(ConfigError, match="unknown option.*epoch"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("args, message", [
    (["--data", "{dir}/missing.csv", "--target", "y"], "data file not found: {dir}/missing.csv"),
    (["--data", "{dir}/messy.csv", "--target", "nope"], "target column 'nope' not found"),
    (["--data", "{dir}/messy.csv", "--target", "label", "--features", "income,colour",
      "--numeric", "colour"], "--numeric column 'colour' has 60 rows that are not numbers"),
    (["--data", "{dir}/messy.csv", "--target", "label", "--drop", "height"],
     "--drop names column(s) not found: height"),
    (["--data", "{dir}/messy.csv", "--target", "one", "--features", "income"], "single class"),
    (["--data", "{dir}/tiny.csv", "--target", "label", "--features", "income"], "too few rows (4)"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    frame = make_frame(n=60).assign(colour="red", one="x")
    frame.loc[[3, 9], "age"] = None
    frame.to_csv(tmp_path / "messy.csv", index=False)
    frame.head(4).to_csv(tmp_path / "tiny.csv", index=False)
    models = tmp_path / "models"
    args = [a.format(dir=tmp_path) for a in args]
    assert main(args + ["--models-dir", str(models), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(dir=tmp_path) in err and err.count("\n") == 1
    assert not models.exists() or not any(models.rglob("model.onnx"))


def test_cli_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.fit", "--data", str(tmp_path), "--target", "y"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path} is a directory without Parquet files; expected a "
                                   "CSV or Parquet file, or a directory of Parquet parts")


def test_killed_run_resumes_to_the_same_end(tmp_path):
    """kill -9 mid-run, then --resume: the same epochs in total and the same result as a clean run."""
    data = tmp_path / "big.csv"
    make_frame(n=6000).to_csv(data, index=False)
    args = [sys.executable, "-m", "training.fit", "--data", str(data), "--target", "label",
            "--epochs", "30", "--patience", "0", "--hidden", "64,64", "--batch-size", "16", "--lr", "0.005",
            "--no-progress", "--no-store", "--name", "resumed", "--folds", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ckpt = tmp_path / "a" / "resumed" / "checkpoint.pt"
    proc = subprocess.Popen(args + ["--models-dir", str(tmp_path / "a")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and Checkpoint.load(ckpt).progress.epoch >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = Checkpoint.load(ckpt).progress.epoch
    assert 3 <= killed_at < 30

    changed = subprocess.run(args + ["--models-dir", str(tmp_path / "a"), "--resume", "--lr", "0.1"],
                             cwd=ROOT, capture_output=True, text=True)
    assert changed.returncode == 2 and "different config: lr=0.005 (now 0.1)" in changed.stderr

    resumed = subprocess.run(args + ["--models-dir", str(tmp_path / "a"), "--resume"], cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    clean = subprocess.run(args + ["--models-dir", str(tmp_path / "b")], cwd=ROOT,
                           capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    card_a = json.loads(next((tmp_path / "a").rglob("card.json")).read_text())
    card_b = json.loads(next((tmp_path / "b").rglob("card.json")).read_text())
    assert card_a["training"]["resumed"] and [h["epoch"] for h in card_a["history"]] == list(range(1, 31))
    assert card_a["training"]["epochs_run"] == card_b["training"]["epochs_run"] == 30
    assert abs(card_a["metrics"]["test"]["accuracy"] - card_b["metrics"]["test"]["accuracy"]) <= 0.01
    assert not ckpt.exists()  # a finished run leaves nothing to resume


def test_crash_during_export_keeps_the_previous_model_served(tmp_path, csv_path):
    """kill -9 while the artifacts are being written: no half model, the last good one still served."""
    from training.export import sha256
    models = tmp_path / "models"
    base = ["--data", str(csv_path), "--target", "label", "--epochs", "3", "--no-progress",
            "--models-dir", str(models), "--name", "crashy"]
    assert main(base) == 0
    (previous,) = [d for d in (models / "crashy").iterdir() if d.is_dir() and not d.name.startswith(".")]
    env = {k: v for k, v in os.environ.items() if k != "MODEL_TAG"}
    served = lambda: subprocess.run(  # noqa: E731  what `bentoml serve` would pick now
        [sys.executable, "-c", "import service.service as s; print(s.MODEL_TAG)"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1]
    assert served() == f"crashy:{previous.name}"

    proc = subprocess.Popen([sys.executable, "-m", "training.fit", *base], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list((models / "crashy").glob(".*.tmp")):  # export is writing the new model
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before its export could be interrupted"
    complete = [d for d in (models / "crashy").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert complete == [previous]  # no half-written model beside it
    card = json.loads((previous / "card.json").read_text())
    assert card["onnx_sha256"] == sha256(previous / "model.onnx")
    assert served() == f"crashy:{previous.name}"


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


GOOD_ROWS = "".join(f"{i},{i % 7},{'yes' if i % 2 else 'no'}\n" for i in range(40))
BROKEN_INPUTS = [  # (case, file name, contents (None: a directory), extra options, message)
    ("missing file", None, None, [], "data file not found"),
    ("directory", "folder", None, [], "is a directory without Parquet files"),
    ("empty file", "empty.csv", b"", [], "is empty"),
    ("header only", "header.csv", "a,b,label\n", [], "has no data rows"),
    ("target column missing", "t.csv", "a,b,y\n" + GOOD_ROWS, [], "target column 'label' not found"),
    ("one class", "one.csv", "a,b,label\n" + "".join(f"{i},{i},yes\n" for i in range(40)), [],
     "has a single class ('yes')"),
    ("constant regression target", "const.csv", "a,b,label\n" + "".join(f"{i},{i},3.5\n" for i in range(40)),
     ["--task", "regression"], "is constant"),
    ("duplicate column names", "dupe.csv", "a,a,label\n" + GOOD_ROWS, [], "duplicate column names: a"),
    ("not UTF-8", "latin.csv", "a,b,label\n".encode() + "1,2,sí\n".encode("latin-1") * 40, [],
     "is not UTF-8 text"),
    ("one row", "row.csv", "a,b,label\n1,2,yes\n", [], "too few rows (1)"),
    ("unsupported file type", "data.xlsx", b"PK\x03\x04", [], "unsupported file type .xlsx"),
]


@pytest.mark.parametrize("case, name, contents, extra, message", BROKEN_INPUTS,
                         ids=[b[0] for b in BROKEN_INPUTS])
def test_broken_training_data_is_one_line_and_writes_nothing(tmp_path, capsys, case, name, contents,
                                                             extra, message):
    path = tmp_path / (name or "missing.csv")
    if name and contents is None:
        path.mkdir()
    elif contents is not None:
        write(path, contents)
    models = tmp_path / "models"
    code = main(["--data", str(path), "--target", "label", "--models-dir", str(models),
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not models.exists()


def test_degenerate_but_valid_data_trains(tmp_path, capsys):
    """A constant feature (left out), a class with two rows, a last batch of one row."""
    rows = ["a,const,label"] + [f"{i},5,{'yes' if i % 2 else 'no'}" for i in range(120)]
    rows += [f"{1000 + i},5,rare" for i in range(2)]
    path = write(tmp_path / "odd.csv", "\n".join(rows) + "\n")
    models = tmp_path / "models"
    assert main(["--data", str(path), "--target", "label", "--models-dir", str(models), "--epochs", "3",
                 "--batch-size", "83", "--no-progress", "--no-store", "--normalizer", "standard",
                 "--folds", "1"]) == 0
    card = json.loads(next(models.rglob("card.json")).read_text())
    assert card["feature_names"] == ["a"] and card["classes"] == ["no", "rare", "yes"]
    assert {"name": "const", "reason": "constant"} in card["left_out"]
    assert card["rows"]["train"] % 83 == 1 and not card["stratified"]  # 84 = 83 + a batch of 1
    err = capsys.readouterr().err
    assert "not stratified" in err and "left out constant column(s) const" in err


def test_an_ensemble_exports_the_average_of_its_members(tmp_path, csv_path):
    import numpy as np
    import onnxruntime as ort
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", ensemble=2, store=False))
    members = result.trained.net.members
    assert len(members) == 2 and [m["seed"] for m in result.card["training"]["members"]] == [0, 1]
    X = result.data.split.X_test.astype(np.float32)
    with torch.no_grad():
        logits = [m.eval()(torch.from_numpy(X)) for m in members]
        expected = torch.softmax((logits[0] + logits[1]) / 2, -1).numpy()
    assert not torch.allclose(logits[0], logits[1])  # two different networks
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    np.testing.assert_allclose(session.run(["probabilities"], {"features": X})[0], expected, atol=1e-5)


def test_refit_trains_on_training_and_validation_rows_for_the_best_epoch_count(tmp_path, csv_path):
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", epochs=12, patience=4,
                              refit=True, store=False))
    t = result.card["training"]
    assert t["refit"]["rows"] == result.card["rows"]["train"] + result.card["rows"]["validation"]
    assert "not held out" in t["refit"]["note"] and t["members"][0]["best_epoch"] == t["best_epoch"]
    assert result.card["metrics"]["test"]["accuracy"] > 0.85
    plain = run(quick_config(tmp_path, data=str(csv_path), target="label", epochs=12, patience=4,
                             store=False))
    assert plain.card["training"]["best_epoch"] == t["best_epoch"]  # the same first training
    weights = "body.0.weight"  # the first Linear layer: trained again, on more rows
    assert not torch.equal(plain.trained.net.state_dict()[weights], result.trained.net.state_dict()[weights])
    with pytest.raises(ConfigError, match="--refit needs an in-memory run"):
        quick_config(tmp_path, data=str(csv_path), target="label", refit=True, stream=True)


def test_early_stopping_can_watch_the_validation_loss(tmp_path, csv_path):
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", epochs=20, patience=5,
                              stop_on="loss", lr=0.05, store=False))
    history = result.card["history"]
    best = min(history, key=lambda h: h["val_loss"])
    assert result.card["training"]["best_epoch"] == best["epoch"]
    assert result.card["metrics"]["validation"]["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_label_smoothing_keeps_the_training_loss_above_zero_on_confident_answers():
    logits, y = torch.tensor([[20.0, -20.0]]), torch.tensor([0])
    assert float(engine.loss_fn("classification")(logits, y)) < 1e-6
    assert float(engine.loss_fn("classification", label_smoothing=0.1)(logits, y)) > 0.1


def test_linear_skip_adds_a_linear_model_beside_the_network(tmp_path, csv_path):
    import numpy as np
    import onnxruntime as ort
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", linear_skip=True,
                              store=False))
    net = result.trained.net.eval()
    X = torch.from_numpy(result.data.split.X_test.astype(np.float32))
    with torch.no_grad():
        z = net.inputs(net.normalize(X))
        np.testing.assert_allclose(net(X).numpy(), (net.body(z) + net.skip(z)).numpy(), atol=1e-6)
        expected = torch.softmax(net(X), -1).numpy()
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    np.testing.assert_allclose(session.run(["probabilities"], {"features": X.numpy()})[0], expected,
                               atol=1e-5)


def test_folds_bag_networks_each_stopped_early_on_its_own_fold(tmp_path, csv_path):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from training.dataset import pooled
    from training.ensemble import fold_data
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", folds=3, epochs=10,
                              patience=3, normalizer="standard", store=False))
    split, data = result.data.split, result.data
    rows = pooled(split)
    # No test split by default: every row is in a fold, and the normalizer is fitted on them all.
    assert len(split.y_test) == 0 and len(rows.y_train) == 400 and "test" not in result.card["metrics"]
    np.testing.assert_allclose(result.card["normalization"]["mean"], rows.X_train.mean(axis=0), rtol=1e-6)
    folds = fold_data(data, 3, 0)
    held = np.concatenate([f.split.X_val for f in folds])
    assert len(held) == len(rows.X_train) and len(np.unique(held, axis=0)) == len(np.unique(rows.X_train, axis=0))
    for f in folds:  # a fold's validation rows are not among its training rows
        train_rows = {r.tobytes() for r in f.split.X_train}
        assert not any(r.tobytes() in train_rows for r in f.split.X_val)
    members, t = result.trained.net.members, result.card["training"]
    assert [m["fold"] for m in t["members"]] == [1, 2, 3] and len(members) == 3
    cv = t["cross_validation"]
    expected = sum(m["validation"]["accuracy"] * m["validation_rows"] for m in t["members"]) / len(held)
    assert cv["folds"] == 3 and cv["metrics"]["accuracy"] == pytest.approx(expected)
    X = rows.X_train.astype(np.float32)
    with torch.no_grad():
        mean_logits = torch.stack([m.eval()(torch.from_numpy(X)) for m in members]).mean(0)
    session = ort.InferenceSession(str(result.model_dir / "model.onnx"))
    np.testing.assert_allclose(session.run(["probabilities"], {"features": X})[0],
                               torch.softmax(mean_logits, -1).numpy(), atol=1e-5)
    assert cv["metrics"]["accuracy"] > 0.85 and result.card["parity"]["split"] == "validation"
    from training.report import summary
    result.card["timings"] = {}
    assert "3 folds of 400 rows / no test split" in summary(result.card, result.model_dir, None)
    ops = [n.op_type for n in onnx.load(str(result.model_dir / "model.onnx")).graph.node]
    assert ops.count("Sub") == ops.count("Div") == 1  # the inputs normalized once, not per network


def test_folds_default_to_five_for_in_memory_tables_only(tmp_path, csv_path):
    from training.config import AUTO_FOLDS_MAX_ROWS as most
    table = dict(data=str(csv_path), target="label")
    assert load_config([]).folds_for(most) == 5 and load_config([]).folds_for(most + 1) == 1
    # With folds no test split, unless asked for; one network keeps 15% of the rows for its test.
    assert load_config([]).test_share(5) == 0 and load_config([]).test_share(1) == 0.15
    assert load_config(["--test-size", "0.2"]).test_share(5) == 0.2
    assert load_config(["--data", "t.csv", "--target", "y"]).folds_for(100) == 5
    for one in (["--dataset", "digits-images"], ["--images", "x"], ["--ensemble", "3"], ["--refit"],
                ["--data", "t.csv", "--target", "y", "--stream"], ["--resume"]):
        assert load_config(one).folds_for(100) == 1, one
    assert load_config(["--folds", "3"]).folds_for(most + 1) == 3
    for bad, message in [({"folds": 0}, "at least 1"), ({"folds": 3, "ensemble": 2}, "without --ensemble"),
                         ({"folds": 3, "refit": True}, "without --ensemble, --refit")]:
        with pytest.raises(ConfigError, match=message):
            quick_config(tmp_path, **table, **bad)
    with pytest.raises(SystemExit):
        load_config(["--folds", "2.5"])


def test_the_linear_candidate_the_blend_or_the_networks_whichever_cross_validates_best(tmp_path):
    import numpy as np
    import pandas as pd
    from training.ensemble import Ensemble
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    frame = pd.DataFrame(X, columns=list("abcd")).assign(y=X @ [3.0, -2.0, 1.0, 0.5] + rng.normal(0, 0.1, 300))
    path = tmp_path / "linear.csv"
    frame.to_csv(path, index=False)
    table = dict(data=str(path), target="y", task="regression", folds=3, epochs=60, patience=10,
                 normalizer="standard", embedding="none", store=False)  # auto: test_embedding.py
    result = run(quick_config(tmp_path, **table))
    cv = result.card["training"]["cross_validation"]
    candidates = cv["candidates"]
    assert set(candidates) == {"network", "network + linear", "linear"}
    assert cv["metrics"] == candidates[cv["chosen"]]
    assert all(candidates[cv["chosen"]]["rmse"] <= c["rmse"] for c in candidates.values())
    # A linear table with little noise: the linear models, alone, cross-validate best.
    assert cv["chosen"] == "linear" and candidates["linear"]["rmse"] < candidates["network + linear"]["rmse"]
    linear = result.trained.net  # the linear bag alone; the export's parity held
    assert isinstance(linear, Ensemble) and len(linear.members) == 3
    assert all([type(m) for m in member.body] == [nn.Linear] for member in linear.members)
    assert cv["metrics"]["r2"] > 0.99
    alone = run(quick_config(tmp_path, **table, linear_candidate=False, test_size=0.15))
    assert "candidates" not in alone.card["training"]["cross_validation"]
    assert alone.card["rows"]["test"] == 45 and alone.card["parity"]["split"] == "test"
    assert alone.card["metrics"]["test"]["r2"] > 0.99
    assert len(alone.trained.net.members) == 3


def test_the_blend_is_exported_where_it_cross_validates_best(tmp_path):
    import numpy as np
    import pandas as pd
    from training.ensemble import Ensemble
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 4))
    y = X @ [3.0, -2.0, 1.0, 0.5] + 0.5 * np.abs(X[:, 1]) + rng.normal(0, 0.5, 300)  # mostly linear
    path = tmp_path / "bent.csv"
    pd.DataFrame(X, columns=list("abcd")).assign(y=y).to_csv(path, index=False)
    cfg = quick_config(tmp_path, data=str(path), target="y", task="regression", folds=3, epochs=60,
                       patience=10, normalizer="standard", embedding="none", store=False)  # (a table made for it)
    result = run(cfg)
    cv = result.card["training"]["cross_validation"]
    assert cv["chosen"] == "network + linear" and cv["metrics"] == cv["candidates"]["network + linear"]
    assert cv["metrics"]["rmse"] < min(cv["candidates"]["network"]["rmse"], cv["candidates"]["linear"]["rmse"])
    networks, linear = result.trained.net.members  # two bags, averaged; the export's parity held
    assert isinstance(networks, Ensemble) and isinstance(linear, Ensemble) and len(linear.members) == 3
    assert all([type(m) for m in member.body] == [nn.Linear] for member in linear.members)
    members = result.card["training"]["members"]
    assert len(members) == 6 and [m.get("linear", False) for m in members] == [False] * 3 + [True] * 3
    # The exported networks are at their best epochs in the blend: fold by fold, each averaged
    # with its linear model scores its fold as recorded.
    from training import engine
    from training.ensemble import fold_data
    for i, fold in enumerate(fold_data(result.data, 3, cfg.seed)):
        pair = Ensemble([networks.members[i], linear.members[i]])
        scored = engine.evaluate(pair, *engine.tensors(fold, "validation", "cpu"), "regression",
                                 fold.y_mean, fold.y_scale)
        assert members[i]["validation_in"] == "the blend"
        assert scored == pytest.approx(members[i]["validation"], rel=1e-5)


def test_an_empty_hidden_list_trains_a_linear_model(tmp_path, csv_path):
    assert load_config(["--hidden", ""]).hidden == []
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", hidden=[], store=False))
    assert [type(m) for m in result.trained.net.body] == [nn.Linear]
    assert result.card["metrics"]["test"]["accuracy"] > 0.8


def test_more_folds_than_the_rows_allow_is_a_one_line_error(tmp_path, csv_path):
    from training.rules import DataError
    with pytest.raises(DataError, match="--folds 401: 400 training [+] validation rows cannot make 401 folds"):
        run(quick_config(tmp_path, data=str(csv_path), target="label", folds=401, store=False))
    with pytest.raises(SystemExit):
        load_config(["--folds", "inf"])


def test_fold_repeats_cut_the_rows_anew_and_bag_every_network(tmp_path, csv_path):
    import numpy as np
    from training.dataset import pooled
    from training.ensemble import fold_data
    result = run(quick_config(tmp_path, data=str(csv_path), target="label", folds=3, fold_repeats=2,
                              epochs=4, linear_candidate=False, normalizer="standard", store=False))
    assert len(result.card["training"]["members"]) == len(result.trained.net.members) == 6
    cv = result.card["training"]["cross_validation"]
    assert (cv["folds"], cv["repeats"]) == (3, 2) and result.card["metrics"]["cross_validation"] == cv["metrics"]
    assert [(m["repeat"], m["fold"]) for m in result.card["training"]["members"]][2:4] == [(1, 3), (2, 1)]
    from training.report import split_line
    assert split_line(result.card["rows"], cv).startswith("3 folds x 2 of 400 rows / no test split")
    assert split_line({"train": 300, "validation": 100, "test": 0}, None) == "train 300 / validation 100 / no test split"
    folds = fold_data(result.data, 3, 0, repeats=2)
    every_row = np.unique(pooled(result.data.split).X_train, axis=0)
    for r in (0, 1):  # each repeat's folds hold every row once
        held = np.concatenate([f.split.X_val for f in folds[r * 3:r * 3 + 3]])
        assert len(held) == 400 and np.array_equal(np.unique(held, axis=0), every_row)
    assert not np.array_equal(folds[0].split.X_val, folds[3].split.X_val)  # cut anew
    with pytest.raises(ConfigError, match="--fold-repeats must be at least 1"):
        quick_config(tmp_path, fold_repeats=0)
