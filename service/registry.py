"""The models one server serves: several models, several versions of each, a default version per
model name, and the server's default model (what /predict answers with when a request names
none). One Registry per process; it owns what is loaded (MLServer's registry, in spirit).

What is served is a `Served` snapshot, replaced whole: a request takes the snapshot once and
keeps its scorer, so a switch never touches a request in flight and an unloaded version finishes
the requests it has. Changes go to the durable record first (service/record.py): the worker that
takes a load opens and checks the new version before anything changes (a bad candidate leaves
everything as it was), writes the record, and serves the new snapshot before it answers; the
other workers follow the record from a thread of their own, opening new versions there, off the
event loop.

At start-up: the default model is MODEL_TAG (or a built Bento's model) when set, else the
record's, else the model trained last; the record's other models are loaded beside it.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from service.loading import ModelError, fail, named_model_tag, newest_model_tag, open_model, stored_models
from service.record import FOLLOW_SECONDS, Record, run_id
from service.scoring import Scorer, input_signature


LOOK_SECONDS = 0.001  # requests look at the record at most this often


class NotLoaded(LookupError):
    """A request names a model or version this server does not serve (404)."""


class LoadRefused(ValueError):
    """A load or unload that cannot be done (400); nothing changed."""


class Refused(Exception):
    """A candidate version that failed its checks: `tag` and `reason`."""

    def __init__(self, tag: str, reason: str):
        super().__init__(reason)
        self.tag, self.reason = tag, reason


@dataclass(frozen=True)
class Served:
    scorers: dict[str, Scorer]          # "name:version" -> its scorer
    defaults: dict[str, str]            # name -> its default version
    default_model: str                  # the server's default model name
    failed: dict[str, str] = field(default_factory=dict)  # "name:version" -> why it did not load

    @property
    def default(self) -> Scorer:
        return self.scorers[f"{self.default_model}:{self.defaults[self.default_model]}"]

    def versions(self, name: str) -> list[str]:
        return [t.split(":", 1)[1] for t in self.scorers if t.split(":", 1)[0] == name]

    def as_record(self) -> dict:
        models = {}
        for tag in self.scorers:
            name, version = tag.split(":", 1)
            models.setdefault(name, {"default": self.defaults[name], "loaded": []})["loaded"].append(version)
        return {"default_model": self.default_model, "models": models, "failed": dict(self.failed)}


def tags_of(doc: dict) -> dict[str, list[str]]:
    """name -> its loaded versions, the default first, in a record."""
    out = {}
    for name, m in (doc.get("models") or {}).items():
        rest = [v for v in m.get("loaded", []) if v != m.get("default")]
        out[name] = [m["default"], *rest] if m.get("default") else rest
    return out


class Registry:
    def __init__(self, threads: int, max_rows: int, record: Record | None = None):
        self.threads, self.max_rows = threads, max_rows
        self.record = record or Record()
        self.lock = threading.Lock()  # one change at a time in this process
        self.next_look = 0.0          # when a request next looks at the record
        self.started = False          # scorers started (monitors, warm-up): in a worker
        self.served = self._at_start_up()
        self.stamp, self.generation = self.record.stamp(), int((self.record.read() or {}).get("generation", 0))

    # ---- start-up -------------------------------------------------------------------------

    def _at_start_up(self) -> Served:
        named = named_model_tag()
        doc = self.record.read() or {}
        if named is None and not doc.get("default_model"):
            named = newest_model_tag()
        plan = tags_of(doc)
        if named:
            name, version = named.split(":", 1)
            plan[name] = [version, *[v for v in plan.get(name, []) if v != version]]
            default_model = name
        else:
            default_model = doc["default_model"]
        scorers, defaults, failed = {}, {}, {}
        for name, versions in plan.items():
            for version in versions:
                tag = f"{name}:{version}"
                try:
                    scorers[tag] = self.open(tag)
                    defaults.setdefault(name, version)
                except ModelError as e:
                    if name == default_model and not defaults.get(name):
                        fail(str(e))  # the server's default model must open, as before
                    failed[tag] = str(e)
                    print(f"warning: not loaded: {e}", file=sys.stderr)
        return Served(scorers, defaults, default_model, failed)

    def open(self, tag: str) -> Scorer:
        return Scorer(*open_model(tag, self.threads), self.max_rows)

    def start(self) -> None:
        """In a worker: start every scorer (drift monitor, warm-up) and follow the record."""
        for scorer in self.served.scorers.values():
            scorer.start()
        self.started = True
        threading.Thread(target=self._follow, name="normserve-record", daemon=True).start()

    # ---- requests -------------------------------------------------------------------------

    def current(self) -> Served:
        """What this process serves, once it has caught up with the record: a change another
        worker made is served from a millisecond after that worker answered (the record is looked
        at, one stat, at most once a millisecond; the thread that follows the record has usually
        opened what is new by then)."""
        now = time.monotonic()
        if now >= self.next_look:
            self.next_look = now + LOOK_SECONDS
            if self.record.stamp() != self.stamp:
                with self.lock:
                    self._catch_up()
        return self.served

    def find(self, ref: str | None, version: str | None = None) -> Scorer:
        """The scorer for a request: no model named -> the server's default; NAME -> its default
        version; NAME:VERSION (or `version`) -> that version."""
        served = self.current()
        return served.default if not ref else self._find(served, ref, version)

    @staticmethod
    def _find(served: Served, ref: str, version: str | None) -> Scorer:
        name, _, tagged = ref.partition(":")
        version = version or tagged or served.defaults.get(name)
        if (scorer := served.scorers.get(f"{name}:{version}")) is None:
            if name not in served.defaults:
                raise NotLoaded(f"model {name!r} is not loaded; loaded: {', '.join(sorted(served.defaults))}")
            raise NotLoaded(f"model {name!r} has no loaded version {version!r}; loaded: "
                            f"{', '.join(served.versions(name))}")
        return scorer

    # ---- changes (service/repository.py) ---------------------------------------------------

    def load(self, name: str, wanted, default_of, allow_input_change: bool) -> Served:
        """Load a model's versions: `wanted(loaded versions)` gives the versions of `name` to have
        loaded, `default_of(those)` the default among them. Every new version is opened and
        checked first; a refused one changes nothing but the index's reason for it."""
        def compute(served: Served) -> tuple[Served, dict[str, Scorer]]:
            versions = wanted(served.versions(name))
            default, opened = default_of(versions), {}
            for version in versions:
                tag = f"{name}:{version}"
                if tag not in served.scorers:
                    try:
                        opened[tag] = self.open(tag)
                    except ModelError as e:
                        raise Refused(tag, str(e)) from None
            new_default = opened.get(f"{name}:{default}") or served.scorers[f"{name}:{default}"]
            if name in served.defaults and not allow_input_change:
                current = served.scorers[f"{name}:{served.defaults[name]}"]
                if input_signature(new_default.meta) != input_signature(current.meta):
                    raise Refused(new_default.tag, f"{new_default.tag} takes other inputs than {current.tag} "
                                  "(the default now); load it with \"allow_input_change\": true in the "
                                  "config if that is intended")
            kept = {t: sc for t, sc in served.scorers.items()
                    if t.split(":", 1)[0] != name or t.split(":", 1)[1] in versions}
            failed = {t: r for t, r in served.failed.items() if t not in opened}
            return Served({**kept, **opened}, {**served.defaults, name: default}, served.default_model,
                          failed), opened
        return self._change(compute)

    def unload(self, name: str) -> Served:
        def compute(served: Served) -> tuple[Served, dict]:
            if name == served.default_model:
                raise LoadRefused(f"{name!r} is the server's default model (what /predict answers "
                                  "with): it cannot be unloaded; load another version of it instead")
            if name not in served.defaults:
                raise NotLoaded(f"model {name!r} is not loaded")
            scorers = {t: sc for t, sc in served.scorers.items() if t.split(":", 1)[0] != name}
            defaults = {n: v for n, v in served.defaults.items() if n != name}
            return Served(scorers, defaults, served.default_model, served.failed), {}
        return self._change(compute)

    def _change(self, compute) -> Served:
        """One change, under the record's lock (so that changes through different workers never
        lose one another): catch up with the record, derive the new snapshot, start what it
        opened, write the record, then serve it. A Refused candidate is written to the record's
        failures (the index shows why on every worker) and nothing else changes."""
        with self.lock, self.record.locked():
            self._catch_up()
            try:
                new, opened = compute(self.served)
            except Refused as e:
                old = self.served
                new, opened = Served(old.scorers, old.defaults, old.default_model,
                                     {**old.failed, e.tag: e.reason}), {}
                self._publish(new)
                raise LoadRefused(e.reason) from None
            if self.started:
                for scorer in opened.values():
                    scorer.start()
            self._publish(new)
            return new

    def _publish(self, new: Served) -> None:
        self.generation += 1
        self.record.write({**new.as_record(), "run": run_id(), "generation": self.generation})
        self.stamp, self.served = self.record.stamp(), new

    # ---- following the record ---------------------------------------------------------------

    def _follow(self) -> None:
        while True:
            time.sleep(FOLLOW_SECONDS)
            try:
                if self.record.stamp() != self.stamp:
                    with self.lock:
                        self._catch_up()
            except Exception as e:  # never stop following; say why
                print(f"warning: following {self.record.path}: {type(e).__name__}: {e}", file=sys.stderr)

    def _catch_up(self) -> None:
        """Serve what the record says, if another worker changed it since (hold self.lock)."""
        stamp, doc = self.record.stamp(), self.record.read()
        self.stamp = stamp
        if doc is None or int(doc.get("generation", 0)) <= self.generation:
            return
        served, opened = self.served, {}
        scorers, defaults, failed = {}, {}, dict(doc.get("failed") or {})
        for name, versions in tags_of(doc).items():
            for version in versions:
                tag = f"{name}:{version}"
                if (scorer := served.scorers.get(tag)) is None:
                    try:
                        scorer = opened[tag] = self.open(tag)
                    except ModelError as e:
                        failed[tag] = str(e)
                        continue
                scorers[tag] = scorer
                defaults.setdefault(name, version)
        self.generation = int(doc["generation"])
        default_model = doc.get("default_model") or served.default_model
        if default_model not in defaults:  # not written by the endpoints: keep serving what we do
            return
        if self.started:
            for scorer in opened.values():
                scorer.start()
        self.served = Served(scorers, defaults, default_model, failed)

    # ---- what the index lists -----------------------------------------------------------------

    def index(self, ready_only: bool) -> list[dict]:
        """The store's models of this pipeline: READY (loaded), or UNAVAILABLE and why."""
        served = self.current()
        entries = []
        for m in stored_models():
            tag = str(m.tag)
            name, version = tag.split(":", 1)
            if tag in served.scorers:
                entries.append({"name": name, "version": version, "state": "READY", "reason": ""})
            elif not ready_only:
                entries.append({"name": name, "version": version, "state": "UNAVAILABLE",
                                "reason": served.failed.get(tag, "not loaded")})
        return entries

    def versions_in_store(self, name: str) -> list[str]:
        """A model's stored versions, oldest first."""
        return [str(m.tag).split(":", 1)[1] for m in stored_models(name)]
