#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install vlp into it.
# setup.cfg states ranges (vlp installs into environments users already have); this environment holds
# exactly the tested set, constraints.txt (vlp with all its extras), so the README's commands are reproducible.
# The environment lives outside the clone, keyed by a hash of constraints.txt, pyproject.toml and the Python
# version, so a fresh clone on the same machine reuses it. setup.cfg is not in the key: every requirement it
# states is locked in constraints.txt (tests/test_install.py), so editing a range alone changes nothing
# installed, and a new dependency changes the lock.
# Clones share that environment, but each runs its own code: `.venv` in the clone is a small environment of
# its own (no packages) that puts this clone first on the path and then reads the shared one, with the shared
# commands (vlp, torchrun, accelerate, pytest, ...) re-pointed at it. So `.venv/bin/vlp` runs this clone's vlp,
# whichever clone ran set-up last. Set-ups run one at a time per environment root (a lock): a second one
# started meanwhile waits, then reuses what the first built.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$( (cat constraints.txt pyproject.toml; python3 --version) | sha256sum | cut -c1-16)
root="${VLP_ENV_ROOT:-$HOME/.cache/vlp}"
venv="$root/venv-$key"
mkdir -p "$root"
exec 9>"$root/.setup.lock"
if command -v flock >/dev/null; then
  flock 9 || { echo "[setup] cannot lock $root/.setup.lock" >&2; exit 1; }
fi
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] creating environment $venv (torch install takes a few minutes)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade -c constraints.txt pip 2> >(grep -v "is ignored" >&2)
  # One resolve, held to the lock: every package, torch's CUDA libraries included, at its tested version.
  "$venv/bin/python" -m pip install -q -c constraints.txt -e ".[dev,remote,hf,ray]" 2> >(grep -v "is ignored" >&2)
  touch "$venv/.complete"
else
  # Reused environment: refresh the package's metadata (entry points) from this clone; nothing is resolved.
  log=$(mktemp)
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  rm -f "$log"
fi
# This clone's .venv (earlier set-ups made it a link to the shared environment).
if [ -L .venv ] || { [ -e .venv ] && [ ! -f .venv/pyvenv.cfg ]; }; then rm -rf .venv; fi
[ -f .venv/pyvenv.cfg ] || python3 -m venv --without-pip .venv
ln -sfn "$venv" .venv/shared   # which shared environment this clone reads
own_site=$(echo .venv/lib/python3*/site-packages)
shared_site=$(echo "$venv"/lib/python3*/site-packages)
# .pth files are read in name order: this clone, then the shared packages (whose own .pth files run too).
printf '%s\n' "$PWD" > "$own_site/00-vlp-this-clone.pth"
printf 'import site; site.addsitedir(%s)\n' "'${shared_site//\'/\\\'}'" > "$own_site/01-vlp-shared-env.pth"
for f in "$venv"/bin/*; do
  name=${f##*/}
  case "$name" in python|python3|python3.*|activate|activate.*|Activate.ps1|__pycache__) continue ;; esac
  rm -f ".venv/bin/$name"
  if head -n 3 "$f" 2>/dev/null | grep -qF "$venv/bin/python"; then   # a Python command: same body, our python
    skip=1; [ "$(head -c 9 "$f")" = "#!/bin/sh" ] && skip=3         # pip's header for paths with spaces
    { printf '#!/bin/sh\n'"'''"'exec'"'"' "%s" "$0" "$@"\n'"' '''"'\n' "$PWD/.venv/bin/python"
      tail -n +$((skip + 1)) "$f"; } > ".venv/bin/$name"
    chmod +x ".venv/bin/$name"
  else
    ln -s "$f" ".venv/bin/$name"
  fi
done
