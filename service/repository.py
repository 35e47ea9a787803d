"""The model repository extension of the Open Inference Protocol, as Triton defines it and
tritonclient speaks it, over the registry (service/registry.py):

    POST /v2/repository/index                  [] of {name, version, state, reason};
                                               body {"ready": true}: the READY ones only
    POST /v2/repository/models/{name}/load     no parameters: the newest stored version, made the
                                               default (the versions already loaded stay loaded);
                                               {"parameters": {"config": "<JSON text>"}} with
                                               {"version_policy": {"specific": {"versions": [v, ...]}}}:
                                               those, the newest of them the default (a rollback);
                                               {"version_policy": {"latest": {"num_versions": N}}}:
                                               the N newest stored versions only, the newest the
                                               default; "allow_input_change": true lets the new
                                               default take other inputs than the old
    POST /v2/repository/models/{name}/unload   every version of the model

Only the operator may call them: `Authorization: Bearer <NORMSERVE_ADMIN_TOKEN>`. Without that
variable they are off (403); a missing or malformed header is 401, a wrong token 403 (compared in
constant time). Every answer is JSON; 200 comes once the change is served by the worker that took
the call (the others follow the record within FOLLOW_SECONDS).
"""
from __future__ import annotations

import asyncio
import hmac
import os
import re

import orjson

from service.registry import LoadRefused, NotLoaded, RecordError

PATH = re.compile(r"/v2/repository/(?:(?P<index>index)|models/(?P<name>[^/]+)/(?P<action>load|unload))")
TOKEN_VARIABLE = "NORMSERVE_ADMIN_TOKEN"


