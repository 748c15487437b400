"""The per-run tables on the device the logits live on, copied once and kept by their owner.

A NumberTable's values and word starts, the PDL weights, a vocab shard's number columns and the
squash constants are the same for every micro-batch. Copying them host -> device per call is a
copy (and, from pageable memory, a stall) per micro-batch; a `DeviceTables` makes each once per
(table, device, dtype) and keeps it. Each `Objective` owns one, so the copies live exactly as
long as the objective that uses them; no module-level cache. An entry holds its source tensor,
so that the source's id, part of the key, is never reused by another table while it lives.
Pure torch, no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from token_objectives.ops.layout import VocabLayout
from token_objectives.ops.plan import Distance, VocabShard, vocab_shard
from token_objectives.tables.numbers import NumberTable

T = TypeVar("T")
_NO_TABLE = object()  # the source of the entries built without a NumberTable


class DeviceTables:
    """Device copies and host-side constants of one objective's tables, made on first use.

    builds: how many entries were made (the test that repeated calls copy nothing reads it).
    max_entries: past it the copies are dropped and made again (a run that keeps changing
    devices, dtypes or layouts; one run needs a handful).
    """

    def __init__(self, max_entries: int = 256) -> None:
        self._entries: dict[tuple, tuple[object, object]] = {}
        self.max_entries = max_entries
        self.builds = 0

    def _cached(self, source: object, key: tuple, build: Callable[[], T]) -> T:
        full_key = (id(source), *key)
        hit = self._entries.get(full_key)
        if hit is not None and hit[0] is source:
            return hit[1]
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        value = build()
        self.builds += 1
        self._entries[full_key] = (source, value)
        return value

    def on_device(self, table: torch.Tensor, device: torch.device,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """`table` on `device` (in `dtype`), copied on the first call only."""
        dtype = dtype or table.dtype
        if table.device == torch.device(device) and table.dtype == dtype:
            return table
        return self._cached(table, ("on_device", str(device), dtype),
                            lambda: table.to(device=device, dtype=dtype))

    def shard_of(self, numbers: NumberTable | None, layout: VocabLayout,
                 device: torch.device) -> VocabShard:
        """The VocabShard of `layout` (its number columns and values on `device`)."""
        if numbers is None:  # keyed on the layout's value: each call resolves a new, equal one
            return self._cached(_NO_TABLE, ("shard", layout, str(device)),
                                lambda: vocab_shard(None, layout, device))
        groups = numbers.digit_counts if numbers.grouped else None
        return self._cached(numbers.values, ("shard", layout, str(device)),
                            lambda: vocab_shard(numbers.values, layout, device, groups))

    def distance_for(self, numbers: NumberTable, squash_factor: float | None) -> Distance:
        """Distance.for_values over the table's number values (host work, done once)."""
        return self._cached(numbers.values, ("distance", squash_factor),
                            lambda: Distance.for_values(numbers.values[numbers.is_number],
                                                        squash_factor))

    def max_distance_for(self, numbers: NumberTable, distance: Distance) -> float:
        """The largest distance between two of the table's number values (Wasserstein's
        scale)."""
        return self._cached(numbers.values, ("max_distance", distance),
                            lambda: distance.max_distance(numbers.values[numbers.is_number]))

    def group_bounds_for(self, numbers: NumberTable, device: torch.device) -> torch.Tensor:
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
        return self._cached(numbers.values, ("group_bounds", str(device)), build)
