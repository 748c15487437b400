"""A worker SIGKILLed at any write point of a save loses nothing but the steps since the newest
complete checkpoint, in both loops (2 gloo ranks, the launch scripts, tests/kill_launcher.py).

Each loop runs as a chain of starts to a fixed train.steps / --steps, saving every step: start k
resumes from checkpoint k - 1, saves step k and is killed at a write point of its second save
(step k + 1), or in the metrics append of step k + 1. After each kill the newest complete
checkpoint is step k, every complete checkpoint matches its manifest, and no manifest lists a
leftover of an interrupted write; the next start resumes from step k. The last start finishes
the run: its metrics (one line per step) and losses equal a straight run's, and no leftover
remains.

A full disk during a save at TP = 2, where DCP's forked writers lose the ENOSPC, names it as at
TP = 1 (`checkpointing.disk_cause` probes the disk).
"""

from __future__ import annotations

import errno
import json
import re
import signal
from pathlib import Path

import pytest
from kill_launcher import DEEPSPEED_PRELOAD, MEGATRON_PRELOAD, Launcher
from torchrun_helpers import REPO, TINY_MEGATRON, small_tmpfs
from torchrun_helpers import read_metrics as metrics

from token_objectives.training import checkpointing
from token_objectives.training.checkpointing import MANIFEST, latest_complete_step, step_dir

KILLED = -signal.SIGKILL
MEGATRON = REPO / "launch" / "pretrain_megatron.py"
DEEPSPEED = REPO / "launch" / "pretrain_deepspeed.py"
MEGATRON_POINTS = ["shards", "MANIFEST.json", "COMPLETE", "metrics.jsonl"]
# ZeRO-2 over 2 ranks: rank 0 writes the model states and its optimizer shard, rank 1 its own.
DEEPSPEED_POINTS = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "zero_pp_rank_1_mp_rank_00_optim_states.pt", "MANIFEST.json", "latest",
                    "metrics.jsonl"]
# What the loops import when they start.
PRELOAD = list(dict.fromkeys([*MEGATRON_PRELOAD, *DEEPSPEED_PRELOAD]))


@pytest.fixture(scope="module")
def launcher():
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    server = Launcher(PRELOAD)
    yield server
    server.close()


def _megatron_argv(data, out: Path, *overrides: str) -> list[str]:
    values = [*TINY_MEGATRON, f"data.tokenizer={data.tokenizer_path}",
              f"data.train_prefix={data.train_prefix}",
              f"data.frequencies={data.frequencies_path}", f"output.dir={out}",
              "parallel.tensor=2", *overrides]
    return ["--config", str(REPO / "configs" / "tiny.yaml"),
            *(item for value in values for item in ("--set", value))]


def _output(log: Path) -> str:
    return "".join(path.read_text() for path in sorted(log.parent.glob(f"{log.name}.rank*")))


def _first_step(log: Path) -> int:
    """The first step a start printed (the step after the one it resumed from)."""
    found = re.search(r"^step\s+(\d+)/", _output(log), re.MULTILINE)
    assert found, _output(log)[-3000:]
    return int(found.group(1))


def _assert_whole(checkpoints: list[Path]) -> None:
    for directory in checkpoints:
        assert checkpointing.manifest_problem(directory) is None, directory
        listed = json.loads((directory / MANIFEST).read_text())["files"]
        assert not [name for name in listed if checkpointing.is_leftover(Path(name).name)], (
            directory, sorted(listed))


def _kill_chain(points: list[str], start, newest, directory, out: Path) -> None:
    """Start k (1-based) is killed at points[k - 1] in its second save; `start(log, kill_at)`
    returns the ranks' exit codes, `newest()` the newest complete step, `directory(step)` its
    checkpoint."""
    for k, point in enumerate(points, start=1):
        log = out / f"start{k}"
        exits = start(log, f"{point}:2")
        assert KILLED in exits, (point, exits, _output(log)[-3000:])
        assert _first_step(log) == k, point  # resumed from the newest complete checkpoint
        assert newest() == k, (point, sorted(p.name for p in (out / "checkpoints").iterdir()))
        _assert_whole([directory(step) for step in range(1, k + 1)])
    log = out / "last"
    assert start(log, None) == [0, 0], _output(log)[-3000:]
    assert _first_step(log) == len(points) + 1
    _assert_whole([directory(step) for step in range(1, newest() + 1)])
    assert not [p for p in (out / "checkpoints").rglob("*") if checkpointing.is_leftover(p.name)]


def test_a_kill_at_any_write_point_of_the_megatron_loop_loses_only_the_unsaved_steps(
        data, launcher, tmp_path):
    steps = len(MEGATRON_POINTS) + 2
    out, straight = tmp_path / "killed", tmp_path / "straight"
    root = out / "checkpoints"

    def start(log: Path, kill_at: str | None, directory: Path = out) -> list[int]:
        argv = _megatron_argv(data, directory, f"train.steps={steps}", "train.save_interval=1")
        return launcher.start(MEGATRON, argv, log, kill_at=kill_at)

    assert start(straight / "log", None, straight) == [0, 0]
    _kill_chain(MEGATRON_POINTS, start, lambda: latest_complete_step(root),
                lambda step: step_dir(root, step), out)
    got, want = metrics(out), metrics(straight)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, steps + 1))
    for x, y in zip(got, want, strict=True):
        assert x["lm loss"] == y["lm loss"], (x, y)
    assert latest_complete_step(root) == steps


