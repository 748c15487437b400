"""Megatron-LM's own training loop, `megatron.training.pretrain` (megatron-core 0.19), run for
real on the CPU over gloo at TP = 2 with the objectives hooked in as the README shows
(tests/megatron_lm/pretrain_gpt.py: the chained args provider, `hook.wrap_loss_func`,
`hook.attach_to_model_chunks` as a pre-wrap hook), next to our own loop
(launch/pretrain_megatron.py, configs/tiny.yaml + TINY_MEGATRON) on the same quickstart data.

Three runs, shared by the tests (module fixture), all with an 8-iteration schedule:
- ours: steps 1-7 (train.exit_interval=7), then a checkpoint;
- straight: Megatron-LM with TensorBoard and a torch_dist checkpoint every 3 iterations; the
  per-token losses of iteration 8 are made NaN (PRETRAIN_GPT_NAN_AT=8), so Megatron's rerun
  state machine stops it there, with a checkpoint of iteration 7;
- resumed: Megatron-LM from the straight run's iteration-3 checkpoint (--ckpt-step 3) to 7.

Both loops start from the same weights (the entry point redraws them with our loop's
`layout_independent_init` in a test-only pre-wrap hook) and use the same optimizer, schedule,
batches and data order, so Megatron's TensorBoard scalars equal our metrics step by step (the
losses bit for bit; TensorBoard stores float32, our "ntl" keeps its float64 ratio) and after 7
iterations every weight and Adam moment of the two checkpoints is the same. One difference
shows in Megatron-LM's log lines only: 0.19's `training_log` does not reset its accumulators
after the first iteration of a process, so the line of the second iteration prints the mean of
the first two (TensorBoard gets each one).

CUDA calls patched on the CPU (tests/megatron_lm/cpu_cuda.py, only where CUDA is unavailable):
- from token_objectives.integrations.megatron.cpu_patches.apply(): torch.cuda.current_device,
  torch.cuda.synchronize, torch.cuda.current_stream, CudaRNGStatesTracker.fork,
  tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state,
  optimizer.clip_grad_by_total_norm_fp32, torch.Tensor.cuda, DistributedOptimizer.__init__
  (Tensor.type names), torch.zeros / ones / empty / full / tensor / arange with device="cuda";
- for megatron.training: arguments.get_device_arch_version (0), training.initialize_megatron
  (with Megatron's own allow_no_cuda=True), training.set_jit_fusion_options (no CUDA kernels
  to warm up), torch.cuda.device_count (1), torch.cuda.set_device (no-op), torch.cuda.Stream
  and torch.cuda.stream (the CPU's one stream), torch.cuda.get_rng_state (the CPU generator's).
Everything else is avoided with Megatron-LM flags (MEGATRON_LM_FLAGS: --transformer-impl local,
--no-*-fusion, --use-cpu-initialization, --distributed-backend gloo, ...). Not CUDA: the entry
point lets megatron.training 0.19 import under Python 3.11 (typing.override) and skips the
`make` of the dataset helpers, which the megatron-core package ships built, without a Makefile.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import typing
from pathlib import Path

if not hasattr(typing, "override"):  # megatron.training 0.19 imports it (Python 3.12)
    import typing_extensions

    typing.override = typing_extensions.override

import megatron.training  # noqa: E402,F401  (megatron-core 0.19 only: no skip on 0.16)
import pytest  # noqa: E402
import torch  # noqa: E402
from doc_blocks import doc_block  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torchrun_helpers import REPO, TINY_MEGATRON, WORKER_ENV, torchrun_command  # noqa: E402
from torchrun_helpers import read_metrics as metrics  # noqa: E402

from token_objectives.objectives.components import COMPONENT_NAMES  # noqa: E402
from token_objectives.training.checkpointing import step_dir  # noqa: E402

ENTRY_POINT = REPO / "tests" / "megatron_lm" / "pretrain_gpt.py"
STEPS = 8  # the schedule; iteration 8 is the NaN one
LAST = STEPS - 1  # the last completed iteration
REPORT_NAMES = list(COMPONENT_NAMES)  # "lm loss" (Megatron-LM's own) and our components


def megatron_lm_flags(data, out: Path) -> list[str]:
    """docs/megatron-lm.md's full command line (configs/tiny.yaml with TINY_MEGATRON at TP = 2
    in Megatron-LM's flags), its DATA/ the test's quickstart data and OUT/ the run's folder."""
    text = doc_block("megatron-lm-command").text.replace("\\\n", " ")
    assert text.count("DATA/") == 4 and text.count("OUT/") == 2, text
    words = shlex.split(text.replace("DATA/", f"{data.tokenizer_path.parent}/").replace(
        "OUT/", f"{out}/"))
    launch = ["CUDA_DEVICE_MAX_CONNECTIONS=1", "torchrun", "--nproc-per-node", "2",
              "pretrain_gpt.py"]
    assert words[:len(launch)] == launch
    return [*words[len(launch):], "--num-workers", "0"]


def run_megatron_lm(data, out: Path, *flags: str, nan_at: int = 0):
    env = dict(WORKER_ENV, CUDA_DEVICE_MAX_CONNECTIONS="1", PRETRAIN_GPT_NAN_AT=str(nan_at))
    command = torchrun_command(ENTRY_POINT, *megatron_lm_flags(data, out), "--data-cache-path",
                               str(out / "data_cache"), *flags)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return done, done.stdout + done.stderr


