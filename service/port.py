"""A port already in use, said in one line before `bentoml serve` tries it.

BentoML's CLI process imports the service before it binds the HTTP port; when the port is taken it
ends in a 40-line `OSError: [Errno 98] Address already in use` traceback. This check runs at that
import, in that process only, and stops start-up with one line naming the port instead.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

DEFAULT_HOST, DEFAULT_PORT = "0.0.0.0", 3000  # bentoml serve's own defaults


def serve_command() -> list[str] | None:
    """The arguments after `serve` when this process is `bentoml serve` itself (not a worker)."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    is_cli = program == "bentoml" or (program == "__main__.py" and "bentoml" in sys.argv[0])
    return sys.argv[2:] if is_cli and sys.argv[1:2] == ["serve"] else None


def option(args: list[str], names: tuple[str, ...], env: str, default):
    """An option's value as click reads it: the flag (`--port 3001`, `--port=3001`), its
    environment variable, then the default."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return os.environ.get(env, default)


def check_port_free(fail) -> None:
    """In `bentoml serve`'s own process: `fail` with one line if its host and port are taken."""
    if (args := serve_command()) is None:
        return
    host = option(args, ("--host",), "BENTOML_HOST", DEFAULT_HOST)
    try:
        port = int(option(args, ("--port", "-p"), "BENTOML_PORT", DEFAULT_PORT))
    except ValueError:
        return  # BentoML's CLI names a malformed port itself
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            probe.bind((host, port))
        except OSError as e:
            fail(f"cannot listen on {host}:{port} ({e.strerror}): another server is using the port; "
                 "stop it, or serve on another port with `bentoml serve --port 3001`")
