"""Reference-answer correction data (arXiv 2410.14655): the model answers each prompt itself,
greedily, and the reference answer follows a correction marker; only the reference is learned.

    token-objectives build-correction-data --input qa.jsonl --model hf_model_dir \\
        --output-prefix data/correction --max-new-tokens 256

Each JSONL line {"prompt": ..., "answer": ...} becomes one document

    [prompt][own answer][marker][reference answer][EOS]

in `<prefix>.bin/.idx`, and `<prefix>_loss_mask.bin/.idx` holds the same documents' 0/1 mask:
1 on the reference answer and its EOS, 0 elsewhere. `gpt_data.gpt_dataset` pairs the two, so
both training loops read the data unchanged. The own answer comes from Hugging Face `generate`
on a local model directory (`generation.hf.greedy_answers`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from token_objectives.correction import DEFAULT_MARKER, ON_BAD_LINE
from token_objectives.generation.hf import greedy_answers, load_causal_lm, stop_ids
from token_objectives.tables.errors import InputError
from token_objectives.tables.indexed_dataset import loss_mask_prefix
from token_objectives.tables.jsonl import json_object_line
from token_objectives.tables.output_files import (
    DEFAULT_MODE,
    check_output_path,
    set_mode,
)
from token_objectives.tables.tokenizers import (
    encode_batch,
    end_of_document_id,
    list_vocab,
    load_tokenizer,
)

__all__ = [
    "DEFAULT_MARKER",
    "ON_BAD_LINE",
    "BadLine",
    "CorrectionData",
    "Example",
    "bad_lines_error",
    "build_correction_data",
    "correction_document",
    "read_examples",
]

# Examples generated and written per round: bounds memory, keeps length-sorted batches useful.
_BATCHES_PER_CHUNK = 32
_LISTED_IN_ERRORS = 20


@dataclass(frozen=True)
class Example:
    """One usable JSONL line; `line` is its 1-based line number in the file."""

    line: int
    prompt: str
    answer: str


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


@dataclass(frozen=True)
class CorrectionData:
    """What `build_correction_data` wrote.

    prefix / mask_prefix: indexed-dataset prefixes (without .bin/.idx) of the tokens and of the
    loss mask. num_tokens: all tokens written; num_loss_tokens: the mask's ones.
    skipped: the bad lines left out (only with on_bad_line="skip").
    """

    prefix: Path
    mask_prefix: Path
    num_documents: int
    num_tokens: int
    num_loss_tokens: int
    skipped: tuple[BadLine, ...]


# ------------------------------------------------------------------------------------ input


def read_examples(path: str | os.PathLike) -> tuple[list[Example], list[BadLine]]:
    """The usable lines of a JSONL file and the bad ones, both in file order.

    A line is bad when it is not UTF-8, not a JSON object, or its "prompt" / "answer" is
    missing, not a string, or blank. Blank lines are bad too: nothing is dropped unreported.
    """
    examples, bad = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            example, reason = _parse_line(number, raw)
            if example is not None:
                examples.append(example)
            else:
                bad.append(BadLine(number, reason))
    return examples, bad


def _parse_line(number: int, raw: bytes) -> tuple[Example | None, str]:
    record, reason = json_object_line(raw, ("prompt", "answer"))
    if record is None:
        return None, reason
    for field in ("prompt", "answer"):
        if not isinstance(record[field], str):
            return None, f'"{field}" is a {type(record[field]).__name__}, not a string'
        if not record[field].strip():
            return None, f'"{field}" is empty'
    return Example(number, record["prompt"], record["answer"]), ""


def bad_lines_error(path: str | os.PathLike, bad: Sequence[BadLine]) -> InputError:
    """The error for bad lines in on_bad_line="error" mode: names the lines and the flag."""
    listed = "; ".join(f"line {b.line}: {b.reason}" for b in bad[:_LISTED_IN_ERRORS])
    more = f"; and {len(bad) - _LISTED_IN_ERRORS} more" if len(bad) > _LISTED_IN_ERRORS else ""
    return InputError(
        f"{path}: {len(bad)} bad line(s): {listed}{more}. Fix them, or pass --on-bad-line skip "
        f"(on_bad_line='skip') to leave them out with a report"
    )


def _skip_report(path: str | os.PathLike, bad: Sequence[BadLine]) -> str:
    lines = [f"skipped {len(bad)} bad line(s) of {path}:"]
    lines += [f"  line {b.line}: {b.reason}" for b in bad]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- layout


def correction_document(prompt: Sequence[int], own_answer: Sequence[int], marker: Sequence[int],
                        answer: Sequence[int], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask), both [n]: [prompt][own answer][marker][answer][EOS] and its loss mask,
    1 exactly on the answer and the EOS."""
    context = [*prompt, *own_answer, *marker]
    tokens = np.asarray([*context, *answer, eos_id], dtype=np.int64)
    mask = np.zeros(tokens.size, dtype=np.uint8)
    mask[len(context):] = 1
    return tokens, mask


