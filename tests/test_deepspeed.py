"""The DeepSpeed path, launched for real with torchrun over gloo on the CPU.

One step on a fixed global batch of 8 samples gives the same loss and gradients in a plain torch
model (no DeepSpeed, one process, full logits), under ZeRO-1/2/3 with 2 DP ranks and under AutoTP=2
with a vocab-parallel lm_head. Under AutoTP the objectives see logits [b, s, V/2] and make exactly
2 all-reduces and no all-gather. A run stopped by SIGUSR1 saves, exits cleanly and resumes to the
same losses as a straight run. Bad "token_objectives" sections are errors that name the key. The
loop reads the YAML run config (configs/deepspeed/tiny.yaml here) and the ds_config; the same
run config drives the Megatron loop.

Run as a script (`torchrun ... tests/test_deepspeed.py probe OUT CONFIG...`), this file is the
probe the tests launch: one step per ds_config, gradients saved before `engine.step`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from kill_launcher import DEEPSPEED_PRELOAD, Launcher, next_log
from torchrun_helpers import WORKER_ENV, check, read_metrics, small_tmpfs, torchrun_command

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "deepspeed"
TINY = CONFIGS / "tiny_llama.json"
RUN_CONFIG = CONFIGS / "tiny.yaml"
SEQ_LENGTH = 32
GLOBAL_BATCH = 8  # samples per step in every layout: mbs 2 x gas x dp
SEED = 1234
# Every torch.distributed collective has one of these in its name (all_gather_into_tensor, ...).
COLLECTIVE_WORDS = ("gather", "reduce", "scatter", "broadcast", "all_to_all")


# ----------------------------------------------------------------------------- the probe


class CollectiveCounter:
    """Counts torch.distributed collectives while active; the real functions still run."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._originals = {}

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist

        for name in dir(dist):
            original = getattr(dist, name)
            if (isinstance(original, type) or not callable(original)
                    or not any(word in name for word in COLLECTIVE_WORDS)):
                continue
            self._originals[name] = original

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, original in self._originals.items():
            setattr(dist, name, original)


def _reference(trainer, path: Path) -> None:
    """No DeepSpeed: the plain model on the whole global batch, full logits, one process."""
    from token_objectives.objectives.objective import objective_loss
    from token_objectives.training.deepspeed import build_model
    from token_objectives.training.gpt_data import micro_batches

    model = build_model(trainer.engine.module.config, SEED)
    (batch,) = micro_batches(trainer.dataset, 0, GLOBAL_BATCH, 0, 1, 1)
    objectives = trainer.objectives
    out = objective_loss(model(input_ids=batch["tokens"]).logits, batch["labels"],
                         objectives.config, objectives.numbers, objectives.pdl_weights, None,
                         loss_mask=batch["loss_mask"])
    loss = out.loss.sum() / out.counted.sum()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    torch.save({"loss": loss.item(), "grads": grads}, path)


def run_settings(data) -> list[str]:
    """`--set` values: the shipped tiny run config on the test data."""
    return [f"data.tokenizer={data.tokenizer_path}", f"data.train_prefix={data.train_prefix}",
            f"data.frequencies={data.frequencies_path}", f"model.seq_length={SEQ_LENGTH}",
            f"train.seed={SEED}"]


def probe_env(data) -> dict:
    return dict(WORKER_ENV, PROBE_RUN=json.dumps(run_settings(data)))


def probe_config(out: Path, *overrides: str):
    """In a probe: the tiny run config with the test's settings (PROBE_RUN) and `overrides`."""
    from token_objectives.training.config import load_config

    return load_config(RUN_CONFIG, [*json.loads(os.environ["PROBE_RUN"]), f"output.dir={out}",
                                    *overrides])


def _one_step(config_path: Path, out: Path, name: str, reference: str | None,
              overrides: list[str]) -> None:
    import deepspeed
    import torch.distributed as dist

    from token_objectives.training import deepspeed as deepspeed_training
    from token_objectives.training.deepspeed import Trainer

    ds_config = json.loads(config_path.read_text())
    built = {}
    original_build = deepspeed_training.build_model

    def recording_build(*args, **kwargs):  # what each rank holds when the model is built
        model = original_build(*args, **kwargs)
        built["largest_local_parameter"] = max(p.numel() for p in model.parameters())
        built["partitioned"] = all(hasattr(p, "ds_id") for p in model.parameters())
        return model

    deepspeed_training.build_model = recording_build
    trainer = Trainer(probe_config(out / name, "train.steps=1", *overrides), ds_config)
    assert trainer.global_batch == GLOBAL_BATCH, trainer.global_batch
    if reference is not None and dist.get_rank() == 0:
        _reference(trainer, out / reference)
    batches = trainer.step_batches(0)
    deepspeed_training.build_model = original_build
    extra = {"built": built}
    if trainer.engine.autotp_size() > 1:
        # The objectives on the first micro-batch's sharded logits, collectives counted; the
        # gradient w.r.t. the logits must need no collective either.
        batch = batches[0]
        logits = trainer.engine(input_ids=batch["tokens"]).logits
        with CollectiveCounter() as forward:
            loss = trainer.objectives(logits, batch["labels"], batch["loss_mask"]).loss.sum()
        with CollectiveCounter() as backward:
            torch.autograd.grad(loss, logits)
        extra |= {"logits_shape": list(logits.shape), "vocab_size": trainer.vocab_size,
                 "forward_collectives": forward.counts, "backward_collectives": backward.counts}
    output = trainer.forward_backward(batches)
    totals = output.totals().to(torch.float64)
    dist.all_reduce(totals, group=deepspeed.utils.groups._get_data_parallel_group())
    # Every rank takes part: the full gradient is assembled with collectives.
    grads = {n: deepspeed.utils.safe_get_full_grad(p).detach().clone()
             for n, p in trainer.engine.module.named_parameters()}
    torch.save({"loss": (totals[0] / totals[1]).item(), "grads": grads, **extra},
               out / f"{name}_rank{dist.get_rank()}.pt")
    dist.barrier()
    trainer.engine.destroy()


