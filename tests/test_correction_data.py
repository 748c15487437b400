"""Reference-answer correction data, end to end on the CPU.

A tiny Hugging Face Llama (saved with save_pretrained, with the quickstart's sentencepiece
tokenizer) answers JSONL prompts through `token-objectives build-correction-data`. The written
documents are read back and checked token by token against an independent greedy loop; the
loss-mask sidecar against the layout. gpt_data's pairing of the two streams is checked against
windows cut from the raw documents by hand. Both training loops, launched with torchrun, count
exactly the sidecar's ones.

Run as a script (`torchrun ... tests/test_correction_data.py megatron|deepspeed ...`), this file
is the probe the loop tests launch.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from doc_blocks import doc_block, run_block, substituted
from torchrun_helpers import read_metrics, run_checked, torchrun_command

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 10
MARKER = "\nCorrection:\n"
SEED = 1234
MEGATRON_TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=64",
    "parallel.tensor=1", "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
    "train.warmup_steps=0", "train.lr=1e-3", "train.log_interval=1", "train.steps=2",
    f"train.seed={SEED}", "output.tensorboard=false",
]
MEGATRON_SEQ, DEEPSPEED_SEQ = 64, 32
GLOBAL_BATCH = 8  # both loops: micro-batch 2 x 2 micro-batches x 2 DP ranks
STEPS = 2


# ----------------------------------------------------------------------------- the probes


def _record_calls(owner, name: str, record: list, pick) -> None:
    """Wrap owner.name so that each call's result (through `pick`) is appended to `record`;
    the real function still runs and its result is returned unchanged."""
    original = getattr(owner, name)

    def recorded(*args, **kwargs):
        result = original(*args, **kwargs)
        record.append(pick(result))
        return result

    setattr(owner, name, recorded)


def _megatron_probe(out: Path, prefix: str, tokenizer: str, frequencies: str) -> None:
    """Two steps of the Megatron loop; every rank writes the token count of each micro-batch's
    loss (what the schedule adds up to normalise the gradients)."""
    import torch.distributed as dist

    from token_objectives.training import megatron as megatron_training
    from token_objectives.training.config import load_config

    counts: list[int] = []
    _record_calls(megatron_training, "loss_func", counts, lambda result: int(result[1]))
    overrides = [*MEGATRON_TINY, f"data.train_prefix={prefix}", f"data.tokenizer={tokenizer}",
                 f"data.frequencies={frequencies}", f"output.dir={out}"]
    megatron_training.run(load_config(REPO / "configs" / "tiny.yaml", overrides), printer=None)
    (out / f"counts_rank{dist.get_rank()}.json").write_text(json.dumps(counts))


def _deepspeed_probe(out: Path, prefix: str, tokenizer: str, frequencies: str,
                     config: str) -> None:
    """Two steps of the DeepSpeed loop; rank 0 writes each step's global loss denominator."""
    import torch.distributed as dist

    from token_objectives.training import deepspeed as deepspeed_training
    from token_objectives.training.config import load_config

    denominators: list[float] = []
    _record_calls(deepspeed_training.Trainer, "global_denominator", denominators, float)
    overrides = [f"data.train_prefix={prefix}", f"data.tokenizer={tokenizer}",
                 f"data.frequencies={frequencies}", f"output.dir={out}", f"train.steps={STEPS}",
                 f"train.seed={SEED}", f"model.seq_length={DEEPSPEED_SEQ}"]
    deepspeed_training.run(load_config(REPO / "configs" / "deepspeed" / "tiny.yaml", overrides),
                           json.loads(Path(config).read_text()), printer=None)
    if dist.get_rank() == 0:
        (out / "denominators.json").write_text(json.dumps(denominators))


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    """32 prompts of different lengths (so batches need left padding) and their answers."""
    rng = random.Random(0)
    names, items = ["Emma", "Tariq", "Nadia", "Hiro"], ["books", "bottles", "oranges"]
    rows = []
    for i in range(32):
        a, b, item = rng.randint(1, 999), rng.randint(1, 99), rng.choice(items)
        prompt = f"{rng.choice(names)} has {a} {item} and buys {b} more." + (
            f" The train to Lagos leaves at {i:02d}:30." * (i % 3)) + " How many now?"
        rows.append({"prompt": prompt, "answer": f" {a + b} {item}."})
    return rows


def _reference_greedy(model, prompt: list[int], eos_id: int | None) -> list[int]:
    """Greedy decoding by hand: the full forward pass per token, no cache, no padding."""
    ids = list(prompt)
    for _ in range(MAX_NEW_TOKENS):
        with torch.no_grad():
            next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if next_id == eos_id:
            break
        ids.append(next_id)
    return ids[len(prompt):]


