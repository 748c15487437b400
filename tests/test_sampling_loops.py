"""Batch-scheduled sampling inside the training loops, launched for real with torchrun over gloo.

Megatron: p = 0 trains bit for bit as without the section (and so does the warm-up), TP = 2 and
PP = 2 draw the same inputs as TP = 1, the replaced fraction and p reach metrics.jsonl and
TensorBoard, and a probe checks every input of a p = 1 batch against the model's own greedy
predictions (full logits gathered independently). DeepSpeed: p = 0 is bit for bit, and AutoTP=2
with sampling runs and logs.

Run as a script (`torchrun ... tests/test_sampling_loops.py megatron-probe|deepspeed-probe OUT
...`), this file is the probe the tests launch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from kill_launcher import MEGATRON_PRELOAD, Launcher, next_log
from torchrun_helpers import REPO, WORKER_ENV, check, run_checked, torchrun_command
from torchrun_helpers import TINY_MEGATRON as TINY
from torchrun_helpers import read_metrics as metrics

# Every key given: the tests do not depend on the example values in configs/tiny.yaml.
SAMPLING = ["scheduled_sampling.enabled=true", "scheduled_sampling.schedule=constant",
            "scheduled_sampling.c=null", "scheduled_sampling.k=null",
            "scheduled_sampling.warmup_steps=0", "scheduled_sampling.mode=argmax"]
P1 = [*SAMPLING, "scheduled_sampling.max_p=1.0"]
DS_SEQ_LENGTH = 32
LOG_NAMES = ("sampling/p", "sampling/replaced_of_eligible", "sampling/replaced_of_all",
             "sampling/changed_of_all")


def _megatron_overrides(data, out: Path, overrides) -> list[str]:
    args = []
    for item in (f"data.tokenizer={data.tokenizer_path}", f"data.train_prefix={data.train_prefix}",
                 f"data.frequencies={data.frequencies_path}", f"output.dir={out}", *TINY,
                 *overrides):
        args += ["--set", item]
    return args


_server: Launcher | None = None


@pytest.fixture(scope="module", autouse=True)
def forked_starts():
    """The Megatron loop's starts fork from one server that imported megatron-core once
    (tests/kill_launcher.py) instead of one torchrun each; the probes keep torchrun."""
    global _server
    _server = Launcher(MEGATRON_PRELOAD)
    yield
    _server.close()
    _server = None


def train_megatron(data, out: Path, nproc: int, *overrides: str) -> None:
    check(_server.run(REPO / "launch" / "pretrain_megatron.py",
                      ["--config", str(REPO / "configs" / "tiny.yaml"),
                       *_megatron_overrides(data, out, overrides)], next_log(out), nproc))


def megatron_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from token_objectives.training.checkpointing import step_dir

    target = out / f"weights_{step}.pt"
    dcp_to_torch_save(step_dir(out / "checkpoints", step), target)
    state = torch.load(target, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)
            and k.startswith(("decoder.", "embedding.", "output_layer."))
            and "_extra_state" not in k}


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


# ---------------------------------------------------------------------------------- Megatron


@pytest.fixture(scope="module")
def megatron_runs(data, tmp_path_factory):
    """3 steps at TP=2: plain; p = 0; p = 1 after one warm-up step (TensorBoard on)."""
    root = tmp_path_factory.mktemp("megatron")
    runs = {"plain": [], "p0": [*SAMPLING, "scheduled_sampling.max_p=0"],
            "p1": [*P1, "scheduled_sampling.warmup_steps=1", "output.tensorboard=true"]}
    for name, overrides in runs.items():
        train_megatron(data, root / name, 2, "parallel.tensor=2", "train.steps=3", *overrides)
    return root


def test_megatron_p0_is_plain_training_bit_for_bit(megatron_runs):
    plain, p0 = metrics(megatron_runs / "plain"), metrics(megatron_runs / "p0")
    assert [m["step"] for m in p0] == [1, 2, 3]
    for a, b in zip(plain, p0, strict=True):
        for name in ("lm loss", "ce", "ntl", "ce part", "ntl part", "grad_norm"):
            assert a[name] == b[name], (name, a, b)
        assert b["sampling/p"] == 0.0 and b["sampling/replaced_of_all"] == 0.0
        assert not any(key.startswith("sampling/") for key in a)
    got, expected = megatron_weights(megatron_runs / "p0", 3), megatron_weights(
        megatron_runs / "plain", 3)
    assert got.keys() == expected.keys() and len(got) > 5
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_megatron_warmup_is_plain_then_p1_replaces(megatron_runs):
    plain, p1 = metrics(megatron_runs / "plain"), metrics(megatron_runs / "p1")
    assert p1[0]["lm loss"] == plain[0]["lm loss"] and p1[0]["sampling/p"] == 0.0
    for row in p1[1:]:
        assert row["sampling/p"] == 1.0
        # Every eligible input is replaced unless the model predicted EOD there.
        assert 0.95 <= row["sampling/replaced_of_eligible"] <= 1.0
        assert 0.5 < row["sampling/replaced_of_all"] <= row["sampling/replaced_of_eligible"]
        assert 0 < row["sampling/changed_of_all"] <= row["sampling/replaced_of_all"]
    # Same weights after step 1, different inputs from step 2 on: a different loss.
    assert p1[1]["lm loss"] != plain[1]["lm loss"]
    scalars = tensorboard_scalars(megatron_runs / "p1" / "tensorboard")
    for name in LOG_NAMES:
        assert [step for step, _ in scalars[name]] == [1, 2, 3], name
    assert [value for _, value in scalars["sampling/p"]] == [0.0, 1.0, 1.0]
    assert scalars["sampling/replaced_of_all"][2][1] == pytest.approx(
        p1[2]["sampling/replaced_of_all"])


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_megatron_layouts_draw_the_same_inputs(data, megatron_runs, tmp_path, layout):
    """TP=1 with the fused LM head (the prediction pass still gets logits) and PP=2 (ids
    broadcast from the last stage) against the TP=2 run."""
    parallel = {"tp1": ("parallel.tensor=1", "model.fused_lm_head=true"),
                "pp2": ("parallel.tensor=1", "parallel.pipeline=2")}
    nproc = 1 if layout == "tp1" else 2
    train_megatron(data, tmp_path, nproc, *parallel[layout], "train.steps=3", *P1,
                   "scheduled_sampling.warmup_steps=1")
    reference = metrics(megatron_runs / "p1")
    for a, b in zip(metrics(tmp_path), reference, strict=True):
        for name in LOG_NAMES:
            assert a[name] == b[name], (layout, name, a, b)
        assert a["lm loss"] == pytest.approx(b["lm loss"], rel=2e-5), (layout, a, b)


SAMPLE_MODE = [*P1, "scheduled_sampling.mode=sample", "scheduled_sampling.temperature=0.7",
               "scheduled_sampling.schedule=linear", "scheduled_sampling.c=0.5"]


@pytest.fixture(scope="module")
def sample_mode_run(data, tmp_path_factory):
    """3 steps at TP=2, temperature sampling, p = 0, 0.5, 1."""
    out = tmp_path_factory.mktemp("sample_mode")
    train_megatron(data, out, 2, "parallel.tensor=2", "train.steps=3", *SAMPLE_MODE)
    return out


def test_megatron_sample_mode_runs_under_tp2(sample_mode_run):
    rows = metrics(sample_mode_run)
    assert [r["sampling/p"] for r in rows] == [0.0, 0.5, 1.0]
    assert 0.3 < rows[1]["sampling/replaced_of_eligible"] < 0.7
    assert rows[2]["sampling/replaced_of_eligible"] > 0.95


def test_megatron_resume_draws_what_the_straight_run_drew(data, sample_mode_run, tmp_path):
    for _ in range(2):  # steps 1-2, save and exit; then resume for step 3
        train_megatron(data, tmp_path, 2, "parallel.tensor=2", "train.steps=3",
                       "train.exit_interval=2", *SAMPLE_MODE)
    sliced, straight = metrics(tmp_path), metrics(sample_mode_run)
    assert [m["step"] for m in sliced] == [1, 2, 3]
    for a, b in zip(sliced, straight, strict=True):
        for name in ("lm loss", *LOG_NAMES):
            assert a[name] == b[name], (name, a, b)


def megatron_probe(out: Path, overrides: list[str]) -> None:
    """p = 1, step 0: every input against the model's greedy prediction from the full logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from token_objectives.training.config import load_config
    from token_objectives.training.gpt_data import micro_batches
    from token_objectives.training.megatron import Trainer

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    trainer = Trainer(cfg)
    eod, real = trainer.tokenizer.eod, trainer.tokenizer.vocab_size
    batches = list(micro_batches(trainer.dataset, 0, cfg.parallel.micro_batch_size,
                                 trainer.dp_rank, trainer.dp_size, trainer.num_micro))
    for batch in batches:
        batch["loss_mask"][0, 10:20] = 0  # as a prompt would be
    mixed, values = trainer.scheduled_inputs(batches)
    group = parallel_state.get_tensor_model_parallel_group()
    checked = eligible = changed = 0
    trainer.model.eval()
    for batch, got in zip(batches, mixed, strict=True):
        with torch.no_grad():
            local = trainer.model(batch["tokens"], batch["position_ids"], None)  # [b, s, V/tp]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        predicted = torch.cat(parts, dim=-1)[..., :real].argmax(-1)
        tokens, mask = batch["tokens"], batch["loss_mask"]
        for row in range(tokens.shape[0]):
            for i in range(tokens.shape[1]):
                ok = (i > 0 and tokens[row, i] != eod and tokens[row, i - 1] != eod
                      and mask[row, i - 1] > 0)
                guess = predicted[row, i - 1] if i > 0 else None
                want = guess if ok and guess != eod else tokens[row, i]
                assert got["tokens"][row, i] == want, (row, i, got["tokens"][row], predicted[row])
                checked += 1
                eligible += int(ok)
                changed += int(want != tokens[row, i])
        assert torch.equal(got["labels"], batch["labels"])
    torch.save({"checked": checked, "eligible": eligible, "changed": changed, "values": values},
               out / f"megatron_probe_rank{dist.get_rank()}.pt")


