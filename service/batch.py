"""`python -m service.batch`: score a large file with a stored model, in process or on Apache Spark,
through the same checks and graph /predict uses.

    python -m service.batch --model loans --input big.parquet --output scored.parquet --keep id
    python -m service.batch --model loans:V --input parts/ --output scored/ --engine spark --master local[4]
    python -m service.batch ... --engine spark --master spark://host:7077

Input: a CSV file (separator and decimal commas detected as training detects them; .gz, .bz2, .xz)
or a Parquet file or directory of Parquet parts. Output: Parquet, one row per input row: the --keep
columns (as the file has them; CSV columns as the text written), then `prediction` (the class
label, or the value in the target's units), `probability_<class>` per class (classification),
`model` (name:version) and `error` (null, or why the row has no prediction). `local` keeps the
input's order in one file; `spark` writes a directory of parts in no particular order (join on the
kept ids). The output appears whole (written beside, then renamed); an existing one needs
--overwrite.

Each batch of rows is checked column by column, vectorized, by the service's rules (service/rows.py:
check_frame): a row with a bad value gets its reason and no prediction, every other row is scored.
A column the model takes that the file lacks stops the job before any work. More bad rows than
--max-error-rate (0.01) gives exit code 3 once the output is written; 2 is an error (one line), 0
success. The file's drift against the training profile, the whole file as one window with the
statistics and thresholds of /drift (one row in 4 of a large batch counted, as /drift counts a
large request's), ends the summary and is written beside the output
(`<output>.drift.json`).

`local` streams the file in record batches (pyarrow), checks and scores several at once with
onnxruntime (local_workers: one batch per core, at most 4) and writes them in order as it goes,
with a progress bar; memory stays bounded whatever the file's size.
`spark` runs a PySpark job (mapInArrow): this code, the graph's bytes and its metadata travel with
the job, and each Python worker opens one onnxruntime session, when it first needs it, with
spark.task.cpus threads. This module does not import PyTorch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.contract import MISSING_TEXTS

EXIT_OK, EXIT_FAILED, EXIT_ERRORS = 0, 2, 3
ROOT = Path(__file__).resolve().parents[1]
# The drift counts: of a batch of SAMPLE_ABOVE rows or more, one row in SAMPLE_STRIDE (evenly
# spaced; still thousands a batch), as /drift counts large requests: counting every row cost ~15%
# of the local engine's pace. A smaller file, or batch, is counted whole.
SAMPLE_ABOVE, SAMPLE_STRIDE = 16_384, 4


class BatchError(Exception):
    """The job cannot run; the message says why in one line."""


# ---- what the job reads and writes ---------------------------------------------------------

def needed_columns(scorer) -> list[str]:
    return [c["name"] for c in scorer.columns] if scorer.columns else list(scorer.feature_names)


def check_columns(header: list[str], scorer, keep: list[str]) -> None:
    if missing := [c for c in needed_columns(scorer) if c not in header]:
        raise BatchError(f"the input lacks column(s) the model takes: {', '.join(missing)}")
    if unknown := [k for k in keep if k not in header]:
        raise BatchError(f"--keep names column(s) the input does not have: {', '.join(unknown)}")


def output_schema(scorer, kept):
    """The output's columns: the kept ones (an Arrow schema, as read), then the job's own."""
    import pyarrow as pa
    if scorer.task == "classification":
        classes = scorer.classes
        label = (pa.bool_() if all(isinstance(c, bool) for c in classes)
                 else pa.int64() if all(isinstance(c, int) for c in classes) else pa.string())
        own = [pa.field("prediction", label), *(pa.field(f"probability_{c}", pa.float32()) for c in classes)]
    else:
        own = [pa.field("prediction", pa.float32())]
    own += [pa.field("model", pa.string()), pa.field("error", pa.string())]
    check_keep([f.name for f in kept], [f.name for f in own])
    return pa.schema([*kept, *own])


def check_keep(keep: list[str], own: list[str]) -> None:
    if clash := [k for k in keep if k in own]:
        raise BatchError(f"--keep names column(s) the output writes itself: {', '.join(clash)}")


def as_read(values, decimal: str, numeric: bool):
    """Text cells as training reads a file (CSV cells are all text to both engines): a column whose
    present values are all numbers is numbers. In a column the model takes as numbers, each value
    written as a number is one, and the others stay text for the checks to name."""
    import pandas as pd
    there = values.notna() & ~values.isin(MISSING_TEXTS)
    text = values[there].astype(str)
    if decimal == ",":
        text = text.str.replace(".", "", regex=False).str.replace(",", ".", regex=False)
    x = pd.to_numeric(text, errors="coerce")
    if x.notna().all():
        return x if there.all() else x.reindex(values.index)
    if numeric:
        x = x.reindex(values.index)
        return values.astype(object).where(x.isna(), x)
    return values


@dataclass
class Reading:
    """How a record batch of the input becomes the model's columns as a DataFrame."""
    columns: list[str]          # the model's
    keep: list[str]
    decimal: str | None         # CSV: the file's decimal mark; None for Parquet
    numeric: set = field(default_factory=set)

    def frame(self, batch):
        from training.files import arrow_to_pandas
        from training.rules import is_number_column
        frame = arrow_to_pandas(batch.select(self.columns))
        for c in self.columns:
            if self.decimal is not None or (c in self.numeric and not is_number_column(frame[c])):
                frame[c] = as_read(frame[c], self.decimal or ".", c in self.numeric)
        return frame