def _encode(tokenizer_path: Path, texts: list[str]) -> list[list[int]]:
    from token_objectives.tables.tokenizers import encode_batch, load_tokenizer

    return encode_batch(load_tokenizer(tokenizer_path), texts)


@pytest.fixture(scope="module")
def model_dir(data, questions, tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM directory with the tokenizer inside. The EOS row of the LM head
    is made a scaled copy of the most frequent greedy token's, so EOS wins wherever that token
    would: some answers end early, others run to the length limit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=data.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    prompts = _encode(data.tokenizer_path, [q["prompt"] for q in questions])
    answers = [_reference_greedy(model, p, None) for p in prompts]
    favourite, _ = Counter(t for answer in answers for t in answer).most_common(1)[0]
    with torch.no_grad():
        model.lm_head.weight[2] = 1.5 * model.lm_head.weight[favourite]
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    shutil.copy(data.tokenizer_path, directory / "tokenizer.model")
    return directory


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _cli(*args: str) -> int:
    from token_objectives.cli import main

    return main(["build-correction-data", "--no-progress", *args])


@pytest.fixture(scope="module")
def built(model_dir, questions, tmp_path_factory) -> Path:
    """The correction dataset of all questions, built through the CLI (batches of 5)."""
    directory = tmp_path_factory.mktemp("correction")
    jsonl = _write_jsonl(directory / "qa.jsonl", questions)
    prefix = directory / "correction"
    assert _cli("--input", str(jsonl), "--model", str(model_dir), "--output-prefix", str(prefix),
                "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "5") == 0
    return prefix


def _documents(prefix) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset))]


def _samples(prefix, tokenizer: Path, seq_length: int, cache: Path,
             num_samples: int | None = None):
    """gpt_dataset as the loops build it (needs the process_group fixture)."""
    from token_objectives.training.gpt_data import MegatronTokenizer, gpt_dataset

    return gpt_dataset(str(prefix), seq_length, SEED, MegatronTokenizer(str(tokenizer)),
                       num_samples, cache)


# ------------------------------------------------------------------------------ the docs


@pytest.mark.parametrize("name", ["correction-cli", "correction-python"])
def test_the_docs_commands_build_the_same_data(name, built, model_dir, questions, tmp_path):
    """docs/correction_data.md's command and its Python form, run as written on the test's
    questions and model: the same documents and masks as the fixture's build."""
    from token_objectives.tables.indexed_dataset import loss_mask_prefix

    _write_jsonl(tmp_path / "qa.jsonl", questions)
    (tmp_path / "runs" / "ds").mkdir(parents=True)
    (tmp_path / "runs" / "ds" / "hf").symlink_to(model_dir)
    (tmp_path / "data").mkdir()
    block = doc_block(name)
    cut = ({"max_new_tokens=256": f"max_new_tokens={MAX_NEW_TOKENS}"} if block.language ==
           "python" else {"--max-new-tokens 256": f"--max-new-tokens {MAX_NEW_TOKENS}"})
    run_block(block.language, substituted(block.text, cut), tmp_path)
    written = tmp_path / "data" / "correction"
    for ours, theirs in ((written, built), (loss_mask_prefix(written), loss_mask_prefix(built))):
        assert [d.tolist() for d in _documents(ours)] == [d.tolist() for d in _documents(theirs)]


# ------------------------------------------------------------------------------ the layout


def test_each_document_is_prompt_own_answer_marker_reference(built, model_dir, data, questions):
    from transformers import LlamaForCausalLM

    from token_objectives.tables.indexed_dataset import loss_mask_prefix

    model = LlamaForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    prompts = _encode(data.tokenizer_path, [q["prompt"] for q in questions])
    answers = _encode(data.tokenizer_path, [q["answer"] for q in questions])
    (marker,) = _encode(data.tokenizer_path, [MARKER])
    documents, masks = _documents(built), _documents(loss_mask_prefix(built))
    assert len(documents) == len(masks) == len(questions)
    own_lengths = []
    for document, mask, prompt, answer in zip(documents, masks, prompts, answers, strict=True):
        own = _reference_greedy(model, prompt, eos_id=2)
        own_lengths.append(len(own))
        expected = [*prompt, *own, *marker, *answer, 2]
        assert document.tolist() == expected
        learned = len(answer) + 1
        assert mask.tolist() == [0] * (len(expected) - learned) + [1] * learned
    # Both ends of generation were exercised: the model's EOS and the length limit.
    assert min(own_lengths) < MAX_NEW_TOKENS and max(own_lengths) == MAX_NEW_TOKENS, own_lengths
    assert len({len(p) for p in prompts}) > 1  # batches of 5 needed left padding