def run_ours(data, out: Path) -> None:
    settings = [f"data.tokenizer={data.tokenizer_path}", f"data.train_prefix={data.train_prefix}",
                f"data.frequencies={data.frequencies_path}", f"output.dir={out}", *TINY_MEGATRON,
                "parallel.tensor=2", f"train.steps={STEPS}", f"train.exit_interval={LAST}"]
    command = torchrun_command(REPO / "launch" / "pretrain_megatron.py", "--config",
                               str(REPO / "configs" / "tiny.yaml"),
                               *(arg for setting in settings for arg in ("--set", setting)))
    done = subprocess.run(command, capture_output=True, text=True, env=WORKER_ENV, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def scalars(out: Path) -> dict[str, dict[int, float]]:
    """Megatron-LM's TensorBoard scalars: tag -> {iteration: value}."""
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)}
            for tag in events.Tags()["scalars"]}


def checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor (model and optimizer state) of a Megatron-LM torch_dist checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = directory.parent / f"{directory.name}.pt"
    dcp_to_torch_save(directory, target)
    state = torch.load(target, weights_only=False)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_lm")
    run_ours(data, root / "ours")
    # The docs' command saves to OUT/checkpoints every 3 iterations.
    straight, straight_log = run_megatron_lm(data, root / "straight", nan_at=STEPS)
    resumed, resumed_log = run_megatron_lm(
        data, root / "resumed", "--load", str(root / "straight" / "checkpoints"),
        "--ckpt-step", "3", "--exit-interval", str(LAST))
    assert resumed.returncode == 0, resumed_log[-8000:]
    return {"root": root, "ours": metrics(root / "ours"), "straight": straight,
            "straight log": straight_log, "straight tb": scalars(root / "straight"),
            "resumed log": resumed_log, "resumed tb": scalars(root / "resumed")}


def test_losses_equal_our_loop_step_by_step(runs):
    ours, megatron = runs["ours"], runs["straight tb"]
    assert [row["step"] for row in ours] == list(range(1, LAST + 1))
    for name in REPORT_NAMES:
        assert sorted(megatron[name]) == list(range(1, LAST + 1)), name
        for row in ours:
            assert megatron[name][row["step"]] == pytest.approx(row[name], rel=1e-5), (name, row)
    # The losses move: a real run, not copies of the initial loss.
    assert len({round(row["lm loss"], 4) for row in ours}) == LAST


def test_the_components_are_in_megatron_tensorboard(runs):
    megatron = runs["straight tb"]
    assert set(REPORT_NAMES) <= set(megatron)
    for step in range(1, LAST + 1):
        values = {name: megatron[name][step] for name in REPORT_NAMES}
        assert values["lm loss"] == pytest.approx(values["ce part"] + 0.3 * values["ntl part"],
                                                  rel=1e-5)
        assert 0 < values["number token share"] < 1 and values["ntl"] > 0, values
        # A count is the iteration's count (TensorBoard's float32 holds it whole).
        assert values["number tokens"] == int(values["number tokens"]) > 0, values
        assert values["number token share"] == pytest.approx(
            values["number tokens"] / values["counted tokens"], rel=1e-6)


def test_megatron_log_lines_average_the_first_two_iterations(runs):
    # The one difference from our metrics, and only in Megatron-LM's printed lines: the line of
    # iteration 2 is the mean of iterations 1 and 2 (no reset after a process's first one).
    printed = {int(step): float(loss) for step, loss in re.findall(
        r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+)", runs["straight log"])}
    ours = {row["step"]: row["lm loss"] for row in runs["ours"]}
    assert sorted(printed) == list(range(1, LAST + 1))
    assert printed[2] == pytest.approx((ours[1] + ours[2]) / 2, rel=1e-6)
    for step in (1, *range(3, LAST + 1)):
        assert printed[step] == pytest.approx(ours[step], rel=1e-6), step


def test_a_resume_continues_the_straight_run_exactly(runs):
    log, resumed, straight = runs["resumed log"], runs["resumed tb"], runs["straight tb"]
    assert re.search(r"successfully loaded checkpoint from .* at iteration 3", log), log[-3000:]
    for name in REPORT_NAMES:
        assert sorted(resumed[name]) == list(range(4, LAST + 1)), name
        for step in range(4, LAST + 1):
            assert resumed[name][step] == straight[name][step], (name, step)


def test_a_nan_loss_stops_megatron_before_the_optimizer_step(runs):
    done, log, root = runs["straight"], runs["straight log"], runs["root"]
    assert done.returncode != 0
    assert "Unexpected result nan" in log and "found NaN in local forward loss calculation" in log
    assert STEPS not in runs["straight tb"]["lm loss"]
    # The rerun state machine ran the iteration again, found the NaN again, saved a checkpoint
    # and exited with its code 16 (EXIT_CODE_RESUME_TO_DISAMBIGUATE).
    assert "exitcode  : 16" in log, log[-3000:]
    saved = root / "straight" / "checkpoints"
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == str(LAST)
    # It holds the weights and Adam moments of iteration 7, the same as our loop's after step 7
    # to the bit: the NaN iteration's update was never applied.
    megatron = checkpoint(saved / f"iter_{LAST:07d}")
    ours = checkpoint(step_dir(root / "ours" / "checkpoints", LAST))
    assert megatron.keys() == ours.keys() and len(ours) > 20
    for key, value in ours.items():
        assert torch.equal(megatron[key], value), key
