"""TP = 1, 2, 4 over real gloo processes against the float64 single-process reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from cases import CONFIGS, Case, all_cases, make_case
from dist_pool import (
    counted_collectives,
    destroy_model_parallel,
    initialize_model_parallel,
    tp_group,
)
from reference import reference_objective_loss

from token_objectives import objective_loss

TP_SIZES = (1, 2, 4)
# (TP size, tokens per chunk): default chunking, plus small chunks that do not divide T = 48.
RUNS = ((1, None), (2, None), (4, None), (1, 5), (2, 7), (4, 1))


def _shard(full: torch.Tensor, tp_size: int, rank: int) -> torch.Tensor:
    width = full.shape[-1] // tp_size
    return full[..., rank * width : (rank + 1) * width]


def run_cases(tp_size: int, cases: list[Case], dtype: torch.dtype = torch.float32,
              rows_per_chunk: int | None = None, kernel: str = "torch") -> list[dict]:
    """Runs on every worker: forward + backward of each case on this rank's shard."""
    group = tp_group(tp_size)
    rank = 0 if group is None else dist.get_rank(group)
    results = []
    for case in cases:
        local = _shard(case.logits, tp_size, rank).to(dtype).clone().requires_grad_()
        out = objective_loss(local, case.labels, case.config, case.numbers, case.pdl_weights,
                             group, loss_mask=case.loss_mask, rows_per_chunk=rows_per_chunk,
                             kernel=kernel)
        (out.loss * case.upstream).sum().backward()
        results.append({
            "rank": rank,
            "loss": out.loss.detach(), "ce": out.ce.detach(), "ntl": out.ntl.detach(),
            "is_number": out.is_number, "weight": out.weight.detach(),
            "grad": local.grad,
        })
    return results


def _gather(per_rank: list[list[dict]], tp_size: int, index: int) -> dict:
    """Rank 0..tp-1 of the first group: outputs of rank 0, gradient shards concatenated."""
    first_group = [per_rank[r][index] for r in range(tp_size)]
    merged = dict(first_group[0])
    merged["grad"] = torch.cat([part["grad"] for part in first_group], dim=-1)
    return merged


def _reference(case: Case) -> dict:
    logits = case.logits.double().requires_grad_()
    out = reference_objective_loss(logits, case.labels, case.config, case.numbers,
                                   case.pdl_weights, loss_mask=case.loss_mask)
    (out.loss * case.upstream.double()).sum().backward()
    return {"loss": out.loss, "ce": out.ce, "ntl": out.ntl, "is_number": out.is_number,
            "weight": out.weight, "grad": logits.grad}


@pytest.fixture(scope="module")
def tp_results(pool4):
    cases = all_cases()
    by_run = {run: pool4.run(run_cases, run[0], cases, torch.float32, run[1]) for run in RUNS}
    return cases, by_run


@pytest.mark.parametrize("index", range(len(all_cases())),
                         ids=[c.name for c in all_cases()])
def test_tp_matches_float64_reference(tp_results, index):
    cases, by_tp = tp_results
    case = cases[index]
    expected = _reference(case)
    assert expected["loss"].abs().sum() > 0
    if case.config.ntl is not None:
        assert expected["is_number"].sum() >= 2, "the case must exercise NTL"
        assert expected["ntl"].abs().sum() > 0
    for (tp, rows), per_rank in by_tp.items():
        got = _gather(per_rank, tp, index)
        for key in ("loss", "ce", "ntl", "weight"):
            torch.testing.assert_close(got[key].double(), expected[key], rtol=2e-5, atol=2e-5,
                                       msg=lambda m, k=key, t=tp, r=rows: f"TP={t}/{r} {k}: {m}")
        assert torch.equal(got["is_number"], expected["is_number"]), f"TP={tp} is_number"
        torch.testing.assert_close(got["grad"].double(), expected["grad"], rtol=1e-4,
                                   atol=2e-6, msg=lambda m, t=tp, r=rows: f"TP={t}/{r} grad: {m}")


@pytest.mark.parametrize("index", range(len(all_cases())),
                         ids=[c.name for c in all_cases()])
