"""training.torchrun's verdict after a signal, from the markers the workers leave.

The real path (scancel → torchrun's agent → workers save → exit 0) runs under SLURM in
test_slurm.py::test_tiny_cpu_scancel_saves_and_ends_with_status_0.
"""

from __future__ import annotations

import signal

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
