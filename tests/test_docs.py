"""The documentation cannot rot: the README's commands run (tests/docs_blocks.py says how), the
docs pages' runnable blocks run, every page is linked, every link and anchor resolves, and every
flag the docs name is one the program's `--help` lists."""
from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pytest
from PIL import Image

from docs_blocks import ROOT, Session, blocks, pages, printed

README = ROOT / "README.md"
README_MAX_LINES = 180
README_BLOCKS = [b for b in blocks(README) if b.runs]
DOCS_BLOCKS = [b for page in pages()[1:] for b in blocks(page) if b.runs]
MARKS = re.compile(r"^(run|run: errors shown|not run: \S.*)$")  # a block not run says why


def test_the_readme_is_a_front_page_of_at_most_180_lines():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def test_every_docs_page_is_linked_from_the_readme():
    readme = README.read_text()
    unlinked = [p.name for p in pages()[1:] if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def prose(text: str) -> str:
    """A page without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_and_anchor_resolves():
    broken = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", prose(file.read_text()), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_blocks_that_cannot_run_here_are_marked_with_a_reason_and_listed(capsys):
    """Every fence mark is one the runner knows (a block not run names its reason); the blocks
    that do not run are printed with why."""
    unknown, not_run = [], []
    for page in pages():
        for block in blocks(page):
            if block.mark and not MARKS.match(block.mark):
                unknown.append(f"{block.id}: <!-- {block.mark} -->")
            if block.not_run_reason is not None:
                not_run.append(f"{block.id}: {block.not_run_reason}")
    assert not unknown, f"marks the docs test does not know: {unknown}"
    with capsys.disabled():
        print("\nblocks not run by the suite:\n  " + "\n  ".join(not_run))
    assert len(README_BLOCKS) >= 10  # the front page's tasks run, not only its first command


def test_the_readme_test_command_is_the_one_ci_runs():
    (suite,) = [b for b in blocks(README) if "pytest" in b.code]
    ci = (ROOT / ".ci" / "run").read_text()
    for command in suite.code.strip().split("&&"):
        command = command.strip()
        if command.startswith("pip install"):
            assert re.search(r"pip install .*" + re.escape(command.split()[-1]), ci), command
        else:
            assert command in ci, command


def write_photos(folder, per_class: int = 12):
    """Two classes of small PNGs a CNN tells apart (`photos/` of the README's image task)."""
    rng = np.random.default_rng(0)
    for name, channel in (("cat", 0), ("dog", 2)):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (40, 48, 3), dtype=np.uint8)
            pixels[..., channel] += 160
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def readme_session(tmp_path_factory):
    session = Session(tmp_path_factory.mktemp("readme"))
    write_photos(session.workdir / "photos")
    yield session
    session.close()


@pytest.fixture(scope="module")
def docs_sessions(tmp_path_factory):
    sessions: dict[str, Session] = {}
    yield lambda page: sessions.setdefault(page, Session(tmp_path_factory.mktemp("docs")))
    for session in sessions.values():
        session.close()


def check_block(session: Session, block):
    status, output = session.run(block)
    if not block.errors_shown:
        assert status == 0, f"{block.id} exited {status}:\n{output[-4000:]}"
    missing = [e for e in block.expected if not printed(e, output)]
    assert not missing, f"{block.id} did not print {missing}:\n{output[-4000:]}"


@pytest.mark.parametrize("block", README_BLOCKS, ids=lambda b: b.id)
def test_a_readme_block_runs_as_shown(readme_session, block):
    check_block(readme_session, block)


@pytest.mark.parametrize("block", DOCS_BLOCKS, ids=lambda b: b.id)
def test_a_runnable_docs_block_runs_as_shown(docs_sessions, block):
    check_block(docs_sessions(block.page), block)


# Flags: every `python -m MODULE ... --flag` (or `torchrun ... -m MODULE`) in the docs is one
# MODULE's --help lists.
COMMAND = re.compile(r"(?<![\w-])-m\s+((?:training|service|benchmarks)\.[\w.]+)([^\n`|;&#]*)")


def command_lines() -> list[tuple[str, str]]:
    """(page, line) for every command in code blocks and inline code, continuations joined."""
    found = []
    for page in pages():
        text = page.read_text().replace("\\\n", " ")
        found += [(page.name, m[0]) for m in COMMAND.finditer(text)]
    return found


@cache
def help_text(module: str, sub: str | None = None) -> str:
    command = [sys.executable, "-m", module, *([sub] if sub else []), "--help"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(command[1:])} failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


SUBCOMMANDS = r"\{([\w,-]+)\} \.\.\."  # argparse's usage shows subcommands as {a,b} ... (choices: {a,b})


def flags(text: str) -> set[str]:
    return {f.split("=")[0] for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", text)}


def test_the_flags_the_docs_name_are_the_ones_help_lists():
    commands = [(page, m[1], m[2]) for page, line in command_lines() for m in [COMMAND.match(line)]]
    modules = sorted({module for _, module, _ in commands})
    with ThreadPoolExecutor(2) as pool:
        helps = dict(zip(modules, pool.map(help_text, modules)))
    subcommands = {m: subs[1].split(",") for m, text in helps.items()
                   if (subs := re.search(SUBCOMMANDS, text))}
    unknown = []
    for page, module, args in commands:
        first = args.split()[:1]
        sub = first[0] if first and first[0] in subcommands.get(module, ()) else None
        text = help_text(module, sub) if sub else helps[module]
        unknown += [f"{page}: -m {module} {flag}" for flag in flags(args) - flags(text)]
    # prose names flags too: each must be a flag of a program the docs run (ours, or torchrun's,
    # bentoml's, pytest's as their commands in the docs show them)
    known = set().union(*(flags(text) for text in helps.values()),
                        *(flags(help_text(m, sub)) for m, subs in subcommands.items() for sub in subs))
    known |= flags(" ".join(b.code for page in pages() for b in blocks(page)))
    for page in pages():
        unknown += [f"{page.name} prose: {flag}" for flag in sorted(flags(prose(page.read_text())) - known)]
    assert not unknown, "flags no --help lists:\n" + "\n".join(unknown)


def test_every_error_the_docs_quote_is_one_the_code_prints():
    """Every `error: ...` line the docs quote has four words in a row (three, for a shorter stretch
    between the values it names) that the code's source has too, so a reworded message cannot leave
    a stale quote behind. A quote with no such stretch ('... is empty') is too short to judge."""
    source = " ".join(" ".join(p.read_text().split()) for d in ("training", "service")
                      for p in (ROOT / d).rglob("*.py"))
    stale = []
    for page in pages():
        for message in re.findall(r"(?:^|`|# => )error: ([^`\n]+)", page.read_text(), re.M):
            runs = [run.split() for run in re.split(r"\S*(?:[\d'\"`=/]|\.\.\.|\w\.\w)\S*", message)]
            windows = [" ".join(run[i:i + min(4, len(run))]) for run in runs if len(run) >= 3
                       for i in range(len(run) - min(4, len(run)) + 1)]
            if windows and not any(w in source for w in windows):
                stale.append(f"{page.name}: error: {message[:80]}")
    assert not stale, "quoted errors the code does not print:\n" + "\n".join(stale)
