"""Data for the training loops: megatron-core's GPTDataset over .bin/.idx, and the order in
which data-parallel ranks and micro-batches read it.

A prefix may come with a loss-mask sidecar, `<prefix>_loss_mask.bin/.idx` (written by
`token-objectives build-correction-data`): an indexed dataset with the same document lengths
holding 0/1 per token. Then only the positions whose label token has a 1 there count in the loss.

megatron-core caches a GPTDataset's indices (`path_to_cache`, the loops' <output>/data_cache)
under a key of the prefix and the config, not of the data. `sources.json` beside them records
the .idx each prefix's indices were built from; a dataset rebuilt at the same prefix has its
cached indices deleted and rebuilt, with a one-line note, instead of indexing into the new data.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy
import torch
import torch.distributed as dist

from token_objectives.tables.indexed_dataset import check_indexed_dataset, loss_mask_prefix
from token_objectives.tables.tokenizers import end_of_document_id, list_vocab, load_tokenizer


class MegatronTokenizer:
    """What megatron-core's GPTDataset asks of a tokenizer: eod, pad and vocab_size."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokenizer = load_tokenizer(path)
        listing = list_vocab(self._tokenizer)
        self.vocab_size = listing.size
        self.eod = end_of_document_id(self._tokenizer)
        self.pad = -1
        # Part of the dataset cache key: a different tokenizer must not reuse the cached index.
        self.unique_identifiers = {"class": type(self).__name__, "path": str(path),
                                   "vocab_size": self.vocab_size}


def _sidecar(prefix: str) -> str | None:
    """The loss-mask sidecar prefix of `prefix` (checked against it), or None without one."""
    mask = loss_mask_prefix(prefix)
    present = [Path(mask + suffix).is_file() for suffix in (".bin", ".idx")]
    if not any(present):
        return None
    if not all(present):
        raise FileNotFoundError(
            f"the loss-mask sidecar {mask}.bin/.idx is incomplete (only one of the two files "
            f"exists); rebuild it (token-objectives build-correction-data) or delete it"
        )
    check_indexed_dataset(mask)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # Both datasets stay referenced: their lengths are views of memory maps closed on deletion.
    token_data, mask_data = IndexedDataset(prefix), IndexedDataset(mask)
    token_lengths, mask_lengths = token_data.sequence_lengths, mask_data.sequence_lengths
    if not numpy.array_equal(token_lengths, mask_lengths):
        raise ValueError(
            f"the loss-mask sidecar {mask}.bin/.idx does not match {prefix}.bin/.idx "
            f"({len(mask_lengths)} vs {len(token_lengths)} documents, or other lengths); "
            f"rebuild both with token-objectives build-correction-data"
        )
    return mask


def gpt_dataset(prefix: str | None, seq_length: int, seed: int, tokenizer: MegatronTokenizer,
                num_samples: int | None, cache: Path):
    """megatron-core's GPTDataset over one .bin/.idx prefix: `num_samples` sequences, or one
    epoch for None. With a loss-mask sidecar next to the prefix, a `LossMaskedDataset` over
    both instead; without one, the GPTDataset itself."""
    if prefix is None:
        raise ValueError("data.train_prefix is not set: point it at a Megatron .bin/.idx prefix")
    prefix = str(prefix)
    # At start-up, with the path: megatron-core would read a truncated .bin up to the first
    # sample past its end and fail there with a numpy message, on every resume at that step.
    check_indexed_dataset(prefix)
    mask_prefix = _sidecar(prefix)
    built = mask = None
    # Rank 0 writes the index cache first; the others then read it.
    for turn in (0, 1):
        if (dist.get_rank() == 0) == (turn == 0):
            if turn == 0:
                for source in (prefix, mask_prefix):
                    if source is not None:
                        refresh_cache(source, Path(cache))
            built = _build(prefix, seq_length, seed, tokenizer, num_samples, cache)
            if mask_prefix is not None:
                # Same config, other path: the cache key differs, the indices do not.
                mask = _build(mask_prefix, seq_length, seed, tokenizer, num_samples, cache)
        dist.barrier()
    return built if mask is None else LossMaskedDataset(built, mask)


