#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install vlp into it.
# setup.cfg states ranges (vlp installs into environments users already have); this environment holds
# exactly the tested set, constraints.txt (vlp with all its extras), so the README's commands are reproducible.
# The environment lives outside the clone, keyed by a hash of constraints.txt, pyproject.toml and the Python
# version, so a fresh clone on the same machine reuses it; `.venv` in the repo points at it. setup.cfg is
# not in the key: every requirement it states is locked in constraints.txt (tests/test_install.py), so
# editing a range alone changes nothing installed, and a new dependency changes the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$( (cat constraints.txt pyproject.toml; python3 --version) | sha256sum | cut -c1-16)
root="${VLP_ENV_ROOT:-$HOME/.cache/vlp}"
venv="$root/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] creating environment $venv (torch install takes a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade -c constraints.txt pip 2> >(grep -v "is ignored" >&2)
  # One resolve, held to the lock: every package, torch's CUDA libraries included, at its tested version.
  "$venv/bin/python" -m pip install -q -c constraints.txt -e ".[dev,remote,hf]" 2> >(grep -v "is ignored" >&2)
  touch "$venv/.complete"
else
  # Reused environment: only (re)point the editable install at this clone.
  log=$(mktemp)
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  rm -f "$log"
fi
ln -sfn "$venv" .venv
