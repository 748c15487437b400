"""The bench's measuring tools, and the memory claim of the fused LM head they support."""

from __future__ import annotations

import shlex

import pytest
import torch
from cases import CONFIGS, make_case
from doc_blocks import doc_block, substituted

from token_objectives import fused_linear_objective_loss, objective_loss
from token_objectives.bench.grid_cli import main as bench_main
from token_objectives.bench.methods import saved_for_backward


def _head_inputs(tokens: int, width: int, hidden: int):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen).requires_grad_()
    w = (torch.randn(width, hidden, generator=gen) * 0.3).requires_grad_()
    return h, w


def test_fused_head_keeps_no_logits_sized_tensor_for_backward():
    case = make_case("head", CONFIGS["all"], seed=3, vocab=256, real=250, seq=200)
    labels = case.labels.flatten()
    hidden, weight = _head_inputs(labels.numel(), 256, 8)
    logits_bytes = labels.numel() * 256 * 4

    def unfused():
        return objective_loss(hidden @ weight.t(), labels, case.config, case.numbers,
                              case.pdl_weights).loss.sum()

    def fused():
        return fused_linear_objective_loss(hidden, weight, labels, case.config, case.numbers,
                                           case.pdl_weights, rows_per_chunk=16).loss.sum()

    unfused_bytes, unfused_big = saved_for_backward(unfused, [hidden, weight], logits_bytes // 2)
    fused_bytes, fused_big = saved_for_backward(fused, [hidden, weight], logits_bytes // 2)
    assert unfused_big == 1 and unfused_bytes >= logits_bytes  # the [T, V] logits
    assert fused_big == 0
    # O(T) statistics only: [T, 6] + [T] floats, the targets, values and weights.
    assert fused_bytes < 0.1 * unfused_bytes, (fused_bytes, unfused_bytes)


def test_bench_prints_every_method_with_ratios(capsys):
    assert bench_main(["--tokens", "64", "--vocab", "256", "--tp", "1", "2", "--repeats", "1",
                       "--hidden", "16", "--threads", "1", "--peak-gbs", "50"]) == 0
    out = capsys.readouterr().out
    assert "% peak = of the data-sheet 50 GB/s" in out
    table = out.split("TP      T")[-1].splitlines()[1:]
    methods = ["megatron", "megatron_fused", "naive", "unchunked", "ours", "ours_gaussian",
               "head_unfused", "head_fused"]
    for tp in (1, 2):
        rows = [line.split() for line in table if line.split()[:3] == [str(tp), "64", "256"]]
        assert [row[4] for row in rows] == methods
        for row in rows:
            assert row[5] != "skipped:", row
        ref = next(row for row in rows if row[4] == "megatron")
        assert ref[6] == "1.00"  # each time ratio is against Megatron's CE on the same logits
        fused = next(row for row in rows if row[4] == "head_fused")
        assert int(fused[9]) == 0  # no logits-sized tensor saved
        for row in rows:  # GB/s as a share of the stated peak (not for the head methods)
            if row[4] not in ("head_unfused", "head_fused"):
                assert row[12] == f"{100 * float(row[11]) / 50:.0f}%", row


def _block_argv(name: str, cut: dict[str, str]) -> list[str]:
    """A docs/performance.md command's arguments, its sizes cut for the test."""
    words = shlex.split(substituted(doc_block(name).text.replace("\\\n", " "), cut))
    start = words.index("token-objectives")
    return words[start + 2:]


@pytest.mark.parametrize("name, cut", [
    ("bench-grid", {"--tokens 4096 16384": "--tokens 64", "--vocab 32768 131072": "--vocab 256",
                    "--tp 2 1": "--tp 1", "--repeats 5": "--repeats 1"}),
    ("bench-one-thread", {"--tokens 4096 16384": "--tokens 64", "--vocab 32768": "--vocab 256",
                          "--tp 1 2": "--tp 1", "--repeats 5": "--repeats 1"}),
])
def test_the_docs_bench_commands_run_small(name, cut, capsys):
    """docs/performance.md's two `bench` runs with the sizes cut and at TP = 1 (TP = 2 runs in
    the test above); every method they name gets a row."""
    argv = _block_argv(name, cut)
    assert bench_main(argv) == 0
    methods = argv[argv.index("--methods") + 1:]
    out = capsys.readouterr().out
    table = out.split("TP      T")[-1].splitlines()[1:]
    rows = [line.split() for line in table if line.split()[:3] == ["1", "64", "256"]]
    assert [row[4] for row in rows] == methods


def test_peak_bandwidth_is_known_for_gpus_only():
    from token_objectives.bench.grid import peak_bandwidth_gbs

    assert peak_bandwidth_gbs("cpu") is None
