#!/usr/bin/env bash
# Installs the package with its test extra (CPU torch, megatron-core 0.16.1) and megatron-core
# 0.19.2 in a folder beside it, then runs lint and the tests in two streams side by side (one
# thread each, so the two share the 2 cores without oversubscribing them), balanced by time:
#   A: the SLURM, DeepSpeed and Triton files under megatron-core 0.16, then
#      tests/test_megatron_training.py and tests/test_megatron_lm_pretrain.py under 0.19.2;
#   B: every other file under 0.16, then the other tests/test_megatron_*.py under 0.19.2.
# So every tests/test_megatron_*.py runs under both versions. Arguments go to both 0.16 runs.
# Each run's summary is printed at the end (its whole log when one fails); the exit status is
# non-zero when any run fails.
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
echo "== streams A and B: $(python3 -W ignore -c "${version}"), then the Megatron tests under" \
    "$(PYTHONPATH="${NEWER}" python3 -W ignore -c "${version}")"
export OMP_NUM_THREADS=1
STREAM_A=(tests/test_slurm.py tests/test_slurm_multinode.py tests/test_deepspeed.py
          tests/test_triton_kernel.py)
NEWER_A=(tests/test_megatron_training.py tests/test_megatron_lm_pretrain.py)
NEWER_B=(tests/test_megatron_integration.py tests/test_megatron_lm_contract.py
         tests/test_megatron_model.py)
listed=$(printf '%s\n' "${NEWER_A[@]}" "${NEWER_B[@]}" | sort)
if [ "${listed}" != "$(ls tests/test_megatron_*.py | sort)" ]; then
    echo "scripts/test.sh: NEWER_A and NEWER_B must list every tests/test_megatron_*.py" >&2
    exit 2
fi
LOGS=build/test-logs
mkdir -p "${LOGS}"
stream() {  # stream NAME OLD_ARGS... -- NEWER_FILES...: one run under 0.16, then one under 0.19
    local name=$1 status=0 old=() newer=()
    shift
    while [ "$1" != "--" ]; do old+=("$1"); shift; done
    shift
    newer=("$@")
    python3 -m pytest -q -p no:cacheprovider --basetemp="build/pytest-${name}" "${old[@]}" \
        >"${LOGS}/${name}.log" 2>&1 || status=$?
    PYTHONPATH="${NEWER}" python3 -m pytest -q -p no:cacheprovider \
        --basetemp="build/pytest-${name}-0.19" "${newer[@]}" \
        >"${LOGS}/${name}-megatron-core-0.19.log" 2>&1 || status=$?
    return "${status}"
}
stream a "${STREAM_A[@]}" "$@" -- "${NEWER_A[@]}" &
stream_a=$!
stream b "${STREAM_A[@]/#/--ignore=}" "$@" -- "${NEWER_B[@]}" &
stream_b=$!
status=0
wait "${stream_a}" || status=$?
wait "${stream_b}" || status=$?
for log in a a-megatron-core-0.19 b b-megatron-core-0.19; do
    echo "== ${log} (${LOGS}/${log}.log)"
    if [ "${status}" -eq 0 ]; then tail -n 1 "${LOGS}/${log}.log"; else cat "${LOGS}/${log}.log"; fi
done
exit "${status}"
