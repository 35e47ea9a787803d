"""The code blocks of the README and the docs pages, and how the suite runs them as a reader would.

Which blocks run:
- README.md: every ```bash and ```python block, in order, unless the line before it is
  `<!-- not run: REASON -->` (a GPU, a cluster, the test suite itself).
- docs/*.md: the blocks whose line before is `<!-- run -->`, in order, one session per page;
  `<!-- run: errors shown -->` runs a block that shows failing commands without stopping at the
  first one (troubleshooting.md). Other docs blocks are illustrations.

How they run: in a fresh directory laid out like a clone (the repository's top-level entries linked,
its own `models/` and BentoML store), bash blocks with `bash -e -o pipefail`, Python blocks with
`python`. A line `# => TEXT` under a command is output the block must print (stdout or stderr);
`...` inside TEXT stands for anything. What the runner changes, and only that:
- `pip install ...` is not run (it would reinstall the project from the temporary directory);
  `.ci/run` has installed the project before the suite runs;
- `bentoml serve` starts in the background (a trailing `&` is dropped) on the session's free port
  (BENTOML_PORT), stops the session's previous server first, and returns once `/readyz` answers,
  or prints the server's output when it exits instead;
- `localhost:3000`, `127.0.0.1:3000`, `--port 3000` and `http.server 3000` name that port, and
  NORMSERVE_URL points `python -m service.models` at it.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?:^<!-- (?P<mark>[^\n]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```", re.S | re.M)
RUNNABLE_LANGS = ("bash", "python")
EXPECTED = re.compile(r"^\s*# => (.*)$", re.M)
PORT_NAMES = re.compile(r"(localhost:|127\.0\.0\.1:|--port |http\.server )3000\b")
SERVER_READY_S = 180
# the developer's own settings would change what the blocks do: a reader starts without them
SERVER_SETTINGS = ("MODEL_TAG", "NORMSERVE_", "BENTOML_", "DRIFT", "MAX_ROWS", "MAX_BODY_MB", "WORKERS",
                   "ACCESS_LOG", "TRACING", "CUDA_VISIBLE_DEVICES")

PRELUDE = r"""
pip() { echo "(docs test: pip $* is not run here; .ci/run installed the project)"; }
docs_stop_server() {
    if [ -f "$DOCS_STATE/server.pid" ]; then
        python -c "import sys; sys.path.insert(0, sys.argv[1]); from docs_blocks import stop_tree; \
stop_tree(int(sys.argv[2]))" "$DOCS_TESTS" "$(cat "$DOCS_STATE/server.pid")"
        rm -f "$DOCS_STATE/server.pid"
    fi
}
bentoml() {
    if [ "$1" != serve ]; then command bentoml "$@"; return; fi
    docs_stop_server
    shift
    setsid bentoml serve "$@" > "$DOCS_STATE/server.log" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$DOCS_STATE/server.pid"
    for _ in $(seq 1 $((SERVER_READY_S * 4))); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$DOCS_STATE/server.pid"; cat "$DOCS_STATE/server.log"; return 1
        fi
        python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "http://127.0.0.1:$BENTOML_PORT/readyz" 2>/dev/null && return 0
        sleep 0.25
    done
    echo "bentoml serve did not become ready"; cat "$DOCS_STATE/server.log"; return 1
}
""".replace("SERVER_READY_S", str(SERVER_READY_S))


@dataclass
class Block:
    page: str      # README.md or docs/<page>.md
    line: int      # where the block's fence opens
    lang: str
    code: str
    mark: str      # the comment before the fence, or ""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def not_run_reason(self) -> str | None:
        return self.mark.split(":", 1)[1].strip() if self.mark.startswith("not run") else None

    @property
    def runs(self) -> bool:
        if self.lang not in RUNNABLE_LANGS or self.not_run_reason is not None:
            return False
        return self.page == "README.md" or self.mark.startswith("run")

    @property
    def errors_shown(self) -> bool:
        return self.mark == "run: errors shown"

    @property
    def expected(self) -> list[str]:
        return EXPECTED.findall(self.code)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    name = str(page.relative_to(ROOT))
    return [Block(name, text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["code"], m["mark"] or "")
            for m in FENCE.finditer(text)]


def stop_tree(pid: int, timeout_s: float = 30):
    """Stop `bentoml serve` and its workers (circus starts each worker in a session of its own, so
    a signal to the server's process group does not reach them)."""
    try:
        server = psutil.Process(pid)
        processes = [server, *server.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    for process in psutil.wait_procs(processes, timeout=timeout_s)[1]:
        process.kill()


class Session:
    """One page's blocks, run in order in one directory laid out like a fresh clone."""

    def __init__(self, workdir: Path):
        # imported here, not at the top: the prelude imports this module to stop a server, and
        # test_service's imports (torch) would cost every stop seconds
        from test_service import free_port
        self.workdir, self.port = workdir, free_port()
        self.state = workdir / ".docs-test"
        self.state.mkdir(parents=True)
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
        for entry in sorted({path.split("/")[0] for path in tracked} - {"models"}):
            (workdir / entry).symlink_to(ROOT / entry)
        (self.state / "prelude.sh").write_text(PRELUDE)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_SETTINGS)}
        self.env = {**inherited, "BENTOML_HOME": str(self.state / "bentoml"),
                    "BENTOML_PORT": str(self.port), "DOCS_STATE": str(self.state),
                    "DOCS_TESTS": str(ROOT / "tests"),
                    "NORMSERVE_URL": f"http://127.0.0.1:{self.port}", "PYTHONUNBUFFERED": "1"}

    def run(self, block: Block, timeout_s: int = 900) -> tuple[int, str]:
        """(exit status, what the block printed)."""
        code = PORT_NAMES.sub(lambda m: m[1] + str(self.port), block.code)
        if block.lang == "python":
            script = self.state / f"block-{block.line}.py"
            script.write_text(code)
            command = [sys.executable, str(script)]
        else:
            code = re.sub(r"^(\s*(?:\w+=\S+\s+)*bentoml serve\b[^&\n#]*?)\s*&(\s*#.*)?$", r"\1\2", code,
                          flags=re.M)
            strict = "" if block.errors_shown else "set -e -o pipefail\n"
            command = ["bash", "-c", f"source {self.state / 'prelude.sh'}\n{strict}{code}"]
        proc = subprocess.Popen(command, cwd=self.workdir, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_tree(proc.pid, timeout_s=5)  # and what it started (torchrun's ranks, ...)
            output, _ = proc.communicate()
            return -1, output + f"\n(timed out after {timeout_s} s)"
        return proc.returncode, output

    def close(self):
        pid_file = self.state / "server.pid"
        if pid_file.exists():
            stop_tree(int(pid_file.read_text()))


def printed(expected: str, output: str) -> bool:
    """Whether `output` shows `expected`, where `...` in it stands for anything."""
    pattern = ".*?".join(re.escape(piece.strip()) for piece in expected.split("..."))
    return re.search(pattern, output, re.S) is not None
