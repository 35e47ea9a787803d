"""Draw live vs. training distributions of the most shifted features of a running service.

    python -m service.drift_report --url http://127.0.0.1:3000 [--out drift.png] [--top 6]
                                   [--window recent|since_start]

Reads GET /drift and writes one panel per feature, most shifted first (by PSI): the training
split's share of rows in each bin next to the live share, titled with the PSI, the mean shift
and the verdict. Prints a one-line summary per feature.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

COLORS = {"ok": "tab:green", "warn": "tab:orange", "retrain": "tab:red", "not_enough_data": "tab:gray"}


def fetch(url: str) -> dict:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/drift", timeout=30) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"error: cannot read {url}/drift: {getattr(e, 'reason', e)}", file=sys.stderr)
        raise SystemExit(2) from None


def bin_labels(feature: dict) -> list[str]:
    if feature["kind"] == "categorical":
        return [*map(str, feature["categories"]), "other"]
    edges = [f"{e:.3g}" for e in feature["edges"]]
    bounds = ["-inf", *edges, "inf"]
    return [f"{a}..{b}" for a, b in zip(bounds[:-1], bounds[1:])] + ["missing"]


def draw(report: dict, window: str, top: int, out: str) -> list[dict]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    features = sorted(report[window]["features"], key=lambda f: -(f["psi"] or 0))[:top]
    cols = min(3, len(features))
    rows = -(-len(features) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, f in zip(axes.flat, features):
        labels, x = bin_labels(f), np.arange(len(f["train_freqs"]))
        ax.bar(x - 0.2, f["train_freqs"], 0.4, label="training", color="tab:blue")
        ax.bar(x + 0.2, f["live_freqs"], 0.4, label="live", color=COLORS.get(f["verdict"], "tab:gray"))
        ax.set_xticks(x, labels[:len(x)], rotation=60, ha="right", fontsize=7)
        shift = f"  shift {f['mean_shift']:+.2f} sd" if f.get("mean_shift") is not None else ""
        psi = f"{f['psi']:.3f}" if f["psi"] is not None else "-"
        ax.set_title(f"{f['name']}: PSI {psi}{shift}\n{f['verdict']}", fontsize=9,
                     color=COLORS.get(f["verdict"], "black"))
        ax.set_ylabel("share of rows")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(features):]:
        ax.axis("off")
    fig.suptitle(f"{report.get('model', '')}: {window.replace('_', ' ')} window, "
                 f"{report[window]['rows']} rows, overall {report[window]['verdict']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.drift_report", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the service's base URL")
    parser.add_argument("--out", default="drift.png", help="PNG to write")
    parser.add_argument("--top", type=int, default=6, help="how many features to draw")
    parser.add_argument("--window", choices=("recent", "since_start"), default="recent")
    args = parser.parse_args(argv)
    report = fetch(args.url)
    if not report.get("enabled"):
        print(f"error: drift monitoring is off at {args.url}: {report.get('reason')}", file=sys.stderr)
        return 2
    if report[args.window]["rows"] == 0:
        print(f"error: no rows scored yet at {args.url}; nothing to compare", file=sys.stderr)
        return 2
    for f in draw(report, args.window, max(1, args.top), args.out):
        shift = f" shift {f['mean_shift']:+.2f} sd" if f.get("mean_shift") is not None else ""
        test = f", p {f['p_value']:.2g}" if f.get("p_value") is not None else ""
        print(f"{f['verdict']:<8} {f['name']}: PSI {f['psi']:.3f}{shift}{test}")
    print(f"overall {report[args.window]['verdict']} over {report[args.window]['rows']} rows; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