def reading(scorer, keep: list[str], decimal: str | None) -> Reading:
    numeric = {c["name"] for c in scorer.columns or () if c["type"] == "numeric"} if scorer.columns \
        else set(scorer.feature_names)
    return Reading(needed_columns(scorer), keep, decimal, numeric)


# ---- scoring one batch: both engines ---------------------------------------------------------

def score_batch(scorer, batch, read: Reading, schema, profiled=None):
    """One record batch of the input as a record batch of the output, and the drift counts of
    the rows scored (with `profiled`, the model's Profiled inputs)."""
    import pyarrow as pa

    from service.rows import check_frame
    frame = read.frame(batch)
    feeds, reasons = check_frame(scorer, frame)
    ok = reasons == None
    n, out = len(frame), None
    if ok.any():
        out = scorer.session.run(scorer.outputs, feeds)
        finite = np.isfinite(out[0].reshape(len(out[0]), -1)).all(axis=1)
        if not finite.all():  # no answer for a row whose output overflows, as over HTTP
            bad = np.flatnonzero(ok)[~finite]
            reasons[bad] = "the model's output overflows for these values (far outside the training data?)"
            ok[bad] = False
            out, feeds = [o[finite] for o in out], {k: v[finite] for k, v in feeds.items()}
    where, missing = np.flatnonzero(ok), ~ok
    columns = [batch.column(k) for k in read.keep]
    if scorer.task == "classification":
        label = np.zeros(n, np.int32)
        if len(where):
            label[where] = out[1]
        classes = pa.array(scorer.classes, type=schema.field("prediction").type)
        columns.append(pa.DictionaryArray.from_arrays(pa.array(label, mask=missing), classes).cast(classes.type))
        for j in range(len(scorer.classes)):
            p = np.zeros(n, np.float32)
            if len(where):
                p[where] = out[0][:, j]
            columns.append(pa.array(p, mask=missing))
    else:
        value = np.zeros(n, np.float32)
        if len(where):
            value[where] = out[0].reshape(-1)
        columns.append(pa.array(value, mask=missing))
    model = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([scorer.tag])).cast(pa.string())
    columns += [model, pa.nulls(n, pa.string()) if ok.all() else pa.array(reasons, pa.string())]
    counts = None
    if profiled is not None and len(where):
        step = SAMPLE_STRIDE if len(where) >= SAMPLE_ABOVE else 1
        counts = profiled.layout.count(*profiled({k: v[::step] for k, v in feeds.items()}))
    return pa.RecordBatch.from_arrays(columns, schema=schema), counts


# ---- the file's drift ------------------------------------------------------------------------

def drift_report(meta: dict, counts) -> dict | None:
    """The whole file as one window against the training profile, by the statistics and
    thresholds of /drift."""
    if not meta.get("drift"):
        return None
    from service.monitor import SETTINGS
    from training.drift import Layout
    from training.drift_stats import Comparison
    layout = Layout(meta["drift"])
    report = Comparison(layout, SETTINGS, meta["drift"].get("rows")).compare(
        counts if counts is not None else np.zeros(layout.size))
    return {"model": meta["model"], "window": "the whole file", **report}


def profiled_inputs(meta: dict):
    """The model's inputs as its drift profile counts them, or None without a profile."""
    if not meta.get("drift"):
        return None
    from service.monitor import Profiled
    from training.drift import Layout
    profiled = Profiled(meta)
    profiled.layout = Layout(meta["drift"])
    return profiled