def nonfinite_probe(argv: list[str]) -> None:
    """`nonfinite-probe OUT CONFIG...`: per ds_config, one training step with an inf added to
    one gradient on the last rank only (a tensor hook, before DeepSpeed reduces it); writes
    what the step raised and whether any weight moved."""
    import deepspeed
    import torch.distributed as dist

    from token_objectives.training.deepspeed import Trainer

    out = Path(argv[0])
    for config in argv[1:]:
        name = Path(config).stem
        trainer = Trainer(probe_config(out / name, "train.steps=1"),
                          json.loads(Path(config).read_text()))
        parameters = list(trainer.engine.module.parameters())
        if dist.get_rank() == dist.get_world_size() - 1:
            parameters[0].register_hook(lambda grad: grad + float("inf"))
        before = [deepspeed.utils.safe_get_full_fp32_param(p).clone() for p in parameters]
        error = None
        try:
            trainer.train_step()
        except FloatingPointError as raised:
            error = str(raised)
        after = [deepspeed.utils.safe_get_full_fp32_param(p) for p in parameters]
        moved = sum(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        (out / f"{name}_rank{dist.get_rank()}.json").write_text(json.dumps(
            {"error": error, "moved": moved, "step": trainer.step}))
        dist.barrier()
        trainer.engine.destroy()


def nan_loss_probe(argv: list[str]) -> None:
    """`nan-loss-probe OUT MODE CONFIG`: training.deepspeed.run for 3 steps whose step 2, on the
    last rank only (batch_objectives wrapped in this process only), has with MODE "report" a
    NaN cross-entropy in the logged per-token values (the loss it backward()s, and so the
    gradients, stay finite), with MODE "grads" a NaN per-token loss (so NaN gradients too).
    Writes what the run raised, how many weights step 2 moved and the trainer's step, per
    rank."""
    import dataclasses

    import deepspeed
    import torch.distributed as dist

    import token_objectives.training.deepspeed as ds

    out, mode, config = Path(argv[0]), argv[1], Path(argv[2])
    seen = {}

    class Probe(ds.Trainer):
        def batch_objectives(self, batch):
            output = super().batch_objectives(batch)
            if self.step == 1 and dist.get_rank() == dist.get_world_size() - 1:
                field = "ce" if mode == "report" else "loss"
                output = dataclasses.replace(
                    output, **{field: getattr(output, field) * float("nan")})
            return output

        def train_step(self):
            if self.step == 1:
                seen.update(trainer=self, before=[
                    deepspeed.utils.safe_get_full_fp32_param(p).clone()
                    for p in self.engine.module.parameters()])
            return super().train_step()

    ds.Trainer = Probe
    error = None
    try:
        ds.run(probe_config(out, "train.steps=3"), json.loads(config.read_text()), printer=None)
    except FloatingPointError as raised:
        error = str(raised)
    trainer = seen["trainer"]
    after = [deepspeed.utils.safe_get_full_fp32_param(p)
             for p in trainer.engine.module.parameters()]
    moved = sum(not torch.equal(a, b) for a, b in zip(seen["before"], after, strict=True))
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"error": error, "moved": moved, "step": trainer.step}))