# ------------------------------------------------------------------------------- bad lines

BAD_FILE = [
    (b'{"prompt": "Emma has 3 books.", "answer": " 3"}', None),
    (b'{"prompt": "Emma has 4 books."', "invalid JSON"),
    (b'{"prompt": "Tariq has 6 bottles."}', '"answer" is missing'),
    (b'{"prompt": 7, "answer": " 7"}', '"prompt" is a int, not a string'),
    (b'{"prompt": "   ", "answer": " 9"}', '"prompt" is empty'),
    (b"", "blank line"),
    (b'["Nadia has 2 oranges.", " 2"]', "a JSON list, not an object"),
    (b'{"prompt": "\xff\xfe", "answer": " 1"}', "not UTF-8"),
    (b'{"prompt": "Hiro has 5 books.", "answer": " 5", "source": "extra fields are fine"}', None),
]


@pytest.fixture
def bad_jsonl(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_FILE) + b"\n")
    return path


def test_bad_lines_are_reported_by_line_number(bad_jsonl):
    from token_objectives.correction.build_data import read_examples

    examples, bad = read_examples(bad_jsonl)
    assert [e.line for e in examples] == [1, 9]
    assert examples[1].prompt == "Hiro has 5 books." and examples[1].answer == " 5"
    expected = [(n, reason) for n, (_, reason) in enumerate(BAD_FILE, start=1) if reason]
    assert [b.line for b in bad] == [n for n, _ in expected]
    for found, (_, reason) in zip(bad, expected, strict=True):
        assert reason in found.reason, found


def test_error_mode_names_the_lines_and_the_flag(bad_jsonl, model_dir, tmp_path, capsys):
    from token_objectives.correction.build_data import build_correction_data

    prefix = tmp_path / "out"
    assert _cli("--input", str(bad_jsonl), "--model", str(model_dir),
                "--output-prefix", str(prefix)) == 2
    error = capsys.readouterr().err
    for line in range(2, 9):
        assert f"line {line}:" in error, error
    assert "line 1:" not in error and "line 9:" not in error
    assert "7 bad line(s)" in error and "--on-bad-line skip" in error
    assert not list(tmp_path.glob("out*"))
    with pytest.raises(ValueError, match=r"line 2: invalid JSON.*--on-bad-line skip"):
        build_correction_data(bad_jsonl, model_dir, prefix, on_bad_line="error")


def test_skip_mode_skips_and_lists_every_line(bad_jsonl, model_dir, data, tmp_path, capsys):
    prefix = tmp_path / "out"
    assert _cli("--input", str(bad_jsonl), "--model", str(model_dir), "--output-prefix",
                str(prefix), "--on-bad-line", "skip", "--max-new-tokens", "3") == 0
    captured = capsys.readouterr()
    assert "skipped 7 bad line(s)" in captured.err
    listed = [line.strip().split(":")[0] for line in captured.err.splitlines()[1:8]]
    assert listed == [f"line {n}" for n in range(2, 9)], captured.err
    assert "wrote 2 documents" in captured.out and "skipped 7 bad line(s)" in captured.out
    prompts = _encode(data.tokenizer_path, ["Emma has 3 books.", "Hiro has 5 books."])
    documents = _documents(prefix)
    assert [d[:len(p)].tolist() for d, p in zip(documents, prompts, strict=True)] == prompts


def test_no_room_for_the_answer_is_an_error_before_generation(model_dir, questions, tmp_path):
    from token_objectives.correction.build_data import build_correction_data

    jsonl = _write_jsonl(tmp_path / "qa.jsonl", questions[:3])
    # The model has 256 positions; the first prompt's tokens + 250 new ones do not fit.
    with pytest.raises(ValueError, match=r"line 1: the prompt has \d+ tokens.*--max-new-tokens"):
        build_correction_data(jsonl, model_dir, tmp_path / "out", max_new_tokens=250,
                              progress=False)
    assert not list(tmp_path.glob("out*"))


