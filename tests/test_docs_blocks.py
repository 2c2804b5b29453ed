"""Every shell block in README.md and docs/*.md runs as written, or says why not (tests/docs_blocks.py has the
markers). The blocks of a page run in order in one working folder; `run: slow` blocks only with `-m slow`."""
from __future__ import annotations

import time

import psutil
import pytest

from tests import docs_blocks
from tests.conftest import repo_root

ROOT = repo_root()
TIMEOUT_S = {False: 300, True: 1200}    # a default block, a `run: slow` block (the machine may be loaded)


def _params():
    out = []
    for page in docs_blocks.pages(ROOT):
        for block in docs_blocks.shell_blocks(page):
            if block.not_run_reason is None and block.marker is None or block.slow:
                marks = [pytest.mark.slow] if block.slow else []
                out.append(pytest.param(block, id=block.where, marks=marks))
    return out


@pytest.fixture(scope="module")
def page_dirs(tmp_path_factory):
    """One working folder per page, shared by that page's blocks, and the blocks already run there."""
    made = {}

    def get(page):
        if page not in made:
            made[page] = (docs_blocks.workdir(ROOT, tmp_path_factory.mktemp(page.stem)), set())
        return made[page]
    return get


@pytest.mark.parametrize("block", _params())
def test_block_runs(block, page_dirs):
    """A block may use what the page's earlier default blocks made: those not run yet in this session (a
    `-m slow` run deselects them) run first. A default block must not rely on a `run: slow` one."""
    cwd, done = page_dirs(block.page)
    earlier = [b for b in docs_blocks.shell_blocks(block.page) if b.line < block.line and b.marker is None]
    for b in [*(b for b in earlier if b.line not in done), block]:
        out = docs_blocks.run(b, cwd, TIMEOUT_S[b.slow])
        done.add(b.line)
        tail = "\n".join(out.stdout.splitlines()[-40:])
        assert out.returncode == 0, f"{b.where}: the block exited {out.returncode}; its output ends:\n{tail}"


def test_every_marker_is_well_formed():
    """A marker-like line that is not exactly one of the two markers (a typo, an empty reason) would
    silently run the block or hide it: refuse it."""
    bad = [f"{b.where}: {b.marker!r}" for page in docs_blocks.pages(ROOT) for b in docs_blocks.shell_blocks(page)
           if b.marker is not None and b.not_run_reason is None and not b.slow]
    assert not bad, "malformed markers (use <!-- not-run: REASON --> or <!-- run: slow -->):\n" + "\n".join(bad)


def test_the_pages_hold_shell_blocks():
    """The collection is not silently empty: README's tutorial and the docs pages' blocks are found."""
    found = {b.where for page in docs_blocks.pages(ROOT) for b in docs_blocks.shell_blocks(page)}
    assert any(w.startswith("README.md:") for w in found) and any(w.startswith("docs/") for w in found), found
    assert _params(), "no block is run"


def test_every_flag_in_a_block_is_a_flag_of_its_command():
    """Blocks that are not run (GPU, cluster, network) still name only flags the parsers have: each vlp command
    line of every block (train.py under torchrun/srun too) is checked against its command's own parser."""
    from vlp.flags import Answer

    reference = docs_blocks.flag_reference(ROOT)
    parsers, bad, checked = {}, [], 0
    for page in docs_blocks.pages(ROOT):
        for block in docs_blocks.shell_blocks(page):
            for argv in docs_blocks.commands(block):
                found = docs_blocks.vlp_invocation(argv)
                if not found:
                    continue
                name, target, args = found
                parser = parsers.get(target) or parsers.setdefault(target, reference.parser_of(target))
                known = parser._option_string_actions
                checked += 1
                for arg in args:
                    flag = arg.split("=", 1)[0]
                    if flag.startswith("--") and flag != "--" and (
                            flag not in known or isinstance(known[flag], Answer)):
                        bad.append(f"{block.where}: {name} has no flag {flag}")
    assert checked >= 10, checked
    assert not bad, "\n".join(bad)


def test_ci_runs_the_command_readme_shows():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    readme = [b.code for b in docs_blocks.shell_blocks(ROOT / "README.md")]
    assert any(ci in code.splitlines()[i] for code in readme for i in range(len(code.splitlines()))), ci


def test_an_unmarked_failing_block_fails_and_a_marked_one_is_left_out(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# p\n\n```bash\necho made > made.txt\nfalse\necho never\n```\n\n"
                    "<!-- not-run: GPU -->\n```bash\nnvidia-smi\n```\n\n<!-- not-run:  -->\n```sh\ntrue\n```\n\n"
                    "```console\n$ cat made.txt\nmade\n```\n")
    unmarked, marked, empty_reason, console = docs_blocks.shell_blocks(page)
    assert (unmarked.marker, marked.not_run_reason, console.script()) == (None, "GPU", "cat made.txt")
    assert empty_reason.marker is not None and empty_reason.not_run_reason is None   # refused above
    out = docs_blocks.run(unmarked, tmp_path, 30)
    assert out.returncode == 1 and "never" not in out.stdout        # `set -e`: the first failure ends it
    assert docs_blocks.run(console, tmp_path, 30).stdout == "made\n"


def test_a_block_that_runs_too_long_is_ended_with_its_background_jobs(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nsleep 300 &\necho $! > bg.pid\nsleep 300\n```\n")
    out = docs_blocks.run(docs_blocks.shell_blocks(page)[0], tmp_path, 2)
    assert "timed out" in str(out.returncode)
    pid = int((tmp_path / "bg.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, "the block's background job outlived it"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
