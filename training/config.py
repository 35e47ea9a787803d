"""Training configuration: one dataclass that is the CLI, the YAML file and the record of a run.

Precedence: dataclass defaults < `--config file.yaml` < command-line flags.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.normalize import NORMALIZERS
from training.schedules import SCHEDULERS

AUTO_FOLDS_MAX_ROWS = 20_000  # --folds auto bags tables of up to this many rows
TEST_SIZE = 0.15  # --test-size auto without --folds
LINEAR_CANDIDATE_MAX_ROWS = 5_000  # --linear-candidate: where a linear model may help, and costs little
BUILTIN_DATASETS = ("breast_cancer", "digits", "wine", "iris", "diabetes", "digits-images")


class ConfigError(ValueError):
    """A bad option or config file; reported as a one-line message."""


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # data
    dataset: str = _opt("breast_cancer", "built-in scikit-learn dataset, used when --data is not given",
                        choices=BUILTIN_DATASETS)
    data: str | None = _opt(None, "CSV or Parquet file to train on (needs --target)")
    target: str | None = _opt(None, "target column of --data")
    images: str | None = _opt(None, "folder of images to train on, one sub-folder per class (PNG/JPEG)")
    image_size: int | None = _opt(None, "bring every image to N x N: scaled to cover it, then "
                                        "centre-cropped (default: keep the size if all images share "
                                        "it, else the median shorter side, at most 224)")
    max_broken_images: float = _opt(0.01, "the largest share of image files that may be unreadable "
                                          "(they are skipped with a notice); above it the run stops")
    features: list[str] | None = _opt(None, "comma-separated feature columns (default: all but the target)")
    categorical: list[str] | None = _opt(None, "comma-separated columns to treat as categories "
                                               "(default: text columns)")
    numeric: list[str] | None = _opt(None, "comma-separated columns to treat as numbers")
    drop: list[str] | None = _opt(None, "comma-separated columns to leave out")
    task: str = _opt("auto", "auto infers it from the target", choices=("auto", "classification", "regression"))
    val_size: float = _opt(0.15, "share of rows held out for validation (early stopping)")
    test_size: float | str = _opt("auto", "share of rows held out for the final test metrics; auto: "
                                          "none with --folds (each network is judged on its own "
                                          "fold, and the cross-validated metrics are the held-out "
                                          f"estimate), {TEST_SIZE} otherwise")
    seed: int = _opt(0, "seed for the split, the weights and the batch order")
    # tables larger than memory
    stream: bool = _opt(False, "read --data in chunks instead of whole (tables larger than memory)")
    chunk_rows: int = _opt(100_000, "--stream: rows read at a time")
    shuffle_rows: int = _opt(500_000, "--stream: rows held in the shuffle buffer")
    eval_rows: int = _opt(100_000, "--stream: the metrics use a uniform sample of up to this many "
                                   "rows of each split")
    # recipe: each part can be switched off for ablation
    normalizer: str = _opt("auto", "input normalization fitted on the training split: quantile (each "
                                   "feature to normal scores), standard ((x - mean) / std), robust "
                                   "(median and IQR, outliers smoothly clipped) or none; auto is "
                                   "quantile for tables and standard (per channel) for images",
                           choices=tuple(NORMALIZERS))
    embedding: str = _opt("auto", "tables: each normalized numeric feature encoded before the network: "
                                  "ple (piecewise-linear over --embedding-bins training-quantile bins; "
                                  "better where trees win, slower to serve: docs/quality.md), none, or "
                                  "auto (with --folds: the networks bagged both ways, the candidate "
                                  "that cross-validates best exported; without folds: ple; images: none)",
                          choices=("none", "ple", "auto"))
    embedding_bins: int = _opt(16, "--embedding ple: bins per feature (fewer where values tie)")
    batchnorm: bool = _opt(True, "BatchNorm1d between each Linear and its ReLU")
    hidden: list[int] = _opt((128, 64), "comma-separated hidden layer widths (tables); empty: a linear "
                                        "model on the normalized inputs")
    linear_skip: bool = _opt(False, "tables: a linear layer from the normalized inputs straight to the "
                                    "outputs, beside the network")
    channels: list[int] = _opt((32, 64), "comma-separated conv block widths (images)")
    augment: bool = _opt(False, "light random shifts and rotations of training images (images)")
    dropout: float = _opt(0.0, "dropout after each hidden block (0 = none)")
    optimizer: str = _opt("adamw", "optimizer", choices=("adamw", "sgd"))
    lr: float | str = _opt(1e-2, "learning rate (the peak rate for one-cycle), or auto: a learning-rate "
                                 "range test before training picks it (lr_find.png)")
    momentum: float = _opt(0.0, "momentum, for --optimizer sgd")
    weight_decay: float = _opt(1e-4, "weight decay")
    scheduler: str = _opt("onecycle", "learning-rate schedule", choices=SCHEDULERS)
    epochs: int = _opt(60, "maximum number of epochs")
    batch_size: int = _opt(64, "rows per optimizer step")
    patience: int = _opt(15, "stop after this many epochs without a better validation metric (0 = never)")
    stop_on: str = _opt("metric", "early stopping watches the validation metric (accuracy, or RMSE) "
                                  "or the validation loss", choices=("metric", "loss"))
    label_smoothing: float = _opt(0.0, "classification: label smoothing of the training loss (0 = none)")
    ensemble: int = _opt(1, "train this many networks (seeds seed, seed+1, ...) and export their average")
    refit: bool = _opt(False, "after early stopping, train again on training + validation rows for the "
                              "best epoch count")
    folds: int | str = _opt("auto", "k-fold bagging: the training and validation rows in k folds, k "
                                    "networks each trained on all folds but one and stopped early on "
                                    "that one, their average exported; 1 = one network and the "
                                    "validation split; auto = 5 for in-memory tables of up to "
                                    f"{AUTO_FOLDS_MAX_ROWS:,} rows without "
                                    "--ensemble, --refit or --resume, 1 otherwise")
    fold_repeats: int = _opt(1, "with --folds: cut the rows into k folds this many times, each "
                                "time shuffled anew, and average all the k x repeats networks")
    linear_candidate: bool = _opt(True, "with --folds, on up to "
                                        f"{LINEAR_CANDIDATE_MAX_ROWS:,} training + validation rows: "
                                        "also bag a linear model (--hidden '') over the same folds; "
                                        "export the networks, the networks averaged with the linear "
                                        "models, or the linear models, whichever cross-validates best")
    # run
    device: str = _opt("auto", "auto picks CUDA when present", choices=("auto", "cpu", "cuda"))
    name: str | None = _opt(None, "model name (default: the dataset or file name)")
    models_dir: str = _opt("models", "where models/<name>/<version>/ is written")
    resume: bool = _opt(False, "continue the interrupted run of this model from its last checkpoint")
    store: bool = _opt(True, "also save the model in the BentoML model store as <name>:<version>")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self):
        self.hidden = [int(w) for w in self.hidden]
        self.channels = [int(w) for w in self.channels]
        if self.data and self.images:
            raise ConfigError("give either --data (a table) or --images (a folder), not both")
        if self.image_size is not None and not 4 <= self.image_size <= 1024:
            raise ConfigError("--image-size must be between 4 and 1024")
        if not 0 <= self.max_broken_images < 1:
            raise ConfigError("--max-broken-images must be a share, at least 0 and below 1")
        if self.data and not self.target:
            raise ConfigError("--data needs --target: name the column to predict")
        if self.is_images and NORMALIZERS[self.normalizer][1] is None:
            raise ConfigError(f"--normalizer {self.normalizer} is for tables; images take "
                              + ", ".join(m for m, (_, image) in NORMALIZERS.items() if image))
        if self.is_images and self.embedding == "ple":  # auto: none
            raise ConfigError("--embedding is for tables")
        if not 2 <= self.embedding_bins <= 256:
            raise ConfigError("--embedding-bins must be between 2 and 256")
        if self.stream and not self.data:
            raise ConfigError("--stream reads a --data CSV or Parquet file")
        test = self.test_share(folds=1)
        if not 0 < self.val_size < 1 or not 0 <= test < 1 or self.val_size + test >= 1:
            raise ConfigError("--val-size must be in (0, 1), --test-size in [0, 1) (or auto), and "
                              "together less than 1")
        for ok, message in [(self.epochs >= 1, "--epochs must be at least 1"),
                            (self.batch_size >= 2, "--batch-size must be at least 2 (BatchNorm)"),
                            (all(w >= 1 for w in self.hidden), "--hidden widths must be >= 1"),
                            (self.channels and min(self.channels) >= 1, "--channels must be >= 1"),
                            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
                            (self.lr == "auto" or self.lr > 0, "--lr must be positive, or auto"),
                            (self.patience >= 0, "--patience must be >= 0"),
                            (self.ensemble >= 1, "--ensemble must be at least 1"),
                            (self.fold_repeats >= 1, "--fold-repeats must be at least 1"),
                            (self.folds == "auto" or self.folds >= 1, "--folds must be at least 1, or auto"),
                            (self.folds in ("auto", 1) or not self.excludes_folds,
                             "--folds trains in-memory runs, without --ensemble, --refit or --resume"),
                            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
                            (not (self.refit and self.stream), "--refit needs an in-memory run "
                                                               "(without --stream)"),
                            (not (self.resume and (self.ensemble > 1 or self.refit)),
                             "--resume continues single-network runs (no --ensemble, --refit)"),
                            (min(self.chunk_rows, self.shuffle_rows, self.eval_rows) >= 1,
                             "--chunk-rows, --shuffle-rows and --eval-rows must be >= 1")]:
            if not ok:
                raise ConfigError(message)

    @property
    def is_images(self) -> bool:
        return bool(self.images or self.dataset == "digits-images" and not self.data)

    @property
    def excludes_folds(self) -> bool:
        """Options --folds does not combine with: --stream, --ensemble, --refit, --resume."""
        return bool(self.stream or self.ensemble > 1 or self.refit or self.resume)

    def folds_for(self, rows: int) -> int:
        """--folds with auto settled for a table of `rows` rows: 5 where bagging applies and costs
        little (measured in docs/quality.md), else 1."""
        if self.folds != "auto":
            return self.folds
        plain = not (self.is_images or self.excludes_folds)
        return 5 if plain and rows <= AUTO_FOLDS_MAX_ROWS else 1

    def fitted_embedding(self) -> str:
        """The encoding the normalizer fits: --embedding with auto settled. Tables: ple (with
        folds, training/ensemble.py bags the networks with and without it and exports the better;
        without folds, the networks take it: the tables without folds are the large ones, where it
        paid on each of the suite's, docs/quality.md). Images: none."""
        if self.embedding != "auto":
            return self.embedding
        return "none" if self.is_images else "ple"

    def test_share(self, folds: int) -> float:
        """--test-size with auto settled: no test split when the networks are bagged over folds
        (every row then trains four of five networks and judges the fifth, which paid more than a
        test split's rows held out: docs/quality.md), else TEST_SIZE."""
        if self.test_size != "auto":
            return self.test_size
        return 0.0 if folds > 1 else TEST_SIZE

    @property
    def model_name(self) -> str:
        raw = self.name or (Path(self.data).stem if self.data else
                            Path(self.images).resolve().name if self.images else self.dataset)
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in raw.lower()).strip("-_.")
        return name or "model"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that define what is trained: a checkpoint made under other values cannot be resumed.
