"""The megatron-core training loop, launched for real over gloo on the CPU: each start's ranks
forked as torchrun starts them, from a server that imported megatron-core once
(tests/kill_launcher.py); the SIGUSR1 test goes through torchrun itself.

TP / PP / DP runs are compared with a one-process run on the same data (losses per step and
every weight of the saved checkpoint, read back without a process group); resume is compared
with a straight run; interrupted and corrupt checkpoints are shown to be handled.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill_launcher import MEGATRON_PRELOAD, Launcher, next_log
from torchrun_helpers import REPO, WORKER_ENV, check, free_port, small_tmpfs
from torchrun_helpers import TINY_MEGATRON as TINY
from torchrun_helpers import read_metrics as metrics

from token_objectives.training import checkpointing
from token_objectives.training.checkpointing import (
    COMPLETE_MARKER,
    MANIFEST,
    latest_complete_step,
    step_dir,
)

SCRIPT = REPO / "launch" / "pretrain_megatron.py"


def _arguments(data, out: Path, overrides) -> list[str]:
    """launch/pretrain_megatron.py's arguments: configs/tiny.yaml, the data, TINY, overrides."""
    arguments = [
        "--config", str(REPO / "configs" / "tiny.yaml"),
        "--set", f"data.tokenizer={data.tokenizer_path}",
        "--set", f"data.train_prefix={data.train_prefix}",
        "--set", f"data.frequencies={data.frequencies_path}",
        "--set", f"output.dir={out}",
    ]
    for item in (*TINY, *overrides):
        arguments += ["--set", item]
    return arguments


def _command(data, out: Path, nproc: int, overrides) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", str(SCRIPT), *_arguments(data, out, overrides)]


_server: Launcher | None = None


@pytest.fixture(scope="module", autouse=True)
def forked_starts():
    """The module's starts fork from one server (tests/kill_launcher.py) instead of one torchrun
    each; torchrun itself runs in the SIGUSR1 test, the docs' commands and the SLURM tests."""
    global _server
    _server = Launcher(MEGATRON_PRELOAD)
    yield
    _server.close()
    _server = None


def train(data, out: Path, nproc: int, *overrides: str, check: bool = True):
    """One start of launch/pretrain_megatron.py on `nproc` ranks, its output in a folder beside
    `out`; returns it as a completed process (Launcher.run)."""
    done = _server.run(SCRIPT, _arguments(data, out, overrides), next_log(out), nproc)
    if check and done.returncode != 0:
        raise AssertionError(f"training failed:\n{done.stdout[-6000:]}")
    return done


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint, in global (TP/PP-independent) layout."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = out / f"weights_{step}.pt"
    dcp_to_torch_save(step_dir(out / "checkpoints", step), target)
    state = torch.load(target, weights_only=False)
    model = {k: v for k, v in state.items() if k.startswith(("decoder.", "embedding.",
                                                              "output_layer."))
             and "_extra_state" not in k and isinstance(v, torch.Tensor)}
    assert len(model) > 5, sorted(state)[:20]
    return model


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    """One process: TP = PP = DP = 1, 4 micro-batches of 2 per step."""
    out = tmp_path_factory.mktemp("tp1")
    train(data, out, 1, "parallel.tensor=1", "train.steps=2")
    return out


def _assert_same_run(out: Path, baseline: Path, rtol: float = 2e-5, atol: float = 2e-6):
    ours, theirs = metrics(out), metrics(baseline)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == [1, 2]
    for a, b in zip(ours, theirs, strict=True):
        for name in ("lm loss", "ce", "ntl part", "ce part"):
            assert a[name] == pytest.approx(b[name], rel=rtol), (name, a, b)
    got, expected = weights(out, 2), weights(baseline, 2)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=rtol, atol=atol, msg=key)


def test_tp2_matches_tp1(data, baseline, tmp_path):
    train(data, tmp_path, 2, "parallel.tensor=2", "train.steps=2")
    _assert_same_run(tmp_path, baseline)


def test_sequence_parallel_with_the_fused_head_matches_tp1(data, baseline, tmp_path):
    # TP=2 with the output layer skipped (tied embeddings), norms and residuals split along the
    # sequence: the fused head gathers the hidden states. The same losses and weights. (The
    # head without sequence parallelism, all-reducing grad_hidden: tests/test_fused_linear.py.)
    train(data, tmp_path, 2, "parallel.tensor=2", "parallel.sequence_parallel=true",
          "train.steps=2", "model.fused_lm_head=true")
    _assert_same_run(tmp_path, baseline)