class RepositoryError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Repository:
    def __init__(self, registry, token: str | None = None):
        self.registry = registry
        token = token if token is not None else os.environ.get(TOKEN_VARIABLE)
        self.token = token.encode() if token else None

    async def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, bytes]:
        """(status, JSON body) for a request to a /v2/repository path."""
        try:
            route = PATH.fullmatch(path)
            if route is None:
                raise RepositoryError(404, f"no such path {path}; the repository's paths are "
                                           "/v2/repository/index and /v2/repository/models/{name}/load|unload")
            if method != "POST":
                raise RepositoryError(405, f"{method} is not allowed here; use POST")
            self.authorize(next((v for k, v in headers if k == b"authorization"), None))
            request = self.read(body)
            loop = asyncio.get_running_loop()
            if route["index"]:
                ready = request.get("ready", False)
                if not isinstance(ready, bool):
                    raise RepositoryError(400, "'ready' must be true or false")
                return 200, orjson.dumps(await loop.run_in_executor(None, self.registry.index, ready))
            name = route["name"].lower()  # the store keeps names in lower case
            if route["action"] == "unload":
                await loop.run_in_executor(None, self.registry.unload, name)
            else:
                await loop.run_in_executor(None, self.load, name, config(request))
            return 200, b"{}"
        except (RepositoryError, NotLoaded, LoadRefused, RecordError) as e:
            return failure(e)

    def authorize(self, given: bytes | None) -> None:
        """The operator's token in an Authorization header, or RepositoryError (401 or 403)."""
        if self.token is None:
            raise RepositoryError(403, f"the model repository endpoints are off: start the server with "
                                       f"{TOKEN_VARIABLE} set to turn them on")
        scheme, _, token = (given or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise RepositoryError(401, "send the operator's token: Authorization: Bearer <token>")
        if not hmac.compare_digest(token.strip(), self.token):
            raise RepositoryError(403, "the token is not the operator's")

    async def shadow(self, method: str, model: str | None, authorization: bytes | None,
                     body: bytes) -> tuple[int, bytes]:
        """GET /shadow: every pair's figures; POST /shadow {"model", "version", "share"}: that
        version the shadow of its model's default; DELETE /shadow?model=NAME: none."""
        from service.shadow import stats
        loop = asyncio.get_running_loop()
        try:
            if method == "GET":
                served = self.registry.current()
                pairs = {(f"{n}:{served.defaults[n]}", f"{n}:{s['version']}"): s["share"]
                         for n, s in served.shadows.items()}
                tasks = {tag: sc.task for tag, sc in served.scorers.items()}
                return 200, orjson.dumps(await loop.run_in_executor(None, stats, pairs, tasks))
            self.authorize(authorization)
            if method == "DELETE":
                if not model:
                    raise RepositoryError(400, "name the model: DELETE /shadow?model=NAME")
                await loop.run_in_executor(None, self.registry.set_shadow, model.lower(), None)
                return 200, b"{}"
            request = self.read(body)
            name, version, share = request.get("model"), request.get("version"), request.get("share", 0.25)
            if not isinstance(name, str) or not isinstance(version, str):
                raise RepositoryError(400, 'send {"model": NAME, "version": VERSION, "share": 0.25}')
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise RepositoryError(400, "share must be a number above 0 and at most 1")
            await loop.run_in_executor(None, self.registry.set_shadow, name.lower(), version.lower(), float(share))
            return 200, b"{}"
        except (RepositoryError, NotLoaded, LoadRefused, RecordError) as e:
            return failure(e)

    @staticmethod
    def read(body: bytes) -> dict:
        if not body.strip():
            return {}
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise RepositoryError(400, f"malformed JSON: {e}") from None
        if not isinstance(request, dict):
            raise RepositoryError(400, "the body must be a JSON object")
        return request

    def load(self, name: str, cfg: dict) -> None:
        stored = self.registry.versions_in_store(name)  # oldest first
        if not stored:
            raise NotLoaded(f"no model {name!r} in the BentoML model store (`bentoml models list`)")
        policy = cfg.get("version_policy") or {}
        if not isinstance(policy, dict) or len(policy) > 1 or not set(policy) <= {"specific", "latest"}:
            raise RepositoryError(400, 'version_policy must be {"specific": {"versions": [...]}} or '
                                       '{"latest": {"num_versions": N}}')
        allow = cfg.get("allow_input_change", False)
        if not isinstance(allow, bool):
            raise RepositoryError(400, "allow_input_change must be true or false")
        if "latest" in policy:
            n = (policy["latest"] or {}).get("num_versions") if isinstance(policy["latest"], dict) else None
            if type(n) is not int or n < 1:
                raise RepositoryError(400, "latest.num_versions must be a whole number of at least 1")
            keep = stored[-n:]
            wanted = lambda loaded: keep  # noqa: E731
        else:
            chosen = [stored[-1]]
            if "specific" in policy:
                given = (policy["specific"] or {}).get("versions") if isinstance(policy["specific"], dict) else None
                if not isinstance(given, list) or not given or not all(isinstance(v, str) for v in given):
                    raise RepositoryError(400, "specific.versions must be a list of version strings")
                if missing := [v for v in given if v not in stored]:
                    raise NotLoaded(f"model {name!r} has no stored version {', '.join(missing)}; stored: "
                                    f"{', '.join(stored)}")
                chosen = given
            wanted = lambda loaded: [v for v in stored if v in loaded or v in chosen]  # noqa: E731
            keep = chosen
        newest = max(keep, key=stored.index)
        self.registry.load(name, wanted, lambda versions: newest, allow)


STATUS = {NotLoaded: 404, LoadRefused: 400, RecordError: 503}  # RepositoryError carries its own


def failure(e: Exception) -> tuple[int, bytes]:
    """A refused call as its status and JSON error."""
    return getattr(e, "status", None) or STATUS[type(e)], orjson.dumps({"error": str(e)})


def config(request: dict) -> dict:
    """The load's config: Triton takes it as JSON text in parameters.config (a JSON object is
    taken too)."""
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise RepositoryError(400, "parameters must be an object")
    if unknown := sorted(k for k in params if k != "config"):
        raise RepositoryError(400, f"unsupported load parameter(s) {', '.join(unknown)}: this server "
                                   "loads models from its store, not from files sent with the request")
    cfg = params.get("config", {})
    if isinstance(cfg, str):
        try:
            cfg = orjson.loads(cfg) if cfg.strip() else {}
        except orjson.JSONDecodeError as e:
            raise RepositoryError(400, f"config is not JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise RepositoryError(400, "config must be a JSON object (as text)")
    return cfg
