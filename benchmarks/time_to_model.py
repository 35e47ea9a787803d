"""Time to a model: the wall time of `python -m training.fit` and its split into stages.

    python -m benchmarks.time_to_model                      # the default run, 5 times
    python -m benchmarks.time_to_model --runs 3 -- --data wide.csv --target churned

Each run is a fresh process (so the imports count, as they do for a user), with a temporary
BENTOML_HOME so the store save is measured too. Prints min / median / max of the wall time and
of each stage the summary reports; writes benchmarks/results/time_to_model.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def one_run(options: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BENTOML_HOME": tmp, "BENTOML_DO_NOT_TRACK": "true"}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "training.fit", "--no-progress",
                               "--models-dir", str(Path(tmp) / "artifacts"), *options],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"training.fit failed: {proc.stderr.strip()[-500:]}")
    split = next(line for line in proc.stdout.splitlines() if line.strip().startswith("time split"))
    stages = {name.strip(): float(seconds) for name, seconds in
              re.findall(r"([a-z -]+?) ([0-9.]+) s", split.split("time split", 1)[1])}
    return {"wall": wall, **stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("options", nargs="*", help="training options, after --")
    args = parser.parse_args()
    runs = [one_run(args.options) for _ in range(args.runs)]
    print(f"python -m training.fit {' '.join(args.options)}  ({args.runs} runs, seconds)")
    print(f"{'stage':<22} {'min':>6} {'median':>7} {'max':>6}")
    summary = {}
    for stage in runs[0]:
        values = [r[stage] for r in runs]
        summary[stage] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
        print(f"{stage:<22} {min(values):>6.2f} {statistics.median(values):>7.2f} {max(values):>6.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "time_to_model.json").write_text(json.dumps(
        {"options": args.options, "runs": runs, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
