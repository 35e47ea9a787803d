"""The offline gate's verdicts (training/compare.py) on candidate pairs of known quality.

    python -m benchmarks.gate [--champions 20] [--candidates 10] [--runs 3]

A synthetic classification task (scikit-learn's make_classification: 12 features, 6 of them
informative, 5% of labels flipped). Champions: the default one-network recipe (--folds 1) on
4,000 rows; candidates: the same recipe on 300 rows (seeds and rows differ: clearly worse) and on
2,000 rows (a little worse). Every champion x candidate pair (400 by default) is judged on a labelled file of 2,000 fresh
rows, as `python -m training.compare` judges it (the service's checks and graph, the default
rule: primary accuracy, tolerance 0.005, 1,000 resamples); the truth about each pair is its
accuracy difference on 20,000 more rows. Reported per run (each run draws new gate rows and new
resamples; the models are trained once): how often a candidate worse than its champion by more
than the tolerance (in truth) is promoted (goal: at most 2%), and how often a pair of two
champions (equal recipe, equal data size) is promoted. Prints a table, writes
benchmarks/results/gate.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.serve_load import RESULTS

FEATURES = 12


def task_rows(n: int, seed: int) -> pd.DataFrame:
    from sklearn.datasets import make_classification
    X, y = make_classification(n_samples=n, n_features=FEATURES, n_informative=6, n_redundant=2,
                               flip_y=0.05, class_sep=0.8, random_state=1234, shuffle=False)
    rng = np.random.default_rng(seed)  # one fixed task; rows drawn from a large pool of it
    pick = rng.choice(len(X), n, replace=False) if n < len(X) else np.arange(len(X))
    frame = pd.DataFrame(X[pick], columns=[f"x{i}" for i in range(FEATURES)]).round(5)
    frame["label"] = np.where(y[pick] == 1, "yes", "no")
    return frame


def train(rows: pd.DataFrame, name: str, seed: int, folder: Path) -> str:
    from training.config import make_config
    from training.fit import run
    path = folder / f"{name}-{seed}.csv"
    rows.to_csv(path, index=False)
    cfg = make_config({"data": str(path), "target": "label", "name": name, "seed": seed, "folds": 1,
                       "progress": False, "models_dir": str(folder / "models")})
    return run(cfg).tag


def outputs(tag: str, frame: pd.DataFrame):
    from service.rows import records, score
    from training.compare import open_scorer
    scored = score(open_scorer(tag).scorer, records(frame.drop(columns="label")))
    assert not scored.errors
    return scored.outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--champions", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from training.compare import judge
    folder = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    all_rows = task_rows(200_000, 0)
    order = np.random.default_rng(7).permutation(len(all_rows))
    take = iter(np.array_split(order, 200))  # disjoint blocks of 1,000 rows (80 + 30 + 20 + 6 used)
    block = lambda k: all_rows.iloc[np.concatenate([next(take) for _ in range(k)])].reset_index(drop=True)  # noqa: E731
    print(f"training {args.champions} champions (4,000 rows) and {args.candidates} candidates each on 300 "
          "and on 2,000 rows ...", flush=True)
    champions = [train(block(4), "gate-champion", s, folder) for s in range(args.champions)]
    candidates = ([train(block(1).head(300), "gate-candidate-300", s, folder) for s in range(args.candidates)]
                  + [train(block(2), "gate-candidate-2000", s, folder) for s in range(args.candidates)])
    truth_rows = block(20)
    y_truth = (truth_rows["label"] == "yes").to_numpy().astype(np.int64)  # classes: ["no", "yes"]
    truth = {t: float(np.mean(outputs(t, truth_rows)[1] == y_truth)) for t in champions + candidates}
    runs = []
    for r in range(args.runs):
        gate_rows = block(2)
        y = (gate_rows["label"] == "yes").to_numpy().astype(np.int64)
        out = {t: outputs(t, gate_rows) for t in champions + candidates}
        rows = np.arange(len(y))
        worse = {"pairs": 0, "promoted": 0}
        slightly = {"pairs": 0, "promoted": 0}  # worse by 0.5 to 2 points of accuracy
        equal = {"pairs": 0, "promoted": 0}
        for i, champion in enumerate(champions):
            for j, candidate in enumerate(candidates):
                verdict = judge("classification", y, out[champion], out[candidate], rows, seed=1000 * r + 37 * i + j)
                gap = truth[candidate] - truth[champion]
                if gap < -0.005:
                    worse["pairs"] += 1
                    worse["promoted"] += verdict["verdict"] == "promote"
                if -0.02 <= gap < -0.005:
                    slightly["pairs"] += 1
                    slightly["promoted"] += verdict["verdict"] == "promote"
            partner = champions[(i + 1) % len(champions)]
            verdict = judge("classification", y, out[champion], out[partner], rows, seed=1000 * r + i)
            equal["pairs"] += 1
            equal["promoted"] += verdict["verdict"] == "promote"
        runs.append({"worse": worse, "slightly_worse": slightly, "equal": equal})
        print(f"  run {r + 1}: worse candidates promoted {worse['promoted']} of {worse['pairs']} "
              f"(worse by 0.5-2 points: {slightly['promoted']} of {slightly['pairs']}); pairs of champions "
              f"promoted {equal['promoted']} of {equal['pairs']}", flush=True)
    rate = [r["worse"]["promoted"] / max(r["worse"]["pairs"], 1) for r in runs]
    equal_rate = [r["equal"]["promoted"] / r["equal"]["pairs"] for r in runs]
    gaps = [truth[c] - truth[k] for k in champions for c in candidates]
    slight = [r["slightly_worse"]["promoted"] / max(r["slightly_worse"]["pairs"], 1) for r in runs]
    summary = {"worse_promoted_rate": [float(np.min(rate)), float(np.median(rate)), float(np.max(rate))],
               "slightly_worse_promoted_rate": [float(np.min(slight)), float(np.median(slight)), float(np.max(slight))],
               "worse_pairs": [r["worse"]["pairs"] for r in runs],
               "slightly_worse_pairs": [r["slightly_worse"]["pairs"] for r in runs],
               "equal_promoted_rate": [float(np.min(equal_rate)), float(np.median(equal_rate)), float(np.max(equal_rate))],
               "true_accuracy_champions": [float(np.min([truth[t] for t in champions])),
                                           float(np.max([truth[t] for t in champions]))],
               "true_accuracy_candidates": [float(np.min([truth[t] for t in candidates])),
                                            float(np.max([truth[t] for t in candidates]))],
               "true_gap_candidate_minus_champion": [float(np.min(gaps)), float(np.median(gaps)), float(np.max(gaps))]}
    print(f"\n{'':<44} {'min / median / max':>24}")
    print(f"{'worse candidates promoted (goal <= 2%)':<44} {' / '.join(f'{v:.1%}' for v in summary['worse_promoted_rate']):>24}")
    print(f"{'  of them worse by 0.5-2 points':<44} {' / '.join(f'{v:.1%}' for v in summary['slightly_worse_promoted_rate']):>24}")
    print(f"{'pairs of equal champions promoted':<44} {' / '.join(f'{v:.1%}' for v in summary['equal_promoted_rate']):>24}")
    print(f"{'true gap, candidate - champion (accuracy)':<44} "
          f"{' / '.join(f'{v:+.4f}' for v in summary['true_gap_candidate_minus_champion']):>24}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gate.json").write_text(json.dumps({"summary": summary, "runs": runs, "truth": truth}, indent=1) + "\n")
    print(f"\nwritten to {RESULTS / 'gate.json'}")


if __name__ == "__main__":
    main()
