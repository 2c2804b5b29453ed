"""The fenced shell blocks of README.md and docs/*.md, and how the docs tests run them.

A block (```bash, ```sh, ```shell, ```console) is run by tests/test_docs_blocks.py unless the line directly
above its fence is a marker:

    <!-- not-run: REASON -->   never run (REASON: GPU, network, cluster, slow, ...)
    <!-- run: slow -->         run only with the slow tests (`-m slow`)

The blocks of one page run in order, in one working folder of their own whose entries link to the
repository's (so `.venv/bin/vlp`, `train.py` and `scripts/` work and what a block writes stays there).
A ```console block runs its `$ ` lines only.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SHELL_LANGS = ("bash", "sh", "shell", "console")
NOT_RUN = re.compile(r"<!-- not-run: (?P<reason>\S.*?) -->")
RUN_SLOW = "<!-- run: slow -->"
MARKER_LIKE = re.compile(r"<!--\s*(not[- _]?run|run)\b", re.IGNORECASE)
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")


@dataclass
class Block:
    page: Path
    line: int             # 1-based line of the opening fence
    lang: str
    code: str
    marker: Optional[str]  # the line directly above the fence, when it looks like a marker

    @property
    def where(self) -> str:
        return f"{self.page.name if self.page.parent.name != 'docs' else 'docs/' + self.page.name}:{self.line}"

    @property
    def not_run_reason(self) -> Optional[str]:
        m = NOT_RUN.fullmatch(self.marker or "")
        return m.group("reason") if m else None

    @property
    def slow(self) -> bool:
        return self.marker == RUN_SLOW

    def script(self) -> str:
        if self.lang != "console":
            return self.code
        return "\n".join(line.strip()[2:] for line in self.code.splitlines() if line.strip().startswith("$ "))


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def shell_blocks(page: Path) -> list[Block]:
    """Every fenced block of a shell language in the page, with the marker line above it (if any)."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group("lang"):
            i += 1
            continue
        indent, end = m.group("indent"), i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if m.group("lang") in SHELL_LANGS:
            above = lines[i - 1].strip() if i else ""
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
            out.append(Block(page, i + 1, m.group("lang"), body, above if MARKER_LIKE.match(above) else None))
        i = end + 1
    return out


def workdir(root: Path, where: Path) -> Path:
    """A folder whose entries link to the repository's top-level entries: blocks run there as in a clone."""
    where.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name not in (".git",) and not (where / entry.name).exists():
            (where / entry.name).symlink_to(entry)
    return where


def run(block: Block, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run the block with bash -euo pipefail in its own process group; the group is ended afterwards (and on
    timeout), so a block's background job cannot outlive it."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TERM": "dumb"}
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.script()], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _end_group(proc.pid)
        out, _ = proc.communicate()
        rc = f"timed out after {timeout:.0f} s"
    _end_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, rc, out, None)


def _end_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def commands(block: Block) -> list[list[str]]:
    """The block's command lines as argv lists (continuations joined, comments and `&` dropped)."""
    import shlex

    joined = re.sub(r"\\\n\s*", " ", block.script())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            argv = shlex.split(line, comments=True)
        except ValueError:
            continue
        out.append([a for a in argv if a != "&"])
    return out


def vlp_invocation(argv: list[str]) -> Optional[tuple[str, str, list[str]]]:
    """(command name, COMMANDS target, its arguments) when argv runs a vlp command, else None. Knows
    `train.py`/`eval_zeroshot.py` (also under torchrun/srun/accelerate), `vlp ...`, `python -m vlp ...`."""
    from vlp.cli import COMMANDS

    for i, arg in enumerate(argv):
        name = Path(arg).name
        if name in ("train.py", "eval_zeroshot.py"):
            rest = argv[i + 1:]
            rest = rest[1:] if rest[:1] == ["--"] else rest
            return (("vlp train", "vlp.cli:train") if name == "train.py" else ("vlp eval", "vlp.cli:evaluate")) + (rest,)
        if name == "vlp" and (i == 0 or argv[i - 1] == "-m" or "/" in arg):
            rest = argv[i + 1:]
            table, words = COMMANDS, ["vlp"]
            while rest and rest[0] in table:
                target, _ = table[rest[0]]
                words.append(rest[0])
                rest = rest[1:]
                if not isinstance(target, dict):
                    return " ".join(words), target, rest
                table = target
            return None
    return None


def flag_reference(root: Path):
    """scripts/flag_reference.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flag_reference", root / "scripts" / "flag_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
