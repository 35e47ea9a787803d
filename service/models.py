"""`python -m service.models`: what a running server has loaded, and switching, rolling back and
unloading model versions, through its model repository endpoints (service/repository.py) with
the operator's token from NORMSERVE_ADMIN_TOKEN.

    python -m service.models list                         # every stored version: READY or not, default
    python -m service.models load NAME                    # the newest stored version, as the default
    python -m service.models load NAME VERSION            # that version, as the default (a switch)
    python -m service.models load NAME --latest 2         # only the two newest stay loaded
    python -m service.models rollback NAME                # the version stored before the default
    python -m service.models unload NAME
    --url http://127.0.0.1:3000 (default; or NORMSERVE_URL)   --allow-input-change

Exit codes: 0 done, 2 refused or failed (one line saying why).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


class Failed(Exception):
    pass


def call(url: str, path: str, body: dict | None = None, token: str | None = None):
    """POST or GET a JSON path; the parsed answer, or Failed with the server's reason."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers,
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            reason = e.reason
        raise Failed(f"{e.code}: {reason}") from None
    except urllib.error.URLError as e:
        raise Failed(f"cannot reach {url}: {e.reason}") from None


def load_body(versions: list[str] | None = None, latest: int | None = None,
              allow_input_change: bool = False) -> dict:
    """A load request as Triton's clients send it: the config as JSON text."""
    cfg = {}
    if versions:
        cfg["version_policy"] = {"specific": {"versions": versions}}
    elif latest:
        cfg["version_policy"] = {"latest": {"num_versions": latest}}
    if allow_input_change:
        cfg["allow_input_change"] = True
    return {"parameters": {"config": json.dumps(cfg)}} if cfg else {}


def defaults(url: str, names: set[str]) -> dict[str, str]:
    """Each loaded model's default version, from the protocol's model metadata."""
    return {n: call(url, f"/v2/models/{n}")["parameters"].get("default_version") for n in names}


def show(url: str, token: str) -> str:
    index = call(url, "/v2/repository/index", {}, token)
    loaded = {e["name"] for e in index if e["state"] == "READY"}
    default_of = defaults(url, loaded)
    served = call(url, "/metadata")["model"]
    rows = [("model", "version", "state", "")]
    for e in index:
        mark = ("default" if default_of.get(e["name"]) == e["version"] else "") + (
            ", served by /predict" if f"{e['name']}:{e['version']}" == served else "")
        rows.append((e["name"], e["version"], e["state"], mark or e["reason"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)


def rollback_version(url: str, token: str, name: str) -> str:
    """The stored version created just before the model's default version."""
    index = [e for e in call(url, "/v2/repository/index", {}, token) if e["name"] == name]
    versions = [e["version"] for e in index]  # oldest first
    current = defaults(url, {name})[name]
    if current not in versions or versions.index(current) == 0:
        raise Failed(f"{name}:{current} is the oldest stored version: there is nothing to roll back to")
    return versions[versions.index(current) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("NORMSERVE_URL", "http://127.0.0.1:3000"))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every stored version: READY or UNAVAILABLE, and which is the default")
    load = commands.add_parser("load", help="load a version (the newest if none is named) as the default")
    load.add_argument("name")
    load.add_argument("version", nargs="?")
    load.add_argument("--latest", type=int, help="keep only this many of the newest stored versions loaded")
    load.add_argument("--allow-input-change", action="store_true",
                      help="the new default may take other inputs than the old")
    for name, text in (("rollback", "make the version stored before the default the default again"),
                       ("unload", "unload every version of a model")):
        commands.add_parser(name, help=text).add_argument("name")
    args = parser.parse_args(argv)
    token = os.environ.get("NORMSERVE_ADMIN_TOKEN")
    try:
        if not token:
            raise Failed("set NORMSERVE_ADMIN_TOKEN to the server's operator token")
        if args.command == "list":
            print(show(args.url, token))
            return 0
        if args.command == "unload":
            call(args.url, f"/v2/repository/models/{args.name}/unload", {}, token)
        else:
            version = args.version if args.command == "load" else rollback_version(args.url, token, args.name)
            body = load_body([version] if version else None, getattr(args, "latest", None),
                             getattr(args, "allow_input_change", False))
            call(args.url, f"/v2/repository/models/{args.name}/load", body, token)
        print(show(args.url, token))
        return 0
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