def test_pp2_matches_pp1(data, baseline, tmp_path):
    train(data, tmp_path, 2, "parallel.tensor=1", "parallel.pipeline=2", "train.steps=2")
    _assert_same_run(tmp_path, baseline)


def test_dp2_matches_dp1_with_twice_the_micro_batches(data, baseline, tmp_path):
    # DP=2: 2 micro-batches per rank; the baseline (DP=1) runs 4 on one rank.
    train(data, tmp_path, 2, "parallel.tensor=1", "train.steps=2")
    _assert_same_run(tmp_path, baseline)


def test_distributed_optimizer_at_dp2_matches_the_baseline(data, baseline, tmp_path):
    # The fp32 optimizer state sharded over DP=2, the gradient reduce-scatter and the parameter
    # all-gather overlapped: the same update, to fp32 rounding.
    train(data, tmp_path, 2, "parallel.tensor=1", "train.steps=2",
          "parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
          "parallel.overlap_param_gather=true")
    _assert_same_run(tmp_path, baseline)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_run(data, baseline, tmp_path, mode):
    train(data, tmp_path, 1, "parallel.tensor=1", "train.steps=2", f"model.recompute={mode}")
    _assert_same_run(tmp_path, baseline, rtol=0, atol=0)


def test_weights_move_and_components_add_up(baseline, data, tmp_path):
    rows = metrics(baseline)
    for row in rows:
        assert row["lm loss"] == pytest.approx(row["ce part"] + 0.3 * row["ntl part"], rel=1e-5)
        assert 0 < row["number token share"] < 1 and row["ntl"] > 0
        # The counts are the step's, whole numbers (docs/metrics.md).
        assert row["number tokens"] == int(row["number tokens"]) > 0
        assert row["number token share"] == pytest.approx(
            row["number tokens"] / row["counted tokens"], rel=1e-12)
    # The second step sees the first update: a different loss on different data, finite.
    assert all(torch.isfinite(torch.tensor(r["lm loss"])) for r in rows)


def test_resume_equals_a_straight_run(data, tmp_path):
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    train(data, straight, 2, "parallel.tensor=2", "train.steps=6")
    first = train(data, sliced, 2, "parallel.tensor=2", "train.steps=6", "train.exit_interval=3")
    assert latest_complete_step(sliced / "checkpoints") == 3
    assert [m["step"] for m in metrics(sliced)] == [1, 2, 3], first.stdout[-2000:]

    # A save that was cut short must never be taken for a checkpoint.
    broken = sliced / "checkpoints" / "step_0000005.partial"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"\x00" * 100)
    unmarked = step_dir(sliced / "checkpoints", 4)
    shutil.copytree(step_dir(sliced / "checkpoints", 3), unmarked)
    (unmarked / COMPLETE_MARKER).unlink()
    assert latest_complete_step(sliced / "checkpoints") == 3

    train(data, sliced, 2, "parallel.tensor=2", "train.steps=6", "train.exit_interval=3")
    a, b = metrics(straight), metrics(sliced)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        assert x["lm loss"] == y["lm loss"], (x, y)
    got, expected = weights(sliced, 6), weights(straight, 6)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def _flip_bits(path: Path) -> None:
    """Invert 16 bytes in the middle of `path` on disk; its size stays the same."""
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
    path.write_bytes(bytes(raw))


def test_flipped_bits_in_the_latest_checkpoint_fall_back_or_stop(data, tmp_path):
    """Bits flipped in a shard of the newest checkpoint (same size, so only the manifest's
    sha256 sees it): "stop" exits non-zero naming the file; "fallback" reports the checkpoint,
    resumes from the one before and trains exactly as the straight run did."""
    args = ("parallel.tensor=1", "train.steps=4", "train.save_interval=2")
    train(data, tmp_path, 1, *args)
    straight = metrics(tmp_path)
    root = tmp_path / "checkpoints"
    assert latest_complete_step(root) == 4
    assert (step_dir(root, 4) / MANIFEST).is_file()
    shard = max(step_dir(root, 4).glob("*.distcp"), key=lambda p: p.stat().st_size)
    _flip_bits(shard)

    stopped = train(data, tmp_path, 1, *args, "train.on_corrupt_checkpoint=stop", check=False)
    assert stopped.returncode != 0
    assert f"checkpoint {step_dir(root, 4)} is corrupt" in stopped.stderr, stopped.stderr[-3000:]
    assert f"{shard} does not match its sha256" in stopped.stderr
    assert latest_complete_step(root) == 4  # "stop" leaves it where it is

    resumed = train(data, tmp_path, 1, *args)
    assert f"checkpoint {step_dir(root, 4)} is corrupt" in resumed.stderr, resumed.stderr[-3000:]
    assert f"resuming from the previous complete checkpoint {step_dir(root, 2)}" in resumed.stderr
    assert (root / "step_0000004.corrupt" / shard.name).is_file()
    again = metrics(tmp_path)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for x, y in zip(straight, again, strict=True):
        assert x["lm loss"] == y["lm loss"], (x, y)
    assert checkpointing.manifest_problem(step_dir(root, 4)) is None


