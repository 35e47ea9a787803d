"""`python -m training.fit`: train a normalized BatchNorm network on a table or images and export
it, normalization included, to ONNX.

Everything but argument parsing is importable: tests call `run(config)` directly.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from training import dataset, engine, ensemble, report
from training.checkpoint import checkpoint_path
from training.config import Config, ConfigError, load_config
from training.dataset import Data
from training.distributed import World
from training.export import ExportError, export_model, save_to_bentoml, write_artifacts
from training.model import serving_model
from training.rules import DataError, DataNote


class Stopwatch:
    """Seconds per stage of a run, for the summary (`laps`)."""

    def __init__(self):
        self.last, self.laps = time.perf_counter(), {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self.last, 3)
        self.last = now


@dataclass
class Result:
    model_dir: Path
    tag: str | None          # <name>:<version> in the BentoML store (None with --no-store)
    card: dict               # as written beside model.onnx
    data: Data               # the split and the fitted normalizer
    trained: engine.Trained  # the best epoch's network


def run(cfg: Config) -> Result | None:
    """Load, split, fit the normalizer, train, export, write and save. Raises DataError,
    ConfigError or ExportError with a one-line message; on any error nothing is written to
    models/<name>/<version>. Under torchrun, rank 0 exports and returns the result; the other
    ranks return None."""
    clock = Stopwatch()
    world = World.start(cfg.device)
    try:
        data = dataset.prepare(cfg, world)         # the normalizer is fitted on the training split
        clock.lap("data")
        trained = ensemble.train(cfg, data, world)  # engine.train, once per --ensemble member
        clock.lap("training")
    finally:
        world.close()
    if trained is None:
        return None

    metrics = engine.evaluate_splits(trained.net, data)
    if trained.cross_validation:  # the bag's held-out estimate, beside the splits' (trained-on) ones
        metrics["cross_validation"] = trained.cross_validation["metrics"]
    head = serving_model(trained.net, data.table.task, data.y_mean, data.y_scale)
    metadata = report.model_metadata(cfg, data, trained, metrics)
    proto, parity = export_model(head, data, "test" if "test" in metrics else "validation", metadata)
    clock.lap("export")

    out_dir = Path(cfg.models_dir) / cfg.model_name / trained.version
    card = write_artifacts(out_dir, proto, report.card(cfg, data, trained, metadata, parity),
                           yaml.safe_dump(cfg.to_dict(), sort_keys=False), report.plots(data, trained))
    clock.lap("write")
    tag = save_to_bentoml(out_dir, cfg.model_name, trained.version, data.table.task) if cfg.store else None
    checkpoint_path(cfg).unlink(missing_ok=True)  # the run is complete; nothing is left to resume
    clock.lap("store")
    card["timings"] = clock.laps  # not in the written card: the store save comes after it
    return Result(model_dir=out_dir, tag=tag, card=card, data=data, trained=trained)


def seconds_since_start() -> float:
    """How long this process has run: Python's start-up and the imports, before main()."""
    import psutil
    return time.time() - psutil.Process().create_time()


def one_line(message: str) -> str:
    """A message on one line, whatever the column names it quotes hold."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    return cli(argv)[0]


def cli(argv: list[str] | None = None) -> tuple[int, Result | None]:
    """What `python -m training.fit` does: the exit code (0, or 2 with one `error:` line on
    stderr), and the run's result (tests look at both)."""
    start_up = seconds_since_start()
    main_rank = World.launched().main  # under torchrun every rank has the same errors and notes
    cfg = None
    try:
        cfg = load_config(argv)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataNote)
            result = run(cfg)
        notes = [str(w.message) for w in caught if issubclass(w.category, DataNote)]
        for note in dict.fromkeys(notes) if main_rank else ():  # ours, once each; library chatter stays quiet
            print(f"note: {one_line(note)}", file=sys.stderr)
    except (DataError, ConfigError, ExportError) as e:
        if main_rank:
            print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        resumable = cfg is not None and checkpoint_path(cfg).exists()
        print("interrupted; " + ("continue with --resume" if resumable else "nothing to resume (only "
              "one network, --folds 1, keeps a checkpoint)"), file=sys.stderr)
        return 130, None
    if result is not None:
        result.card["timings"] = {"start-up and imports": round(start_up, 2), **result.card["timings"]}
        print(report.summary(result.card, result.model_dir, result.tag))
    return 0, result


if __name__ == "__main__":
    sys.exit(main())
