"""`python -m training.compare`: the offline gate. Is a candidate model better than the champion on
the same labelled rows?

    python -m training.compare --champion loans:V1 --candidate loans:V2 --data labelled.csv --target y
    python -m training.compare ... --metric log_loss --tolerance 0.01
    python -m training.compare ... --promote --server http://127.0.0.1:3000   # then make it the default

Both exported graphs score the same raw rows the way the server does (service/rows.py: the
service's own checks and graph; a row a model cannot take is counted and reported, not fatal), on
the rows both could score. Printed: each model's metrics (accuracy, log loss, ROC AUC and macro F1
for classification; RMSE, MAE and R² for regression), the paired difference with a bootstrap
confidence interval (--bootstrap resamples of the rows, --confidence), and a verdict, MLflow's
model validation in spirit:

    primary   the metric training stops early on (accuracy, or RMSE), unless --metric names another
    promote   if the candidate's difference on it, in its favour, is at least --min-change (0), the
              interval's lower end is above -(--tolerance) (0.005 in the metric's units), and no
              other metric is worse by more than --secondary-margin (0.02)

so an equal candidate is promoted (no worse) and one worse by more than the tolerance is kept out.
Exit codes: 0 promote, 3 keep, 2 error (one line). --json PATH also writes the report as JSON.
Works for tables (CSV/Parquet, read as training reads them) and image folders (one sub-folder per
class).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXIT_PROMOTE, EXIT_KEEP, EXIT_ERROR = 0, 3, 2
# name -> (greater is better, needs probabilities)
METRICS = {"classification": {"accuracy": True, "log_loss": False, "roc_auc": True, "macro_f1": True},
           "regression": {"rmse": False, "mae": False, "r2": True}}
PRIMARY = {"classification": "accuracy", "regression": "rmse"}  # what training stops early on


class GateError(Exception):
    """The comparison cannot be made; the message says why in one line."""


@dataclass
class Model:
    tag: str
    scorer: object  # service.scoring.Scorer


def open_scorer(tag: str) -> Model:
    import bentoml

    from service.loading import ModelError, open_model
    from service.scoring import Scorer
    try:
        return Model(str(bentoml.models.get(tag).tag), Scorer(*open_model(tag, os.cpu_count() or 1), 10**9))
    except (bentoml.exceptions.NotFound, ValueError):
        raise GateError(f"{tag} is not in the BentoML model store (`bentoml models list`)") from None
    except ModelError as e:
        raise GateError(str(e)) from None
    except SystemExit:
        raise GateError(f"{tag} cannot be opened") from None


# ---- the labelled rows ---------------------------------------------------------------------

def labelled_table(path: str, target: str):
    """The file's rows as JSON records (as a client holding the file sends them) and their
    labels; rows without a label are left out."""
    from service.rows import records
    from training.files import read_file
    from training.rules import DataError
    try:
        _, frame = read_file(path)
    except DataError as e:
        raise GateError(str(e)) from None
    if target not in frame.columns:
        raise GateError(f"target column {target!r} not found in {path}")
    frame = frame[frame[target].notna()].reset_index(drop=True)
    if frame.empty:
        raise GateError(f"{path} has no rows with a {target!r} label")
    return records(frame), frame[target].to_numpy(object)


def labelled_images(folder: str):
    """An image folder's files (their bytes, as uploads) and their labels (the sub-folder)."""
    from training.images import ImageError, image_files
    try:
        files = image_files(folder)
    except ImageError as e:
        raise GateError(str(e)) from None
    pairs = [(f.read_bytes(), c) for c, fs in files.items() for f in fs]
    if not pairs:
        raise GateError(f"{folder} holds no PNG/JPEG files in class sub-folders")
    return [p[0] for p in pairs], np.array([p[1] for p in pairs], dtype=object)


# ---- metrics --------------------------------------------------------------------------------

def class_index(labels: np.ndarray, classes: list) -> np.ndarray:
    """Each label's index in the model's classes, as the service names them (5, 5.0 and "5" are
    one class); -1 for a class the model does not know."""
    from training.contract import category_text
    lookup = {category_text(c): i for i, c in enumerate(classes)}
    return np.array([lookup.get(category_text(v), -1) for v in labels], dtype=np.int64)


def metric(name: str, y, out: list[np.ndarray], rows: np.ndarray) -> float:
    """One metric on the given rows: y class indices (or values), out the graph's outputs."""
    from sklearn import metrics as m
    y = y[rows]
    if name in METRICS["regression"]:
        pred = out[0][rows].astype(np.float64)
        if name == "rmse":
            return float(np.sqrt(np.mean((pred - y) ** 2)))
        if name == "mae":
            return float(np.mean(np.abs(pred - y)))
        return float(m.r2_score(y, pred))
    probabilities, labels = out[0][rows].astype(np.float64), out[1][rows]
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # float32 softmax: sums of 1 +- 1e-7
    k = probabilities.shape[1]
    if name == "accuracy":
        return float(np.mean(labels == y))
    if name == "log_loss":
        return float(m.log_loss(y, probabilities, labels=list(range(k))))
    if name == "macro_f1":
        return float(m.f1_score(y, labels, labels=list(range(k)), average="macro", zero_division=0))
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if k == 2:
        return float(m.roc_auc_score(y, probabilities[:, 1]))
    p = probabilities[:, present] / probabilities[:, present].sum(axis=1, keepdims=True)
    return float(m.roc_auc_score(y, p, multi_class="ovr", labels=present))


