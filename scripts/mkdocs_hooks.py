"""mkdocs hook: README.md, the tutorial at the repository's root, becomes the site's Tutorial page.

The README links into docs/ as GitHub shows it (`docs/training.md`); on the site those pages sit beside it,
so the hook drops the `docs/` prefix. `mkdocs build --strict` then checks the tutorial's links as any page's.
"""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    readme = Path(config.config_file_path).parent / "README.md"
    text = re.sub(r"\]\(docs/", "](", readme.read_text())
    files.append(File.generated(config, "tutorial.md", content=text))
    return files
