"""Batched greedy generation for `evaluate`: a Megatron-loop model (the model a training run
holds, or a dist checkpoint read by `training.evaluation_checkpoint`, since this package sits
below training/) or a local Hugging Face model directory.

Both backends take prompts as text and return each generation as text, cut before the first
newline when `stop_at_newline` (the corpus writes one answer per line). Prompts are sorted by
token length and batched, so that rows of a batch need little or no padding; a tqdm bar counts
the prompts done. Nothing is downloaded.

Megatron: GPTModel has no KV cache here, so each new token is one forward over the whole window
(at most model.seq_length tokens, cut on the left); a batch holds prompts of one token length
only, so no padding enters the causal attention. The next id is `vocab_parallel_argmax` over the
vocab-sharded logits (one TP all-reduce; every TP rank gets the same id, so every TP rank must
call this with the same prompts). Hugging Face: `generation.hf.greedy_answers` (left
padding, `generate`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from token_objectives.tables.errors import InputError
from token_objectives.tables.tokenizers import encode_batch

__all__ = ["HFGenerator", "MegatronGenerator", "batched_by_length"]

IdsFunction = Callable[[list[list[int]]], list[list[int]]]


def batched_by_length(prompts: Sequence[list[int]], batch_size: int, generate: IdsFunction,
                      same_length: bool = False, progress: bool = False,
                      description: str = "evaluate") -> list[list[int]]:
    """generate(batch) over batches of at most `batch_size` prompts (longest first; with
    `same_length` only prompts of one length share a batch); results in the prompts' order."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    batches, current = [], []
    for index in order:
        if current and (len(current) == batch_size or (
                same_length and len(prompts[index]) != len(prompts[current[0]]))):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    results: list[list[int]] = [[] for _ in prompts]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=description, unit="prompt")
    try:
        for rows in batches:
            for row, ids in zip(rows, generate([list(prompts[i]) for i in rows]), strict=True):
                results[row] = ids
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    return results


def _until(ids: list[int], stop: Sequence[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop:
            return ids[:position]
    return ids


def _continuation(tokenizer, prompt_ids: list[int], new_ids: list[int],
                  stop_at_newline: bool) -> str:
    """The text the new ids add to the prompt's (decoded together: sentencepiece drops a
    leading space of a text decoded alone)."""
    prompt_text = tokenizer.decode(prompt_ids)
    text = tokenizer.decode(prompt_ids + new_ids)
    text = text[len(prompt_text):] if text.startswith(prompt_text) else tokenizer.decode(new_ids)
    return text.split("\n", 1)[0] if stop_at_newline else text


def _newline_id(tokenizer) -> int | None:
    """The id of a token that is exactly "\\n", when the tokenizer has one (a stop id)."""
    ids = encode_batch(tokenizer, ["\n"])[0]
    return ids[-1] if len(ids) >= 1 and tokenizer.decode(ids[-1:]) == "\n" else None


class MegatronGenerator:
    """Greedy generation with a Megatron-loop GPTModel (TP = any, PP = 1).

    model: the GPTModel (not the DDP wrapper); tokenizer: the loop's tokenizer (sentencepiece or
    HF tokenizers); eod: its end-of-document id, put before each prompt as the training stream
    has it before each document; real_vocab: ids at and above are padding, never chosen.
    """

    def __init__(self, model, tokenizer, eod: int, real_vocab: int, seq_length: int,
                 tp_group=None) -> None:
        self.model, self.tokenizer, self.eod = model, tokenizer, eod
        self.real_vocab, self.seq_length, self.tp_group = real_vocab, seq_length, tp_group
        # Sequence parallelism splits the sequence over the TP ranks: the window is padded on
        # the right to a multiple of TP, which the causal attention keeps out of the real
        # positions' logits.
        config = getattr(model, "config", None)
        self.length_multiple = (config.tensor_model_parallel_size
                                if getattr(config, "sequence_parallel", False) else 1)

    @torch.no_grad()
    def ids(self, prompts: list[list[int]], max_new_tokens: int,
            stop: Sequence[int]) -> list[list[int]]:
        """One batch of prompts of one length: each one's new ids before its first stop id."""
        from token_objectives.ops.sampling import vocab_parallel_argmax

        device = next(self.model.parameters()).device
        tokens = torch.tensor(prompts, dtype=torch.long, device=device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        stop_ids = torch.tensor(list(stop), device=device)
        start = tokens.shape[1]
        for _ in range(max_new_tokens):
            window = tokens[:, -self.seq_length:]
            length = window.shape[1]
            pad = -length % self.length_multiple
            if pad:
                window = torch.cat([window, window.new_full((len(prompts), pad), self.eod)], 1)
            positions = torch.arange(window.shape[1], device=device).expand_as(window)
            logits = self.model(window, positions, None)[:, length - 1]  # [b, V/tp]
            chosen = vocab_parallel_argmax(logits, self.tp_group, real_vocab=self.real_vocab)
            chosen = torch.where(done, torch.full_like(chosen, stop[0]), chosen)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            done |= torch.isin(chosen, stop_ids)
            if bool(done.all()):  # the same on every TP rank: the ids are
                break
        return [_until(row, stop) for row in tokens[:, start:].tolist()]

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                 stop_at_newline: bool = True, progress: bool = False) -> list[str]:
        """The greedy continuation of each prompt, as text."""
        stop = [self.eod]
        newline = _newline_id(self.tokenizer) if stop_at_newline else None
        if newline is not None:
            stop.append(newline)
        encoded = [[self.eod, *ids] for ids in encode_batch(self.tokenizer, list(prompts))]
        was_training = self.model.training
        self.model.eval()
        try:
            new = batched_by_length(encoded, batch_size,
                                    lambda batch: self.ids(batch, max_new_tokens, stop),
                                    same_length=True, progress=progress)
        finally:
            self.model.train(was_training)
        return [_continuation(self.tokenizer, ids[1:], out, stop_at_newline)
                for ids, out in zip(encoded, new, strict=True)]


class HFGenerator:
    """Greedy generation with a local Hugging Face causal LM directory and its tokenizer."""

    def __init__(self, path: str | os.PathLike, dtype: str = "float32") -> None:
        from transformers import AutoTokenizer

        from token_objectives.generation.hf import load_causal_lm

        self.model = load_causal_lm(path, dtype=dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                 stop_at_newline: bool = True, progress: bool = False) -> list[str]:
        from token_objectives.generation.hf import greedy_answers, stop_ids
        from token_objectives.tables.tokenizers import end_of_document_id

        stop = stop_ids(self.model, end_of_document_id(self.tokenizer))
        newline = _newline_id(self.tokenizer) if stop_at_newline else None
        if newline is not None and newline not in stop:
            stop.append(newline)
        encoded = self.tokenizer(list(prompts))["input_ids"]  # with the model's BOS, if any
        new = batched_by_length(
            encoded, batch_size,
            lambda batch: greedy_answers(self.model, batch, max_new_tokens, stop, len(batch)),
            progress=progress)
        return [_continuation(self.tokenizer, ids, out, stop_at_newline)
                for ids, out in zip(encoded, new, strict=True)]