def test_a_tokenizer_of_the_same_size_but_another_vocab_is_refused(model_dir, data, questions,
                                                                   tmp_path, capsys):
    """The vocab itself is compared, not its size: a word-level tokenizer with exactly the
    model's number of ids (and a </s>) is not the model's, and nothing is generated or written."""
    from tokenizer_fixtures import word_level_tokenizer

    from token_objectives.tables.tokenizers import list_vocab

    size = list_vocab(data.tokenizer_path).size
    other = tmp_path / "other.json"
    word_level_tokenizer(["</s>", *(f"w{i}" for i in range(size - 2))]).save(str(other))
    assert list_vocab(other).size == size
    jsonl = _write_jsonl(tmp_path / "qa.jsonl", questions[:2])
    prefix = tmp_path / "out"
    common = ["--input", str(jsonl), "--model", str(model_dir), "--output-prefix", str(prefix),
              "--max-new-tokens", "2"]
    assert _cli(*common, "--tokenizer", str(other)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert f"--tokenizer {other} is not the tokenizer of the model {model_dir}" in error
    assert not list(tmp_path.glob("out*"))
    # The same vocabulary from another file is the model's.
    assert _cli(*common, "--tokenizer", str(data.tokenizer_path)) == 0


def test_written_files_are_group_readable_whatever_the_umask(model_dir, questions, tmp_path):
    import os
    import stat

    from token_objectives.tables.indexed_dataset import loss_mask_prefix

    jsonl = _write_jsonl(tmp_path / "qa.jsonl", questions[:2])
    prefix = tmp_path / "out"
    old = os.umask(0o077)
    try:
        assert _cli("--input", str(jsonl), "--model", str(model_dir), "--output-prefix",
                    str(prefix), "--max-new-tokens", "2") == 0
    finally:
        os.umask(old)
    for path in (prefix, loss_mask_prefix(prefix)):
        for suffix in (".bin", ".idx"):
            assert stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) == 0o644, path


# --------------------------------------------------------------------------- gpt_data pairing


def _expected_window(tokens_dataset, raw_tokens, raw_masks, index: int, seq_length: int):
    """Sample `index` cut by hand from the raw documents, at the position megatron-core's
    shuffle / sample / document indices give: (text [s+1], mask stream [s+1])."""
    position = tokens_dataset.shuffle_index[index]
    (first, offset), (last, _) = tokens_dataset.sample_index[position:position + 2]
    documents = tokens_dataset.document_index[first:last + 1]
    text = np.concatenate([raw_tokens[d] for d in documents])[offset:offset + seq_length + 1]
    mask = np.concatenate([raw_masks[d] for d in documents])[offset:offset + seq_length + 1]
    assert text.size == seq_length + 1  # training samples are never padded
    return text, mask


@pytest.mark.parametrize("epochs", [None, 3])
def test_samples_carry_the_sidecar_aligned_with_the_labels(built, data, process_group, tmp_path,
                                                           epochs):
    from token_objectives.tables.indexed_dataset import loss_mask_prefix
    from token_objectives.training.gpt_data import LossMaskedDataset

    seq_length = 16  # shorter than a document: samples start and end inside documents
    one_epoch = len(_samples(built, data.tokenizer_path, seq_length, tmp_path / "probe"))
    num_samples = None if epochs is None else epochs * one_epoch + 1
    dataset = _samples(built, data.tokenizer_path, seq_length, tmp_path / "cache",
                       num_samples)
    assert isinstance(dataset, LossMaskedDataset)
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(dataset.mask, name), getattr(dataset.tokens, name)), name
    assert dataset.mask.unique_description_hash != dataset.tokens.unique_description_hash
    raw_tokens, raw_masks = _documents(built), _documents(loss_mask_prefix(built))
    assert len(dataset) >= (num_samples or one_epoch)
    for index in range(len(dataset)):
        sample = dataset[index]
        text, mask = _expected_window(dataset.tokens, raw_tokens, raw_masks, index, seq_length)
        assert sample["tokens"].tolist() == text[:-1].tolist()
        assert sample["labels"].tolist() == text[1:].tolist()
        assert sample["loss_mask"].tolist() == mask[1:].astype(np.float32).tolist(), index
        assert sample["loss_mask"].dtype == torch.float32


def test_data_without_a_sidecar_is_unchanged(built, data, process_group, tmp_path):
    from megatron.core.datasets.gpt_dataset import GPTDataset

    plain = tmp_path / "plain"
    for suffix in (".bin", ".idx"):
        shutil.copy(str(built) + suffix, str(plain) + suffix)
    masked = _samples(built, data.tokenizer_path, 16, tmp_path / "cache")
    unmasked = _samples(plain, data.tokenizer_path, 16, tmp_path / "cache")
    assert type(unmasked) is GPTDataset
    assert len(unmasked) == len(masked)
    ones = 0
    for index in range(len(unmasked)):
        sample, reference = unmasked[index], masked[index]
        assert torch.equal(sample["tokens"], reference["tokens"])
        assert torch.equal(sample["loss_mask"], torch.ones(16))
        ones += int(reference["loss_mask"].sum())
    assert 0 < ones < 16 * len(unmasked)