# ---------------------------------------------------------------------------------- writing


class _DocumentPairWriter:
    """Tokens and mask as two indexed datasets, written under temporary names. `finalize`
    moves them in place mask first: a build that stops early leaves any earlier pair intact,
    and a token .idx never appears without its sidecar."""

    def __init__(self, prefix: Path, token_dtype, mode: int = DEFAULT_MODE) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.mode = mode
        self.targets = [str(prefix), loss_mask_prefix(prefix)]
        self.partials = [target + ".partial" for target in self.targets]
        self.builders = [IndexedDatasetBuilder(partial + ".bin", dtype=dtype)
                         for partial, dtype in zip(self.partials, (token_dtype, np.uint8),
                                                   strict=True)]

    def add(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        for builder, values in zip(self.builders, (tokens, mask), strict=True):
            builder.add_item(torch.from_numpy(values))
            builder.end_document()

    def finalize(self) -> None:
        for builder, partial in zip(self.builders, self.partials, strict=True):
            builder.finalize(partial + ".idx")
        for partial, target in zip(reversed(self.partials), reversed(self.targets), strict=True):
            for suffix in (".bin", ".idx"):
                set_mode(partial + suffix, self.mode)
                os.replace(partial + suffix, target + suffix)


# ------------------------------------------------------------------------------------ build


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_correction_data(
    input_path: str | os.PathLike,
    model_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    marker: str = DEFAULT_MARKER,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    on_bad_line: str = "error",
    dtype: str = "float32",
    device: str | None = None,
    progress: bool = True,
    printer: Callable[[str], None] | None = _print_stderr,
    mode: int = DEFAULT_MODE,
) -> CorrectionData:
    """JSONL (prompt, answer) lines -> the model's greedy answers -> correction documents.

    model_path: a local Hugging Face causal-LM directory (never downloaded). tokenizer_path:
    the training run's tokenizer (`tokenizer_io.load_tokenizer`); default the model directory.
    marker: text between the own answer and the reference, tokenised on its own ("" for none).
    on_bad_line: "error" raises before any generation, naming every bad line; "skip" leaves
    them out and reports them through `printer`. dtype / device: of the generating model
    (device default: cuda when available). Documents are written in input order, in files of
    permission bits `mode` whatever the umask. The directory of `output_prefix` must exist.
    A tokenizer_path whose vocabulary (id -> token) is not that of the model directory's own
    tokenizer is refused.
    """
    if on_bad_line not in ON_BAD_LINE:
        raise InputError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
    if max_new_tokens < 1 or batch_size < 1:
        raise InputError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must "
                         f"be at least 1")
    # Before the generation, which can take hours: a prefix that cannot be written fails now.
    output_prefix = check_output_path(output_prefix, "--output-prefix")
    examples, bad = read_examples(input_path)
    if bad and on_bad_line == "error":
        raise bad_lines_error(input_path, bad)
    if bad and printer is not None:
        printer(_skip_report(input_path, bad))
    if not examples:
        raise InputError(f"{input_path} holds no usable line: each line needs a JSON object "
                         f'with non-empty string "prompt" and "answer" fields')

    tokenizer = load_tokenizer(model_path if tokenizer_path is None else tokenizer_path)
    if tokenizer_path is not None:
        _check_is_the_models_tokenizer(tokenizer, tokenizer_path, model_path)
    eos_id = end_of_document_id(tokenizer)
    marker_ids = encode_batch(tokenizer, [marker])[0] if marker else []
    model = load_causal_lm(model_path, dtype, device)
    tokenizer_size = list_vocab(tokenizer).size
    model_vocab = model.get_input_embeddings().num_embeddings
    if tokenizer_size > model_vocab:
        raise InputError(f"the tokenizer has {tokenizer_size} ids but the model {model_path} only "
                         f"{model_vocab} embeddings: pass the tokenizer the model was trained with")
    chunk_size = batch_size * _BATCHES_PER_CHUNK
    _check_prompts(examples, tokenizer, chunk_size, max_new_tokens,
                   getattr(model.config, "max_position_embeddings", None))
    stop = stop_ids(model, eos_id)

    with warnings.catch_warnings():
        # megatron-core warns at import about optional GPU libraries that writing never uses.
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
        from megatron.core.datasets.indexed_dataset import DType

    # Generated ids may reach the model's (padded) vocab, beyond the tokenizer's.
    writer = _DocumentPairWriter(output_prefix, DType.optimal_dtype(model_vocab), mode)
    num_tokens = num_loss_tokens = 0
    with tqdm(total=len(examples), unit="ex", disable=not progress) as bar:
        for chunk in _chunks(examples, chunk_size):
            prompts = encode_batch(tokenizer, [e.prompt for e in chunk])
            answers = encode_batch(tokenizer, [e.answer for e in chunk])
            own = greedy_answers(model, prompts, max_new_tokens, stop, batch_size)
            for prompt, own_answer, answer in zip(prompts, own, answers, strict=True):
                tokens, mask = correction_document(prompt, own_answer, marker_ids, answer, eos_id)
                writer.add(tokens, mask)
                num_tokens += tokens.size
                num_loss_tokens += int(np.count_nonzero(mask))
            bar.update(len(chunk))
    writer.finalize()
    return CorrectionData(output_prefix, Path(loss_mask_prefix(output_prefix)), len(examples),
                          num_tokens, num_loss_tokens, tuple(bad))


