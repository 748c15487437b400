# Sourced by every script in slurm/ (inside the batch job, on the first node). The one place for
# site set-up; the scripts themselves hold only what differs between them.
#
# Needs, from the sourcing script: NPROC_PER_NODE (workers per node). Gives: REPO_DIR (the working
# directory from here on), MASTER_ADDR, MASTER_PORT, RUN_DIR, log, and srun_with_requeue.
# shellcheck shell=bash

# ---------------------------------------------------------------- preemption and requeue
# First of all, so that no signal finds the shell without its handler (the default would end
# the job). srun_with_requeue at the bottom does the rest.
log() { printf '[%(%F %T)T %s] %s\n' -1 "${SLURM_JOB_ID:-local}" "$*"; }

# The warning signal comes to this batch shell (#SBATCH --signal=B:USR1@N, or
# `scancel --signal=USR1 --batch JOBID`). It is passed on to the tasks of the training step,
# where the torchrun agents ignore it (see the launcher in srun_with_requeue) and the workers
# catch it: they finish the step they are in, save a checkpoint and exit 0. Once the step has
# ended cleanly, the job requeues itself, keeping its id and so its RUN_DIR; the next start
# resumes from that checkpoint.
_REQUEUE=0
_STEP_PID=
_on_usr1() {
    log "SIGUSR1: asking the workers to save a checkpoint and stop; the job will requeue"
    _REQUEUE=1
    _forward_usr1
}
_forward_usr1() {
    # srun passes SIGUSR1 on to every task of its step, on every node.
    if [[ -n ${_STEP_PID} ]]; then kill -USR1 "${_STEP_PID}" 2>/dev/null || true; fi
}
# SIGTERM (scancel, the time limit, preemption by a higher-priority job) goes to every process of
# the job: the workers save and exit on it themselves. This shell only waits for them.
_on_term() {
    log "SIGTERM: the workers save a checkpoint and stop; the step ends with 0 once all have (no requeue from here)"
}
trap _on_usr1 USR1
trap _on_term TERM
# The sbatch scripts trap USR1 first thing; one that came before this handler counts now.
if [[ -n ${_EARLY_USR1:-} ]]; then _on_usr1; fi

# ---------------------------------------------------------------- site: edit this block
# Modules and the Python environment. Either set SLURM_MODULES / VENV in the environment you
# submit from (sbatch exports it), or write your site's lines here, e.g.
#   module load cuda/12.4 nccl/2.21
#   source /shared/venvs/token-objectives/bin/activate
if [[ -n ${SLURM_MODULES:-} ]]; then
    # shellcheck disable=SC2086  # a list of module names
    module load ${SLURM_MODULES}
fi
if [[ -n ${VENV:-} ]]; then
    # shellcheck disable=SC1091
    source "${VENV}/bin/activate"
fi
# Where per-job run directories go (checkpoints, metrics.jsonl, tensorboard/, job.log): a
# filesystem every node sees.
RUN_ROOT=${RUN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/runs/slurm}
# ---------------------------------------------------------------- end of the site block

set -euo pipefail

# sbatch runs a copy of the script from the spool directory: the repository is where the job
# was submitted from (or REPO_DIR).
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "${REPO_DIR}"

# torchrun's rendezvous: the first node of the allocation, and a port that only this job uses.
# A requeued job keeps its id, so it keeps its port and its run directory.
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
export MASTER_ADDR MASTER_PORT

# One thread pool per worker: the task's CPUs shared among its workers.
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-1} / ${NPROC_PER_NODE:-1} ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
export PYTHONUNBUFFERED=1  # log lines reach job.log as they are printed
# Triton's compile cache on node-local disk: one on a shared $HOME is slow and, written by every
# node at once, racy. Kept per job, so a requeued start on the same node finds its kernels.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-cache-${USER:-user}-${SLURM_JOB_ID:-0}}
# Network interfaces: NCCL and gloo (the Megatron loop's CPU-side group) choose one themselves;
# on nodes with several (ib0, eth0, docker0, ...) set NCCL_SOCKET_IFNAME, NCCL_IB_HCA and
# GLOO_SOCKET_IFNAME in the environment you submit from (sbatch exports it). They are taken
# from there as they are, never set here.