RUN_DEFINING = ("dataset", "data", "target", "features", "categorical", "numeric", "drop", "images",
                "image_size", "task", "val_size", "test_size", "seed", "normalizer", "embedding",
                "embedding_bins", "batchnorm",
                "hidden", "linear_skip", "channels", "augment", "dropout", "optimizer", "lr",
                "momentum", "weight_decay", "scheduler", "epochs", "batch_size", "stop_on",
                "label_smoothing", "ensemble", "refit", "folds", "fold_repeats", "linear_candidate",
                "stream", "chunk_rows", "shuffle_rows")


def _list_of(kind):
    def parse(text: str):
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def folds(value) -> int | str:
    """A fold count: a whole number, or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        whole = not isinstance(value, bool) and float(value) == int(float(value))
    except OverflowError:  # inf
        whole = False
    if not whole:
        raise ValueError(f"expected a whole number or auto, got {value!r}")
    return int(float(value))


def number_or_auto(value) -> float | str:
    """A learning rate or a share: a number, or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number or auto, got {value!r}") from None


CASTERS = {"int": int, "float": float, "float | str": number_or_auto, "int | str": folds}  # by field type


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Train a normalized BatchNorm network on a table and export it, with its "
                    "normalization, to ONNX (models/<name>/<version>/) and the BentoML model store.")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of defaults; flags override it")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] += f" (default: {f.default})"
        else:
            kw["type"] = {**CASTERS, "int | None": int, "list[int]": _list_of(int),
                          "list[str] | None": _list_of(str)}.get(f.type, str)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            if f.default is not None:
                default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                kw["help"] += f" (default: {default})"
        parser.add_argument(flag, **kw)
    parser.add_argument("--no-normalize", dest="normalizer", action="store_const", const="none",
                        default=argparse.SUPPRESS, help="the same as --normalizer none")
    return parser


