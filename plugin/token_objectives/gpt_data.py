"""Data for the training loops: megatron-core's GPTDataset over .bin/.idx, and the order in
which data-parallel ranks and micro-batches read it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from token_objectives.tokenizer_io import list_vocab, load_tokenizer


class MegatronTokenizer:
    """What megatron-core's GPTDataset asks of a tokenizer: eod, pad and vocab_size."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokenizer = load_tokenizer(path)
        listing = list_vocab(self._tokenizer)
        self.vocab_size = listing.size
        self.eod = _end_of_document_id(self._tokenizer)
        self.pad = -1
        # Part of the dataset cache key: a different tokenizer must not reuse the cached index.
        self.unique_identifiers = {"class": type(self).__name__, "path": str(path),
                                   "vocab_size": self.vocab_size}


def _end_of_document_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    if callable(eos) and eos() >= 0:
        return int(eos())  # sentencepiece
    for token in ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"):
        token_id = tokenizer.token_to_id(token) if hasattr(tokenizer, "token_to_id") else None
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has no end-of-document token (</s>, <eos>, <|endoftext|>)")


def gpt_dataset(prefix: str | None, seq_length: int, seed: int, tokenizer: MegatronTokenizer,
                num_samples: int | None, cache: Path):
    """megatron-core's GPTDataset over one .bin/.idx prefix: `num_samples` sequences, or one
    epoch for None."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if prefix is None:
        raise ValueError("data.train_prefix is not set: point it at a Megatron .bin/.idx prefix")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="100,0,0",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache),
    )
    built = None
    # Rank 0 writes the index cache first; the others then read it.
    for turn in (0, 1):
        if (dist.get_rank() == 0) == (turn == 0):
            built = BlendedMegatronDatasetBuilder(
                GPTDataset, [num_samples, None, None], lambda: True, config
            ).build()[0]
        dist.barrier()
    return built


class Repeated:
    """One seeded epoch of a dataset, repeated: sample k is epoch[k % len].

    The order does not depend on the number of steps, so a run can be resumed with more steps
    and still see the samples a straight run would.
    """

    def __init__(self, epoch) -> None:
        if len(epoch) == 0:
            raise ValueError("the dataset has no sample of the sequence length")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.epoch)

    def __getitem__(self, index: int) -> dict:
        return self.epoch[index % len(self.epoch)]


def micro_batches(dataset, step: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  num_micro: int) -> Iterator[dict]:
    """This DP rank's micro-batches of global step `step` (0-based).

    Global sample order: step * global_batch + micro * (mbs * dp) + dp_rank * mbs + i, so DP=2 and
    DP=1 with twice the micro-batches see the same samples.
    """
    mbs = micro_batch_size
    base = step * mbs * dp_size * num_micro
    for micro in range(num_micro):
        first = base + micro * mbs * dp_size + dp_rank * mbs
        samples = [dataset[first + i] for i in range(mbs)]
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
               for key in ("tokens", "labels", "loss_mask", "position_ids")}