# One directory per job, the same one after every requeue: the training script resumes from its
# checkpoints and continues its metrics.jsonl and TensorBoard run there. Set RUN_DIR to continue
# a run under a new job id.
RUN_DIR=${RUN_DIR:-${RUN_ROOT}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
mkdir -p "${RUN_DIR}"
# Everything from here on, this shell's and every task's output, goes to the run directory;
# appended, so a requeued run follows the one it continues.
exec >>"${RUN_DIR}/job.log" 2>&1
log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) start $(( ${SLURM_RESTART_COUNT:-0} + 1 )):" \
    "restart count ${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST}," \
    "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"
# What this start resumes from: the newest complete Megatron checkpoint (step_N/COMPLETE), or the
# tag DeepSpeed's `latest` names.
_resume_from=none
for _checkpoint in "${RUN_DIR}"/checkpoints/step_*; do
    if [[ -f ${_checkpoint}/COMPLETE ]]; then _resume_from=${_checkpoint##*/}; fi
done
if [[ -f ${RUN_DIR}/checkpoints/latest ]]; then _resume_from=$(<"${RUN_DIR}/checkpoints/latest"); fi
log "resuming from checkpoint: ${_resume_from}"
log "network: NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-auto} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-auto};" \
    "triton cache ${TRITON_CACHE_DIR}"
# CPU binding per GPU: torchrun's --numa-binding puts each worker on the CPUs of its GPU's NUMA
# node. It reads the GPUs' PCI location through CUDA, so only where GPUs answer (nvidia-smi);
# NUMA_BINDING=node|socket|exclusive|core-complex chooses the mode, none turns it off.
numa_args=()
if [[ ${NUMA_BINDING:-node} != none ]] && nvidia-smi -L >/dev/null 2>&1; then
    numa_args=(--numa-binding="${NUMA_BINDING:-node}")
fi
log "CPU binding: ${numa_args[*]:-none (no GPU answers nvidia-smi here, or NUMA_BINDING=none)}"

# srun_with_requeue SRUN_OPTION... -- COMMAND...: one task per node runs COMMAND with SIGUSR1
# ignored: the torchrun agent would die of it otherwise, and a worker still importing would too.
# The workers install their own handler over the inherited "ignore" before their start-up. Waits
# for the step through any number of signals, then requeues the job if SIGUSR1 came and the step
# succeeded. Returns the step's exit status.
srun_with_requeue() {
    local options=()
    while (( $# )) && [[ $1 != -- ]]; do options+=("$1"); shift; done
    shift
    srun "${options[@]}" bash -c 'trap "" USR1; exec "$@"' ignore-usr1 "$@" &
    _STEP_PID=$!
    local ticks=0
    while kill -0 "${_STEP_PID}" 2>/dev/null; do
        if (( _REQUEUE )); then
            # Workers that were still starting up ignored the signal: repeat it every 15 s
            # until the step has ended (a worker that has it already is not disturbed).
            sleep 1 &
            wait "$!" || true
            if (( ++ticks % 15 == 0 )); then _forward_usr1; fi
        else
            # Returns early whenever a trapped signal arrives.
            wait "${_STEP_PID}" || true
        fi
    done
    local status=0
    wait "${_STEP_PID}" || status=$?
    _STEP_PID=
    log "training step ended with status ${status}"
    if (( _REQUEUE && status == 0 )); then
        log "requeueing job ${SLURM_JOB_ID}; it resumes from the checkpoint just saved"
        scontrol requeue "${SLURM_JOB_ID}"
    fi
    return "${status}"
}