def load_config(argv: list[str] | None = None) -> Config:
    """Parse flags over an optional YAML file over the defaults."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if path := args.pop("config", None):
        values = read_yaml(path)
    values.update(args)
    return make_config(values)


def read_yaml(path: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in values.items()}


def make_config(values: dict[str, Any]) -> Config:
    if "normalize" in values:  # the switch's earlier name, in config files
        values["normalizer"] = "standard" if values.pop("normalize") else "none"
    known = {f.name for f in dataclasses.fields(Config)}
    if unknown := sorted(set(values) - known):
        raise ConfigError(f"unknown option(s) in config: {', '.join(unknown)}")
    for key in ("hidden", "channels"):
        if isinstance(values.get(key), str):
            values[key] = _list_of(int)(values[key])
    for key in ("features", "categorical", "numeric", "drop"):
        if isinstance(values.get(key), str):
            values[key] = _list_of(str)(values[key])
    for f in dataclasses.fields(Config):
        if f.type == "bool" and isinstance(values.get(f.name), str):
            word = values[f.name].strip().lower()
            if word not in ("true", "false", "yes", "no", "1", "0"):
                raise ConfigError(f"option {f.name} must be true or false, got {values[f.name]!r}")
            values[f.name] = word in ("true", "yes", "1")
        caster = CASTERS.get(f.type)
        if caster and f.name in values:
            try:
                values[f.name] = caster(values[f.name])
            except (TypeError, ValueError):
                raise ConfigError(f"option {f.name} must be a number, got {values[f.name]!r}") from None
    for f in dataclasses.fields(Config):
        if "choices" in f.metadata and f.name in values and values[f.name] not in f.metadata["choices"]:
            raise ConfigError(f"option {f.name} must be one of {', '.join(f.metadata['choices'])}, "
                              f"got {values[f.name]!r}")
    try:
        return Config(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
