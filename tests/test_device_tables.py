"""The per-run tables (number values and word starts, PDL weights, the vocab shard, the squash
and Wasserstein constants, each rank's layout row) are built once, not per micro-batch: repeated
calls of one Objective build nothing, and give the same result; a new table is built anew. The
copies belong to the Objective (its DeviceTables), not to a module."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cases import CONFIGS, make_case
from torch.overrides import TorchFunctionMode

from token_objectives import Objective
from token_objectives.objectives.device_tables import DeviceTables
from token_objectives.ops import layout
from token_objectives.ops.plan import Distance


class TableCopies(TorchFunctionMode):
    """Counts Tensor.to / .cuda / .clone called on one of `tables` (on a GPU, each is a
    host -> device copy; here, on CPU tensors, each is the call that would be one)."""

    def __init__(self, tables):
        super().__init__()
        self.tables, self.count = [t for t in tables if t is not None], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.clone) and args and any(
                args[0] is table for table in self.tables):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["all", "number", "was_squash"])
def test_repeated_calls_build_no_table(name, monkeypatch):
    case = make_case(name, CONFIGS[name])
    numbers = case.numbers
    if name == "number":  # word starts on the number level
        word_start = torch.zeros(numbers.vocab_size, dtype=torch.bool)
        word_start[numbers.is_number.nonzero()[::2].flatten()] = True
        numbers = dataclasses.replace(numbers, word_start=word_start)

    objective = Objective(case.config, numbers, case.pdl_weights)

    def call():
        return objective(case.logits, case.labels, kernel="torch").loss

    constants = []
    for method in ("for_values", "max_distance"):
        original = getattr(Distance, method)
        monkeypatch.setattr(Distance, method, (lambda f: lambda *a, **k: (
            constants.append(f.__name__), f(*a, **k))[1])(original))
    first = call()
    built = objective.tables.builds
    rows = layout._rows_template.cache_info().misses
    computed = len(constants)
    copies = TableCopies([numbers.values, numbers.word_start, case.pdl_weights])
    with copies:
        for _ in range(3):
            torch.testing.assert_close(call(), first, rtol=0, atol=0)
    assert copies.count == 0
    assert len(constants) == computed  # the squash and Wasserstein constants: once
    assert objective.tables.builds == built
    assert layout._rows_template.cache_info().misses == rows

    other = dataclasses.replace(numbers, values=numbers.values.clone())
    objective.numbers = other
    objective(case.logits, case.labels, kernel="torch")
    assert objective.tables.builds > built  # a new table is not served from another's entry


def test_a_table_on_another_dtype_is_copied_once():
    weights = torch.rand(16, dtype=torch.float32)
    tables = DeviceTables()
    copies = [tables.on_device(weights, torch.device("cpu"), torch.float64) for _ in range(3)]
    assert copies[0].dtype == torch.float64 and all(c is copies[0] for c in copies)
    assert tables.on_device(weights, torch.device("cpu")) is weights  # nothing to copy
