"""token_objectives.integrations.hf in real `transformers.Trainer` (and TRL `SFTTrainer`) runs on
the CPU.

Every run trains one SGD step (lr 1, no clipping) of a tiny LlamaForCausalLM on the same 8 rows
(hf_runs.py), so the parameter change is the gradient. The expected values are objective_loss
on logits[:, :-1] against labels[:, 1:], divided by the counted tokens, computed by hand here
(and its loss held against the float64 reference); the Trainer runs must equal it in one
process, under accumulation 4 x 2, fused from the hidden states, and in 2 processes (torchrun
over gloo: DDP, DeepSpeed ZeRO-2, ZeRO-3 fused, AutoTP = 2 with a vocab-parallel lm_head whose
logits stay sharded).
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

import pytest
import torch
from doc_blocks import doc_block, run_block, substituted
from torchrun_helpers import REPO, WORKER_ENV, run_checked, torchrun_command

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import hf_runs  # noqa: E402
from reference import reference_objective_loss  # noqa: E402

from token_objectives import (  # noqa: E402
    NumberTable,
    Objective,
    ObjectiveConfig,
    objective_loss,
)
from token_objectives.integrations.hf import (  # noqa: E402
    ObjectiveLoss,
    objective_loss_from_options,
    patch_model,
)

CONFIG = ObjectiveConfig(**hf_runs.OPTIONS)
COMPONENTS = ("lm_loss", "ce", "ntl", "counted_tokens", "number_tokens", "number_token_share")


@pytest.fixture(scope="module")
def tokenizer():
    return hf_runs.hf_tokenizer()


@pytest.fixture(scope="module")
def expected(tokenizer):
    """(loss, grads, component means) by hand, on a fresh copy of the seeded model."""
    return hf_runs.hand_reference(hf_runs.tiny_llama(len(tokenizer)), tokenizer, CONFIG)


def _assert_matches(record: dict, expected, what: str) -> None:
    loss, grads, means = expected
    assert record["loss"] == pytest.approx(loss, rel=1e-6), what
    # Every parameter; under AutoTP the ones it leaves whole (norms, embedding).
    assert len(record["grads"]) == (6 if "autotp" in what else len(grads)), what
    for name, grad in record["grads"].items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=2e-7,
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")
    (logs,) = record["logs"]
    for key in COMPONENTS:
        assert logs[key] == pytest.approx(means[key], rel=1e-5), (what, key)


def _run(mode: str, tokenizer, **kwargs) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"hf_{mode}_"))
    return hf_runs.run(mode, out, model=hf_runs.tiny_llama(len(tokenizer)),
                       tokenizer=tokenizer, **kwargs) | {"out": out}


def test_hand_reference_is_the_float64_reference(tokenizer):
    model = hf_runs.tiny_llama(len(tokenizer))
    data = hf_runs.batch(tokenizer)
    numbers = NumberTable.from_tokenizer(tokenizer)
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    ours = objective_loss(logits[:, :-1], data["labels"][:, 1:], CONFIG, numbers)
    ref = reference_objective_loss(logits[:, :-1].double(), data["labels"][:, 1:], CONFIG,
                                   numbers)
    assert ours.loss.sum().item() == pytest.approx(ref.loss.sum().item(), rel=1e-5)
    assert ours.counted.sum() == (data["labels"][:, 1:] != -100).sum()


def test_one_trainer_step_equals_the_objective_by_hand_and_logs_to_tensorboard(
        tokenizer, expected):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = _run("single", tokenizer, report_to="tensorboard")
    _assert_matches(record, expected, "Trainer, batch 8")
    (events,) = list(record["out"].rglob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(events.parent)).Reload().Tags()["scalars"]
    accumulator = EventAccumulator(str(events.parent)).Reload()
    for key in (*COMPONENTS, "pdl_weight"):
        assert f"train/{key}" in scalars, scalars
    for key in COMPONENTS:
        (event,) = accumulator.Scalars(f"train/{key}")
        assert event.step == 1 and event.value == pytest.approx(expected[2][key], rel=1e-5)


def test_accumulation_4x2_and_the_fused_head_equal_one_batch_of_8(tokenizer, expected):
    _assert_matches(_run("accumulate", tokenizer), expected, "accumulation 4 x micro-batch 2")
    _assert_matches(_run("fused", tokenizer), expected, "fused head, batch 8")


def test_two_processes_ddp_and_deepspeed_zero2_zero3_fused_autotp_equal_one(tmp_path, expected,
                                                                           tokenizer):
    pytest.importorskip("deepspeed")
    modes = ["ddp", "zero2", "zero3_fused", "autotp2", "autotp2_padded"]
    env = dict(WORKER_ENV, PYTHONPATH=f"{REPO / 'plugin'}:{WORKER_ENV.get('PYTHONPATH', '')}")
    run_checked(torchrun_command(REPO / "tests" / "hf_runs.py", ",".join(modes),
                                 str(tmp_path)), env=env)
    for mode in modes[:-1]:
        record = torch.load(tmp_path / mode / "result.pt")
        _assert_matches(record, expected, f"2 processes, {mode}")
    padded = hf_runs.hand_reference(hf_runs.tiny_llama(len(tokenizer) + 1), tokenizer, CONFIG)
    record = torch.load(tmp_path / "autotp2_padded" / "result.pt")
    _assert_matches(record, padded, "2 processes, autotp2 over a vocab of 301")
    assert record["head_shard"] == (0, 151)  # uneven: the ids were read from the model
    assert torch.load(tmp_path / "zero2" / "result.pt")["zero_stage"] == 2
    zero3 = torch.load(tmp_path / "zero3_fused" / "result.pt")
    assert zero3["zero_stage"] == 3 and zero3["head_numel"] == 0  # the head was partitioned
    # Outside the engine's forward the fused head gathers the weight itself (GatheredParameters).
    assert zero3["partitioned_outside_forward"]
    assert zero3["gathered_fused_loss"] == pytest.approx(zero3["gathered_logits_loss"], rel=1e-6)
    # AutoTP's vocab-parallel lm_head: rank 0's logits were [b, s, 150] of the 300 ids.
    assert torch.load(tmp_path / "autotp2" / "result.pt")["head_shard"] == (0, 150)


def _largest_saved(step) -> int:
    """The most elements of one tensor autograd saves while `step()` builds its graph."""
    largest = [0]

    def pack(tensor):
        largest[0] = max(largest[0], tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return largest[0]


def test_fused_equals_the_logits_path_and_keeps_no_logits_sized_tensor(tokenizer):
    data = hf_runs.batch(tokenizer)
    inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
    logits_size = data["input_ids"].numel() * len(tokenizer)
    plain, fused = hf_runs.tiny_llama(len(tokenizer)), hf_runs.tiny_llama(len(tokenizer))
    objectives = objective_loss_from_options(CONFIG, tokenizer, model=plain)
    count = (data["labels"][:, 1:] != -100).sum()

    def logits_step():
        return objectives(plain(**inputs), data["labels"], num_items_in_batch=count)

    fused_objectives = objective_loss_from_options(CONFIG, tokenizer, model=fused, fused=True,
                                                   rows_per_chunk=16)
    patch_model(fused, fused_objectives)
    patch_model(fused, fused_objectives)  # idempotent

    def fused_step():
        return fused(**inputs, labels=data["labels"], num_items_in_batch=count).loss

    with pytest.raises(ValueError, match=r"attach\(trainer\)"):
        fused_objectives(plain(**inputs), data["labels"])  # fused needs the patched model
    assert _largest_saved(logits_step) >= logits_size
    assert _largest_saved(fused_step) < logits_size // 4
    assert fused_step().item() == pytest.approx(logits_step().item(), rel=1e-6)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_sft_trainer_takes_the_same_loss(tokenizer, expected, tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    data = hf_runs.batch(tokenizer)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(data["input_ids"],
                                                             data["attention_mask"], strict=True)]
    model = hf_runs.tiny_llama(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, max_steps=1, learning_rate=1.0, optim="sgd",
                     lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none",
                     save_strategy="no", use_cpu=True, logging_steps=1, max_length=None,
                     gradient_checkpointing=False, bf16=False, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_dict({"input_ids": rows}))
    # The tables from the trainer's processing_class; attach sets compute_loss_func.
    objectives = objective_loss_from_options(CONFIG, trainer.processing_class, model=model)
    objectives.attach(trainer)
    result = trainer.train()
    record = {"loss": result.training_loss,
              "grads": {n: before[n] - p.detach() for n, p in model.named_parameters()},
              "logs": [row for row in trainer.state.log_history if "ntl" in row]}
    _assert_matches(record, expected, "SFTTrainer, accumulation 2 x 4")
    with pytest.raises(ValueError, match="fused=False"):
        ObjectiveLoss(Objective(CONFIG, objectives.numbers), fused=True).attach(trainer)


def test_a_batch_without_labels_is_an_error_not_a_skipped_loss(tokenizer, tmp_path):
    from transformers import Trainer

    data = {k: v for k, v in hf_runs.batch(tokenizer).items() if k != "labels"}
    model = hf_runs.tiny_llama(len(tokenizer))
    objectives = objective_loss_from_options(CONFIG, tokenizer, model=model)
    trainer = Trainer(model=model, args=hf_runs.training_args(tmp_path, "single"),
                      train_dataset=hf_runs.Rows(data), compute_loss_func=objectives)
    with pytest.raises(ValueError, match="labels=None.*labels column"):
        trainer.train()


def test_logits_wider_than_the_tokenizer_are_padding_or_an_error(tokenizer):
    data = hf_runs.batch(tokenizer)
    real, padded = len(tokenizer), len(tokenizer) + 20
    model = hf_runs.tiny_llama(padded)
    outputs = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    objectives = objective_loss_from_options(CONFIG, tokenizer, model=model)
    assert objectives.numbers.vocab_size == padded
    loss = objectives(outputs, data["labels"])
    numbers = NumberTable.from_tokenizer(tokenizer, vocab_size=padded)
    ref = reference_objective_loss(outputs.logits[:, :-1].double(), data["labels"][:, 1:],
                                   CONFIG, numbers, real_vocab_size=real)
    assert loss.item() == pytest.approx((ref.loss.sum() / ref.counted.sum()).item(), rel=1e-5)
    unpadded = objective_loss_from_options(CONFIG, tokenizer)
    message = f"{padded} vocab columns but the tables have {real}.*vocab_size={padded}"
    with pytest.raises(ValueError, match=message):
        unpadded(outputs, data["labels"])


def test_options_and_tables_from_a_tokenizer_path_and_a_frequencies_file(tokenizer, tmp_path):
    from token_objectives.tables.frequencies import pdl_weights, save_frequencies
    from token_objectives.tables.tokenizers import tokenizer_identity

    tokenizer.save_pretrained(tmp_path / "tok")
    model = hf_runs.tiny_llama(len(tokenizer))
    counts = torch.bincount(hf_runs.batch(tokenizer)["input_ids"].flatten(),
                            minlength=len(tokenizer)).numpy()
    save_frequencies(tmp_path / "freqs.safetensors", counts,
                     tokenizer_identity=tokenizer_identity(tokenizer), vocab_size=len(tokenizer))
    options = {"ntl": "mse", "pdl_alpha": 0.5, "ntl_weight": "0.1"}
    objectives = objective_loss_from_options(options, tmp_path / "tok",
                                             tmp_path / "freqs.safetensors", model=model)
    assert objectives.config == ObjectiveConfig(ntl="mse", pdl_alpha=0.5, ntl_weight=0.1)
    assert torch.equal(objectives.numbers.values.isnan(),
                       NumberTable.from_tokenizer(tokenizer).values.isnan())
    torch.testing.assert_close(objectives.pdl_weights, pdl_weights(counts, 0.5))
    with pytest.raises(ValueError, match=r"ntl_wieght.*'objectives'"):
        objective_loss_from_options({"ntl_wieght": 1}, tokenizer)
    with pytest.raises(ValueError, match="frequencies file"):
        objective_loss_from_options({"pdl_alpha": 0.5, "ntl": None}, tokenizer)
    with pytest.raises(ValueError, match="ignore_index=-100"):
        ObjectiveLoss(Objective(ObjectiveConfig(ignore_index=-1), objectives.numbers))


def test_bench_hf_prints_the_three_methods(capsys):
    from token_objectives.cli import main

    # docs/performance.md's command, the model and batch cut.
    command = doc_block("bench-hf").text
    words = shlex.split(substituted(command, {
        "--vocab 32768 --hidden 256 --batch 4 --seq 256 --repeats 3":
            "--vocab 512 --hidden 32 --batch 2 --seq 32 --repeats 1"}))
    assert words[:3] == ["OMP_NUM_THREADS=1", "token-objectives", "bench-hf"]
    assert main(words[2:]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] and line.split()[0] in ("hf", "ours", "ours_fused")}
    assert list(rows) == ["hf", "ours", "ours_fused"]
    assert rows["hf"][2] == "1.00" and int(rows["hf"][5]) == 1  # the logits, saved
    assert int(rows["ours_fused"][5]) == 0  # no logits-sized tensor saved


@pytest.mark.parametrize("fused", [False, True])
def test_evaluate_gives_the_same_loss(tokenizer, expected, tmp_path, fused):
    from transformers import Trainer

    model = hf_runs.tiny_llama(len(tokenizer))
    objectives = objective_loss_from_options(CONFIG, tokenizer, model=model, fused=fused)
    args = hf_runs.training_args(tmp_path, "single")
    args.per_device_eval_batch_size = 8
    trainer = Trainer(model=model, args=args, eval_dataset=hf_runs.Rows(hf_runs.batch(tokenizer)))
    objectives.attach(trainer)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected[0], rel=1e-6)
    assert objectives.take_totals() is None  # evaluation keeps nothing for the training logs


def test_the_docs_example_trains_on_the_quickstart_corpus(tmp_path):
    """docs/huggingface.md's command (launch/train_hf.py, fused), one step on a small corpus:
    the data, the tables over the padded vocab, the logs."""
    text = doc_block("hf-example").text
    assert text.count("--steps 20") == 1
    text = substituted(text, {
        "--steps 20": "--steps 1 --documents 100 --vocab 384 --seq-length 32"})
    (tmp_path / "launch").symlink_to(REPO / "launch")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = dict(WORKER_ENV, PYTHONPATH=f"{REPO / 'plugin'}:{WORKER_ENV.get('PYTHONPATH', '')}")
    done = run_block("bash", text, tmp_path, env=env)
    assert "'ntl':" in done.stdout + done.stderr
    assert list((tmp_path / "runs" / "hf_tiny").rglob("events.out.tfevents.*"))