def _model_tokenizer(model_path: str | os.PathLike):
    """The tokenizer saved in the model directory, or None when it holds none."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if os.path.isfile(os.path.join(model_path, name)):
            return load_tokenizer(os.path.join(model_path, name))
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    except (OSError, ValueError):  # what transformers raises for a directory without one
        return None


def _check_is_the_models_tokenizer(tokenizer, tokenizer_path, model_path) -> None:
    """Refuse a tokenizer whose id -> token mapping is not that of the model's own tokenizer:
    a vocabulary of the same size but other tokens would train on ids the model reads as
    other text. Without a tokenizer in the model directory, only the sizes can be compared."""
    own = _model_tokenizer(model_path)
    if own is None:
        return
    given, expected = list_vocab(tokenizer).pieces, list_vocab(own).pieces
    if given == expected:
        return
    differing = sorted(i for i in given.keys() | expected.keys()
                       if given.get(i) != expected.get(i))
    first = differing[0]
    raise InputError(
        f"--tokenizer {tokenizer_path} is not the tokenizer of the model {model_path}: "
        f"{len(differing)} ids map to other tokens (id {first} is {given.get(first)!r} in it, "
        f"{expected.get(first)!r} in the model's); pass the tokenizer the model was trained "
        f"with, or leave --tokenizer out to use the model directory's"
    )


def _check_prompts(examples: list[Example], tokenizer, chunk_size: int, max_new_tokens: int,
                   max_positions: int | None) -> None:
    """Before any generation: every prompt has tokens and leaves room for the answer."""
    for chunk in _chunks(examples, chunk_size):
        for example, prompt in zip(chunk, encode_batch(tokenizer, [e.prompt for e in chunk]),
                                   strict=True):
            if not prompt:
                raise InputError(f"line {example.line}: the prompt encodes to no token")
            if max_positions is not None and len(prompt) + max_new_tokens > max_positions:
                raise InputError(
                    f"line {example.line}: the prompt has {len(prompt)} tokens, which with "
                    f"--max-new-tokens {max_new_tokens} exceeds the model's {max_positions} "
                    f"positions; lower --max-new-tokens or shorten the prompt"
                )
