#!/usr/bin/env bash
# Installs the package with its test extra (CPU torch) and runs lint + the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet "torch==2.13.0" -e ".[test]"
python3 -m ruff check plugin tests launch
python3 -m pytest -q "$@"
