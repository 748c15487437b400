"""Submitting to a test SLURM and reading what a job left: shared by tests/test_slurm.py and
tests/test_slurm_multinode.py."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from slurm_cluster import Cluster

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.seq_length=64", "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
    "train.warmup_steps=0", "train.log_interval=1",
]
STEP_LINE = re.compile(r"^step\s+(\d+)/(\d+) \|", re.MULTILINE)


def tiny_env(data, *settings: str, **env: str) -> dict[str, str]:
    """tiny_cpu.sbatch's environment: the test's data, a smaller model for speed, `settings`
    (`section.key=value`) after those, and `env`."""
    return {"DATA_DIR": str(data.tokenizer_path.parent),
            "TRAIN_ARGS": " ".join(f"--set {item}" for item in [*TINY, *settings]), **env}


def job_info(cluster: Cluster, job: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", cluster.run("scontrol", "show", "job", "-o",
                                                        job).stdout))


def wait_for(cluster: Cluster, job: str, done, timeout: float, what: str,
             directory: Path | None = None) -> dict[str, str]:
    """Poll `scontrol show job` (no accounting here, so no sacct) until done(info); a failure
    shows the end of the job's log when `directory` is given."""
    deadline = time.time() + timeout
    info = job_info(cluster, job)
    while not done(info):
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        if time.time() > deadline:
            break
        time.sleep(1)
        info = job_info(cluster, job)
    if not done(info):
        log = read_log(directory)[-4000:] if directory and (directory / "job.log").exists() \
            else ""
        raise AssertionError(f"job {job}: waited for {what}, state {info.get('JobState')} "
                             f"({info.get('Reason')}, exit {info.get('ExitCode')})\n{log}")
    return info


def finished(info: dict[str, str]) -> bool:
    return info.get("JobState") == "COMPLETED"


def submit(cluster: Cluster, script: str, out: Path, *args: str, sbatch=(), **env: str) -> str:
    """sbatch from the repository root, as a user would; the run directories go under `out`."""
    done = cluster.run("sbatch", "--parsable", f"--output={out}/slurm-%x-%j.out", *sbatch,
                       str(SLURM / f"{script}.sbatch"), *args, cwd=REPO,
                       env={"RUN_ROOT": str(out), **env})
    return done.stdout.strip().split(";")[0]


def run_dir(out: Path, name: str, job: str) -> Path:
    return out / f"{name}-{job}"


def read_log(directory: Path) -> str:
    return (directory / "job.log").read_text(errors="replace")


def metric_steps(directory: Path) -> list[int]:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line]


def tensorboard_steps(directory: Path, tag: str) -> list[int]:
    """The steps of one scalar as TensorBoard shows it: every event file of the run directory,
    with the steps a resumed writer purged left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def wait_for_steps(directory: Path, count: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = directory / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= count:  # complete lines
            return
        time.sleep(0.2)
    log = read_log(directory)[-3000:] if (directory / "job.log").exists() else "no job.log"
    raise AssertionError(f"fewer than {count} steps after {timeout} s:\n{log}")


def preempt_and_resume(cluster: Cluster, job: str, directory: Path, total: int,
                       at_start: bool = False, after: int = 10) -> int:
    """USR1 to the batch shell mid-run (after `after` steps), or as soon as the job runs, before
    the workers listen (the batch shell repeats it until they do); returns the step saved."""
    if at_start:
        wait_for(cluster, job, lambda i: i.get("JobState") == "RUNNING", 120, "the start")
    else:
        wait_for_steps(directory, after, timeout=120)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = wait_for(cluster, job, lambda i: int(i.get("Restarts", 0)) >= 1, 90, "the requeue",
                    directory)
    assert info["Requeue"] == "1"
    wait_for(cluster, job, finished, 180, "the resumed run to finish", directory)
    log = read_log(directory)
    assert "SIGUSR1: asking the workers to save" in log
    assert f"requeueing job {job}" in log
    first, _, second = log.partition("restart count 1,")
    assert second, f"the log shows no restart:\n{log[-3000:]}"
    saved = [int(m.group(1)) for m in STEP_LINE.finditer(first)][-1]
    resumed = [int(m.group(1)) for m in STEP_LINE.finditer(second)]
    assert (1 if at_start else after) <= saved < total, saved
    assert resumed[0] == saved + 1, (saved, resumed[:3])
    assert "resuming from checkpoint: none" in first
    # No gap, no repeat: in the loss log, in the job log, and in TensorBoard.
    assert metric_steps(directory) == list(range(1, total + 1))
    assert [int(m.group(1)) for m in STEP_LINE.finditer(log)] == list(range(1, total + 1))
    return saved
