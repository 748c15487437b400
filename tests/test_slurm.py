"""The sbatch scripts in slurm/, submitted to a real one-node SLURM (see tests/slurm_cluster.py).

- every script parses (`bash -n`);
- slurm/tiny_cpu.sbatch trains to the end: 2 workers, every step logged once, a checkpoint;
- preemption: `scancel --signal=USR1 --batch` mid-run (what `--signal=B:USR1@N` does before the
  time limit) makes the workers save and exit 0, the job requeues itself, and the resumed run
  continues from the saved step: steps 1..N exactly once in metrics.jsonl, job.log and
  TensorBoard, all in the job's one directory. Shown for the Megatron loop (tiny_cpu.sbatch) and
  for the DeepSpeed loop (deepspeed_3b.sbatch with the tiny model on CPU, signalled while its
  workers are still starting up);
- the GPU scripts: `sbatch --test-only` with their resource lines as written except the node
  count, CPUs per task and partition, which the test cluster (one node, 2 CPUs, 8 GPUs declared by
  count) cannot match; and a DRY_RUN job of each that prints the torchrun command it would run.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from doc_blocks import doc_block
from slurm_cluster import FAKE_GPUS, Cluster, Unavailable, ensure_cluster
from slurm_jobs import (
    REPO,
    SLURM,
    finished,
    metric_steps,
    preempt_and_resume,
    read_log,
    run_dir,
    submit,
    tensorboard_steps,
    tiny_env,
    wait_for,
    wait_for_steps,
)

from token_objectives.training.checkpointing import latest_complete_step

GPU_SCRIPTS = ("megatron_3b", "deepspeed_3b")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    try:
        started = ensure_cluster(tmp_path_factory.mktemp("slurm"))
    except Unavailable as why:
        pytest.skip(str(why))
    yield started
    started.stop()


def _node(cluster: Cluster) -> dict[str, str]:
    line = cluster.run("scontrol", "show", "node", "-o").stdout.splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", line))


# ---------------------------------------------------------------------------------- the scripts
@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.glob("*.sbatch")) + ["env.sh"])
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (SLURM / script).read_text()
    if script.endswith(".sbatch"):
        for directive in ("--signal=B:USR1@", "--requeue", "--open-mode=append"):
            assert f"#SBATCH {directive}" in text, directive
        assert 'source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/env.sh"' in text
        assert "srun_with_requeue" in text and "--rdzv-backend=c10d" in text
        # A failed worker ends the step (see slurm/README.md, "A lost node").
        assert "--max-restarts=0 " in text
        if script in ("megatron_3b.sbatch", "deepspeed_3b.sbatch"):
            assert '"${numa_args[@]}"' in text
        # The launcher that exits 0 after a clean stop on SIGTERM, not torchrun itself.
        assert "python3 -m token_objectives.training.torchrun" in text
        assert not re.search(r"^\s*(\"\$\{launcher\[@\]\}\" )?torchrun ", text, re.MULTILINE)


# ---------------------------------------------------------------------------------- tiny on CPU
def test_tiny_cpu_preempted_requeues_resumes_and_completes(cluster, data, tmp_path):
    """USR1 mid-run: the workers save, the job requeues, resumes and runs to completion."""
    total = 60
    # The README's command: `sbatch slurm/tiny_cpu.sbatch`, with the test's settings after it.
    sbatch, script = shlex.split(doc_block("slurm-submit").text)
    assert sbatch == "sbatch" and script.startswith("slurm/") and script.endswith(".sbatch")
    job = submit(cluster, Path(script).stem, tmp_path, "--set", f"train.steps={total}",
                 "--set", "train.save_interval=0", **tiny_env(data))
    directory = run_dir(tmp_path, "tiny-cpu", job)
    saved = preempt_and_resume(cluster, job, directory, total)
    info = wait_for(cluster, job, finished, 10, "the run to finish", directory)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1"
    assert info["NumCPUs"] == "2" and info["NumNodes"] == "1"
    log = read_log(directory)
    assert f"resuming from checkpoint: step_{saved:07d}" in log
    assert f"rendezvous {_node(cluster)['NodeHostName']}:{20000 + int(job) % 40000}" in log
    assert "network: NCCL_SOCKET_IFNAME=auto GLOO_SOCKET_IFNAME=auto;" in log
    assert re.search(rf"triton cache \S*/triton-cache-\S+-{job}$", log, re.MULTILINE), log[:2000]
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert all(row["lm loss"] > 0 and row["tokens_per_s"] > 0 for row in rows)
    assert rows[-1]["lm loss"] < rows[0]["lm loss"]  # it learns
    checkpoints = sorted(p.name for p in (directory / "checkpoints").iterdir())
    assert checkpoints == [f"step_{saved:07d}", f"step_{total:07d}"]
    final = directory / "checkpoints" / f"step_{total:07d}"
    assert (final / "COMPLETE").is_file()
    # Two workers (TP=2), each wrote its shard of the checkpoint.
    assert len(list(final.glob("__*_0.distcp"))) == 2
    # One TensorBoard run for the job, continued after the requeue.
    assert tensorboard_steps(directory / "tensorboard", "loss/lm loss") == \
        list(range(1, total + 1))


def test_tiny_cpu_scancel_saves_and_ends_with_status_0(cluster, data, tmp_path):
    """Plain `scancel`: SIGTERM to every process of the job, the torchrun agents included. The
    workers save; the launcher (training.torchrun) exits 0 where torchrun would exit 1, so the
    step and the batch script end with 0 and SLURM shows ExitCode 0:0 (the state is CANCELLED,
    SLURM's record of who ended the job). No requeue: a plain scancel means stop.

    It comes after periodic saves, and twice: megatron-core's checkpoint writer keeps a Manager
    process from the first save on, which the job-wide SIGTERM used to kill, failing the
    emergency save (BrokenPipeError, exit 143)."""
    job = submit(cluster, "tiny_cpu", tmp_path, "--set", "train.steps=300",
                 "--set", "train.save_interval=2", **tiny_env(data))
    directory = run_dir(tmp_path, "tiny-cpu", job)
    wait_for_steps(directory, 5, timeout=120)
    assert latest_complete_step(directory / "checkpoints") >= 2  # a periodic save came first
    cluster.run("scancel", job)
    time.sleep(0.5)
    cluster.run("scancel", job, check=False)  # the job may be completing already
    deadline = time.time() + 90
    while "training step ended" not in read_log(directory) and time.time() < deadline:
        time.sleep(0.5)
    info = wait_for(cluster, job, lambda i: i.get("JobState") == "CANCELLED"
                    and "COMPLETING" not in i.get("JobState", ""), 60, "the end", directory)
    log = read_log(directory)
    assert "SIGTERM: the workers save a checkpoint" in log
    assert "all 2 workers of this node saved a checkpoint at step" in log, log[-3000:]
    assert "training step ended with status 0" in log, log[-3000:]
    assert "requeueing" not in log and info["Restarts"] == "0"
    assert info["ExitCode"] == "0:0", info
    saved = latest_complete_step(directory / "checkpoints")
    assert saved is not None and 5 <= saved < 300
    assert metric_steps(directory) == list(range(1, saved + 1))


def test_deepspeed_script_signalled_at_start_requeues_and_resumes(cluster, data, tmp_path):
    """deepspeed_3b.sbatch as written, with the tiny model on CPU: ZeRO-2 over 2 workers. The
    signal comes while the workers are still starting up. The batch shell repeats it every 15 s
    until the workers listen, so the first run takes some tens of steps (up to ~150 on an idle
    machine) before it saves: 300 leaves room, and a resumed run short enough for the test's
    180 s on a loaded one (600 did not finish there)."""
    total = 300
    job = submit(
        cluster, "deepspeed_3b", tmp_path, "--ds-set", "bf16.enabled=false",
        sbatch=("--partition=" + _partition(cluster), "--nodes=1", "--cpus-per-task=2"),
        GPUS_PER_NODE="2", TP="1", ZERO_STAGE="2", MICRO_BATCH="2", GLOBAL_BATCH="8",
        SEQ_LENGTH="64", STEPS=str(total), SAVE_INTERVAL="0",
        MODEL_CONFIG="configs/deepspeed/tiny_llama.json",
        TOKENIZER=str(data.tokenizer_path), DATA_PREFIX=str(data.train_prefix),
        FREQUENCIES=str(data.frequencies_path),
    )
    directory = run_dir(tmp_path, "deepspeed-3b", job)
    saved = preempt_and_resume(cluster, job, directory, total, at_start=True)
    assert f"resuming from checkpoint: global_step{saved}" in read_log(directory)
    assert (directory / "checkpoints" / "latest").read_text() == f"global_step{total}"


# ---------------------------------------------------------------------------------- GPU scripts
def _partition(cluster: Cluster) -> str:
    line = cluster.run("sinfo", "-h", "-o", "%P").stdout.split()[0]
    return line.rstrip("*")


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_scripts_pass_test_only(cluster, script):
    node = _node(cluster)
    gpus = re.search(r"gpu:(\d+)", node.get("Gres", ""))
    if gpus is None:
        pytest.skip("this cluster declares no gpu gres; the one tests/slurm_cluster.py starts does")
    assert int(gpus.group(1)) >= FAKE_GPUS
    # Everything as written but what one 2-CPU node cannot hold: 2 nodes, 64 CPUs per task, and
    # the `gpu` partition. --gpus-per-node=8, --exclusive, --mem=0, --time, --signal, --requeue
    # are checked by slurmctld as they are.
    fits = ("--partition=" + _partition(cluster), "--nodes=1",
            f"--cpus-per-task={node['CPUTot']}")
    done = cluster.run("sbatch", "--test-only", *fits, str(SLURM / f"{script}.sbatch"),
                       check=False, cwd=REPO)
    assert done.returncode == 0 and "to start at" in done.stderr, done.stderr
    # The GPU request is really checked: one GPU more than the node has is refused.
    more = cluster.run("sbatch", "--test-only", *fits, f"--gpus-per-node={int(gpus.group(1)) + 1}",
                       str(SLURM / f"{script}.sbatch"), check=False, cwd=REPO)
    assert more.returncode != 0 and "not available" in more.stderr, more.stderr
    # And as written (2 nodes x 8 GPUs) it does not fit this one-node cluster.
    whole = cluster.run("sbatch", "--test-only", f"--partition={_partition(cluster)}",
                        str(SLURM / f"{script}.sbatch"), check=False, cwd=REPO)
    assert whole.returncode != 0 and "not available" in whole.stderr, whole.stderr


@pytest.mark.parametrize("script, program", [("megatron_3b", "launch/pretrain_megatron.py"),
                                             ("deepspeed_3b", "launch/pretrain_deepspeed.py")])
def test_gpu_scripts_dry_run_under_slurm(cluster, script, program, tmp_path):
    """The scripts run for real on the one node, printing the launch instead of training."""
    if not re.search(r"gpu:\d+", _node(cluster).get("Gres", "")):
        pytest.skip("this cluster declares no gpu gres")
    fits = ("--partition=" + _partition(cluster), "--nodes=1", "--cpus-per-task=2")
    job = submit(cluster, script, tmp_path, "--extra", "1", sbatch=fits, DRY_RUN="1",
                 TOKENIZER="/data/tokenizer.json", DATA_PREFIX="/data/corpus_text_document",
                 FREQUENCIES="/data/frequencies.safetensors")
    wait_for(cluster, job, finished, 60, "the dry run")
    directory = run_dir(tmp_path, script.replace("_", "-"), job)
    log = read_log(directory)
    host = _node(cluster)["NodeHostName"]
    launch = next(line for line in log.splitlines() if line.startswith(
        "DRY_RUN python3 -m token_objectives.training.torchrun"))
    assert f"--max-restarts=0 --nnodes=1 --nproc-per-node={FAKE_GPUS} --rdzv-id={job} " \
           f"--rdzv-backend=c10d --rdzv-endpoint={host}:{20000 + int(job) % 40000} " \
           f"{program}" in launch
    assert "TP=2 " in log and f"DP={FAKE_GPUS // 2}," in log
    assert str(directory) in launch and launch.endswith("--extra 1")
    # CPU binding per GPU only where GPUs answer: this cluster's are declared, not real.
    assert "CPU binding: none (no GPU answers nvidia-smi here" in log
    assert "--numa-binding" not in launch
    if script == "megatron_3b":
        assert "--config configs/llama3.2-3b.yaml --set parallel.tensor=2" in launch
    else:
        assert "--config configs/deepspeed/llama3.2-3b.yaml" in launch
        assert "--set model.hf_config=configs/deepspeed/llama3.2-3b.json" in launch
        assert "3b_zero1.json" in launch and "tensor_parallel.autotp_size=2" in launch
        assert "scheduler.params.total_num_steps=100000" in launch
        assert "--set model.recompute=full" in launch
        # 256 sequences = micro-batch 1 x DP 4 x accumulation 64
        assert "gradient_accumulation_steps=64" in launch

    # Without its data paths the job stops at once and says what to set.
    job = submit(cluster, script, tmp_path, sbatch=fits, DRY_RUN="1")
    wait_for(cluster, job, lambda i: i.get("JobState") == "FAILED", 60, "the failure")
    assert "set TOKENIZER to the tokenizer" in read_log(run_dir(tmp_path, script.replace("_", "-"),
                                                                job))