def test_tp_sizes_agree_to_fp32_rounding(tp_results, index):
    _, by_tp = tp_results
    base = _gather(by_tp[(1, None)], 1, index)
    for (tp, _), per_rank in by_tp.items():
        got = _gather(per_rank, tp, index)
        torch.testing.assert_close(got["loss"], base["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["grad"], base["grad"], rtol=1e-5, atol=1e-7)


def test_every_group_computes_the_same(tp_results):
    """At TP=2 the pool has two TP groups (DP=2); both must give identical results."""
    _, by_tp = tp_results
    tp2 = by_tp[(2, None)]
    for index in range(len(tp2[0])):
        for key in ("loss", "grad"):
            torch.testing.assert_close(tp2[0][index][key], tp2[2][index][key],
                                       rtol=0, atol=0)


def run_bf16(tp_size: int, case: Case) -> list[dict]:
    return run_cases(tp_size, [case], dtype=torch.bfloat16)


def test_bf16_logits_under_tp(pool4):
    case = make_case("bf16", CONFIGS["all"], seed=7)
    case.logits = case.logits.bfloat16().float()  # the reference sees the same rounded logits
    expected = _reference(case)
    for tp in (2, 4):
        got = _gather(pool4.run(run_bf16, tp, case), tp, 0)
        assert got["grad"].dtype == torch.bfloat16
        # Accumulation is fp32, so only the gradient's final bf16 rounding shows.
        torch.testing.assert_close(got["loss"].double(), expected["loss"], rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(got["grad"].double(), expected["grad"], rtol=1e-2,
                                   atol=1e-4)


def count_collectives(tp_size: int, cases: list[Case]) -> list[tuple[int, int, dict]]:
    """Forward and backward collective counts of each case on this rank."""
    out = []
    group = tp_group(tp_size)
    rank = dist.get_rank(group)
    with counted_collectives() as counter:
        for case in cases:
            counter.clear()
            local = _shard(case.logits, tp_size, rank).clone().requires_grad_()
            result = objective_loss(local, case.labels, case.config, case.numbers,
                                    case.pdl_weights, group, loss_mask=case.loss_mask)
            forward = sum(counter.values())
            kinds = dict(counter)
            counter.clear()
            result.loss.sum().backward()
            out.append((forward, sum(counter.values()), kinds))
    return out


def test_two_collectives_forward_none_backward(pool4):
    cases = [make_case(name, cfg, seed=3) for name, cfg in CONFIGS.items()]
    for tp in (2, 4):
        for rank_result in pool4.run(count_collectives, tp, cases):
            for case, (forward, backward, kinds) in zip(cases, rank_result, strict=True):
                assert (forward, backward) == (2, 0), (case.name, tp, kinds)
                assert kinds == {"all_reduce": 2}, (case.name, kinds)


def megatron_parity(cases: list[Case]) -> list[dict]:
    """Megatron's vocab_parallel_cross_entropy and ours on the same [s, b, V/2] shards."""
    from megatron.core import parallel_state, tensor_parallel

    groups_before = initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()
        out = []
        for case in cases:
            # Megatron's layout: logits [s, b, V/tp], target [s, b].
            logits = _shard(case.logits, 2, rank).transpose(0, 1).contiguous()
            target = case.labels.transpose(0, 1).contiguous()
            theirs_in = logits.clone().requires_grad_()
            theirs = tensor_parallel.vocab_parallel_cross_entropy(theirs_in.clone(), target)
            (theirs * case.upstream.t()).sum().backward()
            ours_in = logits.clone().requires_grad_()
            ours = objective_loss(ours_in, target, case.config, case.numbers, None, group)
            (ours.loss * case.upstream.t()).sum().backward()
            out.append({"theirs": theirs.detach(), "ours": ours.loss.detach(),
                        "theirs_grad": theirs_in.grad, "ours_grad": ours_in.grad})
        return out
    finally:
        destroy_model_parallel(groups_before)


def test_megatron_vocab_parallel_cross_entropy_parity(pool4):
    # Megatron's CE spans the whole padded vocab and knows no ignore_index: give it a table
    # without padding and labels without ignored positions.
    cases = []
    for seed in range(3):
        case = make_case("megatron", CONFIGS["ce"], real=64, seed=seed, with_mask=False)
        case.labels[case.labels < 0] = 1
        cases.append(case)
    for rank_result in pool4.run(megatron_parity, cases):
        for item in rank_result:
            torch.testing.assert_close(item["ours"], item["theirs"], rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(item["ours_grad"], item["theirs_grad"], rtol=1e-5,
                                       atol=1e-7)
