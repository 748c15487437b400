"""The fused LM head + objectives against the float64 reference on explicit logits, at TP=1/2/4."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from cases import CONFIGS, Case, case_named, make_case
from dist_pool import counted_collectives, tp_group
from reference import reference_objective_loss

from token_objectives.objectives.objective import fused_linear_objective_loss

HIDDEN = 16
NAMES = ["ce", "was", "was_squash", "mse", "number", "label_smoothing", "z_loss", "all",
         "all_mse_weighted_mean", "gaussian_was", "groups_all", "groups_number_float",
         "groups_gaussian_was"]


def _inputs(case: Case, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batch, seq = case.labels.shape
    hidden = torch.randn(batch, seq, HIDDEN, generator=gen)
    weight = torch.randn(case.logits.shape[-1], HIDDEN, generator=gen) * 0.7
    return hidden, weight


def run_fused(tp_size: int, cases: list[Case], rows: int | None, dtype=torch.float32,
              kernel: str = "torch"):
    group = tp_group(tp_size)
    rank = 0 if group is None else dist.get_rank(group)
    out = []
    for case in cases:
        hidden, weight = _inputs(case)
        width = weight.shape[0] // tp_size
        h = hidden.to(dtype).requires_grad_()
        w = weight[rank * width : (rank + 1) * width].to(dtype).clone().requires_grad_()
        result = fused_linear_objective_loss(h, w, case.labels, case.config, case.numbers,
                                             case.pdl_weights, group, loss_mask=case.loss_mask,
                                             rows_per_chunk=rows, kernel=kernel)
        (result.loss * case.upstream).sum().backward()
        out.append({"loss": result.loss.detach(), "grad_hidden": h.grad,
                    "grad_weight": w.grad})
    return out


def _reference(case: Case) -> dict:
    hidden, weight = (t.double().requires_grad_() for t in _inputs(case))
    ref = reference_objective_loss(hidden @ weight.t(), case.labels, case.config, case.numbers,
                                   case.pdl_weights, loss_mask=case.loss_mask)
    (ref.loss * case.upstream.double()).sum().backward()
    return {"loss": ref.loss, "grad_hidden": hidden.grad, "grad_weight": weight.grad}


@pytest.fixture(scope="module")
def fused_runs(pool4):
    cases = [case_named(name, seed=40 + i) for i, name in enumerate(NAMES)]
    runs = {(tp, rows): pool4.run(run_fused, tp, cases, rows)
            for tp, rows in ((1, None), (2, None), (4, 7), (2, 1))}
    return cases, runs


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_fused_linear_matches_reference_at_every_tp(fused_runs, index):
    cases, runs = fused_runs
    expected = _reference(cases[index])
    for (tp, rows), per_rank in runs.items():
        parts = [per_rank[r][index] for r in range(tp)]
        tag = f"TP={tp} rows={rows}"
        torch.testing.assert_close(parts[0]["loss"].double(), expected["loss"], rtol=2e-5,
                                   atol=2e-5, msg=lambda m, t=tag: f"{t} loss: {m}")
        for part in parts:  # grad_hidden is complete (all-reduced) on every rank
            torch.testing.assert_close(part["grad_hidden"].double(), expected["grad_hidden"],
                                       rtol=1e-4, atol=1e-5, msg=lambda m, t=tag: f"{t} dh: {m}")
        grad_weight = torch.cat([p["grad_weight"] for p in parts], dim=0)
        torch.testing.assert_close(grad_weight.double(), expected["grad_weight"], rtol=1e-4,
                                   atol=1e-5, msg=lambda m, t=tag: f"{t} dW: {m}")


def count_fused_collectives(tp_size: int, case: Case) -> tuple[dict, dict]:
    group = tp_group(tp_size)
    rank = dist.get_rank(group)
    hidden, weight = _inputs(case)
    width = weight.shape[0] // tp_size
    w = weight[rank * width : (rank + 1) * width].clone().requires_grad_()
    h = hidden.requires_grad_()
    with counted_collectives() as counter:
        result = fused_linear_objective_loss(h, w, case.labels, case.config, case.numbers,
                                             case.pdl_weights, group, rows_per_chunk=3)
        forward = dict(counter)
        counter.clear()
        result.loss.sum().backward()
        return forward, dict(counter)


def test_collectives_are_two_forward_and_the_head_s_one_backward(pool4):
    case = make_case("count", CONFIGS["all"], seed=9)
    for forward, backward in pool4.run(count_fused_collectives, 4, case):
        assert forward == {"all_reduce": 2}  # whatever the number of chunks (16 here)
        assert backward == {"all_reduce": 1}  # grad_hidden over TP, as the LM head's own


def run_sequence_parallel(tp_size: int, cases: list[Case]) -> list[dict]:
    """Megatron's sequence-parallel layout: labels [s, b] whole, hidden [s/tp, b, h] per rank."""
    group = tp_group(tp_size)
    rank = dist.get_rank(group)
    out = []
    for case in cases:
        hidden, weight = _inputs(case)
        seq = case.labels.shape[1] // tp_size
        width = weight.shape[0] // tp_size
        h = hidden.transpose(0, 1)[rank * seq : (rank + 1) * seq].clone().requires_grad_()
        w = weight[rank * width : (rank + 1) * width].clone().requires_grad_()
        mask = None if case.loss_mask is None else case.loss_mask.t()
        with counted_collectives() as counter:
            result = fused_linear_objective_loss(h, w, case.labels.t(), case.config,
                                                 case.numbers, case.pdl_weights, group,
                                                 loss_mask=mask, seq_dim=0, rows_per_chunk=5,
                                                 sequence_parallel=True)
            forward = dict(counter)
            counter.clear()
            (result.loss * case.upstream.t()).sum().backward()
        out.append({"loss": result.loss.detach().t(), "grad_hidden": h.grad,
                    "grad_weight": w.grad, "collectives": (forward, dict(counter))})
    return out


