"""scripts/gpu_check.sh and its correctness module, kept runnable without a GPU: the script
parses, and `bench.gpu_check --small` runs its checks on CPU under Triton's interpreter (the
host-sync check needs CUDA and says it is skipped). The GPU run itself is the script's job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def test_the_script_parses_and_names_every_step():
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for step in ("step check_kernels", "step correctness", "step bench", '"megatron_${kernel}"'):
        assert step in text, step


def test_the_correctness_checks_pass_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "token_objectives.bench.gpu_check", "--small",
               "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().endswith("gpu_check: 12 passed, 0 failed, 1 skipped")
    assert "SKIP host syncs: needs CUDA" in done.stdout


def test_a_difference_past_the_tolerance_is_a_failure():
    import torch

    from token_objectives.bench.gpu_check import _close

    want = torch.linspace(-3, 3, 100, dtype=torch.float64)
    assert _close("x", want + 1e-6, want, 1e-4, 1e-5).startswith("PASS x")
    bumped = want.clone()
    bumped[57] += 1e-2
    assert _close("x", bumped, want, 1e-4, 1e-5).startswith("FAIL x: max |diff| 0.01")
