"""The documentation site: `mkdocs build --strict` succeeds on the committed pages and fails on a broken link,
and docs/flags.md is what scripts/flag_reference.py writes from the parsers (a changed flag fails the test)."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from tests import docs_blocks
from tests.conftest import repo_root

ROOT = repo_root()


def build(config_dir, out_dir) -> subprocess.CompletedProcess:
    """mkdocs build --strict (not -q: mkdocs 1.6 then no longer counts the warnings that strict turns into a failure)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(config_dir / "mkdocs.yml"), "-d", str(out_dir)],
                          capture_output=True, text=True, env=env, timeout=300)


def copy_site(tmp_path):
    """What the build reads: mkdocs.yml, docs/, the README (the Tutorial page) and the hook that adds it."""
    for name in ("mkdocs.yml", "README.md", "scripts/mkdocs_hooks.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_site_builds_strict(tmp_path):
    out = build(ROOT, tmp_path / "site")
    assert out.returncode == 0, out.stdout + out.stderr
    for page in ("index", "tutorial", "training", "data", "curation", "evaluation", "reliability", "scale", "results", "flags"):
        assert (tmp_path / "site" / ("" if page == "index" else page) / "index.html").exists(), page


@pytest.mark.parametrize("page, link, named", [
    ("docs/training.md", "[the page that is gone](no_such_page.md)", "no_such_page.md"),          # a broken link
    ("README.md", "[gone](docs/gone.md)", "gone.md"),                                          # in the tutorial
    ("docs/data.md", "[a section](evaluation.md#no-such-section)", "no-such-section"),         # a broken anchor
])
def test_strict_build_fails_on_a_broken_link(tmp_path, page, link, named):
    site = copy_site(tmp_path)
    path = site / page
    path.write_text(path.read_text() + f"\nSee {link}.\n")
    out = build(site, tmp_path / "site")
    assert out.returncode != 0
    assert named in out.stdout + out.stderr


def test_flag_reference_matches_the_parsers():
    page = ROOT / "docs" / "flags.md"
    assert page.read_text() == docs_blocks.flag_reference(ROOT).render(), \
        "docs/flags.md is out of date: run `.venv/bin/python scripts/flag_reference.py` and commit it"


def test_flag_reference_sees_a_changed_flag(monkeypatch):
    """The comparison above catches drift: rename one flag of `vlp data inspect` and the page no longer matches."""
    add_argument = argparse.ArgumentParser.add_argument

    def renamed(self, *names, **kw):
        return add_argument(self, *("--show-samples" if n == "--show" else n for n in names), **kw)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", renamed)
    text = docs_blocks.flag_reference(ROOT).render()
    assert "`--show-samples`" in text
    assert text != (ROOT / "docs" / "flags.md").read_text()