@dataclass
class Summary:
    rows_in: int
    rows_out: int
    errors: int
    seconds: float
    drift: dict | None
    engine: str
    startup_seconds: float = 0.0
    sessions: list = field(default_factory=list)  # spark: the Python workers that opened a session


# ---- the local engine ----------------------------------------------------------------------

def open_scorer(tag: str, threads: int):
    import bentoml

    from service.loading import ModelError, open_model
    from service.scoring import Scorer
    try:
        resolved = str(bentoml.models.get(tag).tag)
    except (bentoml.exceptions.NotFound, ValueError):
        raise BatchError(f"{tag} is not in the BentoML model store (`bentoml models list`)") from None
    try:
        return Scorer(*open_model(resolved, threads), 10**9)
    except ModelError as e:
        raise BatchError(str(e)) from None


def local_batches(how, columns: list[str], chunk_rows: int):
    """The input as record batches of `columns` (CSV: every cell as its text), and the row count
    when the file says it (Parquet)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from training.files import COMPRESSED
    if how.parquet:
        # One thread reads (the cores score), a row group at a time: pyarrow 26's iter_batches over
        # a whole file holds every batch it has read until the end (2.5 GB for 10M rows of 30 floats).
        files = [pq.ParquetFile(p) for p in how.parts]
        return (b for f in files for g in range(f.num_row_groups)
                for b in f.iter_batches(chunk_rows, row_groups=[g], columns=columns, use_threads=False)), \
            sum(f.metadata.num_rows for f in files)
    opener = COMPRESSED.get(Path(how.path).suffix.lower())
    source = opener(how.path, "rb") if opener else how.path
    reader = pacsv.open_csv(
        source, read_options=pacsv.ReadOptions(block_size=1 << 22),
        parse_options=pacsv.ParseOptions(delimiter=how.sep, newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(include_columns=columns, column_types=dict.fromkeys(columns, pa.string()),
                                             strings_can_be_null=True, null_values=[""]))
    return iter(reader), None


def local_workers() -> tuple[int, int]:
    """How the local engine uses the cores: batches scored at once, and onnxruntime threads for
    each. One thread per batch scales better than one batch on every thread (onnxruntime alone:
    1.6x from one thread to two here), and the checks and writing of one batch overlap the others'
    scoring; at most 4 batches at once, so memory stays a few batches."""
    cores = os.cpu_count() or 1
    workers = min(cores, 4)
    return workers, max(1, cores // workers)


def run_local(scorer, source: str, output: Path, keep: list[str], chunk_rows: int, progress: bool) -> Summary:
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from training.files import check_file, check_header, read_errors
    from training.rules import DataError
    started = time.perf_counter()
    try:
        how = check_file(source)
        check_columns(check_header(how), scorer, keep)
    except DataError as e:
        raise BatchError(str(e)) from None
    columns = list(dict.fromkeys(needed_columns(scorer) + keep))
    read = reading(scorer, keep, None if how.parquet else how.decimal)
    profiled = profiled_inputs(scorer.meta)
    counts = np.zeros(profiled.layout.size) if profiled else None
    tmp = output.with_name(f".{output.name}.tmp")
    rows, errors, writer, pending = 0, 0, None, deque()
    workers = local_workers()[0]
    pool = ThreadPoolExecutor(workers)

    def write_oldest():  # in the input's order
        nonlocal rows, errors, counts
        scored, batch_counts = pending.popleft().result()
        writer.write_batch(scored)
        if batch_counts is not None:
            counts += batch_counts
        rows += scored.num_rows
        errors += scored.num_rows - scored.column("error").null_count
        bar.update(scored.num_rows)
    try:
        with read_errors(source):
            batches, total = local_batches(how, columns, chunk_rows)
            bar = tqdm(total=total, desc="score", unit=" rows", unit_scale=True, disable=not progress)
            for batch in batches:
                if writer is None:
                    kept = pa.schema([batch.schema.field(k) for k in keep])
                    schema = output_schema(scorer, kept)
                    # dictionary pages for the job's own few-valued columns, not for the kept ids
                    writer = pq.ParquetWriter(tmp, schema, use_dictionary=["prediction", "model", "error"])
                pending.append(pool.submit(score_batch, scorer, batch, read, schema, profiled))
                if len(pending) > workers:
                    write_oldest()
            while pending:
                write_oldest()
            bar.close()
        if writer is None:
            raise BatchError(f"{source} has no data rows")
        writer.close()
        replace(tmp, output)
    except DataError as e:
        raise BatchError(str(e)) from None
    finally:
        pool.shutdown(cancel_futures=True)
        if tmp.exists():
            tmp.unlink()
    rows_out = pq.ParquetFile(output).metadata.num_rows
    return Summary(rows, rows_out, errors, time.perf_counter() - started,
                   drift_report(scorer.meta, counts), "local")


def replace(tmp: Path, output: Path) -> None:
    """The finished output in place of `output` (a file or a directory of parts, either way)."""
    old = output.with_name(f".{output.name}.old")
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


# ---- the spark engine ----------------------------------------------------------------------

_WORKER: dict = {}  # in each Python worker: model tag -> its scorer, opened once, when first needed


def worker_scorer(model, meta: dict, threads: int, opened):
    """This Python worker's scorer for the model (`model`: the graph's bytes, broadcast)."""
    if (scorer := _WORKER.get(meta["model"])) is None:
        import onnxruntime as ort

        from service.scoring import Scorer
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(model.value, options, providers=["CPUExecutionProvider"])
        scorer = _WORKER[meta["model"]] = Scorer(session, meta, 10**9)
        opened.add([os.getpid()])
    return scorer


_SESSIONS: dict = {}


def spark_session(master: str, progress: bool):
    """This process's Spark session for `master`, with this code shipped to its workers (tests
    share one session)."""
    if (spark := _SESSIONS.get(master)) is None:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        from pyspark.sql import SparkSession
        spark = (SparkSession.builder.master(master).appName("normserve-batch")
                 .config("spark.ui.enabled", "false")
                 .config("spark.ui.showConsoleProgress", str(progress).lower())
                 .config("spark.sql.execution.arrow.maxRecordsPerBatch", "65536")
                 .getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        spark.sparkContext.addPyFile(str(code_zip()))
        _SESSIONS[master] = spark
    return spark


def code_zip() -> Path:
    """The service and training packages as a zip for the executors' Python path."""
    path = Path(tempfile.mkdtemp(prefix="normserve-code-")) / "normserve.zip"
    with zipfile.ZipFile(path, "w") as z:
        for package in ("service", "training"):
            for f in sorted((ROOT / package).rglob("*.py")):
                z.write(f, f.relative_to(ROOT))
    return path


