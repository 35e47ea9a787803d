"""`python -m training.fit`: train a normalized BatchNorm network on a table and export it to ONNX.

Everything but argument parsing is importable: tests call `run(config)` directly.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import platform
import secrets
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from training import drift, engine, stream
from training.config import RUN_DEFINING, Config, ConfigError, load_config
from training.data import DataError, Split, Table, load_table, split_table
from training.distributed import World
from training.contract import INPUTS, OUTPUTS, SCHEMA_VERSION
from training.export import (ExportError, check_parity, export_onnx, save_to_bentoml, set_metadata,
                             write_artifacts)
from training.model import ConvNet, TabularNet, fit_channel_stats, fit_normalizer, serving_model
from training import preprocess


@dataclass
class Result:
    model_dir: Path
    tag: str | None
    card: dict
    net: TabularNet | ConvNet  # the trained network (best weights, eval mode, on the CPU)
    split: Split
    table: Table
    preprocessor: object | None = None  # mixed tables: the fitted scikit-learn pipeline


def new_version() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def library_versions() -> dict[str, str]:
    import onnx
    import sklearn
    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def checkpoint_path(cfg: Config) -> Path:
    return Path(cfg.models_dir) / cfg.model_name / "checkpoint.pt"


def _resume_state(cfg: Config, world_size: int) -> dict:
    path = checkpoint_path(cfg)
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint at {path}; start the run without --resume")
    try:
        state = engine.load_checkpoint(path)
    except Exception as e:
        raise ConfigError(f"--resume: cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None
    saved, now = state["config"], cfg.to_dict()
    if changed := [k for k in RUN_DEFINING if saved.get(k) != now.get(k)]:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in changed)
        raise ConfigError(f"--resume: checkpoint {path} was made with a different config: {diffs}")
    if state.get("world_size", 1) != world_size:
        raise ConfigError(f"--resume: checkpoint {path} was made by {state.get('world_size', 1)} "
                          f"process(es), this run has {world_size}")
    return state


@dataclass
class Trained:
    """A trained network (best weights restored, eval mode, on the CPU) and what produced it."""
    net: TabularNet | ConvNet
    table: Table
    split: Split
    rows: dict[str, int]              # rows per split (a streamed split holds samples of them)
    tensors: dict[str, torch.Tensor]  # the splits as the network takes them (targets standardized)
    mean: np.ndarray                  # input normalization, from the training split
    scale: np.ndarray
    y_mean: float                     # regression target standardization (0, 1 for classification)
    y_scale: float
    preprocessor: object | None       # mixed tables: the fitted scikit-learn pipeline
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    seconds: float
    device: torch.device
    version: str
    resumed: bool
    distributed: dict | None = None   # under torchrun: world size, backend, batch per rank


def build_network(cfg: Config, table: Table, n_inputs: int, mean, scale) -> TabularNet | ConvNet:
    n_out = len(table.classes) if table.task == "classification" else 1
    if table.modality == "image":
        return ConvNet(table.X.shape[1], n_out, cfg.channels, cfg.batchnorm, cfg.dropout, mean, scale,
                       cfg.augment)
    return TabularNet(n_inputs, n_out, cfg.hidden, cfg.batchnorm, cfg.dropout, mean, scale)


@dataclass
class Data:
    """The data as the training loop takes it, with its statistics from the training split."""
    table: Table                 # streamed: the description only, no rows
    split: Split                 # streamed: a uniform sample of each split (rank 0; empty elsewhere)
    rows: dict[str, int]
    inputs: list                 # train, validation, test inputs as the network takes them
    mean: np.ndarray
    scale: np.ndarray
    y_mean: float
    y_scale: float
    preprocessor: object | None = None
    scan: stream.Scan | None = None


def load_data(cfg: Config, table: Table | None, world: World) -> Data:
    """Load, split and fit the normalization, once (on rank 0 under torchrun)."""
    if cfg.stream:
        s = world.share(lambda: stream.scan(cfg, world.size),
                        public=lambda s: dataclasses.replace(s, split=None))
        n = len(s.features)
        table = Table(np.empty((0, n)), np.empty(0), s.features, s.task, s.classes, cfg.data,
                      s.dropped_rows)
        split = s.split or Split(*[np.empty((0, n)), np.empty(0, np.int64)] * 3, stratified=False)
        return Data(table, split, s.rows, [split.X_train, split.X_val, split.X_test], s.mean, s.scale,
                    s.y_mean, s.y_scale, scan=s)

    table = table or load_table(cfg)
    split = split_table(table, cfg.val_size, cfg.test_size, cfg.seed)
    rows = {"train": len(split.y_train), "validation": len(split.y_val), "test": len(split.y_test)}
    inputs = [split.X_train, split.X_val, split.X_test]
    y_mean, y_scale = 0.0, 1.0
    if table.task == "regression":  # targets are learned standardized, exported in their units
        y_mean, y_scale = float(split.y_train.mean()), float(split.y_train.std()) or 1.0
    if table.modality == "mixed":  # the scikit-learn pipeline imputes, standardizes and encodes
        preprocessor = world.share(
            lambda: preprocess.fit_preprocessor(split.X_train, table.columns, cfg.normalize))
        inputs = [preprocess.transform(preprocessor, frame) for frame in inputs]
        width = inputs[0].shape[1]
        return Data(table, split, rows, inputs, np.zeros(width), np.ones(width), y_mean, y_scale,
                    preprocessor)
    fit = fit_channel_stats if table.modality == "image" else fit_normalizer
    mean, scale = world.share(lambda: fit(split.X_train, cfg.normalize))
    return Data(table, split, rows, inputs, mean, scale, y_mean, y_scale)


def train(cfg: Config, table: Table | None = None, checkpoints: bool = True) -> Trained | None:
    """Load and split the data (unless given), fit the normalization on the training split,
    train with early stopping and restore the best epoch's weights. Under torchrun every rank
    trains its shard; rank 0 gets the result, the other ranks None."""
    world = World.start(cfg.device)
    try:
        return _train(cfg, table, checkpoints, world)
    finally:
        world.close()


def _train(cfg: Config, table: Table | None, checkpoints: bool, world: World) -> Trained | None:
    device = world.device
    if cfg.batch_size < 2 * world.size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch: it needs at least 2 "
                          f"rows for each of the {world.size} ranks (BatchNorm)")
    batch_size = cfg.batch_size // world.size  # per rank; the global batch is the same as one process's
    state = _resume_state(cfg, world.size) if cfg.resume else None
    version = state["version"] if state else world.share(new_version)
    data = load_data(cfg, table, world)
    table, task = data.table, data.table.task
    classification = task == "classification"

    torch.manual_seed(cfg.seed)
    net = build_network(cfg, table, data.inputs[0].shape[1], data.mean, data.scale).to(device)
    model = world.wrap(net)  # DistributedDataParallel under torchrun; the network itself otherwise
    core = model.module if world.size > 1 else model
    if world.size > 1:
        torch.manual_seed(cfg.seed + world.rank)  # each rank its own dropout and augmentation
    y_mean, y_scale = data.y_mean, data.y_scale
    scale_y = (lambda y: y) if classification else (lambda y: (y - y_mean) / y_scale)
    split = data.split
    X_train, y_train, X_val, y_val, X_test, y_test = engine.to_device(
        [data.inputs[0], scale_y(split.y_train), data.inputs[1], scale_y(split.y_val),
         data.inputs[2], scale_y(split.y_test)], device,
        [torch.uint8 if table.modality == "image" else torch.float32,
         torch.int64 if classification else torch.float32] * 3)

    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.stream:  # every rank takes as many steps as the smallest shard allows
        steps = min(engine.steps_per_epoch(n, batch_size) for n in data.scan.rows_per_rank)
        batches = lambda epoch: stream.train_batches(  # noqa: E731
            cfg, data.scan, world.rank, world.size, epoch, batch_size, steps, device)
    elif world.size > 1:  # DistributedSampler pads the shards to one length
        steps = engine.steps_per_epoch(math.ceil(len(X_train) / world.size), batch_size)
        batches = lambda epoch: engine.shuffled_batches(  # noqa: E731
            X_train, y_train, batch_size, order=world.sampler_order(len(X_train), cfg.seed, epoch))
    else:
        steps = engine.steps_per_epoch(len(X_train), batch_size)
        batches = lambda epoch: engine.shuffled_batches(X_train, y_train, batch_size, generator)  # noqa: E731
    if steps == 0:
        raise DataError("too few training rows for one batch on every rank")

    optimizer = engine.make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay,
                                      cfg.momentum)
    metric, higher = engine.monitor(task)
    schedule = engine.LRSchedule(cfg.scheduler, optimizer, cfg.lr, cfg.epochs, steps, cfg.patience,
                                 higher)
    history: list[dict] = []
    best, best_state, best_epoch, start_epoch, elapsed_before = None, None, 0, 0, 0.0
    if state:
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best, best_epoch = state["history"], state["best"], state["best_epoch"]
        best_state, start_epoch, elapsed_before = state["best_state"], state["epoch"], state["elapsed"]

    ckpt = checkpoint_path(cfg)
    checkpoints = checkpoints and world.main  # rank 0 writes; every rank can resume from it
    if checkpoints:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    train_started = time.perf_counter()
    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"train {cfg.model_name}", unit="epoch",
               initial=start_epoch, total=cfg.epochs, disable=not (cfg.progress and world.main),
               file=sys.stderr)
    stopped_early = False
    for epoch in bar:
        lr = optimizer.param_groups[0]["lr"]
        train_loss = world.mean(*engine.train_one_epoch(model, batches(epoch), task, optimizer,
                                                        schedule))
        # Rank 0 evaluates and every rank follows its verdict, so all stop at the same epoch.
        val = world.share(lambda: engine.evaluate(core, X_val, y_val, task, y_mean, y_scale))
        schedule.after_epoch(val[metric])
        elapsed = elapsed_before + time.perf_counter() - train_started
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
                        f"val_{metric}": val[metric], "lr": lr, "seconds": round(elapsed, 4)})
        if engine.is_better(val, best, task):
            best, best_epoch = val, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
        bar.set_postfix(loss=f"{train_loss:.4f}", **{f"val_{metric}": f"{val[metric]:.4f}"},
                        lr=f"{lr:.2e}")
        stopped_early = bool(cfg.patience and epoch + 1 - best_epoch >= cfg.patience)
        if checkpoints:
            engine.save_checkpoint(ckpt, {
                "config": cfg.to_dict(), "world_size": world.size, "version": version,
                "epoch": epoch + 1, "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history, "best": best,
                "best_epoch": best_epoch, "best_state": best_state, "elapsed": elapsed})
        if stopped_early:
            break
    bar.close()
    if not world.main:
        return None

    # A plain network (BatchNorm, not SyncBatchNorm; no DDP wrapper) with the best weights.
    final = build_network(cfg, table, data.inputs[0].shape[1], data.mean, data.scale)
    final.load_state_dict(best_state)
    tensors = dict(zip(["X_train", "y_train", "X_val", "y_val", "X_test", "y_test"],
                       (t.cpu() for t in (X_train, y_train, X_val, y_val, X_test, y_test))))
    return Trained(final.eval(), table, split, data.rows, tensors, data.mean, data.scale, y_mean,
                   y_scale, data.preprocessor, history, best_epoch, stopped_early,
                   elapsed_before + time.perf_counter() - train_started, device, version,
                   bool(state), world.describe(batch_size))


def evaluate_splits(t: Trained) -> dict[str, dict[str, float]]:
    return {name: engine.evaluate(t.net, t.tensors[f"X_{key}"], t.tensors[f"y_{key}"], t.table.task,
                                  t.y_mean, t.y_scale)
            for name, key in (("train", "train"), ("validation", "val"), ("test", "test"))}


def model_metadata(cfg: Config, t: Trained, metrics: dict) -> dict:
    """What the ONNX file says about itself (training/contract.py)."""
    table, image = t.table, t.table.modality == "image"
    spread = "std" if image else "scale"
    columns = preprocess.describe(t.preprocessor, table.columns) if t.preprocessor else None
    return {
        "schema_version": SCHEMA_VERSION, "name": cfg.model_name, "version": t.version,
        "model": f"{cfg.model_name}:{t.version}", "task": table.task, "modality": table.modality,
        "input": INPUTS[table.modality], "outputs": OUTPUTS[table.task],
        "feature_names": table.feature_names, "classes": table.classes,
        "image": {"channels": int(table.X.shape[1]), "height": int(table.X.shape[2]),
                  "width": int(table.X.shape[3]), "resize": table.resize} if image else None,
        "columns": columns,
        "normalization": ({"enabled": cfg.normalize, "per_column": "see columns: numeric -> training "
                           "median for missing values, then (x - mean) / scale; categorical -> "
                           "one-hot over the training categories, unseen -> all zeros"}
                          if columns else
                          {"enabled": cfg.normalize, "mean": t.mean.tolist(), spread: t.scale.tolist(),
                           **({"pixel_scale": "1/255, then (x - mean) / std"} if image else {})}),
        "target_normalization": (None if table.task == "classification"
                                 else {"mean": t.y_mean, "scale": t.y_scale}),
        "metrics": metrics,
        # What the service compares live inputs with (training/drift.py): the raw training split,
        # or, streamed, its uniform sample.
        "drift": drift.profile(t.split.X_train, table.modality, table.feature_names, table.columns),
        "versions": library_versions(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run(cfg: Config) -> Result | None:
    """Load, split, normalize, train, evaluate, export and save. Raises DataError, ConfigError or
    ExportError with a one-line message; on any error nothing is written to models/<name>/<version>.
    Under torchrun, rank 0 exports and returns the result; the other ranks return None."""
    started = time.perf_counter()
    t = train(cfg)
    if t is None:
        return None
    task, metrics = t.table.task, evaluate_splits(t)
    head = serving_model(t.net, task, t.y_mean, t.y_scale)
    metadata = model_metadata(cfg, t, metrics)
    X_test = t.tensors["X_test"].numpy()
    if t.preprocessor is not None:  # one graph: the scikit-learn pipeline, then the network
        net_proto = export_onnx(head, t.tensors["X_test"][:1], "features", task)
        proto = preprocess.join(preprocess.export_preprocessor(
            t.preprocessor, t.table.columns, like=net_proto, output="preprocessed"),
            net_proto, "features")
        frame, columns = t.split.X_test, t.table.columns
        feeds = lambda rows: preprocess.column_feeds(frame.iloc[rows], columns)  # noqa: E731
    else:
        proto = export_onnx(head, t.tensors["X_test"][:1], metadata["input"], task)
        feeds = lambda rows: {metadata["input"]: X_test[rows]}  # noqa: E731
    set_metadata(proto, metadata)
    parity = check_parity(proto, head, X_test, feeds, task)

    split = t.split
    card = {**metadata, "source": t.table.source, "rows": t.rows,
            "dropped_rows_missing_target": t.table.dropped_rows, "stratified": split.stratified,
            "training": {"epochs_run": len(t.history), "best_epoch": t.best_epoch,
                         "stopped_early": t.stopped_early, "seconds": round(t.seconds, 3),
                         "device": str(t.device), "resumed": t.resumed,
                         "distributed": t.distributed,
                         "streamed": {"metrics_on_sample_rows": {
                             "train": len(split.y_train), "validation": len(split.y_val),
                             "test": len(split.y_test)}} if cfg.stream else None},
            "parity": parity, "config": cfg.to_dict(), "history": t.history}
    out_dir = Path(cfg.models_dir) / cfg.model_name / t.version
    card = write_artifacts(out_dir, proto, card, yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                           t.history, engine.monitor(task)[0])
    tag = save_to_bentoml(out_dir, cfg.model_name, t.version, task) if cfg.store else None
    checkpoint_path(cfg).unlink(missing_ok=True)  # the run is complete; nothing is left to resume
    card["total_seconds"] = round(time.perf_counter() - started, 2)
    return Result(out_dir, tag, card, t.net, split, t.table, t.preprocessor)


def summary(result: Result) -> str:
    """The table printed at the end of a run."""
    c = result.card
    metric = engine.monitor(c["task"])[0]
    t = c["training"]
    what = (f"{len(c['classes'])} classes" if c["classes"] else "regression")
    inputs = (f"{c['image']['channels']}x{c['image']['height']}x{c['image']['width']} images"
              if c["image"] else f"{len(c['feature_names'])} features")
    rows = [
        ("data", f"{c['source']}  ({sum(c['rows'].values())} rows, {inputs}, {c['task']}, {what})"),
        ("split", f"train {c['rows']['train']} / validation {c['rows']['validation']} / "
                  f"test {c['rows']['test']}"),
        ("epochs", f"{t['epochs_run']} (best {t['best_epoch']}"
                   f"{', stopped early' if t['stopped_early'] else ''})"),
        ("time", f"{t['seconds']:.1f} s training, {c['total_seconds']:.1f} s in all, on {t['device']}"),
    ]
    if d := t.get("distributed"):
        rows.append(("processes", f"{d['world_size']} ranks ({d['backend']}), {d['batch_per_rank']} "
                                  "rows per rank per step"))
    if streamed := t.get("streamed"):
        rows.append(("streamed", "metrics on uniform samples of "
                     + " / ".join(map(str, streamed["metrics_on_sample_rows"].values())) + " rows"))
    extra = ["mae", "r2"] if metric == "rmse" else []
    for split_name in ("validation", "test"):
        m = c["metrics"][split_name]
        rows.append((f"{split_name} {metric}", f"{m[metric]:.4f}"
                     + "".join(f"   {k} {m[k]:.4f}" for k in extra) + f"   loss {m['loss']:.4f}"))
    rows += [("onnx parity", f"max |onnx - torch| = {c['parity']['max_abs_diff']:.2e} "
                             f"over {c['parity']['rows']} test inputs"),
             ("model", str(result.model_dir)),
             ("bentoml tag", result.tag or "(not saved: --no-store)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


MAIN_RANK = os.environ.get("RANK", "0") == "0"  # torchrun sets RANK; one process is rank 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            result = run(cfg)
        for w in caught:
            if w.filename.endswith("data.py") and MAIN_RANK:  # ours; library chatter stays quiet
                print(f"note: {w.message}", file=sys.stderr)
    except (DataError, ConfigError, ExportError) as e:
        if MAIN_RANK:  # under torchrun every rank has the same error
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    if result is not None:
        print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