def test_a_truncated_only_checkpoint_trains_from_scratch_and_says_so(data, tmp_path):
    train(data, tmp_path, 1, "parallel.tensor=1", "train.steps=2", "train.exit_interval=1")
    ckpt = step_dir(tmp_path / "checkpoints", 1)
    for shard in ckpt.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:64])
    done = train(data, tmp_path, 1, "parallel.tensor=1", "train.steps=2")
    assert f"checkpoint {ckpt} is corrupt" in done.stderr and "has 64 bytes" in done.stderr
    assert "no earlier complete checkpoint: training from scratch" in done.stderr
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(data, tmp_path):
    """The checkpoint root is a 2 MiB tmpfs: the first save (~1.4 MB) fits, the second does
    not. The run exits non-zero with ENOSPC, the path and the free space; the first checkpoint
    is untouched and still matches its manifest, and no partial directory is left."""
    root = tmp_path / "checkpoints"
    with small_tmpfs(root, "2m"):
        done = train(data, tmp_path, 1, "parallel.tensor=1", "train.steps=2",
                     "train.save_interval=1", "train.keep_checkpoints=1", check=False)
        assert done.returncode != 0
        message = re.search(r"checkpoint save to (\S+) failed: no space left on device "
                            r"\((\d+) bytes free on (\S+)\); .*the previous checkpoint (\S+) is "
                            r"kept", done.stderr)
        assert message, done.stderr[-3000:]
        assert message.group(1) == str(step_dir(root, 2))
        assert message.group(3) == str(root) and message.group(4) == str(step_dir(root, 1))
        assert sorted(p.name for p in root.iterdir()) == ["step_0000001"]
        assert checkpointing.manifest_problem(step_dir(root, 1)) is None


def test_manifest_names_the_missing_resized_or_changed_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"abc" * 1000)
    (tmp_path / "sub" / "b.bin").write_bytes(b"xyz")
    assert checkpointing.manifest_problem(tmp_path) == f"it has no {MANIFEST}"
    checkpointing.write_manifest(tmp_path)
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert sorted(files) == ["a.bin", "sub/b.bin"] and files["sub/b.bin"]["size"] == 3
    assert checkpointing.manifest_problem(tmp_path) is None
    (tmp_path / "sub" / "b.bin").write_bytes(b"xyZ")
    assert checkpointing.manifest_problem(tmp_path) == (
        f"{tmp_path / 'sub' / 'b.bin'} does not match its sha256 in {MANIFEST}")
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert "a.bin has 3 bytes, the manifest 3000" in checkpointing.manifest_problem(tmp_path)
    (tmp_path / "a.bin").unlink()
    assert checkpointing.manifest_problem(tmp_path) == f"{tmp_path / 'a.bin'} is missing"


def test_enospc_inside_a_dcp_failure_is_found(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    full = OSError(errno.ENOSPC, "No space left on device")
    error = CheckpointException("save failed", {0: (full, None)})
    message = checkpointing.save_failure(tmp_path / "step_0000002", error, tmp_path / "step_1")
    assert message.startswith(f"checkpoint save to {tmp_path / 'step_0000002'} failed: no space "
                              f"left on device (")
    assert message.endswith(f"the previous checkpoint {tmp_path / 'step_1'} is kept")


def test_bad_config_key_fails_before_training(data, tmp_path):
    done = train(data, tmp_path, 1, "model.hiden_size=32", check=False)
    assert done.returncode != 0
    assert "unknown key(s) ['hiden_size'] in config section 'model'" in done.stderr


def test_sigusr1_saves_and_exits_then_the_run_resumes(data, tmp_path):
    """SLURM's warning signal reaches the workers mid-run: they save the step they finished,
    exit cleanly, and the next launch continues from it."""
    import signal
    import time

    import psutil

    command = _command(data, tmp_path, 2, ("parallel.tensor=2", "train.steps=500"))
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=WORKER_ENV)
    try:
        log = tmp_path / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not log.exists() or len(metrics(tmp_path)) < 3):
            time.sleep(0.2)
        assert log.exists(), launcher.stderr.read()[-3000:] if launcher.poll() else "no log"
        for worker in psutil.Process(launcher.pid).children(recursive=True):
            worker.send_signal(signal.SIGUSR1)
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err[-3000:]
    saved = latest_complete_step(tmp_path / "checkpoints")
    steps = [m["step"] for m in metrics(tmp_path)]
    assert saved is not None and 3 <= saved < 500 and steps == list(range(1, saved + 1))

    train(data, tmp_path, 2, "parallel.tensor=2", "train.steps=500",
          f"train.exit_interval={saved + 2}")
    steps = [m["step"] for m in metrics(tmp_path)]
    assert steps == list(range(1, saved + 3))
    assert latest_complete_step(tmp_path / "checkpoints") == saved + 2