def accumulators(spark, size: int):
    """What the workers add to: the rows read, the drift counts, and the pid of each Python
    worker each time it opens a session."""
    from pyspark.accumulators import AccumulatorParam

    class Sum(AccumulatorParam):
        def zero(self, value):
            return np.zeros_like(value)

        def addInPlace(self, a, b):
            return a + b

    class Joined(AccumulatorParam):
        def zero(self, value):
            return []

        def addInPlace(self, a, b):
            return a + b
    sc = spark.sparkContext
    return sc.accumulator(0), sc.accumulator(np.zeros(size), Sum()), sc.accumulator([], Joined())


def spark_frame(spark, how):
    if how.parquet:
        return spark.read.parquet(*how.parts)
    # Every cell as text, read as the local engine reads it (as_read). Lines are split across
    # tasks, so a quoted field may not hold a line break (the local engine allows it).
    df = spark.read.csv(how.path, header=True, sep=how.sep, inferSchema=False, encoding="UTF-8",
                        escape='"', nullValue="")
    return df.toDF(*[c.lstrip("\ufeff") for c in df.columns])


def run_spark(scorer, source: str, output: Path, keep: list[str], master: str, progress: bool) -> Summary:
    import pyarrow.parquet as pq
    from pyspark.sql.functions import lit
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    from training.files import check_file
    from training.rules import DataError
    started = time.perf_counter()
    try:
        how = check_file(source)
    except DataError as e:
        raise BatchError(str(e)) from None
    spark = spark_session(master, progress)
    df = spark_frame(spark, how)
    check_columns(df.columns, scorer, keep)
    columns = list(dict.fromkeys(needed_columns(scorer) + keep))
    df = df.select(*columns)
    schema = output_schema(scorer, to_arrow_schema(df.select(*keep).schema))
    meta, threads = scorer.meta, int(spark.conf.get("spark.task.cpus", "1"))
    read = reading(scorer, keep, None if how.parquet else how.decimal)
    model = spark.sparkContext.broadcast(model_bytes(scorer))
    profiled = profiled_inputs(meta)
    rows, drift, opened = accumulators(spark, profiled.layout.size if profiled else 1)
    # Start-up, reported apart: the session, then a task per core that starts its Python worker and
    # opens the model there (the job's tasks find them ready; worker_scorer opens each once).
    slots = spark.sparkContext.defaultParallelism
    spark.sparkContext.parallelize(range(slots), slots).foreach(lambda _: worker_scorer(model, meta, threads, opened))
    startup = time.perf_counter() - started
    started = time.perf_counter()

    def score(batches):
        worker = worker_scorer(model, meta, threads, opened)
        for batch in batches:
            rows.add(batch.num_rows)
            scored, counts = score_batch(worker, batch, read, schema, profiled)
            if counts is not None:
                drift.add(counts)
            yield scored.drop_columns(["model"])  # a constant: added by Spark (lit), not converted per row

    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        scored = df.mapInArrow(score, from_arrow_schema(schema.remove(schema.get_field_index("model"))))
        scored.withColumn("model", lit(scorer.tag)).select(*schema.names).write.parquet(str(tmp))
        replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        model.unpersist()
    seconds = time.perf_counter() - started
    written = pq.ParquetDataset(str(output)).read(columns=["error"])
    return Summary(rows.value, written.num_rows, written.num_rows - written.column("error").null_count, seconds,
                   drift_report(meta, drift.value if profiled else None), "spark", startup, sorted(opened.value))


