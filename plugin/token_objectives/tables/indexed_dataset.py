"""The check of a Megatron indexed dataset (.bin/.idx) before anything reads it, and the name of
its loss-mask sidecar (written by `token-objectives build-correction-data`, read by the loops)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from token_objectives.tables.errors import InputError

# megatron-core's .idx header (megatron/core/datasets/indexed_dataset.py, _IndexWriter): magic,
# <Q version, <B dtype code, <Q sequence count, <Q document count; then int32 sizes [sequences],
# int64 byte pointers [sequences], int64 document indices [documents], and for multimodal
# datasets int8 modes [sequences].
_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
           7: np.float32, 8: np.uint16}
_REBUILD = "rebuild it with Megatron's preprocess_data.py (or the tool that wrote it)"
# Elements compared per round: bounds the memory the check needs on billion-sequence datasets.
_CHUNK = 1 << 24
LOSS_MASK_SUFFIX = "_loss_mask"


def loss_mask_prefix(prefix: str | Path) -> str:
    """The loss-mask sidecar's .bin/.idx prefix of a dataset prefix."""
    return f"{prefix}{LOSS_MASK_SUFFIX}"


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """What a checked .bin/.idx pair holds: `num_tokens` tokens of `dtype`, back to back from
    byte 0 of the .bin, in `num_sequences` sequences and `num_documents` documents."""

    prefix: str
    dtype: np.dtype
    num_sequences: int
    num_documents: int
    num_tokens: int


def check_indexed_dataset(prefix: str | os.PathLike) -> IndexedDatasetInfo:
    """Check a Megatron indexed dataset before it is read; returns what it holds.

    Reads the .idx header and arrays (memory-mapped) and checks: the magic, the version and
    the dtype code; that the .idx size is what its counts give; that the sizes are >= 0, the
    pointers follow them and the document indices run from 0 to the sequence count; that the
    .bin holds exactly the bytes the last pointer and size end at. Raises FileNotFoundError
    when a file is missing, InputError (naming the file, what is wrong and the fix) otherwise.
    """
    prefix = str(prefix)
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"indexed dataset {prefix!r}: {path} not found (pass the path prefix without "
                ".bin/.idx, as for Megatron's --data-path)"
            )
    idx_bytes = os.path.getsize(idx)
    if idx_bytes < _HEADER.size:
        raise InputError(
            f"{idx} holds {idx_bytes} bytes, less than the {_HEADER.size}-byte header of a "
            f"Megatron index: it is truncated or empty; {_REBUILD}"
        )
    with open(idx, "rb") as file:
        magic, version, code, sequences, documents = _HEADER.unpack(file.read(_HEADER.size))
    if magic != _MAGIC:
        raise InputError(
            f"{idx} does not start with Megatron's index magic {_MAGIC!r} (found {magic!r}): "
            f"it is not a Megatron .idx, or it is corrupt; {_REBUILD}"
        )
    if version != _VERSION:
        raise InputError(f"{idx} has index version {version}, megatron-core reads {_VERSION}: "
                         f"the header is corrupt; {_REBUILD}")
    if code not in _DTYPES:
        raise InputError(f"{idx} has dtype code {code}, not one of megatron-core's "
                         f"{sorted(_DTYPES)}: the header is corrupt; {_REBUILD}")
    dtype = np.dtype(_DTYPES[code])
    expected = _HEADER.size + sequences * (4 + 8) + documents * 8
    if idx_bytes not in (expected, expected + sequences):  # without / with the multimodal modes
        raise InputError(
            f"{idx} holds {idx_bytes} bytes but its header ({sequences} sequences, {documents} "
            f"documents) says {expected}: the .idx is truncated or corrupt; {_REBUILD}"
        )
    arrays = np.memmap(idx, dtype=np.uint8, mode="r")
    sizes = arrays[_HEADER.size:_HEADER.size + 4 * sequences].view(np.int32)
    start = _HEADER.size + 4 * sequences
    pointers = arrays[start:start + 8 * sequences].view(np.int64)
    start += 8 * sequences
    document_index = arrays[start:start + 8 * documents].view(np.int64)
    end = _check_pointers(idx, sizes, pointers, dtype.itemsize)
    _check_documents(idx, document_index, sequences)
    bin_bytes = os.path.getsize(bin_)
    if bin_bytes != end:
        what = "truncated" if bin_bytes < end else "longer than its index: the .idx is stale"
        raise InputError(
            f"{bin_} holds {bin_bytes} bytes but {idx} says {end}: the .bin is {what}; "
            f"{_REBUILD}"
        )
    # The document indices are the boundaries: one more than the documents.
    return IndexedDatasetInfo(prefix, dtype, int(sequences), int(documents) - 1,
                              end // dtype.itemsize)


def _check_pointers(idx: str, sizes: np.ndarray, pointers: np.ndarray, itemsize: int) -> int:
    """Check that sequence i starts where sequence i - 1 ends (Megatron writes them back to
    back from byte 0); returns the byte where the last one ends."""
    end = 0
    for first in range(0, sizes.size, _CHUNK):
        chunk = np.asarray(sizes[first:first + _CHUNK], dtype=np.int64)
        if (chunk < 0).any():
            bad = first + int(np.argmax(chunk < 0))
            raise InputError(f"{idx}: sequence {bad} has size {int(sizes[bad])}: the .idx is "
                             f"corrupt; {_REBUILD}")
        ends = end + np.cumsum(chunk * itemsize)
        starts = np.concatenate(([end], ends[:-1]))
        wrong = starts != pointers[first:first + _CHUNK]
        if wrong.any():
            bad = first + int(np.argmax(wrong))
            raise InputError(
                f"{idx}: sequence {bad} points to byte {int(pointers[bad])}, but the sizes before "
                f"it end at byte {int(starts[bad - first])}: the .idx is corrupt; {_REBUILD}"
            )
        end = int(ends[-1])
    return end


def _check_documents(idx: str, document_index: np.ndarray, sequences: int) -> None:
    """Megatron's document indices: 0, then the sequence count after each document."""
    ok = document_index.size > 0 and document_index[0] == 0 and document_index[-1] == sequences
    steps = np.diff(document_index)
    if not ok or (steps < 0).any():
        raise InputError(
            f"{idx}: the document indices do not run from 0 up to the {sequences} sequences: "
            f"the .idx is corrupt; {_REBUILD}"
        )
