#!/usr/bin/env bash
# Creates .venv and installs the project with every extra; installs redis-server (Debian) for the
# Redis-backed feature-store tests. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch==2.13.0 is pinned in pyproject.toml: the CPU wheel; never an open range (CUDA build).
.venv/bin/python -m pip install -q -e '.[dev,federated,ray]'