def test_a_kill_at_any_write_point_of_the_deepspeed_loop_loses_only_the_unsaved_steps(
        data, launcher, tmp_path):
    steps = len(DEEPSPEED_POINTS) + 2
    config = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    config["bf16"] = {"enabled": False}
    config["tensorboard"]["enabled"] = False
    (tmp_path / "zero2.json").write_text(json.dumps(config))
    out, straight = tmp_path / "killed", tmp_path / "straight"
    root = out / "checkpoints"

    def start(log: Path, kill_at: str | None, directory: Path = out) -> list[int]:
        values = [f"data.tokenizer={data.tokenizer_path}", f"data.train_prefix={data.train_prefix}",
                  f"data.frequencies={data.frequencies_path}", f"output.dir={directory}",
                  f"model.hf_config={REPO / 'configs' / 'deepspeed' / 'tiny_llama.json'}",
                  "model.seq_length=32", f"train.steps={steps}", "train.save_interval=1"]
        argv = ["--config", str(REPO / "configs" / "deepspeed" / "tiny.yaml"),
                "--deepspeed_config", str(tmp_path / "zero2.json"),
                *(item for value in values for item in ("--set", value))]
        return launcher.start(DEEPSPEED, argv, log, kill_at=kill_at)

    def newest() -> int:
        return int((root / "latest").read_text().removeprefix("global_step"))

    assert start(straight / "log", None, straight) == [0, 0]
    _kill_chain(DEEPSPEED_POINTS, start, newest, lambda step: root / f"global_step{step}", out)
    got, want = metrics(out), metrics(straight)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, steps + 1))
    for x, y in zip(got, want, strict=True):
        assert x["lm loss"] == pytest.approx(y["lm loss"], rel=1e-6, abs=1e-7), (x, y)
    assert newest() == steps


def test_a_full_disk_during_a_save_at_tp2_names_the_cause(data, launcher, tmp_path):
    """The checkpoint root is a 2 MiB tmpfs: step 1 (~1.5 MB over 2 TP ranks) fits, step 2 does
    not. When DCP's forked writers fail ("[enforce fail at inline_container.cc:672] unexpected
    pos", no errno) the message still says no space left on device, with the mount; step 1 is
    kept and matches its manifest."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    argv = _megatron_argv(data, out, "train.steps=2", "train.save_interval=1",
                          "train.keep_checkpoints=1")
    with small_tmpfs(root, "2m"):
        exits = launcher.start(MEGATRON, argv, tmp_path / "log")
        output = _output(tmp_path / "log")
        assert 1 in exits and 0 not in exits, (exits, output[-3000:])
        message = re.search(r"checkpoint save to (\S+) failed: no space left on device "
                            r"\((\d+) bytes free on (\S+)\); .*the previous checkpoint (\S+) is "
                            r"kept", output)
        assert message, output[-3000:]
        assert message.group(1) == str(step_dir(root, 2))
        assert message.group(3) == str(root) and message.group(4) == str(step_dir(root, 1))
        # Every rank names it (or the other rank): which writer hits the full disk first varies.
        causes = re.findall(r"checkpoint save to \S+ failed: (.*?); its partial directory",
                            output, re.DOTALL)
        assert all(cause.startswith("no space left on device (")
                   or cause == "it failed on another rank" for cause in causes), causes
        assert sorted(p.name for p in root.iterdir()) == ["step_0000001"]
        assert checkpointing.manifest_problem(step_dir(root, 1)) is None


def test_a_write_failure_without_an_errno_is_probed_for_a_full_disk(tmp_path):
    """With room left, or no directory to probe, the error stays as it is (and no probe file is
    left); on a full disk the probe's ENOSPC is the cause, the error its __cause__, and
    save_failure names it."""
    error = RuntimeError("Worker failure: [enforce fail at inline_container.cc:672] . "
                         "unexpected pos 704 vs 598")
    assert checkpointing.disk_cause(error, tmp_path / "missing") is error
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        assert checkpointing.disk_cause(error, disk) is error
        assert not list(disk.iterdir())
        with open(disk / "filler", "wb", buffering=0) as handle:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    handle.write(bytes(1 << 16))
        found = checkpointing.disk_cause(error, disk)
        assert isinstance(found, OSError) and found.errno == errno.ENOSPC, found
        assert found.__cause__ is error
        message = checkpointing.save_failure(disk / "step_0000002", found, None)
        assert message.startswith(f"checkpoint save to {disk / 'step_0000002'} failed: no space "
                                  f"left on device (")
        assert f" bytes free on {disk}); " in message
        assert [p.name for p in disk.iterdir()] == ["filler"]