def nan_loss_probe(argv: list[str]) -> None:
    """`nan-loss-probe OUT MODE OVERRIDE...`: training.megatron.run for 3 steps, its loss_func
    wrapped in this process only: in step 2, MODE "report" makes the reported "ntl" sum NaN
    while the loss it returns, and so the gradients, stay finite; MODE "grads" makes the
    per-token loss NaN, and so the gradients too; MODE "gradient-only" a NaN gradient under a
    finite loss. Writes what the run raised, how many weights
    step 2 moved and the trainer's step, per rank."""
    import token_objectives.training.megatron as megatron
    from token_objectives.training.config import load_config

    out, mode = Path(argv[0]), argv[1]
    original, seen = megatron.loss_func, {}

    class NanGradient(torch.autograd.Function):
        """Identity forward; a NaN gradient backward (the loss stays finite)."""

        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def loss_func(loss_mask, output_tensor, model=None, **options):
        if seen and mode == "grads":
            output_tensor = output_tensor * float("nan")
        if seen and mode == "gradient-only":
            output_tensor = NanGradient.apply(output_tensor)
        loss, tokens, report = original(loss_mask, output_tensor, model, **options)
        if seen and mode == "report":
            nan = torch.tensor([float("nan"), 0.0], device=report["ntl"].device)
            report["ntl"] = report["ntl"] + nan
        return loss, tokens, report

    class Probe(megatron.Trainer):
        def train_step(self):
            if self.step == 1:
                seen.update(trainer=self, scheduled=self.scheduler.num_steps,
                            before=[p.detach().clone() for p in self.model.parameters()])
            return super().train_step()

    megatron.loss_func, megatron.Trainer = loss_func, Probe
    error = None
    try:
        megatron.run(load_config(REPO / "configs" / "tiny.yaml", argv[2:]), printer=None)
    except FloatingPointError as raised:
        error = str(raised)
    except Exception as raised:  # noqa: BLE001 - what else stopped the run, for the test
        error = f"{type(raised).__name__}: {raised}"
    trainer = seen["trainer"]
    moved = sum(not torch.equal(a, b) for a, b in
                zip(seen["before"], trainer.model.parameters(), strict=True))
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "error": error, "moved": moved, "step": trainer.step,
        "scheduler_moved": trainer.scheduler.num_steps != seen["scheduled"]}))


def _probe(out: Path, nproc: int, mode: str, overrides: list[str]) -> None:
    """`nan-loss-probe` (this file as the script) on `nproc` ranks, forked by the server."""
    check(_server.run(Path(__file__), ["nan-loss-probe", str(out), mode, *overrides],
                      out.parent / f"{out.name}.logs" / "probe", nproc))


def test_a_nan_gradient_under_a_finite_loss_stops_with_the_step_and_the_fix(data, tmp_path):
    """megatron-core's own check said 'iteration -1 ... found NaN in local grad norm'."""
    overrides = [*TINY, f"data.tokenizer={data.tokenizer_path}",
                 f"data.train_prefix={data.train_prefix}",
                 f"data.frequencies={data.frequencies_path}", f"output.dir={tmp_path}",
                 "parallel.tensor=1", "train.steps=3"]
    _probe(tmp_path, 1, "gradient-only", overrides)
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["error"].startswith("step 2: a gradient is NaN or inf while the loss is finite "
                                   "(lm loss "), got
    assert "lower train.lr and train.resume_schedule override" in got["error"], got
    assert got["moved"] == 0 and got["step"] == 1 and not got["scheduler_moved"], got