SEQUENCE_PARALLEL = ["all", "number", "was_squash", "gaussian_was", "groups_all"]


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_head_matches_reference(pool4, tp):
    cases = [case_named(name, seed=70 + i) for i, name in enumerate(SEQUENCE_PARALLEL)]
    per_rank = pool4.run(run_sequence_parallel, tp, cases)
    for index, case in enumerate(cases):
        expected = _reference(case)
        parts = [per_rank[r][index] for r in range(tp)]
        tag = f"{SEQUENCE_PARALLEL[index]} TP={tp}"
        for part in parts:  # every rank has the whole sequence's loss
            torch.testing.assert_close(part["loss"].double(), expected["loss"], rtol=2e-5,
                                       atol=2e-5, msg=lambda m, t=tag: f"{t} loss: {m}")
            assert part["collectives"] == (
                {"all_reduce": 2, "all_gather_into_tensor": 1},
                {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}), tag
        # Each rank holds the gradient of its own slice of the sequence, summed over the vocab.
        grad_hidden = torch.cat([p["grad_hidden"] for p in parts], dim=0).transpose(0, 1)
        torch.testing.assert_close(grad_hidden.double(), expected["grad_hidden"], rtol=1e-4,
                                   atol=1e-5, msg=lambda m, t=tag: f"{t} dh: {m}")
        grad_weight = torch.cat([p["grad_weight"] for p in parts], dim=0)
        torch.testing.assert_close(grad_weight.double(), expected["grad_weight"], rtol=1e-4,
                                   atol=1e-5, msg=lambda m, t=tag: f"{t} dW: {m}")


def test_bf16_fused_linear_close_to_reference():
    case = make_case("bf16", CONFIGS["all"], seed=5)
    hidden, weight = _inputs(case)
    h = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    out = fused_linear_objective_loss(h, w, case.labels, case.config, case.numbers,
                                      case.pdl_weights, loss_mask=case.loss_mask)
    (out.loss * case.upstream).sum().backward()
    logits = h.detach().double() @ w.detach().double().t()
    expected = reference_objective_loss(logits, case.labels, case.config, case.numbers,
                                        case.pdl_weights, loss_mask=case.loss_mask)
    # The logits are computed in bf16, as a bf16 model's output layer would.
    torch.testing.assert_close(out.loss.double(), expected.loss, rtol=0.05, atol=0.05)
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad).all()
    assert w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad).all()


def test_shape_errors_name_the_layout():
    case = make_case("shape", CONFIGS["ce"])
    hidden, weight = _inputs(case)
    with pytest.raises(ValueError, match=r"must be this rank's output-layer shard \[V/tp, 16\]"):
        fused_linear_objective_loss(hidden, weight.t(), case.labels, case.config, case.numbers)
    with pytest.raises(ValueError, match="must be labels' shape"):
        fused_linear_objective_loss(hidden[:, :3], weight, case.labels, case.config,
                                    case.numbers)
