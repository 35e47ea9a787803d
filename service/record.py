"""The durable record of what a server serves: which versions of which models are loaded, each
model's default version, and the server's default model. Every worker follows it; a change made
through one worker (service/repository.py) is written here, and the others apply it within
FOLLOW_SECONDS. After a restart the server serves what the record says (unless MODEL_TAG or a
built Bento names the default model: service/registry.py).

    {"generation": 7, "run": "4121-1764768000.52", "default_model": "loans",
     "models": {"loans": {"default": "20261203-101500-ab12", "loaded": ["20261203-101500-ab12", ...]}},
     "failed": {"loans:20261203-111500-cd34": "model.onnx does not match its card ..."}}

It lives in $BENTOML_HOME/normserve/served.json (NORMSERVE_RECORD names another file), out of the
Prometheus folder that BentoML empties at start. Written whole to a temporary file and renamed,
under an exclusive lock on a file beside it, so readers never see half a record and two changes
never lose one another.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

FOLLOW_SECONDS = 0.2


def record_path() -> Path:
    if path := os.environ.get("NORMSERVE_RECORD"):
        return Path(path)
    home = os.environ.get("BENTOML_HOME") or os.path.join(os.path.expanduser("~"), "bentoml")
    return Path(home) / "normserve" / "served.json"


def run_id() -> str:
    """This `bentoml serve`: its workers share the parent process (its pid and start time)."""
    import psutil
    parent = psutil.Process(os.getppid())
    return f"{parent.pid}-{parent.create_time():.2f}"


class Record:
    def __init__(self, path: Path | None = None):
        self.path = path or record_path()

    def stamp(self) -> tuple | None:
        """What changes whenever the record is rewritten (None: there is no record)."""
        try:
            s = os.stat(self.path)
        except FileNotFoundError:
            return None
        return s.st_ino, s.st_mtime_ns, s.st_size

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # damaged by hand: treated as absent, and rewritten on change
            return None

    @contextlib.contextmanager
    def locked(self):
        """An exclusive lock on the record, across processes, for a read-change-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def write(self, doc: dict) -> None:
        """The whole record, atomically (hold `locked()`)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the record: a crash leaves one whole
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # and the rename with it
        finally:
            os.close(directory)
