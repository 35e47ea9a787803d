"""Two runs of benchmarks/quality.py side by side: did a recipe change help, and by how much
against each table's noise?

    python -m benchmarks.quality --fast --set embedding=none --out screen-none
    python -m benchmarks.quality --fast --out screen-se
    python -m benchmarks.quality_compare screen-none screen-se      # before, after

Per table (the same tables and seeds in both, in the same order): each run's mean over the seeds, the change, the
standard error of the first run's seed mean (se; a loss is also given in se), each run's gap to the
better baseline (HistGradientBoosting or the linear model, their means over the same seeds) and
what the second run's folds exported, per seed. Prints the table as Markdown, then how many tables
are within 0.005 of the better baseline, the mean gap on the tables where trees win (quality.TREES)
and the tables that lost more than one se. Writes benchmarks/results/compare-BEFORE-AFTER.json and
.png (the change per table with its +-1 se band).
"""
from __future__ import annotations

import argparse
import collections
import json

import numpy as np

from benchmarks.quality import RESULTS, TREES, summarize


def runs_of(name: str) -> list[dict]:
    return json.loads((RESULTS / f"{name}.json").read_text())["runs"]


def compare(before: list[dict], after: list[dict]) -> list[dict]:
    """Per table: both runs' means and gaps (quality.summarize), the change, the first run's se."""
    rows = []
    for old, new in zip(summarize(before), summarize(after)):
        first = np.array([r["project"]["metric"] for r in before if r["table"] == old["table"]])
        chosen = collections.Counter(r["project"].get("chosen") or "one candidate"
                                     for r in after if r["table"] == old["table"])
        rows.append({"table": old["table"], "seeds": len(first), "before": old["project"]["mean"],
                     "after": new["project"]["mean"], "change": new["project"]["mean"] - old["project"]["mean"],
                     "se": float(first.std(ddof=1) / np.sqrt(len(first))),
                     "gap_before": old["gap"], "gap_after": new["gap"], "chosen": dict(chosen.most_common())})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| table | seeds | before | after | change | se | gap, before | gap, after | exported |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        loss = f" ({-r['change'] / r['se']:.1f} se)" if r["change"] < 0 and r["se"] > 0 else ""
        lines.append(f"| {r['table']} | {r['seeds']} | {r['before']:.4f} | {r['after']:.4f} | "
                     f"{r['change']:+.4f}{loss} | {r['se']:.4f} | {r['gap_before']:+.4f} | "
                     f"{r['gap_after']:+.4f} | {', '.join(f'{k} {v}' for k, v in r['chosen'].items())} |")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 4.2))
    x = np.arange(len(rows))
    se = np.array([r["se"] for r in rows])
    ax.fill_between(x, -se, se, step="mid", color="tab:grey", alpha=0.25, label="+-1 se of the first run")
    ax.bar(x, [r["change"] for r in rows], 0.6,
           color=["tab:red" if r["change"] < -r["se"] else "tab:blue" for r in rows], label="change")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, [r["table"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("change in holdout accuracy or R²")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="a result name under benchmarks/results (no .json)")
    parser.add_argument("after")
    args = parser.parse_args()
    before, after = runs_of(args.before), runs_of(args.after)
    if {(r["table"], r["seed"]) for r in before} != {(r["table"], r["seed"]) for r in after}:
        raise SystemExit(f"{args.before} and {args.after} hold other tables or seeds: compare like with like")
    rows = compare(before, after)
    print(markdown(rows))
    trees = {name for _, name, _ in TREES}
    within = [sum(r[k] >= -0.005 for r in rows) for k in ("gap_before", "gap_after")]
    tree_rows = [r for r in rows if r["table"] in trees]
    tree_gaps = [float(np.mean([r[k] for r in tree_rows])) for k in ("gap_before", "gap_after")] \
        if tree_rows else None
    lost = [r["table"] for r in rows if r["change"] < -r["se"]]
    print(f"\nwithin 0.005 of the better baseline: {within[0]} -> {within[1]} of {len(rows)} tables; "
          "mean gap where trees win: " + (f"{tree_gaps[0]:+.4f} -> {tree_gaps[1]:+.4f}" if tree_rows
                                          else "none of quality.TREES in these runs") +
          f"; worse by more than one se: {', '.join(lost) or 'none'}")
    name = f"compare-{args.before}-{args.after}"
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"before": args.before, "after": args.after, "tables": rows, "within": within,
         "trees_gap": tree_gaps, "worse_than_one_se": lost}, indent=2) + "\n")
    plot(rows, f"{args.after} against {args.before}, per table", RESULTS / f"{name}.png")
    print(f"written to {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