@pytest.mark.parametrize(("mode", "component"), [("report", "ntl"), ("grads", "lm loss")])
def test_a_nan_loss_stops_before_the_update(data, tmp_path, mode, component):
    """Step 2 reports a NaN NTL with finite gradients, or a NaN loss with NaN gradients (TP = 2):
    every rank stops with the step and the component named, no weight and no LR-schedule step
    moved, and metrics.jsonl ends at step 1. Before, the first went on with the update applied;
    the second stopped in megatron-core's gradient check, without naming the loss."""
    overrides = [*TINY, f"data.tokenizer={data.tokenizer_path}",
                 f"data.train_prefix={data.train_prefix}",
                 f"data.frequencies={data.frequencies_path}", f"output.dir={tmp_path}",
                 "parallel.tensor=2", "train.steps=3"]
    _probe(tmp_path, 2, mode, overrides)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["error"] is not None and got["error"].startswith(
            f"step 2: the loss component '{component}' is nan ("), got
        assert "the update was not applied. Check the data" in got["error"], got
        assert got["moved"] == 0 and got["step"] == 1 and not got["scheduler_moved"], got
    assert [row["step"] for row in metrics(tmp_path)] == [1]


if __name__ == "__main__" and sys.argv[1:2] == ["nan-loss-probe"]:
    nan_loss_probe(sys.argv[2:])


def _cosine(step: int, max_lr: float, min_lr: float, steps: int) -> float:
    """The rate megatron-core's cosine schedule (no warm-up) gives the update of `step`
    (1-based): the schedule has advanced over the steps before it."""
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))


def test_a_resume_follows_the_config_or_refuses_naming_each_changed_key(data, tmp_path):
    """Megatron-LM's rule for the optimizer schedule (refuse a mismatch unless told to
    override it or to keep the checkpoint's), and the same for the objectives; a different
    model is reported as one, never as a corrupt checkpoint."""
    out = tmp_path / "run"
    lrs = lambda: {m["step"]: m["lr"] for m in metrics(out)}  # noqa: E731

    def run(*overrides: str, check: bool = True):
        return train(data, out, 1, "parallel.tensor=1", "train.min_lr=3e-4", *overrides,
                     check=check)

    run("train.steps=4")
    for step in range(1, 5):
        assert lrs()[step] == pytest.approx(_cosine(step, 1e-3, 3e-4, 4), rel=1e-6)

    refused = run("train.steps=6", check=False)
    assert refused.returncode != 0 and max(lrs()) == 4
    assert "train.steps: 4 in the checkpoint, 6 now" in refused.stderr
    assert "train.resume_schedule override" in refused.stderr
    assert "train.resume_schedule checkpoint" in refused.stderr

    # A lower lr (what the NaN stop suggests) and more steps: the new schedule from step 5 on.
    run("train.steps=8", "train.lr=5e-4", "train.resume_schedule=override")
    for step in (5, 6, 7, 8):
        assert lrs()[step] == pytest.approx(_cosine(step, 5e-4, 3e-4, 8), rel=1e-6)
    # Keeping the checkpoint's schedule: its decay ended at step 8, so min_lr from then on.
    run("train.steps=10", "train.lr=9e-4", "train.resume_schedule=checkpoint")
    assert lrs()[9] == lrs()[10] == pytest.approx(3e-4, rel=1e-6)

    # (The schedule kept is the checkpoint's: saying so again is what a user would do.)
    objectives = run("train.steps=10", "train.lr=9e-4", "train.resume_schedule=checkpoint",
                     "objectives.ntl_weight=0.5", check=False)
    assert objectives.returncode != 0
    assert "objectives.ntl_weight: 0.3 in the checkpoint, 0.5 now" in objectives.stderr
    assert "train.resume_objectives override" in objectives.stderr
    run("train.steps=11", "train.lr=9e-4", "train.resume_schedule=checkpoint",
        "objectives.ntl_weight=0.5", "train.resume_objectives=override")
    row = metrics(out)[-1]
    assert row["step"] == 11  # trained on, with the new weight: lm loss = ce + 0.5 ntl
    assert (row["lm loss"] - row["ce part"]) / row["ntl part"] == pytest.approx(0.5, rel=1e-4)

    other = run("train.steps=10", "model.hidden_size=128", check=False)
    assert other.returncode != 0
    assert "holds a different model" in other.stderr
    assert "model.hidden_size: 64 in the checkpoint, 128 now" in other.stderr
    assert "corrupt" not in other.stderr and "delete" not in other.stderr