def test_megatron_p1_inputs_are_the_model_predictions(data, tmp_path):
    overrides = _megatron_overrides(data, tmp_path, ["parallel.tensor=2", *P1])
    run_checked(torchrun_command(Path(__file__), "megatron-probe", str(tmp_path),
                                 *overrides[1::2]))
    for rank in (0, 1):
        result = torch.load(tmp_path / f"megatron_probe_rank{rank}.pt")
        assert result["checked"] == 8 * 64  # every input of the global batch (DP = 1)
        assert result["eligible"] > 0.8 * result["checked"] and result["changed"] > 0
        assert result["values"]["sampling/p"] == 1.0


# --------------------------------------------------------------------------------- DeepSpeed


DS_RUN_CONFIG = REPO / "configs" / "deepspeed" / "tiny.yaml"


def _ds_config(data, directory: Path, name: str, **overrides) -> Path:
    config = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
    config["bf16"] = {"enabled": False}
    config["tensorboard"]["enabled"] = False
    config.update(overrides)
    path = directory / f"{name}-{len(list(directory.glob('*.json')))}.json"
    path.write_text(json.dumps(config))
    return path


def _ds_settings(data) -> list[str]:
    """The DeepSpeed loop's tiny run config on the test data, short sequences."""
    return [f"data.tokenizer={data.tokenizer_path}", f"data.train_prefix={data.train_prefix}",
            f"data.frequencies={data.frequencies_path}", f"model.seq_length={DS_SEQ_LENGTH}",
            "train.steps=2"]


