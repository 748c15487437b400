"""The Triton kernels, run on CPU by Triton's interpreter, against the torch stages and the
float64 reference: logits path and fused LM head, TP = 1, 2, 4, fp32 and bf16."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist
from cases import all_cases, case_named
from test_fused_linear import NAMES as FUSED_NAMES
from test_fused_linear import _reference as fused_reference
from test_fused_linear import run_fused
from test_objective_tp import _gather, _reference, run_cases

from token_objectives import objective_loss
from token_objectives.ops import plan
from token_objectives.ops.plan import resolve_kernel

# Importing triton here would fix its interpreter switch off in this process: only look.
if importlib.util.find_spec("triton") is None:
    pytest.skip("the test extra installs triton (x86-64 Linux)", allow_module_level=True)

# The interpreter runs each row as Python: every case at TP=1, the ones that stress the
# sharding (numbers on one shard, padding, label smoothing over the global vocab) at TP=2, 4.
# Shorter rows than the torch tests' 24: the interpreter's time goes as the rows.
SEQ = 14
SHARDED_CASES = ("all", "was_squash", "label_smoothing", "numbers_first_shard",
                 "numbers_last_shard", "wide_padding", "gaussian_numbers_last_shard",
                 "groups_all", "groups_gaussian_was")


def first_group_only(task, tp_size: int, *args):
    """The interpreter is slow: only the ranks of the first TP group run `task` (the groups are
    disjoint, so the others may sit out its collectives). Blocks of 16 columns make the test
    vocabularies (16 to 64 columns a rank) span several blocks, as real ones do, and blocks of
    8 number tokens make the number loop run twice, so that the forward's online
    re-basing of the number sums runs."""
    from token_objectives.ops import triton_kernels

    triton_kernels.MAX_BLOCK = 16
    triton_kernels.NUMBER_BLOCK = 8  # the cases' 10 number tokens take 2 blocks, rescaled online
    return task(tp_size, *args) if dist.get_rank() < tp_size else None


@pytest.fixture(scope="module")
def triton_runs(pool4):
    cases = all_cases(SEQ)
    sharded = [c for c in cases if c.name in SHARDED_CASES]
    def run(tp: int, some: list) -> tuple[list, list]:
        return some, pool4.run(first_group_only, run_cases, tp, some, torch.float32, None,
                               "triton")

    return {1: run(1, cases), 2: run(2, sharded), 4: run(4, sharded)}


@pytest.mark.parametrize("name", [c.name for c in all_cases(SEQ)])
def test_triton_matches_float64_reference_at_every_tp(triton_runs, name):
    for tp, (cases, per_rank) in triton_runs.items():
        names = [c.name for c in cases]
        if name not in names:
            continue
        index = names.index(name)
        expected = _reference(cases[index])
        got = _gather(per_rank, tp, index)
        tag = f"triton TP={tp}"
        for key in ("loss", "ce", "ntl", "weight"):
            torch.testing.assert_close(got[key].double(), expected[key], rtol=2e-5, atol=2e-5,
                                       msg=lambda m, k=key, t=tag: f"{t} {k}: {m}")
        torch.testing.assert_close(got["grad"].double(), expected["grad"], rtol=1e-4,
                                   atol=2e-6, msg=lambda m, t=tag: f"{t} grad: {m}")


FUSED_CASES = [name for name in FUSED_NAMES
               if name in ("ce", "was_squash", "number", "all", "gaussian_was", "groups_all")]


@pytest.fixture(scope="module")
def fused_triton_runs(pool4):
    cases = [case_named(name, seed=40 + i, seq=SEQ)
             for i, name in enumerate(FUSED_NAMES) if name in FUSED_CASES]
    return cases, {(tp, rows): pool4.run(first_group_only, run_fused, tp, cases, rows,
                                         torch.float32, "triton")
                   for tp, rows in ((1, None), (2, 16), (4, 20))}


@pytest.mark.parametrize("index", range(len(FUSED_CASES)), ids=FUSED_CASES)
def test_triton_fused_head_matches_reference_with_weight_gradient(fused_triton_runs, index):
    cases, by_run = fused_triton_runs
    expected = fused_reference(cases[index])
    for (tp, rows), per_rank in by_run.items():
        parts = [per_rank[r][index] for r in range(tp)]
        tag = f"triton fused TP={tp} rows={rows}"
        torch.testing.assert_close(parts[0]["loss"].double(), expected["loss"], rtol=2e-5,
                                   atol=2e-5, msg=lambda m, t=tag: f"{t} loss: {m}")
        torch.testing.assert_close(parts[0]["grad_hidden"].double(), expected["grad_hidden"],
                                   rtol=1e-4, atol=1e-5, msg=lambda m, t=tag: f"{t} dh: {m}")
        grad_weight = torch.cat([p["grad_weight"] for p in parts], dim=0)
        torch.testing.assert_close(grad_weight.double(), expected["grad_weight"], rtol=1e-4,
                                   atol=1e-5, msg=lambda m, t=tag: f"{t} dW: {m}")


def torch_and_triton(tp_size: int, case_names: list[str], dtype: torch.dtype,
                     minus_inf: bool) -> dict:
    """On a pool worker (interpreter on): loss and logit gradient by both kernels, TP=1."""
    cases = {c.name: c for c in all_cases()}
    results = {}
    for name in case_names:
        case = cases[name]
        if minus_inf:  # a row of -inf logits, and a row with every other logit -inf
            case.logits[0, 3] = float("-inf")
            case.logits[1, 7, ::2] = float("-inf")
        for kernel in ("torch", "triton"):
            logits = case.logits.to(dtype).requires_grad_()
            out = objective_loss(logits, case.labels, case.config, case.numbers,
                                 case.pdl_weights, loss_mask=case.loss_mask, kernel=kernel)
            loss = out.loss[1] if minus_inf else out.loss  # row [0, 3] has an infinite loss
            (loss * case.upstream[1 if minus_inf else slice(None)]).sum().backward()
            results[name, kernel] = (loss.detach(), logits.grad)
    return results


def test_bf16_triton_agrees_with_the_torch_stages(pool4):
    names = ["all", "numbers_last_shard", "wide_padding"]
    results = pool4.run(first_group_only, torch_and_triton, 1, names, torch.bfloat16, False)[0]
    for name in names:
        (loss_torch, grad_torch) = results[name, "torch"]
        (loss_triton, grad_triton) = results[name, "triton"]
        assert grad_triton.dtype == torch.bfloat16
        torch.testing.assert_close(loss_triton, loss_torch, rtol=1e-5, atol=1e-5)
        # Both accumulate in fp32; only the final rounding to bf16 may differ, by one ulp.
        torch.testing.assert_close(grad_triton.float(), grad_torch.float(), rtol=8e-3,
                                   atol=1e-6)


def test_rows_of_minus_infinity_stay_finite(pool4):
    results = pool4.run(first_group_only, torch_and_triton, 1, ["all"], torch.float32, True)[0]
    (loss_torch, grad_torch), (loss_triton, grad_triton) = (results["all", "torch"],
                                                            results["all", "triton"])
    torch.testing.assert_close(loss_triton, loss_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_triton, grad_torch, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(grad_triton).all()


def test_kernel_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TOKEN_OBJECTIVES_KERNEL", raising=False)
    monkeypatch.setattr(plan, "triton_launcher_problem", lambda: None)
    assert resolve_kernel(None, cpu, torch.float32) == "torch"  # auto: Triton only on CUDA
    assert resolve_kernel("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    assert resolve_kernel("auto", torch.device("cuda"), torch.float64) == "torch"
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        resolve_kernel("triton", cpu, torch.float32)
    with pytest.raises(ValueError, match="use kernel='torch' for fp64"):
        resolve_kernel("triton", cpu, torch.float64)
    monkeypatch.setenv("TOKEN_OBJECTIVES_KERNEL", "cuda-please")
    with pytest.raises(ValueError, match="one of auto, torch, triton"):
        resolve_kernel(None, cpu, torch.float32)
    monkeypatch.setenv("TOKEN_OBJECTIVES_KERNEL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernel(None, cpu, torch.float32) == "triton"


def test_auto_falls_back_to_the_torch_stages_with_one_warning_where_triton_cannot_launch(
        monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv("TOKEN_OBJECTIVES_KERNEL", raising=False)
    plan.triton_launcher_problem.cache_clear()
    plan._warn_torch_stages.cache_clear()
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(plan.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C compiler for Triton's launcher") as caught:
        assert resolve_kernel("auto", cuda, torch.bfloat16) == "torch"
        assert resolve_kernel("auto", cuda, torch.float16) == "torch"
    assert len(caught) == 1
    plan.triton_launcher_problem.cache_clear()
    monkeypatch.setenv("CC", "gcc")
    monkeypatch.setenv("TRITON_LIBCUDA_PATH", "/nonexistent")
    problem = plan.triton_launcher_problem()
    assert problem is not None and "libcuda" in problem and "TRITON_LIBCUDA_PATH" in problem
    plan.triton_launcher_problem.cache_clear()
    plan._warn_torch_stages.cache_clear()


def in_place_and_not(tp_size: int, case_names: list[str], dtype: torch.dtype) -> dict:
    """On a pool worker (interpreter on): the logit gradient of intermediate logits (base * 1),
    written over them (the default) and into a new tensor (grad_in_place=False), both kernels."""
    cases = {c.name: c for c in all_cases()}
    results = {}
    for name in case_names:
        case = cases[name]
        for kernel in ("torch", "triton"):
            for in_place in (True, False):
                base = case.logits.to(dtype).clone().requires_grad_()
                logits = base * 1  # an intermediate, as the LM head's output is
                seen = {}
                logits.register_hook(lambda g, seen=seen: seen.update(ptr=g.data_ptr()))
                out = objective_loss(logits, case.labels, case.config, case.numbers,
                                     case.pdl_weights, loss_mask=case.loss_mask, kernel=kernel,
                                     grad_in_place=in_place)
                (out.loss * case.upstream).sum().backward()
                results[name, kernel, in_place] = (base.grad, seen["ptr"] == logits.data_ptr(),
                                                   logits._version)
    return results


def test_the_gradient_is_written_over_intermediate_logits_unless_opted_out(pool4):
    for dtype, names in ((torch.float32, ["all", "wide_padding"]), (torch.bfloat16, ["all"])):
        results = pool4.run(first_group_only, in_place_and_not, 1, names, dtype)[0]
        for name in names:
            for kernel in ("torch", "triton"):
                grad, aliased, version = results[name, kernel, True]
                expected, copied, unchanged = results[name, kernel, False]
                assert aliased and version > 0, (name, kernel, dtype)
                assert not copied and unchanged == 0, (name, kernel, dtype)
                torch.testing.assert_close(grad, expected, rtol=0, atol=0,
                                           msg=lambda m, n=name, k=kernel: f"{n} {k}: {m}")


def second_reader_fails(tp_size: int, kernel: str) -> str:
    """On a pool worker: the error of a backward in which another op that saved the logits
    runs after the objective wrote its gradient over them ("" if none)."""
    case = next(c for c in all_cases() if c.name == "all")
    logits = case.logits.clone().requires_grad_() * 1
    # Saves the logits for its own backward, which runs after the objective's (made later).
    also = (logits * logits).sum()
    out = objective_loss(logits, case.labels, case.config, case.numbers, case.pdl_weights,
                         kernel=kernel)
    try:
        (out.loss.sum() + also).backward()
    except RuntimeError as error:
        return str(error)
    return ""


def test_a_leaf_or_a_second_reader_of_the_logits_is_never_handed_the_gradient(pool4):
    case = next(c for c in all_cases() if c.name == "all")
    leaf = case.logits.clone().requires_grad_()
    before = leaf.detach().clone()
    out = objective_loss(leaf, case.labels, case.config, case.numbers, case.pdl_weights,
                         kernel="torch")
    out.loss.sum().backward()
    assert torch.equal(leaf.detach(), before)  # a leaf is the caller's tensor: left alone
    for kernel in ("torch", "triton"):
        error = pool4.run(first_group_only, second_reader_fails, 1, kernel)[0]
        assert "modified by an inplace operation" in error, (kernel, error)