SOURCES = "sources.json"


def refresh_cache(prefix: str, cache: Path) -> None:
    """Rank 0, before megatron-core builds or loads the cached indices of `prefix` in `cache`:
    unless `cache`/sources.json records this very `prefix`.idx, delete them (with a one-line
    note on stderr) so that megatron-core builds them again, and record the .idx.

    The indices depend only on the .idx (the sequence lengths and document boundaries) and the
    config, so the record is the .idx's sha256; its size and mtime spare the hashing while the
    file is unchanged.
    """
    sources_path = cache / SOURCES
    try:
        sources = json.loads(sources_path.read_text()) if sources_path.is_file() else {}
    except ValueError:
        sources = {}  # edited by hand: as if absent, so every cached index is rebuilt once
    recorded = sources.get(prefix)
    source = _idx_source(prefix, recorded)
    cached = _cached_files(prefix, cache)
    if cached and (recorded is None or recorded.get("sha256") != source["sha256"]):
        why = (f"were built from another {prefix}.idx" if recorded is not None
               else "have no record of the .idx they were built from")  # before sources.json
        print(f"{cache}: the cached indices of {prefix} {why}; rebuilding them",
              file=sys.stderr, flush=True)
        for path in cached:
            path.unlink()
    if source != recorded:
        cache.mkdir(parents=True, exist_ok=True)
        sources[prefix] = source
        partial = sources_path.with_suffix(".partial")
        partial.write_text(json.dumps(sources, indent=1))
        partial.replace(sources_path)


def _idx_source(prefix: str, recorded: dict | None) -> dict:
    """The record of `prefix`.idx: its size, mtime and sha256 (`recorded` itself while the
    size and mtime are unchanged: no hashing)."""
    stat = os.stat(prefix + ".idx")
    source = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if recorded is not None and all(recorded.get(key) == value for key, value in source.items()):
        return recorded
    digest = hashlib.sha256()
    with open(prefix + ".idx", "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    source["sha256"] = digest.hexdigest()
    return source


def _cached_files(prefix: str, cache: Path) -> list[Path]:
    """The files megatron-core cached for `prefix` in `cache`: every
    `<hash>-<class>-<split>-*` whose description.txt names `prefix` as its dataset_path."""
    files = []
    for description in cache.glob("*-description.txt"):
        try:
            dataset_path = json.loads(description.read_text()).get("dataset_path")
        except (OSError, ValueError, AttributeError):
            continue  # not a description megatron-core wrote
        if dataset_path == prefix:
            base = description.name[:-len("description.txt")]
            files += [path for path in cache.glob(f"{base}*") if path.is_file()]
    return files


def _build(prefix: str, seq_length: int, seed: int, tokenizer: MegatronTokenizer,
           num_samples: int | None, cache: Path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

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
    return BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, None, None], lambda: True, config
    ).build()[0]


class LossMaskedDataset:
    """GPTDataset samples whose loss_mask also needs a 1 in the loss-mask sidecar.

    tokens, mask: GPTDatasets over `prefix` and `<prefix>_loss_mask`, built with one config.
    Their document, sample and shuffle indices depend only on the document lengths, the seed,
    the sequence length, the split and the number of samples, so sample k spans the same token
    positions in both. labels[i] is text[i + 1], so the mask sample's own labels (stream element
    i + 1, padding read as 0) line up with the token sample's labels. Samples are dicts of
    [seq_length] tensors, as the GPTDataset's.
    """

    def __init__(self, tokens, mask) -> None:
        if len(tokens) != len(mask):
            raise ValueError(f"{len(tokens)} token samples but {len(mask)} loss-mask samples")
        self.tokens = tokens
        self.mask = mask

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.tokens[index])
        # Only a 1 counts: GPTDataset pads with the pad id and maps it to 0, never 1.
        keep = self.mask[index]["labels"] == 1
        sample["loss_mask"] = sample["loss_mask"] * keep.to(sample["loss_mask"].dtype)
        return sample


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