def _sampling(**values) -> list[str]:
    return [f"scheduled_sampling.{key}={json.dumps(value)}" for key, value in values.items()]


def deepspeed_probe(out: Path, runs: list[str]) -> None:
    """Two steps per ds_config[@SECTION.KEY=VALUE...] in this process (the run config is
    DS_RUN_CONFIG with PROBE_RUN's settings); per-step rows and the final weights saved."""
    import torch.distributed as dist

    from token_objectives.training.config import load_config
    from token_objectives.training.deepspeed import Trainer

    for index, run in enumerate(runs):
        config, *overrides = run.split("@")
        cfg = load_config(DS_RUN_CONFIG, [*json.loads(os.environ["PROBE_RUN"]),
                                          f"output.dir={out / f'run{index}'}", *overrides])
        trainer = Trainer(cfg, json.loads(Path(config).read_text()))
        rows = [trainer.train_step().row for _ in range(2)]  # plain dicts for torch.load
        weights = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}
        torch.save({"rows": rows, "weights": weights},
                   out / f"run{index}_rank{dist.get_rank()}.pt")
        dist.barrier()
        trainer.engine.destroy()


def test_deepspeed_p0_is_plain_training_bit_for_bit(data, tmp_path):
    config = _ds_config(data, tmp_path, "zero2")
    runs = [str(config), "@".join([str(config), *_sampling(enabled=True, max_p=0.0)])]
    command = torchrun_command(Path(__file__), "deepspeed-probe", str(tmp_path), *runs)
    run_checked(command, env=dict(WORKER_ENV, PROBE_RUN=json.dumps(_ds_settings(data))))
    for rank in (0, 1):
        plain = torch.load(tmp_path / f"run0_rank{rank}.pt")
        p0 = torch.load(tmp_path / f"run1_rank{rank}.pt")
        for a, b in zip(plain["rows"], p0["rows"], strict=True):
            for name in ("lm loss", "ce", "ntl", "grad_norm"):
                assert a[name] == b[name], (name, a, b)
            assert b["sampling/p"] == 0.0
        for name, weight in plain["weights"].items():
            assert torch.equal(p0["weights"][name], weight), name