def test_a_broken_sidecar_is_a_clear_error(built, data, process_group, tmp_path):
    from token_objectives.tables.indexed_dataset import loss_mask_prefix

    prefix = tmp_path / "data"
    for suffix in (".bin", ".idx"):
        shutil.copy(str(built) + suffix, str(prefix) + suffix)
    shutil.copy(loss_mask_prefix(built) + ".bin", loss_mask_prefix(prefix) + ".bin")
    with pytest.raises(FileNotFoundError, match="incomplete.*rebuild it"):
        _samples(prefix, data.tokenizer_path, 16, tmp_path / "cache")
    # A sidecar of other documents: one document fewer.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(loss_mask_prefix(prefix) + ".bin", dtype=np.uint8)
    for document in _documents(loss_mask_prefix(built))[:-1]:
        builder.add_item(torch.from_numpy(document.astype(np.uint8)))
        builder.end_document()
    builder.finalize(loss_mask_prefix(prefix) + ".idx")
    with pytest.raises(ValueError, match="does not match.*rebuild both"):
        _samples(prefix, data.tokenizer_path, 16, tmp_path / "cache")


# ------------------------------------------------------------------------- the training loops


def _torchrun(*args: str) -> None:
    """This file as a probe under torchrun, 2 processes."""
    run_checked(torchrun_command(Path(__file__), *args))


def _expected_per_step(built, seq_length: int, cache: Path, tokenizer_path: Path):
    """(mask ones, number-token labels among them) of each step's GLOBAL_BATCH samples, from
    the sidecar: sample k of step s is epoch[(s * GLOBAL_BATCH + k) % len(epoch)]."""
    from token_objectives.tables.numbers import NumberTable

    is_number = ~torch.isnan(NumberTable.from_tokenizer(tokenizer_path).values)
    epoch = _samples(built, tokenizer_path, seq_length, cache)
    ones, numbers = [], []
    for step in range(STEPS):
        samples = [epoch[(step * GLOBAL_BATCH + k) % len(epoch)] for k in range(GLOBAL_BATCH)]
        mask = torch.stack([s["loss_mask"] for s in samples]) > 0
        labels = torch.stack([s["labels"] for s in samples])
        ones.append(int(mask.sum()))
        numbers.append(int((mask & is_number[labels]).sum()))
    # The mask matters (fewer ones than positions) and the NTL check has numbers to count.
    assert all(0 < k < n < GLOBAL_BATCH * seq_length
               for n, k in zip(ones, numbers, strict=True)), (ones, numbers)
    return ones, numbers


def test_megatron_loop_counts_only_the_sidecar_ones(built, data, process_group, tmp_path):
    out = tmp_path / "megatron"
    _torchrun("megatron", str(out), str(built), str(data.tokenizer_path),
              str(data.frequencies_path))
    ones, numbers = _expected_per_step(built, MEGATRON_SEQ, tmp_path / "cache",
                                       data.tokenizer_path)
    per_rank = [json.loads((out / f"counts_rank{r}.json").read_text()) for r in (0, 1)]
    micro = GLOBAL_BATCH // 2 // 2  # per rank and step
    counted = [sum(sum(c[s * micro:(s + 1) * micro]) for c in per_rank) for s in range(STEPS)]
    assert counted == ones
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row, n, k in zip(rows, ones, numbers, strict=True):
        # Counts of the step, and the share they make.
        assert (row["counted tokens"], row["number tokens"]) == (n, k)
        assert row["number token share"] == pytest.approx(k / n, rel=1e-6)


def test_deepspeed_loop_counts_only_the_sidecar_ones(built, data, process_group, tmp_path):
    config = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    config["bf16"] = {"enabled": False}
    config["tensorboard"]["enabled"] = False
    config["gradient_accumulation_steps"] = 2
    config_path = tmp_path / "zero2.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "deepspeed"
    _torchrun("deepspeed", str(out), str(built), str(data.tokenizer_path),
              str(data.frequencies_path), str(config_path))
    ones, numbers = _expected_per_step(built, DEEPSPEED_SEQ, tmp_path / "cache",
                                       data.tokenizer_path)
    assert json.loads((out / "denominators.json").read_text()) == ones
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row, n, k in zip(rows, ones, numbers, strict=True):
        # Counts of the step, and the share they make.
        assert (row["counted tokens"], row["number tokens"]) == (n, k)
        assert row["number token share"] == pytest.approx(k / n, rel=1e-6)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    kind, *rest = sys.argv[1:]
    if kind == "megatron":
        _megatron_probe(Path(rest[0]), *rest[1:])
    else:
        _deepspeed_probe(Path(rest[0]), *rest[1:])
