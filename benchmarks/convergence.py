"""Does the recipe converge faster? Each practice added in turn, on every built-in dataset.

    python -m benchmarks.convergence                  # all built-in datasets, 3 seeds
    python -m benchmarks.convergence --datasets iris,wine --seeds 5

For each dataset, variant and seed it trains the same network on the same split (the seed picks
both), with no early stopping, and records the epochs and training seconds until the validation
metric first reaches the dataset's target, and the test metric of the best epoch. Prints a table,
writes benchmarks/results/convergence.json and convergence.png (validation metric per epoch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from training.config import BUILTIN_DATASETS, make_config
from training import engine
from training.data import load_table
from training.dataset import prepare
from training.distributed import World

RESULTS = Path(__file__).resolve().parent / "results"
SGD = {"optimizer": "sgd", "lr": 0.01}
# Each variant adds one practice to the one before; "default" is the project's own recipe.
VARIANTS = {
    "raw": {**SGD, "normalizer": "none", "batchnorm": False, "scheduler": "none"},
    "+normalize": {**SGD, "normalizer": "standard", "batchnorm": False, "scheduler": "none"},
    "+batchnorm": {**SGD, "normalizer": "standard", "batchnorm": True, "scheduler": "none"},
    # One-cycle exists to allow a higher peak rate than a constant one: 10x the constant rate.
    "+onecycle": {**SGD, "lr": 0.1, "normalizer": "standard", "batchnorm": True, "scheduler": "onecycle"},
    "default": {},
}
# Validation targets: (metric, threshold); accuracy must reach it, RMSE must fall to it.
TARGETS = {"breast_cancer": ("accuracy", 0.97), "digits": ("accuracy", 0.97),
           "wine": ("accuracy", 0.96), "iris": ("accuracy", 0.95), "diabetes": ("rmse", 58.0),
           "digits-images": ("accuracy", 0.97)}


def reached(value: float, metric: str, threshold: float) -> bool:
    return value >= threshold if metric == "accuracy" else value <= threshold


def one_run(dataset: str, table, variant: str, seed: int, epochs: int) -> dict:
    metric, threshold = TARGETS[dataset]
    cfg = make_config({"dataset": dataset, "epochs": epochs, "patience": 0, "seed": seed,
                       "folds": 1, "progress": False, **VARIANTS[variant]})  # one network each
    world = World.start(cfg.device)
    data = prepare(cfg, world, table)
    t = engine.train(cfg, data, world, checkpoints=False)
    history = t.progress.history
    curve = [h[f"val_{metric}"] for h in history]
    hit = next((h for h in history if reached(h[f"val_{metric}"], metric, threshold)), None)
    return {"dataset": dataset, "variant": variant, "seed": seed, "metric": metric,
            "target": threshold, "epochs_to_target": hit["epoch"] if hit else None,
            "seconds_to_target": hit["seconds"] if hit else None,
            "test": engine.evaluate_splits(t.net, data)["test"][metric], "curve": curve,
            "train_seconds": t.progress.elapsed}


def summarize(runs: list[dict], epochs: int) -> list[dict]:
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        for variant in VARIANTS:
            rs = [r for r in runs if r["dataset"] == dataset and r["variant"] == variant]
            hits = [r["epochs_to_target"] for r in rs if r["epochs_to_target"] is not None]
            secs = [r["seconds_to_target"] for r in rs if r["seconds_to_target"] is not None]
            tests = [r["test"] for r in rs]
            rows.append({
                "dataset": dataset, "variant": variant, "metric": rs[0]["metric"],
                "target": rs[0]["target"], "seeds": len(rs), "reached": len(hits),
                # A seed that never reaches the target counts as epochs + 1 in the median.
                "epochs_median": statistics.median(
                    [r["epochs_to_target"] or epochs + 1 for r in rs]),
                "epochs_range": [min(hits), max(hits)] if hits else None,
                "seconds_median": statistics.median(secs) if len(secs) == len(rs) else None,
                "test_median": statistics.median(tests), "test_range": [min(tests), max(tests)]})
    return rows


def verdicts(rows: list[dict], epochs: int) -> list[str]:
    """The goal per dataset, and which parts of the recipe did not help, in plain words."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        by = {r["variant"]: r for r in rows if r["dataset"] == dataset}
        raw, best = by["raw"], by["default"]
        never = raw["epochs_median"] > epochs
        speedup = raw["epochs_median"] / best["epochs_median"]
        fast = best["epochs_median"] <= 5 if never else speedup >= 4
        higher = best["metric"] == "accuracy"
        others = [r["test_median"] for v, r in by.items() if v != "default"]
        good = best["test_median"] >= max(others) if higher else best["test_median"] <= min(others)
        raw_text = f"raw never reaches it in {epochs} epochs" if never else \
            f"raw needs {raw['epochs_median']:g} epochs ({speedup:.1f}x)"
        lines.append(f"{dataset}: default reaches {best['metric']} {best['target']} in "
                     f"{best['epochs_median']:g} epochs, {raw_text} -> speed goal "
                     f"{'MET' if fast else 'NOT MET'}; test {best['test_median']:.4f} vs best other "
                     f"{(max if higher else min)(others):.4f} -> {'MET' if good else 'NOT MET'}")
        order = list(VARIANTS)[:4]
        for before, after in zip(order, order[1:]):
            if by[after]["epochs_median"] >= by[before]["epochs_median"] and \
                    by[before]["epochs_median"] <= epochs:
                lines.append(f"  {after} does not help on {dataset}: {by[after]['epochs_median']:g} "
                             f"epochs vs {by[before]['epochs_median']:g} without it")
    return lines


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    cols = min(3, len(datasets))
    rows = (len(datasets) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets):
        metric, threshold = TARGETS[dataset]
        for variant in VARIANTS:
            curves = [r["curve"] for r in runs if r["dataset"] == dataset and r["variant"] == variant]
            median = [statistics.median(c[i] for c in curves) for i in range(len(curves[0]))]
            ax.plot(range(1, len(median) + 1), median, label=variant,
                    linewidth=2.2 if variant == "default" else 1.2)
        ax.axhline(threshold, color="gray", linestyle=":", linewidth=1)
        ax.set(title=f"{dataset} (target {threshold})", xlabel="epoch", ylabel=f"validation {metric}")
        if metric == "accuracy":
            ax.set_ylim(max(0.0, threshold - 0.3), 1.005)
        else:
            ax.set_ylim(threshold * 0.8, threshold * 2)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("validation metric per epoch, median over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(BUILTIN_DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(torch.get_num_threads())
    runs, started = [], time.perf_counter()
    for dataset in args.datasets.split(","):
        table = load_table(make_config({"dataset": dataset}))
        for variant in VARIANTS:
            for seed in range(args.seeds):
                runs.append(one_run(dataset, table, variant, seed, args.epochs))
            r = runs[-args.seeds:]
            print(f"  {dataset:<14} {variant:<11} epochs to target "
                  f"{[x['epochs_to_target'] for x in r]}", flush=True)
    rows = summarize(runs, args.epochs)
    header = (f"{'dataset':<14} {'variant':<11} {'target':>12} {'reached':>7} {'epochs':>7} "
              f"{'range':>8} {'s to target':>11} {'test median':>11} {'test range':>15}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        rng = f"{r['epochs_range'][0]}-{r['epochs_range'][1]}" if r["epochs_range"] else "-"
        epochs = f"{r['epochs_median']:g}" if r["epochs_median"] <= args.epochs else "never"
        secs = f"{r['seconds_median']:.2f}" if r["seconds_median"] is not None else "-"
        print(f"{r['dataset']:<14} {r['variant']:<11} {r['metric'][:3] + ' ' + str(r['target']):>12} "
              f"{r['reached']:>3}/{r['seeds']:<3} {epochs:>7} {rng:>8} {secs:>11} "
              f"{r['test_median']:>11.4f} {r['test_range'][0]:>7.4f}-{r['test_range'][1]:.4f}")
    lines = verdicts(rows, args.epochs)
    print("\n" + "\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "convergence.json").write_text(json.dumps(
        {"epochs": args.epochs, "seeds": args.seeds, "threads": torch.get_num_threads(),
         "variants": VARIANTS, "targets": TARGETS, "summary": rows, "verdicts": lines,
         "runs": runs, "seconds": round(time.perf_counter() - started, 1)}, indent=1) + "\n")
    plot(runs, RESULTS / "convergence.png")
    print(f"\nwritten to {RESULTS / 'convergence.json'} and convergence.png "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
