"""The models one server serves: several models, several versions of each, a default version per
model name, and the server's default model (what /predict answers with when a request names
none). One Registry per process; it owns what is loaded (MLServer's registry, in spirit).

What is served is a `Served` snapshot, replaced whole: a request takes the snapshot once and
keeps its scorer, so a switch never touches a request in flight and an unloaded version finishes
the requests it has. Changes go to the durable record first (service/record.py): the worker that
takes a load, holding the record's lock, catches up with it, opens and checks the new version
before anything changes (a bad candidate leaves everything as it was), writes the record, and
serves the new snapshot before it answers. The other workers follow the record: a request looks
at it at most once a millisecond and serves a change at once when it needs nothing opened (a
switch between loaded versions, an unload); a version not open yet is opened by the worker's
thread that follows the record, off the event loop, woken by that request. Only a request for a
model this worker has not opened yet waits for it.

At start-up: the default model is MODEL_TAG (or a built Bento's model) when set, else the
record's, else the model trained last; the record's other models are loaded beside it. A worker
that BentoML starts again within the same run takes the record as it is. Where a record exists,
the first worker writes what this run serves into it, so that a restart serves it again.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from service.loading import ModelError, fail, named_model_tag, newest_model_tag, open_model, stored_models
from service.record import FOLLOW_SECONDS, Record, run_id
from service.scoring import Scorer, input_signature
from service.shadow import Shadow, ShadowWorker

LOOK_SECONDS = 0.001  # requests look at the record at most this often


class NotLoaded(LookupError):
    """A request names a model or version this server does not serve (404)."""


class LoadRefused(ValueError):
    """A load or unload that cannot be done (400); nothing changed."""


class RecordError(RuntimeError):
    """The record could not be written (503); nothing changed."""


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
    shadows: dict[str, dict] = field(default_factory=dict)  # name -> {"version", "share"} (service/shadow.py)

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
        return {"default_model": self.default_model, "models": models, "failed": dict(self.failed),
                "shadows": dict(self.shadows)}

    def with_shadows(self, shadows: dict[str, dict]) -> Served:
        """The same, with the shadows that still make sense: a loaded version of a loaded model,
        not its default."""
        kept = {n: s for n, s in shadows.items() if n in self.defaults and s["version"] != self.defaults[n]
                and f"{n}:{s['version']}" in self.scorers}
        return Served(self.scorers, self.defaults, self.default_model, self.failed, kept)


def tags_of(doc: dict) -> dict[str, list[str]]:
    """name -> its loaded versions, the default first, in a record."""
    out = {}
    for name, m in (doc.get("models") or {}).items():
        rest = [v for v in m.get("loaded", []) if v != m.get("default")]
        out[name] = [m["default"], *rest] if m.get("default") else rest
    return out


def generation(doc: dict | None) -> int:
    return int((doc or {}).get("generation", 0))


class Registry:
    def __init__(self, threads: int, max_rows: int, record: Record | None = None):
        self.threads, self.max_rows = threads, max_rows
        self.record = record or Record()
        self.lock = threading.Lock()    # what this process serves changes under it
        self.wake = threading.Event()   # a request saw a change that needs opening: follow now
        self.next_look = 0.0            # when a request next looks at the record
        self.started = False            # in a worker: scorers start (drift monitor, warm-up)
        self.shadow_worker = ShadowWorker()
        self._served: Served | None = None
        self.stamp = self.record.stamp()
        doc = self.record.read()
        self.generation = generation(doc)
        self.served = self._at_start_up(doc or {})

    # ---- start-up -------------------------------------------------------------------------

    def _at_start_up(self, doc: dict) -> Served:
        named = named_model_tag() if doc.get("run") != run_id() else None  # restarted worker: the record
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
        return Served(scorers, defaults, default_model, failed).with_shadows(doc.get("shadows") or {})

    @property
    def served(self) -> Served:
        return self._served

    @served.setter
    def served(self, new: Served) -> None:
        """Serve `new`; in a worker, each default with a shadow offers it what it answers."""
        if self.started:
            for scorer in new.scorers.values():
                scorer.shadow = None
            for name, s in new.shadows.items():
                default = new.scorers[f"{name}:{new.defaults[name]}"]
                default.shadow = Shadow(default, new.scorers[f"{name}:{s['version']}"], s["share"],
                                        self.shadow_worker)
                self.shadow_worker.ensure_running()
        self._served = new

    def open(self, tag: str) -> Scorer:
        """A version opened and checked (in a worker also started: its monitor, a first run);
        ModelError says why not."""
        scorer = Scorer(*open_model(tag, self.threads), self.max_rows)
        if self.started:
            try:
                scorer.start()
            except Exception as e:  # onnxruntime's own errors: the graph cannot run
                raise ModelError(f"{tag}: its first run failed: {str(e).strip().splitlines()[0]}") from None
        return scorer

    def start(self) -> None:
        """In a worker: start every scorer, record what this run serves, follow the record."""
        for scorer in self.served.scorers.values():
            scorer.start()
        self.started = True
        self.served = self.served  # wires the shadows
        try:
            with self.record.locked(), self.lock:
                doc = self.record.read()
                if doc and doc.get("run") != run_id() and generation(doc) == self.generation:
                    self._publish(self.served)  # MODEL_TAG may have chosen another default than the record's
                else:
                    self._catch_up()  # a sibling worker of this run wrote it already (or nothing to do)
        except (OSError, RecordError) as e:  # a worker that raised here would be restarted forever
            print(f"warning: the record of loaded models is not kept: {e}", file=sys.stderr)
        threading.Thread(target=self._follow, name="normserve-record", daemon=True).start()

    # ---- requests -------------------------------------------------------------------------

    def current(self) -> Served:
        """What this process serves, having looked at the record at most a millisecond ago."""
        now = time.monotonic()
        if now >= self.next_look:
            self.next_look = now + LOOK_SECONDS
            if self.record.stamp() != self.stamp:
                self._follow_now()
        return self.served

    def _follow_now(self) -> None:
        """From a request: serve the record's change at once if it needs nothing opened; else
        wake the thread that follows the record, which opens what is new off the event loop."""
        if not self.lock.acquire(blocking=False):
            return  # a change, or the follower, is at work: it serves the record when done
        try:
            stamp, doc = self.record.stamp(), self.record.read()
            if doc is None or generation(doc) <= self.generation:
                self.stamp = stamp
            elif all(f"{n}:{v}" in self.served.scorers for n, vs in tags_of(doc).items() for v in vs):
                self._apply(doc, {}, stamp)
            else:
                self.wake.set()
        finally:
            self.lock.release()

    def find(self, ref: str | None, version: str | None = None) -> Scorer:
        """The scorer for a request: no model named -> the server's default; NAME -> its default
        version; NAME:VERSION (or `version`) -> that version. A model loaded a moment ago through
        another worker and not opened here yet is opened now (the request waits for it)."""
        served = self.current()
        if not ref:
            return served.default
        try:
            return self._find(served, ref, version)
        except NotLoaded:
            if self.record.stamp() == self.stamp:
                raise
            with self.lock:
                self._catch_up()
            return self._find(self.served, ref, version)

    @staticmethod
    def _find(served: Served, ref: str, version: str | None) -> Scorer:
        name, _, tagged = ref.lower().partition(":")  # the store keeps names in lower case
        version = (version or tagged).lower() or served.defaults.get(name)
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
        checked first; a refused one changes nothing but the record's reason for it."""
        def compute(served: Served) -> Served:
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
                          failed).with_shadows(served.shadows)
        return self._change(compute)

    def set_shadow(self, name: str, version: str | None, share: float = 0.0) -> Served:
        """Make a loaded version the shadow of its model's default (version None: end it)."""
        def compute(served: Served) -> Served:
            if name not in served.defaults:
                raise NotLoaded(f"model {name!r} is not loaded")
            shadows = {n: s for n, s in served.shadows.items() if n != name}
            if version is None:
                if name not in served.shadows:
                    raise NotLoaded(f"model {name!r} has no shadow")
                return served.with_shadows(shadows)
            tag, default = f"{name}:{version}", served.scorers[f"{name}:{served.defaults[name]}"]
            if tag not in served.scorers:
                raise NotLoaded(f"model {name!r} has no loaded version {version!r}; load it first; loaded: "
                                f"{', '.join(served.versions(name))}")
            if version == served.defaults[name]:
                raise LoadRefused(f"{tag} is the default: a shadow is another version")
            if input_signature(served.scorers[tag].meta) != input_signature(default.meta):
                raise LoadRefused(f"{tag} takes other inputs than {default.tag}: a shadow scores the "
                                  "default's inputs as they are")
            return served.with_shadows({**shadows, name: {"version": version, "share": share}})
        return self._change(compute)

    def unload(self, name: str) -> Served:
        def compute(served: Served) -> Served:
            if name == served.default_model:
                raise LoadRefused(f"{name!r} is the server's default model (what /predict answers "
                                  "with): it cannot be unloaded; load another version of it instead")
            if name not in served.defaults:
                raise NotLoaded(f"model {name!r} is not loaded")
            scorers = {t: sc for t, sc in served.scorers.items() if t.split(":", 1)[0] != name}
            defaults = {n: v for n, v in served.defaults.items() if n != name}
            return Served(scorers, defaults, served.default_model, served.failed).with_shadows(served.shadows)
        return self._change(compute)

    def _change(self, compute) -> Served:
        """One change, under the record's lock (changes through different workers never lose one
        another) and then this process's: catch up with the record, derive the new snapshot,
        write the record, serve the snapshot. A Refused candidate is written to the record's
        failures (the index shows why on every worker) and nothing else changes."""
        with self.record.locked(), self.lock:
            self._catch_up()
            try:
                new = compute(self.served)
            except Refused as e:
                old = self.served
                self._publish(Served(old.scorers, old.defaults, old.default_model,
                                     {**old.failed, e.tag: e.reason}, old.shadows))
                raise LoadRefused(e.reason) from None
            self._publish(new)
            return new

    def _publish(self, new: Served) -> None:
        """Write the record, then serve `new` (hold both locks). If the record cannot be written,
        nothing changes: RecordError."""
        number = self.generation + 1
        try:
            self.record.write({**new.as_record(), "run": run_id(), "generation": number})
        except OSError as e:
            raise RecordError(f"the change could not be recorded in {self.record.path}: "
                              f"{e.strerror or e}") from None
        self.generation, self.stamp, self.served = number, self.record.stamp(), new

    # ---- following the record ---------------------------------------------------------------

    def _follow(self) -> None:
        while True:
            self.wake.wait(FOLLOW_SECONDS)
            self.wake.clear()
            try:
                if self.record.stamp() != self.stamp:
                    with self.lock:
                        self._catch_up()
            except Exception as e:  # never stop following; say why
                print(f"warning: following {self.record.path}: {type(e).__name__}: {e}", file=sys.stderr)

    def _catch_up(self) -> None:
        """Serve the record's latest change, opening what is new (hold self.lock)."""
        stamp, doc = self.record.stamp(), self.record.read()
        if doc is None or generation(doc) <= self.generation:
            self.stamp = stamp
            return
        opened = {}
        for name, versions in tags_of(doc).items():
            for version in versions:
                tag = f"{name}:{version}"
                if tag not in self.served.scorers:
                    try:
                        opened[tag] = self.open(tag)
                    except ModelError as e:
                        print(f"warning: recorded but not opened here: {e}", file=sys.stderr)
        self._apply(doc, opened, stamp)

    def _apply(self, doc: dict, opened: dict[str, Scorer], stamp) -> None:
        """The record's state as this process's snapshot. A version this process could not open
        stays out; if it is a model's recorded default, the model keeps the default it had here."""
        served, available = self.served, {**self.served.scorers, **opened}
        scorers, defaults = {}, {}
        for name, versions in tags_of(doc).items():
            usable = [v for v in versions if f"{name}:{v}" in available]
            if versions and versions[0] not in usable and f"{name}:{served.defaults.get(name)}" in available:
                usable.insert(0, served.defaults[name])
            for v in dict.fromkeys(usable):
                scorers[f"{name}:{v}"] = available[f"{name}:{v}"]
            if usable:
                defaults[name] = usable[0]
        default_model = doc.get("default_model") or served.default_model
        if default_model not in defaults:  # it could not be opened here: keep serving it as it was
            default_model = served.default_model
            scorers[served.default.tag], defaults[default_model] = served.default, served.defaults[default_model]
        self.served = Served(scorers, defaults, default_model, dict(doc.get("failed") or {})).with_shadows(
            doc.get("shadows") or {})
        self.generation, self.stamp = generation(doc), stamp

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
