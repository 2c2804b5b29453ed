#!/usr/bin/env bash
# Set up the environment if needed, then run the built-in demo (extra arguments go to python -m vlp.demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m vlp.demo "$@"
