#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install vlp into it.
# The environment lives outside the clone, keyed by a hash of the dependency files,
# so a fresh clone on the same machine reuses it; `.venv` in the repo points at it.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$( (cat setup.cfg pyproject.toml; python3 --version) | sha256sum | cut -c1-16)
root="${VLP_ENV_ROOT:-$HOME/.cache/vlp}"
venv="$root/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] creating environment $venv (torch install takes a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip 2> >(grep -v "is ignored" >&2)
  # torch first and pinned: on this machine these come from local files; open_clip needs torchvision.
  "$venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 2> >(grep -v "is ignored" >&2)
  "$venv/bin/python" -m pip install -q -e ".[dev]" 2> >(grep -v "is ignored" >&2)
  touch "$venv/.complete"
else
  # Reused environment: only (re)point the editable install at this clone.
  log=$(mktemp)
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  rm -f "$log"
fi
ln -sfn "$venv" .venv
