#!/usr/bin/env bash
# Installs the package with its test extra (CPU torch, megatron-core 0.16.1) and megatron-core
# 0.19.2 in a folder beside it, then runs lint, the whole suite under megatron-core 0.16, and
# every tests/test_megatron_*.py again under 0.19.2 (first on PYTHONPATH). One run after the
# other: the SLURM tests wait on real schedulers with time limits, which a second run beside
# them on 2 cores pushed past (measured). Arguments go to the whole-suite run. Exits non-zero
# when either run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet "torch==2.13.0" -e ".[test]"
# T5's sentencepiece model for the real-vocabulary tests, from a wheel whose requirements would
# replace torch: the file is all the tests read.
python3 -m pip install --quiet --no-deps "diffsynth==1.1.9"
# megatron-core 0.19.2 in a folder of its own, put first on PYTHONPATH for the Megatron tests:
# the same interpreter and packages, 0.19.2 shadowing the 0.16.1 the extra installed. Its
# metadata asks for Python >= 3.12 but its source runs on 3.11 (the dataset helpers compile
# here); its requirements (torch, numpy, packaging) are the main environment's.
MCORE19=build/megatron-core-0.19
if ! PYTHONPATH="${MCORE19}/site" python3 -c "from megatron.core import package_info as p
assert (p.MAJOR, p.MINOR, p.PATCH) == (0, 19, 2)" 2>/dev/null; then
    rm -rf "${MCORE19}/site"
    python3 -m pip install --quiet --ignore-requires-python --no-deps --no-binary megatron-core \
        --target "${MCORE19}/site" "megatron-core==0.19.2"
fi
python3 -m ruff check plugin tests launch
NEWER="${PWD}/${MCORE19}/site${PYTHONPATH:+:${PYTHONPATH}}"
version='from megatron.core import package_info as p; print("megatron-core", p.__shortversion__)'
status=0
echo "== the whole suite under $(python3 -W ignore -c "${version}")"
python3 -m pytest -q "$@" || status=$?
echo "== tests/test_megatron_*.py under $(PYTHONPATH="${NEWER}" python3 -W ignore -c "${version}")"
PYTHONPATH="${NEWER}" python3 -m pytest -q -p no:cacheprovider --basetemp="${MCORE19}/pytest" \
    tests/test_megatron_*.py || status=$?
exit "${status}"
