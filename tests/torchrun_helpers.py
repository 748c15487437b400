"""Running the training loops for real in tests: torchrun commands, the workers' environment,
checked runs and the metrics.jsonl a run writes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tiny GPT of configs/tiny.yaml, spelled out so tests do not depend on its example values.
TINY_MEGATRON = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=64",
    "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
    "train.warmup_steps=0", "train.lr=1e-3", "train.log_interval=1",
    "output.tensorboard=false",
]
WORKER_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script: Path, *args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", str(script), *args]


def check(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`done`, or an AssertionError with the end of its output when it failed."""
    if done.returncode != 0:
        raise AssertionError(f"run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def run_checked(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return check(subprocess.run(command, capture_output=True, text=True,
                                env=env or WORKER_ENV, timeout=600))


def read_metrics(out: Path) -> list[dict]:
    """The rows of `out`/metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str):
    """A tmpfs of `size` mounted on `directory` (created here), unmounted afterwards; skips the
    test when this machine does not allow mounting one."""
    directory.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)