def improvement(name: str, champion: float, candidate: float) -> float:
    """The candidate's difference in its favour: positive is better, in the metric's units."""
    greater = next(g for metrics in METRICS.values() for n, g in metrics.items() if n == name)
    return candidate - champion if greater else champion - candidate


def bootstrap(name: str, y, champion: list, candidate: list, rows: np.ndarray, resamples: int,
              confidence: float, seed: int) -> tuple[float, float, float]:
    """The paired difference in the candidate's favour over resamples of the rows: (mean, low,
    high) of the percentile interval."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        pick = rows[rng.integers(0, len(rows), len(rows))]
        diffs.append(improvement(name, metric(name, y, champion, pick), metric(name, y, candidate, pick)))
    diffs = np.asarray(diffs)
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        return float("nan"), float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    return float(diffs.mean()), float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))


# ---- the gate ---------------------------------------------------------------------------------

def compare(champion: Model, candidate: Model, data: str, target: str | None, *, primary: str | None = None,
            min_change: float = 0.0, tolerance: float = 0.005, secondary_margin: float = 0.02,
            resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """The report: each model's metrics, the paired difference of the primary metric with its
    interval, the rows each could not take, and the verdict."""
    from service.rows import score
    task = champion.scorer.task
    if candidate.scorer.task != task:
        raise GateError(f"{champion.tag} is a {task} model and {candidate.tag} a {candidate.scorer.task} one")
    images = bool(champion.scorer.image)
    if images != bool(candidate.scorer.image):
        raise GateError("one model takes images and the other tables")
    if images:
        rows, labels = labelled_images(data)
    elif not target:
        raise GateError("--target names the label column of --data")
    else:
        rows, labels = labelled_table(data, target)
    scored = {}
    for role, model in (("champion", champion), ("candidate", candidate)):
        scored[role] = score(model.scorer, rows, model.scorer.check_image if images else None)
    if task == "classification":
        classes = champion.scorer.classes
        if sorted(map(str, candidate.scorer.classes)) != sorted(map(str, classes)):
            raise GateError(f"the models know other classes: {classes} and {candidate.scorer.classes}")
        y = class_index(labels, classes)
        order = class_index(np.asarray(classes, dtype=object), candidate.scorer.classes)
        probabilities, label = scored["candidate"].outputs  # the candidate's columns in the champion's order
        scored["candidate"].outputs = [probabilities[:, order],
                                       np.where(label >= 0, np.argsort(order)[np.maximum(label, 0)], -1)]
    else:
        try:
            y = labels.astype(np.float64)
        except (TypeError, ValueError):
            raise GateError(f"the label column {target!r} is not numeric: these are regression models") from None
    both = scored["champion"].ok & scored["candidate"].ok
    unknown = (y < 0) if task == "classification" else np.zeros(len(y), bool)
    rows_used = np.flatnonzero(both & ~unknown)
    if len(rows_used) < 2:
        raise GateError(f"only {len(rows_used)} of {len(y)} rows could be scored by both models")
    outputs = {role: s.outputs for role, s in scored.items()}
    return {"champion": champion.tag, "candidate": candidate.tag, "task": task, "data": data,
            "rows": len(y), "rows_compared": len(rows_used), "rows_unknown_label": int(unknown.sum()),
            "rows_not_taken": {role: {"count": len(s.errors), "examples": dict(list(s.errors.items())[:5])}
                               for role, s in scored.items()},
            **judge(task, y, outputs["champion"], outputs["candidate"], rows_used, primary=primary,
                    min_change=min_change, tolerance=tolerance, secondary_margin=secondary_margin,
                    resamples=resamples, confidence=confidence, seed=seed)}


def judge(task: str, y, champion: list, candidate: list, rows: np.ndarray, *, primary: str | None = None,
          min_change: float = 0.0, tolerance: float = 0.005, secondary_margin: float = 0.02,
          resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """The rule on two models' outputs for the same rows (y: class indices or values)."""
    names = list(METRICS[task])
    primary = primary or PRIMARY[task]
    if primary not in names:
        raise GateError(f"--metric {primary} is not a {task} metric; choose from {', '.join(names)}")
    values = {role: {n: metric(n, y, out, rows) for n in names}
              for role, out in (("champion", champion), ("candidate", candidate))}
    diff = {n: improvement(n, values["champion"][n], values["candidate"][n]) for n in names}
    mean, low, high = bootstrap(primary, y, champion, candidate, rows, resamples, confidence, seed)
    worse = [n for n in names if n != primary and np.isfinite(diff[n]) and diff[n] < -secondary_margin]
    reasons = []
    if not diff[primary] >= min_change:
        reasons.append(f"{primary} differs by {diff[primary]:+.4f} in the candidate's favour, less than "
                       f"--min-change {min_change:g}")
    if not low > -tolerance:
        reasons.append(f"the {confidence:.0%} interval's lower end {low:+.4f} is not above -{tolerance:g}")
    reasons += [f"{n} is worse by {-diff[n]:.4f}, more than --secondary-margin {secondary_margin:g}" for n in worse]
    return {"metrics": values, "difference_in_candidates_favour": diff,
            "primary": {"metric": primary, "difference": diff[primary], "bootstrap_mean": mean,
                        "interval": [low, high], "confidence": confidence, "resamples": resamples},
            "rule": {"min_change": min_change, "tolerance": tolerance, "secondary_margin": secondary_margin},
            "verdict": "keep" if reasons else "promote", "reasons": reasons}