def fp16_skip_probe(argv: list[str]) -> None:
    """`fp16-skip-probe OUT CONFIG MAX_SKIPPED`: training.deepspeed.run for 10 steps in fp16.
    DeepSpeed's CPU accelerator reports fp16 as unsupported and the engine refuses it; its fp16
    optimizer and loss scaler run on the CPU all the same, so this process says it is supported
    (the one change). Writes what the run raised, the steps taken, whether each was applied and
    the loss scale after it, per rank."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    import token_objectives.training.deepspeed as ds

    get_accelerator().is_fp16_supported = lambda: True
    out, config, limit = Path(argv[0]), Path(argv[1]), int(argv[2])
    seen = {"applied": [], "scale": []}

    class Probe(ds.Trainer):
        def train_step(self):
            seen["trainer"] = self
            try:
                return super().train_step()
            finally:
                seen["applied"].append(self.engine.was_step_applied())
                seen["scale"].append(float(self.engine.optimizer.loss_scale))

    ds.Trainer = Probe
    error = None
    try:
        ds.run(probe_config(out, "train.steps=10", f"train.max_skipped_steps={limit}"),
               json.loads(config.read_text()), printer=None)
    except FloatingPointError as raised:
        error = str(raised)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"error": error, "step": seen["trainer"].step, "applied": seen["applied"],
         "scale": seen["scale"]}))


def probe(argv: list[str]) -> None:
    """`probe OUT NAME=CONFIG[@SECTION.KEY=VALUE]...`: one step per ds_config, with run-config
    overrides (the model is TINY unless model.hf_config is given); the first run of each model
    also writes its reference, reference.pt for TINY, reference_<model stem>.pt for another."""
    out = Path(argv[0])
    seen = set()
    for item in argv[1:]:
        name, _, config = item.partition("=")
        config, *overrides = config.split("@")
        model = next((Path(o.partition("=")[2]) for o in overrides
                      if o.startswith("model.hf_config=")), TINY)
        reference = None
        if model not in seen:
            seen.add(model)
            reference = "reference.pt" if model == TINY else f"reference_{model.stem}.pt"
        _one_step(Path(config), out, name, reference, overrides)


# ----------------------------------------------------------------------------------- the tests


def ds_config(data, directory: Path, name: str, **overrides) -> Path:
    """configs/deepspeed/<name>.json in fp32, with overrides (the data is the run config's)."""
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    config["bf16"] = {"enabled": False}
    config["tensorboard"]["enabled"] = False
    config.update(overrides)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _probe(data, out: Path, runs: dict[str, Path]) -> None:
    command = torchrun_command(Path(__file__), "probe", str(out),
                        *(f"{name}={path}" for name, path in runs.items()))
    check(subprocess.run(command, capture_output=True, text=True, env=probe_env(data),
                         timeout=600))


@pytest.fixture(scope="module")
def one_step(data, tmp_path_factory):
    """The probe's files: reference.pt and <layout>_rank<r>.pt."""
    out = tmp_path_factory.mktemp("one_step")
    runs = {f"zero{stage}": ds_config(data, out, f"zero{stage}", gradient_accumulation_steps=2)
            for stage in (1, 2, 3)}
    runs["zero2_fused"] = fused_head(runs["zero2"])
    _probe(data, out, runs)
    autotp = ds_config(data, out, "autotp2", gradient_accumulation_steps=4)
    odd = f"{autotp}@model.hf_config={_odd_vocab_model(out)}{WITHOUT_PDL}"
    _probe(data, out, {"autotp2": autotp, "autotp2_fused": fused_head(autotp),
                       "autotp2_odd": odd, "autotp2_odd_fused": fused_head(odd)})
    return out


# The frequency table counts the tokenizer's 512 ids, not a 515-id model's.
WITHOUT_PDL = "@objectives.pdl_alpha=0@data.frequencies=null"


# The tokenizer's 512 ids padded to 515: AutoTP=2 shards the lm_head into 258 and 257 rows.
ODD_VOCAB = 515


def _odd_vocab_model(directory: Path) -> Path:
    values = json.loads(TINY.read_text())
    values["vocab_size"] = ODD_VOCAB
    path = directory / "tiny_llama_odd_vocab.json"
    path.write_text(json.dumps(values))
    return path


def fused_head(run: Path | str) -> str:
    """A probe run (ds_config[@override...]) with model.fused_lm_head: true."""
    return f"{run}@model.fused_lm_head=true"


def _full_gradient(shards: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """A TP-sharded gradient put back together (shards are contiguous slices, in rank order)."""
    if shards[0].shape == shape:
        torch.testing.assert_close(shards[1], shards[0], rtol=0, atol=0)  # replicated
        return shards[0]
    (dim,) = [d for d in range(len(shape)) if shards[0].shape[d] != shape[d]]
    return torch.cat(shards, dim=dim)


@pytest.mark.parametrize("layout", ["zero1", "zero2", "zero3", "autotp2", "zero2_fused",
                                    "autotp2_fused", "autotp2_odd", "autotp2_odd_fused"])
def test_one_step_matches_plain_torch(one_step, layout):
    odd = "odd" in layout  # uneven vocab shards: 258 + 257 columns of the 515
    reference = torch.load(one_step / ("reference_tiny_llama_odd_vocab.pt" if odd
                                       else "reference.pt"))
    ranks = [torch.load(one_step / f"{layout}_rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert ranks[0]["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    expected = reference["grads"]
    assert set(ranks[0]["grads"]) == set(expected), sorted(ranks[0]["grads"])
    scale = max(g.abs().max().item() for g in expected.values())
    for name, want in expected.items():
        got = _full_gradient([r["grads"][name] for r in ranks], want.shape)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale, msg=name)


def test_zero3_builds_the_model_partitioned(one_step):
    # zero.Init: each parameter is split over the ranks as its module is built, so no rank
    # ever holds the whole model (the weights still equal plain torch's: the test above).
    for rank in (0, 1):
        assert torch.load(one_step / f"zero3_rank{rank}.pt")["built"] == {
            "largest_local_parameter": 0, "partitioned": True}
        zero1 = torch.load(one_step / f"zero1_rank{rank}.pt")["built"]
        assert zero1["largest_local_parameter"] > 0 and not zero1["partitioned"]


def test_autotp_logits_stay_sharded_and_two_all_reduces(one_step):
    for rank in (0, 1):
        probe_out = torch.load(one_step / f"autotp2_rank{rank}.pt")
        assert probe_out["logits_shape"][-1] == probe_out["vocab_size"] // 2
        assert probe_out["forward_collectives"] == {"all_reduce": 2}
        assert probe_out["backward_collectives"] == {}
    widths = [torch.load(one_step / f"autotp2_odd_rank{rank}.pt")["logits_shape"][-1]
              for rank in (0, 1)]
    assert widths == [258, 257]


# ------------------------------------------------------------------------- training and resume


DEEPSPEED = REPO / "launch" / "pretrain_deepspeed.py"
_server: Launcher | None = None


@pytest.fixture(scope="module", autouse=True)
def forked_starts():
    """The training starts fork from one server (tests/kill_launcher.py) instead of one
    torchrun each; torchrun itself runs in the SIGUSR1 test and the probes."""
    global _server
    _server = Launcher(DEEPSPEED_PRELOAD)
    yield
    _server.close()
    _server = None


def _arguments(data, config: Path, out: Path, *args: str) -> list[str]:
    """The launcher's arguments: the tiny run config and `config`, then `args` (--set,
    --ds-set)."""
    values = [*run_settings(data), f"output.dir={out}"]
    return ["--config", str(RUN_CONFIG), "--deepspeed_config", str(config),
            *(item for value in values for item in ("--set", value)), *args]


def _train(data, config: Path, out: Path, *args: str) -> list[str]:
    """The torchrun command of a start (2 workers)."""
    return torchrun_command(DEEPSPEED, *_arguments(data, config, out, *args))


def _start(data, config: Path, out: Path, *args: str,
           nproc: int = 2) -> subprocess.CompletedProcess:
    """One start on `nproc` workers, forked by the server; its output in a folder beside
    `out`."""
    return _server.run(DEEPSPEED, _arguments(data, config, out, *args), next_log(out), nproc)


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def test_sigusr1_saves_exits_and_resume_equals_a_straight_run(data, tmp_path):
    """SLURM's warning signal reaches the workers mid-run: they save the step they finished and
    exit 0; the next launch resumes from `latest` and matches an uninterrupted run. A torn
    last metrics line (a kill mid-write) does not block the resume: it is dropped."""
    import psutil

    config = ds_config(data, tmp_path, "zero2")
    sliced, straight = tmp_path / "sliced", tmp_path / "straight"
    launcher = subprocess.Popen(_train(data, config, sliced, "--set", "train.steps=500"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=WORKER_ENV)
    try:
        log = sliced / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and launcher.poll() is None and (
                not log.exists() or len(read_metrics(sliced)) < 2):
            time.sleep(0.1)
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        for worker in psutil.Process(launcher.pid).children(recursive=True):
            worker.send_signal(signal.SIGUSR1)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, err[-3000:]
    stopped = len(read_metrics(sliced))
    assert 2 <= stopped < 500
    assert _latest(sliced) == f"global_step{stopped}"
    with open(sliced / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(f'{{"step": {stopped + 1}, "lm lo')  # a line torn by a kill

    total = stopped + 2
    check(_start(data, config, straight, "--set", f"train.steps={total}",
                 "--set", "train.save_interval=2"))
    check(_start(data, config, sliced, "--set", f"train.steps={total}"))
    a, b = read_metrics(straight), read_metrics(sliced)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, total + 1))
    for x, y in zip(a, b, strict=True):
        for key in ("lm loss", "ce", "ntl"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (key, x, y)
    assert _latest(sliced) == _latest(straight) == f"global_step{total}"
    saved = sorted(p.name for p in (straight / "checkpoints").glob("global_step*"))
    assert saved == sorted(f"global_step{s}" for s in {*range(2, total + 1, 2), total})


def test_a_full_disk_during_a_save_keeps_the_previous_tag(data, tmp_path):
    """ZeRO-2 over 2 workers, the checkpoint directory a 2.5 MB tmpfs: the first tag (~1.7 MB,
    each rank writing its optimizer shard) fits, the second does not. The run exits non-zero
    with ENOSPC, the tag's path, the free space and the tag kept; `latest` still names the
    first tag, which matches its manifest, and the second is removed."""
    from token_objectives.training import checkpointing

    config = ds_config(data, tmp_path, "zero2")
    root = tmp_path / "run" / "checkpoints"
    with small_tmpfs(root, "2500k"):
        done = _start(data, config, tmp_path / "run", "--set", "train.steps=2",
                      "--set", "train.save_interval=1")
        assert done.returncode != 0
        message = re.search(r"checkpoint save to (\S+) failed: no space left on device "
                            r"\((\d+) bytes free on (\S+)\); .*the previous checkpoint (\S+) is "
                            r"kept", done.stderr)
        assert message, done.stderr[-3000:]
        assert message.group(1) == str(root / "global_step2")
        assert message.group(3) == str(root) and message.group(4) == str(root / "global_step1")
        assert sorted(p.name for p in root.glob("global_step*")) == ["global_step1"]
        assert (root / "latest").read_text() == "global_step1"
        assert checkpointing.manifest_problem(root / "global_step1") is None


def test_a_truncated_shard_falls_back_and_a_missing_tag_is_named(data, tmp_path):
    """Tags global_step2 and global_step4, then the largest file of global_step4 cut in half
    (real bytes on disk): train.on_corrupt_checkpoint=stop exits non-zero naming the file and the
    earlier tags; the default reports it, resumes from global_step2 and trains as the straight
    run did. A `latest` naming a tag that does not exist is an error listing the tags."""
    config = ds_config(data, tmp_path, "zero2")
    out = tmp_path / "run"
    root = out / "checkpoints"
    run = ("--set", "train.steps=4", "--set", "train.save_interval=2")
    check(_start(data, config, out, *run))
    straight = read_metrics(out)
    assert _latest(out) == "global_step4" and (root / "global_step4" / "MANIFEST.json").is_file()
    shard = max((p for p in (root / "global_step4").iterdir() if p.is_file()),
                key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])

    stop = ("--set", "train.on_corrupt_checkpoint=stop")
    stopped = _start(data, config, out, *run, *stop)
    assert stopped.returncode != 0
    assert f"checkpoint {root / 'global_step4'} is corrupt: {shard} has" in stopped.stderr, (
        stopped.stderr[-3000:])
    assert "write one of [global_step2] into" in stopped.stderr

    resumed = check(_start(data, config, out, *run))
    assert f"checkpoint {root / 'global_step4'} is corrupt" in resumed.stderr
    assert (f"resuming from the previous complete checkpoint {root / 'global_step2'}"
            in resumed.stderr), resumed.stderr[-3000:]
    again = read_metrics(out)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for x, y in zip(straight, again, strict=True):
        assert x["lm loss"] == pytest.approx(y["lm loss"], rel=1e-6, abs=1e-7), (x, y)
    assert _latest(out) == "global_step4" and (root / "global_step4.corrupt").is_dir()

    (root / "latest").write_text("global_step9")
    missing = _start(data, config, out, *run)
    assert missing.returncode != 0
    assert (f"{root}: `latest` names tag 'global_step9', which does not exist; use an earlier "
            f"tag: write one of [global_step2, global_step4] into {root / 'latest'}"
            in missing.stderr), missing.stderr[-3000:]


def test_a_non_finite_gradient_stops_the_step_before_the_update(data, tmp_path):
    """An inf in one gradient on one rank stops every rank's step with FloatingPointError
    before engine.step(): no weight moves (DeepSpeed itself would skip the update silently in
    fp32 and apply it in bf16). ZeRO-2 with accumulation and ZeRO-3."""
    configs = [ds_config(data, tmp_path, "zero2", gradient_accumulation_steps=2),
               ds_config(data, tmp_path, "zero3", gradient_accumulation_steps=2)]
    check(subprocess.run(torchrun_command(Path(__file__), "nonfinite-probe", str(tmp_path),
                                          *map(str, configs)),
                         capture_output=True, text=True, timeout=600,
                         env=probe_env(data)))
    for name in ("zero2", "zero3"):
        for rank in (0, 1):
            got = json.loads((tmp_path / f"{name}_rank{rank}.json").read_text())
            assert got["error"] is not None and got["error"].startswith(
                "step 1: a gradient is inf or NaN; the update was not applied"), (name, got)
            assert got["moved"] == 0 and got["step"] == 0, (name, rank, got)


@pytest.mark.parametrize(("mode", "component"), [("report", "ce"), ("grads", "ce part")])
def test_a_nan_loss_stops_before_the_update(data, tmp_path, mode, component):
    """Step 2's cross-entropy is NaN on one rank with finite gradients, or its loss with NaN
    gradients (ZeRO-2, accumulation 2): every rank stops with the step and the component named,
    no weight moves, and metrics.jsonl ends at step 1 (before, the first went on with the
    update applied). A NaN loss makes 'lm loss' and its 'ce part' NaN (ce stays finite: it is
    the objective's own, before the injection); the message names the part, lm loss among the
    others (loop.check_losses' order)."""
    config = ds_config(data, tmp_path, "zero2", gradient_accumulation_steps=2)
    check(subprocess.run(torchrun_command(Path(__file__), "nan-loss-probe", str(tmp_path),
                                          mode, str(config)),
                         capture_output=True, text=True, timeout=600,
                         env=probe_env(data)))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["error"] is not None and got["error"].startswith(
            f"step 2: the loss component '{component}' is nan ("), got
        assert "the update was not applied. Check the data" in got["error"], got
        assert got["moved"] == 0 and got["step"] == 1, (rank, got)
    assert [row["step"] for row in read_metrics(tmp_path)] == [1]


@pytest.mark.parametrize("limit", [3, 0])
def test_fp16_overflows_skip_and_too_many_in_a_row_stop(data, tmp_path, limit):
    """fp16 with a loss scale of 2^24: the first updates overflow and DeepSpeed's loss scaler
    skips them, halving the scale each time. With train.max_skipped_steps=3 the run stops at the
    third skip in a row, naming the flag; with 0 it trains on once the scale fits, an overflow
    being the scaler's business (before, the first one stopped the run as a NaN gradient)."""
    config = ds_config(data, tmp_path, "zero2", fp16={"enabled": True,
                                                      "initial_scale_power": 24,
                                                      "loss_scale_window": 1000,
                                                      "hysteresis": 1})
    check(subprocess.run(torchrun_command(Path(__file__), "fp16-skip-probe", str(tmp_path),
                                          str(config), str(limit)),
                         capture_output=True, text=True, timeout=600,
                         env=probe_env(data)))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        skipped = got["applied"].index(True) if True in got["applied"] else len(got["applied"])
        if limit:
            assert got["applied"] == [False] * 3, got
            assert got["error"] is not None and got["error"].startswith(
                "step 3: the optimizer skipped the update 3 steps in a row "
                "(train.max_skipped_steps = 3)"), got
            assert got["scale"] == [2.0 ** 23, 2.0 ** 22, 2.0 ** 21], got
        else:
            assert got["error"] is None and got["step"] == 10, got
            assert skipped >= 3 and sum(got["applied"]) >= 3, got  # later overflows: skipped
            assert got["scale"][skipped - 1] == 2.0 ** (24 - skipped), got


def test_the_3b_configs_schedule_decay_and_checkpoint_layers(data, tmp_path):
    """configs/deepspeed/3b_zero2.json (bf16 off for the CPU, the tiny Llama, 1 process): the lr
    rises linearly over the warm-up and then decays along the cosine, never under its floor;
    model.recompute=full recomputes the decoder layers and gives the same losses."""
    config = ds_config(data, tmp_path, "3b_zero2", train_micro_batch_size_per_gpu=2,
                       gradient_accumulation_steps=2)
    overrides = ["--ds-set", "scheduler.params.total_num_steps=6",
                 "--ds-set", "scheduler.params.warmup_num_steps=3",
                 "--set", "train.warmup_steps=3"]  # the run config agrees with the ds_config
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--set", "model.recompute=full"])):
        check(_start(data, config, tmp_path / name, "--set", "train.steps=6", *overrides,
                     *extra, nproc=1))
        runs[name] = read_metrics(tmp_path / name)
    for a, b in zip(runs["plain"], runs["checkpointed"], strict=True):
        assert a["lm loss"] == pytest.approx(b["lm loss"], rel=1e-6), (a, b)
        assert a["lr"] == b["lr"]
    lrs = [row["lr"] for row in runs["plain"]]
    peak = json.loads(config.read_text())["optimizer"]["params"]["lr"]
    top = lrs.index(max(lrs))
    assert 1 <= top <= 3 and all(x < y for x, y in pairwise(lrs[:top + 1])), lrs
    assert all(x > y for x, y in pairwise(lrs[top:])), lrs  # the cosine decay
    assert max(lrs) <= peak and min(lrs[top:]) >= 0.1 * peak * (1 - 1e-6), lrs


def test_one_run_config_drives_both_loops(data, tmp_path):
    """configs/deepspeed/tiny.yaml, with the same settings, trains 2 steps in the Megatron loop
    (its GPT from the model section; model.hf_config named as unread) and in the DeepSpeed loop
    (the Llama of model.hf_config, ZeRO-2): the same steps logged in <output.dir>/metrics.jsonl
    and a checkpoint of step 2 in <output.dir>/checkpoints."""
    from token_objectives.training.checkpointing import latest_complete_step

    settings = ("--set", "train.steps=2", "--set", "train.save_interval=1")
    megatron = tmp_path / "megatron"
    values = [*run_settings(data), f"output.dir={megatron}", "train.steps=2",
              "train.save_interval=1"]
    done = check(subprocess.run(torchrun_command(
        REPO / "launch" / "pretrain_megatron.py", "--config", str(RUN_CONFIG),
        *(item for value in values for item in ("--set", value))),
        capture_output=True, text=True, env=dict(WORKER_ENV, PYTHONWARNINGS="always::UserWarning"),
        timeout=600))
    assert "model.hf_config = " in done.stderr and "not read by the Megatron loop" in done.stderr
    deepspeed = tmp_path / "deepspeed"
    check(_start(data, ds_config(data, tmp_path, "zero2"), deepspeed, *settings))
    for out in (megatron, deepspeed):
        assert [row["step"] for row in read_metrics(out)] == [1, 2], out
    assert latest_complete_step(megatron / "checkpoints") == 2
    assert _latest(deepspeed) == "global_step2"


def test_weight_decay_spares_the_norms():
    from transformers import LlamaConfig, LlamaForCausalLM

    from token_objectives.training.deepspeed import decay_groups

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    groups = decay_groups(model.parameters(), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    spared = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert spared and all("norm" in name for name in spared), spared
    assert "model.embed_tokens.weight" in decayed and not any("norm" in n for n in decayed)


# ----------------------------------------------------------------------------- config errors


def _section(**values) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "token_objectives": values}


def test_full_logits_are_not_mistaken_for_a_shard_without_tables():
    """ntl null and no PDL: no table tells V, the model's vocab_size does."""
    from token_objectives import Objective, ObjectiveConfig
    from token_objectives.integrations.deepspeed.section import DeepSpeedObjectives

    objectives = DeepSpeedObjectives(Objective(ObjectiveConfig(ntl=None), vocab_size=64))
    assert objectives._group(64) is None
    with pytest.raises(ValueError, match="no AutoTP group is set up"):
        objectives._group(32)  # a shard, outside any AutoTP run


def test_fused_head_under_zero3_is_refused_with_the_fix():
    from token_objectives.training.config import ModelConfig
    from token_objectives.training.deepspeed import uses_fused_head

    model = ModelConfig(fused_lm_head=True)
    assert uses_fused_head(model, {"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="use stage 1 or 2"):
        uses_fused_head(model, {"zero_optimization": {"stage": 3}})
    assert not uses_fused_head(ModelConfig(), {"zero_optimization": {"stage": 3}})


def test_unknown_key_is_named():
    from token_objectives.integrations.deepspeed.section import read_section

    with pytest.raises(ValueError, match=r'token_objectives"\]: unknown key\(s\) \[.ntl_wieght.\] '
                                         r"in config section 'token_objectives'; valid keys"):
        read_section(_section(ntl="was", ntl_wieght=0.3))


def test_wrong_type_is_named():
    from token_objectives.integrations.deepspeed.section import read_section

    with pytest.raises(ValueError, match=r"ntl_weight: expected a number >= 0, got 'high'"):
        read_section(_section(ntl_weight="high"))
    with pytest.raises(ValueError, match=r"pdl_alpha: expected a number >= 0, got \[0.2\]"):
        read_section(_section(pdl_alpha=[0.2]))


SECTION_OWN_KEYS = {"tokenizer", "number_tokens", "frequencies", "scheduled_sampling",
                    "fused_lm_head"}


def test_section_keys_are_objective_config_fields_plus_its_own():
    """A new ObjectiveConfig field is a section key without anyone adding it by hand."""
    from dataclasses import fields

    from token_objectives import ObjectiveConfig
    from token_objectives.integrations.deepspeed.section import TokenObjectivesConfig

    names = {f.name for f in fields(ObjectiveConfig)}
    keys = {key.name: key for key in fields(TokenObjectivesConfig)}
    assert set(keys) == names | SECTION_OWN_KEYS
    for option in fields(ObjectiveConfig):
        key = keys[option.name]
        assert key.default == option.default and key.metadata == option.metadata


@pytest.mark.parametrize("key,value", [
    ("pdl_alpha", "0.5"), ("ntl_weight", "0.3"), ("reweigh", 1), ("reweigh", "true"),
    ("fused_lm_head", 1), ("pdl_normalize_table", "false"), ("max_number_length", 2.0),
    ("ignore_index", True), ("pdl_alpha", None), ("z_loss", float("nan")),
    ("pdl_eps", float("inf")), ("pdl_unseen", "0.5"), ("pdl_unseen", True),
    ("ntl", "none"), ("pdl_normalization", "mean"),
])
def test_types_are_strict_and_the_key_is_named(key, value):
    from token_objectives.integrations.deepspeed.section import read_section

    with pytest.raises(ValueError, match=rf'^invalid ds_config\["token_objectives"\]: {key}: '):
        read_section(_section(**{key: value}))


def test_an_int_is_accepted_for_a_float_key():
    """JSON writes 1.0 as 1."""
    from token_objectives.integrations.deepspeed.section import read_section

    config = read_section(_section(ntl_weight=1, pdl_alpha=1, pdl_unseen=0, frequencies=None,
                                   z_loss=0)).objective_config()
    assert (config.ntl_weight, config.pdl_alpha, config.pdl_unseen) == (1.0, 1.0, 0.0)
    assert all(isinstance(v, float) for v in (config.ntl_weight, config.pdl_unseen))


def test_range_errors_come_from_objective_config_and_name_the_key():
    from token_objectives.integrations.deepspeed.section import read_section

    with pytest.raises(ValueError, match=r'\]: pdl_eps: expected a number >= 0, got -1$'):
        read_section(_section(pdl_eps=-1))


def test_pdl_options_reach_the_weights(tmp_path):
    import numpy as np

    from token_objectives.integrations.deepspeed import objective_from_ds_config
    from token_objectives.tables.frequencies import pdl_weights, save_frequencies

    counts = np.array([0, 7, 1, 0, 30, 2], dtype=np.int64)
    path = tmp_path / "freqs.safetensors"
    save_frequencies(path, counts, tokenizer_identity="test")
    objectives = objective_from_ds_config(_section(
        ntl=None, pdl_alpha=0.5, pdl_eps=2.0, pdl_unseen=0.0, pdl_normalize_table=False,
        frequencies=str(path)))
    expected = pdl_weights(counts, 0.5, eps=2.0, unseen_weight=0.0, normalize=False)
    torch.testing.assert_close(objectives.pdl_weights, expected, rtol=0, atol=0)
    assert objectives.pdl_weights[0] == 0 and objectives.pdl_weights[1] == 9.0 ** -0.5


def test_weighted_mean_divides_the_whole_loss_by_the_counted_pdl_weights():
    """By hand in float64: N = sum of w[y] over counted tokens (mask != 0, not ignored), and the
    NTL and z-loss terms, unweighted in the numerator, are divided by that N as well."""
    from cases import make_case

    from token_objectives import Objective, ObjectiveConfig
    from token_objectives.integrations.deepspeed.section import DeepSpeedObjectives
    from token_objectives.training.deepspeed import counted_denominator

    config = ObjectiveConfig(ntl="mse", ntl_weight=0.5, reweigh=False, pdl_alpha=1.0,
                             pdl_normalization="weighted_mean", z_loss=1e-2)
    case = make_case("weighted_mean", config, seed=31)
    labels, mask = case.labels, case.loss_mask.clone()
    mask[0, 3] = 0.5  # a fractional mask scales the loss; the token still counts once
    mask[1, 12] = 1.0  # ignored label under a mask of 1: not counted
    objectives = DeepSpeedObjectives(Objective(config, case.numbers, case.pdl_weights))
    logits = case.logits.double()
    out = objectives(logits, labels, loss_mask=mask)
    denominator = counted_denominator([{"labels": labels, "loss_mask": mask}], objectives)

    real = case.numbers.valid_vocab_size
    counted = (mask != 0) & (labels != config.ignore_index)
    target = torch.where(counted, labels, 0)
    lse = torch.logsumexp(logits[..., :real], dim=-1)
    ce = lse - logits.gather(-1, target[..., None])[..., 0]
    weight = case.pdl_weights.double()[target]
    ids = case.numbers.number_ids
    values = case.numbers.values.double()
    yhat = torch.softmax(logits[..., ids], dim=-1) @ values[ids]
    is_number = counted & ~torch.isnan(values[target])
    ntl = torch.where(is_number, (yhat - torch.nan_to_num(values[target])) ** 2, 0.0)
    per_token = weight * ce + config.z_loss * lse**2 + config.ntl_weight * ntl
    numerator = torch.where(counted, per_token * mask, 0.0).sum()
    weights = torch.where(counted, weight, 0.0).sum()

    torch.testing.assert_close(denominator, weights, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss.sum() / denominator, numerator / weights, rtol=1e-6,
                               atol=0)
    # Not the CE alone over the weights with NTL and z-loss over the token count:
    split = (torch.where(counted, weight * ce * mask, 0.0).sum() / weights
             + torch.where(counted, (per_token - weight * ce) * mask, 0.0).sum() / counted.sum())
    assert not torch.isclose(out.loss.sum() / denominator, split, rtol=1e-4)
    token = DeepSpeedObjectives(Objective(ObjectiveConfig(ntl="mse", pdl_alpha=1.0),
                                          case.numbers, case.pdl_weights))
    assert counted_denominator([{"labels": labels, "loss_mask": mask}], token) == counted.sum()
    # The logs divide by the same N (the fractional mask included) and show what is trained.
    from token_objectives.integrations.deepspeed.section import log_components

    totals = out.totals().double()
    torch.testing.assert_close(totals[5], denominator, rtol=1e-6, atol=0)
    logged = log_components(None, out, step=0, config=config)
    assert logged["lm loss"] == pytest.approx((numerator / weights).item(), rel=1e-6)


def test_weighted_mean_denominator_with_an_ignore_index_beyond_the_vocab():
    from token_objectives import Objective, ObjectiveConfig
    from token_objectives.integrations.deepspeed.section import DeepSpeedObjectives
    from token_objectives.training.deepspeed import counted_denominator

    config = ObjectiveConfig(ntl=None, pdl_alpha=1.0, pdl_normalization="weighted_mean",
                             ignore_index=1000)
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    labels = torch.tensor([[0, 1000, 2, 3]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    total = counted_denominator([{"labels": labels, "loss_mask": mask}],
                                DeepSpeedObjectives(Objective(config, None, weights)))
    assert total.item() == 2.5


def test_missing_frequency_file_is_named(tmp_path):
    from token_objectives.integrations.deepspeed.section import read_section

    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(ValueError, match=rf"frequencies: .*{missing.name}' does not exist"):
        read_section(_section(pdl_alpha=0.2, frequencies=str(missing)))


def test_ntl_with_a_tokenizer_without_numbers_is_named(tmp_path):
    from tokenizer_fixtures import word_level_tokenizer

    from token_objectives.integrations.deepspeed.section import numbers_from_section, read_section

    path = tmp_path / "tokenizer.json"
    word_level_tokenizer(["the", "cat", "sat", "</s>"]).save(str(path))
    section = read_section(_section(ntl="was", tokenizer=str(path)))
    with pytest.raises(ValueError, match=r'token_objectives"\]\.ntl = .was. .*no number tokens'):
        numbers_from_section(section, vocab_size=8)
    off = read_section(_section(ntl=None, tokenizer=str(path)))
    assert numbers_from_section(off, vocab_size=8) is None


def test_shipped_configs_are_valid():
    """Every configs/deepspeed ds_config of the loop goes with its run config (tiny.yaml,
    llama3.2-3b.yaml) without a key set in both, and autotp2 has the AutoTP keys DeepSpeed
    reads."""
    from deepspeed.runtime.tensor_parallel.config import get_tensor_parallel_config

    from token_objectives.training.config import load_config
    from token_objectives.training.deepspeed import check_run_config

    paths = ["data.tokenizer=t", "data.train_prefix=p"]
    for run, names in (("tiny", ("zero1", "zero2", "zero3", "autotp2")),
                       ("llama3.2-3b", ("3b_zero1", "3b_zero2", "3b_zero3"))):
        cfg = load_config(CONFIGS / f"{run}.yaml", paths)
        assert cfg.objectives.ntl == "was" and cfg.model.hf_config
        for name in names:
            config = json.loads((CONFIGS / f"{name}.json").read_text())
            assert check_run_config(cfg, config) == [], name
            assert config["bf16"]["enabled"] is True
    autotp = get_tensor_parallel_config(json.loads((CONFIGS / "autotp2.json").read_text()))
    assert autotp.autotp_size == 2 and autotp.vocab_parallel_lm_head is True


def test_llama32_3b_config_is_the_3b_shape():
    """3,212,749,824 parameters with tied embeddings (Llama-3.2-3B), on the meta device."""
    from transformers import LlamaForCausalLM

    from token_objectives.training.deepspeed import llama_config

    config = llama_config(CONFIGS / "llama3.2-3b.json", tokenizer_vocab=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 3_212_749_824
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tiny = llama_config(TINY, tokenizer_vocab=500)
    assert tiny.vocab_size == 512 and tiny.tie_word_embeddings


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    probe(sys.argv[2:])
if __name__ == "__main__" and sys.argv[1:2] == ["nonfinite-probe"]:
    nonfinite_probe(sys.argv[2:])
if __name__ == "__main__" and sys.argv[1:2] == ["nan-loss-probe"]:
    nan_loss_probe(sys.argv[2:])
if __name__ == "__main__" and sys.argv[1:2] == ["fp16-skip-probe"]:
    fp16_skip_probe(sys.argv[2:])


def test_a_resume_follows_the_ds_config_or_refuses_naming_each_changed_key(data, tmp_path):
    """--ds-set optimizer.params.lr on a resume: refused with the key and both options, applied
    with train.resume_schedule=override; another frequency file is refused naming
    train.resume_objectives (the Megatron loop's test covers "checkpoint" and the objectives'
    override)."""
    config = ds_config(data, tmp_path, "zero1")
    out = tmp_path / "run"

    def run(*args: str) -> subprocess.CompletedProcess:
        return _start(data, config, out, *args)

    check(run("--set", "train.steps=2"))
    lrs = lambda: {m["step"]: m["lr"] for m in read_metrics(out)}  # noqa: E731
    assert lrs() == {1: 1e-3, 2: 1e-3}
    lower = ("--ds-set", "optimizer.params.lr=5e-4")
    refused = run("--set", "train.steps=3", *lower)
    assert refused.returncode != 0 and max(lrs()) == 2
    assert "optimizer.params.lr: 0.001 in the checkpoint, 0.0005 now" in refused.stderr
    assert "train.resume_schedule override" in refused.stderr
    assert "train.resume_schedule checkpoint" in refused.stderr
    check(run("--set", "train.steps=3", *lower, "--set", "train.resume_schedule=override"))
    assert lrs()[3] == pytest.approx(5e-4, rel=1e-9)

    from token_objectives.tables.frequencies import load_frequencies, save_frequencies

    table = load_frequencies(data.frequencies_path)  # the same vocab, other counts
    other = tmp_path / "other.safetensors"
    save_frequencies(other, table.counts + 1, tokenizer_identity=table.tokenizer_identity)
    frequencies = ("--set", f"data.frequencies={other}", *lower)
    changed = run("--set", "train.steps=4", *frequencies)
    assert changed.returncode != 0 and max(lrs()) == 3
    assert "frequencies (sha256)" in changed.stderr
    assert "train.resume_objectives override" in changed.stderr
