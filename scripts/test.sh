#!/usr/bin/env bash
# Installs the package with its test extra (CPU torch, megatron-core 0.16.1) and megatron-core
# 0.19.2 in a folder beside it, then runs lint and the tests in two streams side by side (one
# thread each, so the two share the 2 cores without oversubscribing them):
#   A: the launcher-heavy files (SLURM, DeepSpeed, HF, Triton), megatron-core 0.16;
#   B: every other file under megatron-core 0.16, then tests/test_megatron_*.py again under
#      0.19.2.
# Arguments go to both 0.16 runs. Each stream's pytest output is printed when it ends; the
# exit status is non-zero when any run fails.
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
echo "== streams A and B under $(python3 -W ignore -c "${version}"), then the Megatron tests" \
    "under $(PYTHONPATH="${NEWER}" python3 -W ignore -c "${version}")"
export OMP_NUM_THREADS=1
STREAM_A=(tests/test_slurm.py tests/test_slurm_multinode.py tests/test_deepspeed.py
          tests/test_hf.py tests/test_triton_kernel.py)
IGNORE_A=("${STREAM_A[@]/#/--ignore=}")
LOGS=build/test-logs
mkdir -p "${LOGS}"
python3 -m pytest -q -p no:cacheprovider --basetemp=build/pytest-a "${STREAM_A[@]}" "$@" \
    >"${LOGS}/a.log" 2>&1 &
stream_a=$!
status=0
{
    python3 -m pytest -q -p no:cacheprovider --basetemp=build/pytest-b "${IGNORE_A[@]}" "$@" \
        >"${LOGS}/b.log" 2>&1 || status=$?
    PYTHONPATH="${NEWER}" python3 -m pytest -q -p no:cacheprovider --basetemp=build/pytest-19 \
        tests/test_megatron_*.py >"${LOGS}/megatron-core-0.19.log" 2>&1 || status=$?
    exit "${status}"
} &
stream_b=$!
wait "${stream_a}" || status=$?
wait "${stream_b}" || status=$?
for log in a b megatron-core-0.19; do
    echo "== ${log} (${LOGS}/${log}.log)"
    if [ "${status}" -eq 0 ]; then tail -n 1 "${LOGS}/${log}.log"; else cat "${LOGS}/${log}.log"; fi
done
exit "${status}"