def model_bytes(scorer) -> bytes:
    import bentoml
    return Path(bentoml.models.get(scorer.tag).path_of("model.onnx")).read_bytes()


# ---- the command ---------------------------------------------------------------------------

def summary_text(s: Summary, output: Path, max_error_rate: float) -> str:
    rate = s.errors / max(s.rows_out, 1)
    lines = [f"  engine     {s.engine}" + (f" (start-up {s.startup_seconds:.1f} s, apart)" if s.engine == "spark" else ""),
             f"  rows       {s.rows_in:,} in, {s.rows_out:,} out, {s.errors:,} without a prediction ({rate:.2%})",
             f"  speed      {s.rows_in / max(s.seconds, 1e-9):,.0f} rows/s ({s.seconds:.1f} s)",
             f"  output     {output}"]
    if s.drift:
        moved = [f["name"] for f in s.drift["features"] if f["verdict"] != "ok"]
        lines.append(f"  drift      {s.drift['verdict']} over {s.drift['rows']:,} rows counted (one in 4 of a large batch)"
                     + (f" (moved: {', '.join(moved)})" if moved else ""))
    if rate > max_error_rate:
        lines.append(f"  errors     {rate:.2%} of the rows have no prediction, more than --max-error-rate "
                     f"{max_error_rate:g}: exit {EXIT_ERRORS}")
    return "\n".join(lines)


def write_report(output: Path, s: Summary) -> Path:
    path = output.with_name(output.name + ".drift.json")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"engine": s.engine, "rows_in": s.rows_in, "rows_out": s.rows_out,
                               "errors": s.errors, "seconds": round(s.seconds, 3),
                               **({"startup_seconds": round(s.startup_seconds, 3)} if s.engine == "spark" else {}),
                               "drift": s.drift}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m service.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="NAME (its newest version) or NAME:VERSION")
    parser.add_argument("--input", required=True, help="CSV or Parquet file, or a directory of Parquet parts")
    parser.add_argument("--output", required=True, help="Parquet file (local) or directory (spark)")
    parser.add_argument("--engine", choices=("local", "spark"), default="local")
    parser.add_argument("--keep", default="", help="comma-separated input columns copied to the output (ids)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--max-error-rate", type=float, default=0.01,
                        help="exit 3 when a larger share of rows has no prediction (default 0.01)")
    parser.add_argument("--chunk-rows", type=int, default=65536, help="local: rows per batch")
    parser.add_argument("--master", default="local[2]", help="spark: local[N] or a cluster URL (spark://host:7077)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa
    args = parse_args(argv)
    output, keep = Path(args.output), [k for k in args.keep.split(",") if k]
    try:
        if output.exists() and not args.overwrite:
            raise BatchError(f"{output} exists; --overwrite replaces it")
        if not output.parent.is_dir():
            raise BatchError(f"{output.parent} is not a directory")
        scorer = open_scorer(args.model, local_workers()[1] if args.engine == "local" else 1)
        check_keep(keep, output_schema(scorer, pa.schema([])).names)
        if args.engine == "local":
            summary = run_local(scorer, args.input, output, keep, args.chunk_rows, args.progress)
        else:
            summary = run_spark(scorer, args.input, output, keep, args.master, args.progress)
        write_report(output, summary)
    except BatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(summary_text(summary, output, args.max_error_rate))
    return EXIT_ERRORS if summary.errors / max(summary.rows_out, 1) > args.max_error_rate else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
