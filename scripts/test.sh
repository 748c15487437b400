#!/usr/bin/env bash
# Installs the package with its test extra (megatron-core 0.16.1; torch 2.13.0 only where none
# imports: scripts/ensure_torch.sh) and megatron-core 0.19.2 in a folder beside it, then runs
# lint and the tests in two streams side by side (most tests start processes, whose start-up
# leaves a core idle part of the time):
#   A: every tests/test_megatron_*.py under megatron-core 0.19.2, then the SLURM, Triton,
#      checkpoint-fault, evaluate and docs files under 0.16 (the split balances the measured
#      times; a third process would not help: the two streams keep both cores busy, and the
#      SLURM tests' timings failed under three);
#   B: every other file under 0.16 (the Megatron files included).
# So the Megatron tests run under both versions and every other test once. Arguments go to both
# 0.16 runs. Each run's summary is printed at the end (its whole log when one fails); the exit
# status is non-zero when any run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_torch.sh
python3 -m pip install --quiet -e ".[test]"
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
OLD_VERSION=$(python3 -W ignore -c "${version}")
NEW_VERSION=$(PYTHONPATH="${NEWER}" python3 -W ignore -c "${version}")
export OMP_NUM_THREADS=1
LATER_A=(tests/test_slurm.py tests/test_slurm_multinode.py tests/test_triton_kernel.py
         tests/test_checkpoint_faults.py tests/test_evaluate.py tests/test_docs_code.py)
LOGS=build/test-logs
rm -rf "${LOGS}"
mkdir -p "${LOGS}"
# pytest_run LOG BASETEMP ARGS...: one pytest run, its output (the 30 slowest tests at its end)
# to LOGS/LOG.log
pytest_run() {
    local log=$1 basetemp=$2
    shift 2
    python3 -m pytest -q -p no:cacheprovider --durations=30 --basetemp="${basetemp}" "$@" \
        >"${LOGS}/${log}.log" 2>&1
}
stream_a() {
    local status=0
    PYTHONPATH="${NEWER}" pytest_run a-megatron "build/pytest-a-0.19" tests/test_megatron_*.py \
        || status=$?
    pytest_run a-later "build/pytest-a" "${LATER_A[@]}" "$@" || status=$?
    return "${status}"
}
echo "== stream A: tests/test_megatron_*.py under ${NEW_VERSION}, then" \
    "${LATER_A[*]} under ${OLD_VERSION}"
echo "== stream B: every other file under ${OLD_VERSION}"
stream_a "$@" &
a=$!
pytest_run b "build/pytest-b" "${LATER_A[@]/#/--ignore=}" "$@" &
b=$!
status=0
wait "${a}" || status=$?
wait "${b}" || status=$?
for log in a-megatron a-later b; do
    case "${log}" in
        a-megatron) what="tests/test_megatron_*.py under ${NEW_VERSION}" ;;
        a-later) what="${LATER_A[*]} under ${OLD_VERSION}" ;;
        *) what="every other file under ${OLD_VERSION}" ;;
    esac
    echo "== ${what} (${LOGS}/${log}.log)"
    if [ "${status}" -eq 0 ]; then tail -n 1 "${LOGS}/${log}.log"; else cat "${LOGS}/${log}.log"; fi
done
exit "${status}"
