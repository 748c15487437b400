"""training.torchrun's verdict after a signal, from the markers the workers leave.

The real path (scancel → torchrun's agent → workers save → exit 0) runs under SLURM in
test_slurm.py::test_tiny_cpu_scancel_saves_and_ends_with_status_0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from token_objectives.training import torchrun


@pytest.fixture
def stop_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(torchrun.STOP_DIR_ENV, str(tmp_path))
    return tmp_path


def _worker(monkeypatch, local_rank: int, local_world_size: int, step: int) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(10 + local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
    torchrun.report_clean_stop(step)


def test_every_local_worker_saved_is_a_clean_stop(stop_dir, monkeypatch):
    for local_rank in range(3):
        _worker(monkeypatch, local_rank, 3, step=12)
    status, line = torchrun.stop_status(stop_dir, signal.SIGTERM)
    assert status == 0
    assert "SIGTERM: all 3 workers of this node saved a checkpoint at step 12" in line


def test_a_worker_killed_before_its_marker_fails_with_128_plus_the_signal(stop_dir, monkeypatch):
    _worker(monkeypatch, 0, 2, step=7)
    status, line = torchrun.stop_status(stop_dir, signal.SIGTERM)
    assert status == 128 + 15
    assert "local workers [1] of 2 reported no saved checkpoint" in line
    assert "--shutdown-timeout" in line and "KillWait" in line


def test_no_marker_at_all_fails(stop_dir):
    status, line = torchrun.stop_status(stop_dir, signal.SIGINT)
    assert status == 128 + 2 and "SIGINT: no local worker reported" in line


def test_workers_outside_the_launcher_write_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(torchrun.STOP_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    torchrun.report_clean_stop(3)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ the counts


@pytest.fixture
def launched(monkeypatch):
    """torchrun itself replaced: the argv each launch would have started."""
    import torch.distributed.run

    calls = []
    monkeypatch.setattr(torch.distributed.run, "main", calls.append)
    return calls


@pytest.mark.parametrize(("argv", "says"), [
    (["--nproc-per-node", "0"], "--nproc-per-node 0: pass an integer >= 1"),
    (["--nproc_per_node=-2"], "--nproc-per-node -2: pass an integer >= 1"),
    (["--nproc-per-node", "gpus"], "--nproc-per-node gpus: pass an integer >= 1"),
    (["--nnodes", "0"], "--nnodes 0: pass N or MIN:MAX with 1 <= MIN <= MAX"),
    (["--nnodes", "2:1"], "--nnodes 2:1: pass N or MIN:MAX"),
    (["--nnodes", "x"], "--nnodes x: pass N or MIN:MAX"),
    (["--max-restarts", "-1"], "--max-restarts -1: pass 0 or more"),
    (["--monitor-interval", "0"], "--monitor-interval 0.0: pass a positive number of seconds"),
    (["--shutdown-timeout", "-5"], "--shutdown-timeout -5: pass 0 or more seconds"),
    (["--node-rank", "-1", "--standalone"], "--node-rank -1: pass 0 to --nnodes - 1"),
    # The static rendezvous waits 15 minutes for nodes that never come.
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank 2: pass 0 to --nnodes - 1 (here 1)"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_a_count_torchrun_would_refuse_with_a_bare_assertion(launched, capsys, argv, says):
    assert torchrun.main([*argv, "train.py", "--lr", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{torchrun.PREFIX}: error: {says}"), err
    assert launched == []


def test_sound_counts_reach_torchrun(launched):
    argv = ["--nnodes", "1:2", "--nproc-per-node", "auto", "--node-rank", "1", "train.py", "-x"]
    assert torchrun.main(argv) == 0
    assert launched == [argv]


def test_nproc_per_node_0_through_the_module(tmp_path):
    """A real process: one line on stderr, exit status 2, no traceback, no worker started."""
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('started')\n")
    result = subprocess.run([sys.executable, "-m", "token_objectives.training.torchrun",
                             "--nproc-per-node", "0", "--standalone", str(script)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"{torchrun.PREFIX}: error: --nproc-per-node 0: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_failed_save_is_named_as_the_cause(stop_dir, monkeypatch):
    _worker(monkeypatch, 0, 2, 7)
    monkeypatch.setenv("LOCAL_RANK", "1")
    torchrun.report_failed_stop(7, BrokenPipeError(32, "Broken pipe"))
    status, line = torchrun.stop_status(stop_dir, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM
    assert ("the checkpoint save of step 7 failed on local workers [1]: BrokenPipeError: "
            "[Errno 32] Broken pipe. Not a timeout") in line
    assert "--shutdown-timeout" not in line


def test_a_group_wide_sigterm_after_a_periodic_save_still_saves(tmp_path):
    """What torchrun's agent, scancel and SLURM's time limit do after the run has saved once:
    SIGTERM to the whole process group, twice. megatron-core's writer Manager, started by
    the first save, used to die with the group and fail the emergency save (BrokenPipeError,
    exit 143)."""
    import time

    from torchrun_helpers import REPO, TINY_MEGATRON, WORKER_ENV, free_port, read_metrics

    from token_objectives.quickstart.build_data import build_quickstart_data
    from token_objectives.training.checkpointing import latest_complete_step

    data = build_quickstart_data(tmp_path / "data", num_documents=200)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "token_objectives.training.torchrun",
               "--nproc-per-node=2", f"--master-port={free_port()}",
               str(REPO / "launch" / "pretrain_megatron.py"),
               "--config", str(REPO / "configs" / "tiny.yaml")]
    for item in (*TINY_MEGATRON, f"data.tokenizer={data.tokenizer_path}",
                 f"data.train_prefix={data.train_prefix}",
                 f"data.frequencies={data.frequencies_path}", f"output.dir={out}",
                 "train.steps=500", "train.save_interval=2"):
        command += ["--set", item]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=WORKER_ENV, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and launcher.poll() is None and not (
                latest_complete_step(out / "checkpoints") and len(read_metrics(out)) >= 3):
            time.sleep(0.1)
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        os.killpg(launcher.pid, signal.SIGTERM)
        time.sleep(0.5)
        os.killpg(launcher.pid, signal.SIGTERM)
        log, _ = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, log[-4000:]
    assert "all 2 workers of this node saved a checkpoint at step" in log, log[-4000:]
    saved = latest_complete_step(out / "checkpoints")
    assert saved >= 3 and saved == len(read_metrics(out)), log[-3000:]
