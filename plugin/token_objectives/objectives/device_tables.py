"""The per-run tables on the device the logits live on, copied once and cached.

A NumberTable's values and word starts, the PDL weights, a vocab shard's number columns and the
squash constants are the same for every micro-batch. Copying them host -> device per call is a
copy (and, from pageable memory, a stall) per micro-batch; here each is made once per (table,
device, dtype) and kept. The cache holds the source tensor, so that its id, the key, is never
reused by another table while the entry lives. Pure torch, no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from token_objectives.ops.layout import VocabLayout
from token_objectives.ops.plan import Distance, VocabShard, vocab_shard
from token_objectives.tables.numbers import NumberTable

MAX_ENTRIES = 256
T = TypeVar("T")
_CACHE: dict[tuple, tuple[object, object]] = {}
_NO_TABLE = object()  # the source of the entries built without a NumberTable
# How many entries were built: the test that repeated calls copy nothing reads it.
builds = 0


def _cached(source: object, key: tuple, build: Callable[[], T]) -> T:
    global builds
    full_key = (id(source), *key)
    hit = _CACHE.get(full_key)
    if hit is not None and hit[0] is source:
        return hit[1]
    if len(_CACHE) >= MAX_ENTRIES:
        _CACHE.clear()
    value = build()
    builds += 1
    _CACHE[full_key] = (source, value)
    return value


def on_device(table: torch.Tensor, device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """`table` on `device` (in `dtype`), copied on the first call only."""
    dtype = dtype or table.dtype
    if table.device == torch.device(device) and table.dtype == dtype:
        return table
    return _cached(table, ("on_device", str(device), dtype),
                   lambda: table.to(device=device, dtype=dtype))


def shard_of(numbers: NumberTable | None, layout: VocabLayout,
             device: torch.device) -> VocabShard:
    """The VocabShard of `layout` (its number columns and values on `device`)."""
    if numbers is None:  # keyed on the layout's value: each call resolves a new, equal one
        return _cached(_NO_TABLE, ("shard", layout, str(device)),
                       lambda: vocab_shard(None, layout, device))
    groups = numbers.digit_counts if numbers.grouped else None
    return _cached(numbers.values, ("shard", layout, str(device)),
                   lambda: vocab_shard(numbers.values, layout, device, groups))


def distance_for(numbers: NumberTable, squash_factor: float | None) -> Distance:
    """Distance.for_values over the table's number values (host work, done once)."""
    return _cached(numbers.values, ("distance", squash_factor), lambda: Distance.for_values(
        numbers.values[numbers.is_number], squash_factor))


def max_distance_for(numbers: NumberTable, distance: Distance) -> float:
    """The largest distance between two of the table's number values (Wasserstein's scale)."""
    return _cached(numbers.values, ("max_distance", distance), lambda: distance.max_distance(
        numbers.values[numbers.is_number]))


def group_bounds_for(numbers: NumberTable, device: torch.device) -> torch.Tensor:
    """float64 [G + 1, 2] (lowest, highest) number value of each group of a grouped table
    (group = digit count; rows of absent groups hold 0, 0), on `device`."""
    def build() -> torch.Tensor:
        counts = numbers.digit_counts[numbers.is_number].long()
        values = numbers.values[numbers.is_number].double()
        bounds = torch.zeros(int(counts.max()) + 1, 2, dtype=torch.float64)
        for group in counts.unique().tolist():
            members = values[counts == group]
            bounds[group] = torch.stack([members.min(), members.max()])
        return bounds.to(device)
    return _cached(numbers.values, ("group_bounds", str(device)), build)