def test_deepspeed_autotp_sampling_runs_and_logs(data, tmp_path):
    config = _ds_config(data, tmp_path, "autotp2", gradient_accumulation_steps=4,
                        tensorboard={"enabled": True, "output_path": "", "job_name": "ss"})
    settings = [*_ds_settings(data), f"output.dir={tmp_path / 'out'}",
                *_sampling(enabled=True, max_p=1.0, mode="sample", temperature=0.8)]
    run_checked(torchrun_command(
        REPO / "launch" / "pretrain_deepspeed.py", "--config", str(DS_RUN_CONFIG),
        "--deepspeed_config", str(config),
        *(item for value in settings for item in ("--set", value))))
    rows = metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sampling/p"] == 1.0
        assert 0.95 <= row["sampling/replaced_of_eligible"] <= 1.0
        assert 0.5 < row["sampling/replaced_of_all"] and row["sampling/changed_of_all"] > 0
    scalars = tensorboard_scalars(tmp_path / "out" / "tensorboard" / "ss")
    for name in LOG_NAMES:
        assert [step for step, _ in scalars[f"Train/{name}"]] == [1, 2], name


if __name__ == "__main__" and sys.argv[1:2] == ["megatron-probe"]:
    megatron_probe(Path(sys.argv[2]), sys.argv[3:])
elif __name__ == "__main__" and sys.argv[1:2] == ["deepspeed-probe"]:
    deepspeed_probe(Path(sys.argv[2]), sys.argv[3:])
