"""The default run's wall time against another recipe's, table by table (issue 28's cost goal).

    python -m benchmarks.wall_ratio                          # the 19 tables, default vs embedding=none
    python -m benchmarks.wall_ratio --tables digits,Wages --rounds 3 --set embedding=none

For each table of the suite (benchmarks/quality.py), seed 0's 80% file is trained by
`python -m training.fit` (a subprocess: imports, data, training and export, what a user waits
for), once with the defaults and once with `--set`'s options, `--rounds` times, each recipe first
in every other round; run it with nothing else on the machine. Prints min / median / max seconds per table and the ratio of
the medians, and their median over the tables; writes benchmarks/results/wall_ratio.json and .png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.quality import (RESULTS, SUITE, TREES, cli_option, holdout, load, parse_settings,
                                project_cli)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="", help="comma-separated names (default: the 19 tables)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="the other recipe's training options (default: embedding=none)")
    parser.add_argument("--out", default="wall_ratio")
    args = parser.parse_args()
    other = parse_settings(args.set or ["embedding=none"])
    recipes = {"default": [], "other": [a for k, v in other.items() for a in cli_option(k, v)]}
    wanted = set(filter(None, args.tables.split(",")))
    suite = [t for t in SUITE + TREES if not wanted or t[1] in wanted]
    from training.data import infer_task
    files = []
    for source, name, target in suite:
        frame = load(source, name)
        task = infer_task(frame[target].dropna())
        files.append((name, target, task, *holdout(frame, target, task, 0)))
    seconds = {(name, r): [] for name, *_ in files for r in recipes}
    for round_ in range(args.rounds):
        for name, target, task, train, test in files:
            order = list(recipes.items())
            for recipe, options in (order if round_ % 2 == 0 else order[::-1]):  # each goes first in turn
                with tempfile.TemporaryDirectory() as tmp:
                    run = project_cli(train, test, target, task, 0, options, Path(tmp))
                seconds[name, recipe].append(run["seconds"])
            print(f"  round {round_ + 1} {name:<15} default {seconds[name, 'default'][-1]:5.1f} s, "
                  f"other {seconds[name, 'other'][-1]:5.1f} s", flush=True)
    rows = [summary(name, seconds[name, "default"], seconds[name, "other"]) for name, *_ in files]
    overall = statistics.median(r["ratio"] for r in rows)
    print(f"\nwall seconds min / median / max, default against {other}")
    print("| table | other | default | ratio of medians |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['table']} | {spread(r['other'])} | {spread(r['default'])} | {r['ratio']:.2f}x |")
    print(f"median ratio over {len(rows)} tables: {overall:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"other": other, "rounds": args.rounds, "tables": rows, "median_ratio": overall}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, other, RESULTS / f"{args.out}.png")
    print(f"written to {RESULTS / (args.out + '.json')} and {args.out}.png")


def summary(name: str, default: list[float], other: list[float]) -> dict:
    return {"table": name, "default": default, "other": other,
            "ratio": statistics.median(default) / statistics.median(other)}


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def plot(rows: list[dict], other: dict, path: Path) -> None:
    """The ratio of medians per table, each round's own ratios as dots, and the 1.3x goal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for x, r in enumerate(rows):
        ax.bar(x, r["ratio"], 0.6, color="tab:blue")
        ax.plot([x] * len(r["default"]), [d / o for d, o in zip(r["default"], r["other"])], "k.", ms=4)
    ax.axhline(1.3, color="tab:red", linestyle="--", linewidth=0.8, label="goal: 1.3x")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(rows)), [r["table"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"wall time, default / {', '.join(f'{k}={v}' for k, v in other.items())}")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
