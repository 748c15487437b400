"""The methods `token-objectives bench` compares, and how each is measured on one rank.

Logits in ([T, V/tp] shard per rank):
  megatron        megatron-core's tensor_parallel.vocab_parallel_cross_entropy (CE alone)
  megatron_fused  megatron-core's fused_vocab_parallel_cross_entropy (CE alone), where it runs
  naive           all-gather the logits, F.cross_entropy * PDL weight + 0.3 * ntloss.NTLoss
  unchunked       ours (CE + NTL-WAS + PDL), torch stages, one chunk of all T rows
  ours            ours, default chunks; the Triton kernels on CUDA
  ours_gaussian   ours with Gaussian number targets as well (gaussian_sigma = 1)
Hidden states in ([T, h] and the output-layer shard [V/tp, h]):
  head_unfused    hidden @ weight.T, then `ours`
  head_fused      Objective.fused: no [T, V/tp] tensor is kept
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from token_objectives import NumberTable, Objective, ObjectiveConfig
from token_objectives.bench import HEAD_METHODS

CONFIG = ObjectiveConfig(ntl="was", ntl_weight=0.3, pdl_alpha=0.5)
GAUSSIAN_CONFIG = dataclasses.replace(CONFIG, gaussian_sigma=1.0)


@dataclass
class Problem:
    """One rank's inputs. logits: [T, V/tp]; hidden [T, h]; weight [V/tp, h]; labels [T]."""

    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    labels: torch.Tensor
    pdl_weights: torch.Tensor
    numbers: NumberTable
    group: dist.ProcessGroup | None
    naive_ntl: Callable | None
    # One Objective per config, built on first use as a training run builds it once.
    objectives: dict = field(default_factory=dict)

    def objective(self, config: ObjectiveConfig) -> Objective:
        if config not in self.objectives:
            self.objectives[config] = Objective(config, self.numbers, self.pdl_weights)
        return self.objectives[config]


@dataclass
class Measurement:
    seconds: float
    saved_bytes: int  # distinct storages autograd keeps for backward (see saved_for_backward)
    big_saved: int  # of those, storages of at least half a [T, V/tp] tensor
    peak_bytes: int | None  # CUDA only: peak allocated above the inputs, fwd + bwd


def saved_for_backward(
    step: Callable[[], torch.Tensor], exclude: list[torch.Tensor], big: int
) -> tuple[int, int]:
    """(bytes of the distinct storages autograd saves while `step()` builds its graph, number
    of those with >= `big` bytes), not counting the storages of `exclude`.

    Saved logits count: a model frees its logits after the loss unless the loss keeps them
    (Megatron's CE keeps its softmax in their buffer). Hidden states and the output weight do
    not: the LM head's matmul keeps them anyway.
    """
    own = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    del loss
    return sum(storages.values()), sum(1 for n in storages.values() if n >= big)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], setup: Callable[[], None], repeats: int, group,
          device: torch.device) -> float:
    """Median seconds of `step()` over `repeats` runs after one warm-up, `setup()` before each
    run, off the clock; the slowest rank counts."""
    setup()
    step()
    times = []
    for _ in range(repeats):
        setup()
        _synchronize(device)
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        step()
        _synchronize(device)
        # On the device: an NCCL group carries no CPU tensors.
        elapsed = torch.tensor([time.perf_counter() - start], device=device)
        if group is not None:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(elapsed.item())
    return statistics.median(times)


def _loss_of(method: str, p: Problem, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """The summed loss of `method` on input x (logits, or hidden with weight w)."""
    if method == "megatron":
        from megatron.core import tensor_parallel

        return tensor_parallel.vocab_parallel_cross_entropy(x, p.labels).sum()
    if method == "megatron_fused":
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        group = p.group if p.group is not None else dist.group.WORLD
        return fused_vocab_parallel_cross_entropy(x, p.labels, group).sum()
    if method == "naive":
        return _naive_loss(p, x)
    if method in ("unchunked", "ours", "ours_gaussian"):
        rows = x.shape[0] if method == "unchunked" else None
        kernel = "torch" if method == "unchunked" else None
        config = GAUSSIAN_CONFIG if method == "ours_gaussian" else CONFIG
        return p.objective(config)(x, p.labels, tp_group=p.group, rows_per_chunk=rows,
                                   kernel=kernel).loss.sum()
    if method == "head_unfused":
        if p.group is not None:  # a column-parallel head all-reduces grad_hidden, as fused does
            from megatron.core.tensor_parallel.mappings import (
                copy_to_tensor_model_parallel_region,
            )

            x = copy_to_tensor_model_parallel_region(x)
        return p.objective(CONFIG)(x @ w.t(), p.labels, tp_group=p.group).loss.sum()
    if method == "head_fused":
        return p.objective(CONFIG).fused(x, w, p.labels, tp_group=p.group).loss.sum()
    raise ValueError(f"unknown method {method!r}")


def _naive_loss(p: Problem, shard: torch.Tensor) -> torch.Tensor:
    """Gather the vocab on every rank, then ntloss: what the objectives avoid. The gather is
    outside autograd, so each rank back-propagates its replicated loss into its own slice."""
    world = 1 if p.group is None else dist.get_world_size(p.group)
    rank = 0 if p.group is None else dist.get_rank(p.group)
    parts = [torch.empty_like(shard) for _ in range(world)]
    if p.group is None:
        parts = [shard.detach()]
    else:
        dist.all_gather(parts, shard.detach().contiguous(), group=p.group)
    parts[rank] = shard
    logits = torch.cat(parts, dim=-1)
    ce = F.cross_entropy(logits.float(), p.labels, reduction="none")
    ntl = p.naive_ntl(logits.unsqueeze(0), p.labels.unsqueeze(0), reduction="sum")
    return (p.pdl_weights[p.labels] * ce).sum() + CONFIG.ntl_weight * ntl


def measure(method: str, p: Problem, repeats: int, device: torch.device) -> Measurement:
    """Time, saved bytes and (CUDA) peak memory of `method`, forward + backward; with
    repeats 0 only the saved bytes (one forward)."""
    head = method in HEAD_METHODS
    source = p.hidden if head else p.logits
    weight = p.weight.detach().requires_grad_() if head else None
    # Megatron's CE writes into its input, as into a real model's fresh logits: a fresh copy
    # per call, made off the clock. The others get the same treatment. The logits are an
    # intermediate of the graph, as a model's head output is (`+ 0` on a fresh leaf, off the
    # clock), so that ours may write its gradient over them too (grad_in_place).
    box: list[torch.Tensor] = []

    def setup() -> None:
        box.clear()
        leaf = source.detach().clone().requires_grad_()
        box.append(leaf if head else leaf + 0)

    def step() -> None:
        _loss_of(method, p, box[0], weight).backward()

    seconds = timed(step, setup, repeats, p.group, device) if repeats > 0 else 0.0
    setup()
    exclude = [box[0], weight] if head else []
    width = p.weight.shape[0] if head else p.logits.shape[-1]
    # In bytes: half a [T, V/tp] tensor in the inputs' dtype.
    big = p.labels.numel() * width * source.element_size() // 2
    saved, large = saved_for_backward(lambda: _loss_of(method, p, box[0], weight), exclude, big)
    peak = None
    if device.type == "cuda" and repeats > 0:
        setup()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    return Measurement(seconds, saved, large, peak)