def summary(report: dict) -> str:
    lines = [f"  champion   {report['champion']}", f"  candidate  {report['candidate']}",
             f"  rows       {report['rows_compared']} compared of {report['rows']}"]
    for role in ("champion", "candidate"):
        n = report["rows_not_taken"][role]["count"]
        if n:
            example = next(iter(report["rows_not_taken"][role]["examples"].items()))
            lines.append(f"             {n} row(s) the {role} cannot take (row {example[0]}: {example[1]})")
    if report["rows_unknown_label"]:
        lines.append(f"             {report['rows_unknown_label']} row(s) with a class the models do not know")
    lines.append(f"  {'metric':<10} {'champion':>10} {'candidate':>10} {'difference':>11}  (in the candidate's favour)")
    for n, champ in report["metrics"]["champion"].items():
        lines.append(f"  {n:<10} {champ:>10.4f} {report['metrics']['candidate'][n]:>10.4f} "
                     f"{report['difference_in_candidates_favour'][n]:>+11.4f}"
                     + ("   primary" if n == report["primary"]["metric"] else ""))
    p = report["primary"]
    lines.append(f"  {p['metric']} difference {p['difference']:+.4f}, {p['confidence']:.0%} interval "
                 f"[{p['interval'][0]:+.4f}, {p['interval'][1]:+.4f}] ({p['resamples']} resamples)")
    lines.append(f"  verdict    {report['verdict'].upper()}" + (": " + "; ".join(report["reasons"]) if report["reasons"] else
                                                              " (no worse beyond the tolerance)"))
    return "\n".join(lines)


def promote(tag: str, server: str) -> None:
    """Make the candidate its model's default version on a running server (the operator's token)."""
    from service.models import Failed, call, load_body
    token = os.environ.get("NORMSERVE_ADMIN_TOKEN")
    if not token:
        raise GateError("--promote needs NORMSERVE_ADMIN_TOKEN, the server's operator token")
    name, version = tag.split(":", 1)
    try:
        call(server, f"/v2/repository/models/{name}/load", load_body([version]), token)
    except Failed as e:
        raise GateError(f"promotion refused, the server serves what it did: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--champion", required=True, help="NAME:VERSION of the model serving now")
    parser.add_argument("--candidate", required=True, help="NAME:VERSION of the model that may replace it")
    parser.add_argument("--data", required=True, help="labelled CSV/Parquet file, or an image folder")
    parser.add_argument("--target", help="the label column (tables)")
    parser.add_argument("--metric", help="the primary metric (default: accuracy, or rmse)")
    parser.add_argument("--min-change", type=float, default=0.0)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--secondary-margin", type=float, default=0.02)
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the interval")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--promote", action="store_true", help="if promoted, load the candidate as the default")
    parser.add_argument("--server", default=os.environ.get("NORMSERVE_URL", "http://127.0.0.1:3000"))
    args = parser.parse_args(argv)
    try:
        if args.bootstrap < 10 or not 0.5 <= args.confidence < 1:
            raise GateError("--bootstrap must be at least 10 and --confidence between 0.5 and 1")
        report = compare(open_scorer(args.champion), open_scorer(args.candidate), args.data, args.target,
                         primary=args.metric, min_change=args.min_change, tolerance=args.tolerance,
                         secondary_margin=args.secondary_margin, resamples=args.bootstrap,
                         confidence=args.confidence, seed=args.seed)
        print(summary(report))
        if args.json:
            tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
            tmp.write_text(json.dumps(report, indent=1) + "\n")
            os.replace(tmp, args.json)
        if report["verdict"] == "promote" and args.promote:
            promote(report["candidate"], args.server)
            print(f"  promoted   {report['candidate']} is the default version on {args.server}")
    except GateError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_PROMOTE if report["verdict"] == "promote" else EXIT_KEEP


if __name__ == "__main__":
    sys.exit(main())
