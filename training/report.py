"""What a run says about its model: the metadata inside the ONNX file, the card beside it, and the
summary printed at the end.
"""
from __future__ import annotations

import datetime as dt
import platform

import numpy as np

from training import drift
from training.contract import INPUTS, OUTPUTS, SCHEMA_VERSION
from training.engine import monitor
from training.layers import PiecewiseEncoding


def library_versions() -> dict[str, str]:
    import onnx
    import sklearn
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "scikit-learn": sklearn.__version__, "numpy": np.__version__}


def model_metadata(cfg, data, trained, metrics: dict) -> dict:
    """What the ONNX file says about itself (training/contract.py)."""
    table = data.table
    image = table.modality == "image"
    normalization = data.normalizer.metadata()
    if not any(isinstance(m, PiecewiseEncoding) for m in trained.net.modules()):
        normalization["normalization"].pop("embedding", None)  # --embedding auto chose the plain networks
    return {
        "schema_version": SCHEMA_VERSION, "name": cfg.model_name, "version": trained.version,
        "model": f"{cfg.model_name}:{trained.version}", "task": table.task, "modality": table.modality,
        "input": INPUTS[table.modality], "outputs": OUTPUTS[table.task],
        "feature_names": table.feature_names, "classes": table.classes,
        "image": {"channels": int(table.X.shape[1]), "height": int(table.X.shape[2]),
                  "width": int(table.X.shape[3]), "resize": table.resize,
                  **({"fit": "crop"} if table.resize else {})} if image else None,
        "columns": None,
        **normalization,  # "normalization", and for mixed tables "columns"
        # The file's columns the model does not take, and why: a request may carry them.
        "left_out": table.left_out,
        "target_normalization": (None if table.task == "classification"
                                 else {"mean": data.y_mean, "scale": data.y_scale}),
        "metrics": metrics,
        # What the service compares live inputs with (training/drift.py): the raw training split,
        # or, streamed, its uniform sample.
        "drift": drift.profile(data.split.X_train, table.modality, table.feature_names, table.columns),
        "versions": library_versions(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def card(cfg, data, trained, metadata: dict, parity: dict) -> dict:
    """The card written beside model.onnx: the metadata, plus how the model was made."""
    split, progress = data.split, trained.progress
    streamed = {"metrics_on_sample_rows": {"train": len(split.y_train), "validation": len(split.y_val),
                                           "test": len(split.y_test)}} if cfg.stream else None
    return {**metadata, "source": data.table.source, "rows": data.rows,
            "dropped_rows_missing_target": data.table.dropped_rows, "stratified": split.stratified,
            "training": {"epochs_run": len(progress.history), "best_epoch": progress.best_epoch,
                         "stopped_early": trained.stopped_early, "seconds": round(progress.elapsed, 3),
                         "device": trained.device, "resumed": trained.resumed, "lr": progress.lr,
                         "lr_find": progress.lr_sweep, "members": trained.members,
                         "refit": ({"note": "trained again on training + validation rows: the "
                                    "validation metrics are not held out", "rows":
                                    data.rows["train"] + data.rows["validation"]}
                                   if trained.refit else None),
                         "cross_validation": trained.cross_validation,
                         "distributed": trained.distributed, "streamed": streamed},
            "parity": parity, "config": cfg.to_dict(), "history": progress.history}


def plots(data, trained) -> dict:
    """The PNGs written beside the model: file name -> a function that draws into a path."""
    from training import lr_finder
    from training.export import plot_curves
    history, metric = trained.progress.history, monitor(data.table.task)[0]
    drawn = {"curves.png": lambda path: plot_curves(history, metric, path)}
    if sweep := trained.progress.lr_sweep:
        drawn["lr_find.png"] = lambda path: lr_finder.plot(sweep, path)
    return drawn


def split_line(rows: dict, cross_validation: dict | None) -> str:
    """How the rows were used: a train/validation/test split, or folds (and a test split or none)."""
    test = f"test {rows['test']}" if rows["test"] else "no test split"
    if cross_validation:
        held = "" if rows["test"] else " (the cross-validated metric is held out)"
        repeats = f" x {cross_validation['repeats']}" if cross_validation.get("repeats", 1) > 1 else ""
        return (f"{cross_validation['folds']} folds{repeats} of {rows['train'] + rows['validation']} "
                f"rows / {test}{held}")
    return f"train {rows['train']} / validation {rows['validation']} / {test}"


def summary(card: dict, model_dir, tag: str | None) -> str:
    """The table printed at the end of a run."""
    c, t = card, card["training"]
    metric = monitor(c["task"])[0]
    what = (f"{len(c['classes'])} classes" if c["classes"] else "regression")
    inputs = (f"{c['image']['channels']}x{c['image']['height']}x{c['image']['width']} images"
              if c["image"] else f"{len(c['feature_names'])} features")
    rows = [
        ("data", f"{c['source']}  ({sum(c['rows'].values())} rows, {inputs}, {c['task']}, {what})"),
        ("split", split_line(c["rows"], t.get("cross_validation"))),
        ("epochs", f"{t['epochs_run']} (best {t['best_epoch']}"
                   f"{', stopped early' if t['stopped_early'] else ''})"),
        ("learning rate", f"{t['lr']:.3g}" + (f" (--lr auto: {t['lr_find']['rule']} of a range test "
                                              f"over {t['lr_find']['steps']} steps, lr_find.png)"
                                              if t.get("lr_find") else "")),
        ("time", f"{t['seconds']:.1f} s training, {sum(c['timings'].values()):.1f} s in all, "
                 f"on {t['device']}"),
        ("time split", ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in c["timings"].items())),
    ]
    if members := t.get("members"):
        rows.append(("networks", f"{len(members)} averaged (best epochs "
                     + ", ".join(str(m["best_epoch"]) for m in members) + ")"
                     + (", refitted on training + validation rows" if t.get("refit") else "")
                     + (", one per fold" if t.get("cross_validation") else "")))
    if cv := t.get("cross_validation"):
        m = cv["metrics"]
        rows.append((f"cross-val. {metric}", f"{m[metric]:.4f}   loss {m['loss']:.4f}   (each network "
                     "on its own fold)"))
        if others := cv.get("candidates"):
            rows.append(("chosen", f"{cv['chosen']} (cross-val. {metric}: " + ", ".join(
                f"{name} {v[metric]:.4f}" for name, v in others.items()) + ")"))
        if e := cv.get("encoding"):
            rows.append(("encoding", f"{e['encoded']} over {e['plain']}: {e['gain']:+.4f} {metric} "
                         f"a fold (+ is better; standard error {e['se']:.4f}), so {cv['chosen']} "
                         "(the encoding has to gain more than one standard error)"))
    if d := t.get("distributed"):
        rows.append(("processes", f"{d['world_size']} ranks ({d['backend']}), {d['batch_per_rank']} "
                                  "rows per rank per step"))
    if streamed := t.get("streamed"):
        rows.append(("streamed", "metrics on uniform samples of "
                     + " / ".join(map(str, streamed["metrics_on_sample_rows"].values())) + " rows"))
    extra = ["mae", "r2"] if metric == "rmse" else []
    for split_name in [s for s in ("validation", "test") if s in c["metrics"]]:
        m = c["metrics"][split_name]
        seen = split_name == "validation" and (t.get("refit") or t.get("cross_validation"))
        rows.append((f"{split_name} {metric}", f"{m[metric]:.4f}"
                     + "".join(f"   {k} {m[k]:.4f}" for k in extra) + f"   loss {m['loss']:.4f}"
                     + ("   (trained on)" if seen else "")))
    rows += [("onnx parity", f"max |onnx - torch| = {c['parity']['max_abs_diff']:.2e} "
                             f"over {c['parity']['rows']} {c['parity']['split']} inputs"),
             ("model", str(model_dir)),
             ("bentoml tag", tag or "(not saved: --no-store)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
