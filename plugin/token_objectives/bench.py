"""`token-objectives bench`: fused CE+NTL+PDL against Megatron's CE and a naive version, TP on gloo.

Each of `--tp` processes holds a [T, V/tp] logits shard. Three ways to get a loss and the shard's
gradient are timed in the same run, forward + backward:
  megatron  megatron-core's tensor_parallel.vocab_parallel_cross_entropy (CE alone)
  naive     all-gather the logits, F.cross_entropy * PDL weight + 0.3 * ntloss.NTLoss
  fused     token_objectives.objective_loss with CE + NTL (Wasserstein) + PDL
Bytes saved for backward are counted with torch.autograd.graph.saved_tensors_hooks (distinct
storages, so an in-place buffer counts once). Not a test: it prints figures and ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from token_objectives import NumberTable, ObjectiveConfig, objective_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_saved_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `step()` builds its graph."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    del loss
    return sum(storages.values())


def _synthetic_tokenizer(vocab: int):
    """A word-level HF tokenizer of `vocab` tokens whose ids 0..9 are the digits (for ntloss)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokens = {str(d): d for d in range(10)}
    tokens.update({f"w{i}": i for i in range(10, vocab - 1)})
    tokens["<unk>"] = vocab - 1
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(tokens, "<unk>")), unk_token="<unk>"
    )


def _problem(tokens: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=gen) * 2
    labels = torch.randint(10, vocab - 1, (tokens,), generator=gen)
    digits = torch.rand(tokens, generator=gen) < 0.1
    labels[digits] = torch.randint(0, 10, (int(digits.sum()),), generator=gen)
    counts = (1e7 / torch.arange(1, vocab + 1, dtype=torch.float64)).floor()  # Zipf
    weights = (counts + 1) ** -0.5
    weights = (weights / ((weights * counts).sum() / counts.sum())).float()
    values = torch.full((vocab,), float("nan"))
    values[:10] = torch.arange(10.0)
    return logits, labels, weights, NumberTable.from_values(values)


def _time(step: Callable[[], None], repeats: int, group) -> float:
    """Median seconds of `step` over `repeats` runs after one warm-up; the slowest rank counts."""
    step()
    times = []
    for _ in range(repeats):
        dist.barrier(group)
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(elapsed.item())
    return statistics.median(times)


def _measure(
    dtype, dtype_name, full, labels, weights, numbers, config, naive_ntl, group, repeats
) -> dict:
    """Times and saved bytes of the three methods on this rank's shard of `full` [T, V]."""
    from megatron.core import tensor_parallel

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    width = full.shape[-1] // world
    shard = full[:, rank * width : (rank + 1) * width].to(dtype).contiguous()
    # Megatron writes into its input (as into a real model's fresh logits): one copy per call,
    # made before the clock starts.
    fresh = [shard.clone() for _ in range(repeats + 1)]

    def megatron_step():
        x = fresh.pop().requires_grad_()
        loss = tensor_parallel.vocab_parallel_cross_entropy(x, labels)
        loss.sum().backward()
        return loss

    def fused_step():
        x = shard.detach().requires_grad_()
        out = objective_loss(x, labels, config, numbers, weights, group)
        out.loss.sum().backward()
        return out.loss

    def naive_step():
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard, group=group)
        logits = torch.cat(parts, dim=-1).requires_grad_()
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        loss = (weights[labels] * ce).sum()
        loss = loss + config.ntl_weight * naive_ntl(
            logits.unsqueeze(0), labels.unsqueeze(0), reduction="sum"
        )
        loss.backward()
        return logits.grad[:, rank * width : (rank + 1) * width]

    row = {"dtype": dtype_name}
    row["megatron_s"] = _time(megatron_step, repeats, group)
    row["fused_s"] = _time(fused_step, repeats, group)
    row["megatron_saved"] = count_saved_bytes(
        lambda: tensor_parallel.vocab_parallel_cross_entropy(shard.clone().requires_grad_(), labels)
    )
    row["fused_saved"] = count_saved_bytes(
        lambda: (
            objective_loss(
                shard.detach().requires_grad_(), labels, config, numbers, weights, group
            ).loss
        )
    )
    if naive_ntl is not None:
        row["naive_s"] = _time(naive_step, repeats, group)
    return row


def _worker(rank: int, world: int, port: int, args, results) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=30),
    )
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    full, labels, weights, numbers = _problem(args.tokens, args.vocab)
    config = ObjectiveConfig(ntl="was", ntl_weight=0.3, pdl_alpha=0.5)
    naive_ntl = None
    if not args.skip_naive:
        import ntloss

        naive_ntl = ntloss.NTLoss(_synthetic_tokenizer(args.vocab), vocab_size=args.vocab)
    rows = [
        _measure(
            DTYPES[name],
            name,
            full,
            labels,
            weights,
            numbers,
            config,
            naive_ntl,
            group,
            args.repeats,
        )
        for name in args.dtypes
    ]
    parallel_state.destroy_model_parallel()
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(rows: list[dict], args) -> str:
    lines = [
        f"TP={args.tp} on gloo, CPU, {args.threads} thread(s) per rank; T={args.tokens}, "
        f"V={args.vocab}; fused = CE + NTL-WAS + PDL; median of {args.repeats}, fwd+bwd",
        f"{'dtype':<6}{'megatron CE ms':>16}{'fused ms':>10}{'fused/megatron':>16}"
        f"{'naive ms':>10}{'naive/fused':>13}{'saved MB meg':>14}{'saved MB fused':>16}"
        f"{'fused/meg':>11}",
    ]
    for row in rows:
        naive = row.get("naive_s")
        lines.append(
            f"{row['dtype']:<6}{row['megatron_s'] * 1e3:>16.1f}{row['fused_s'] * 1e3:>10.1f}"
            f"{row['fused_s'] / row['megatron_s']:>16.2f}"
            f"{(naive * 1e3 if naive else float('nan')):>10.1f}"
            f"{(naive / row['fused_s'] if naive else float('nan')):>13.2f}"
            f"{row['megatron_saved'] / 2**20:>14.1f}{row['fused_saved'] / 2**20:>16.1f}"
            f"{row['fused_saved'] / row['megatron_saved']:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="token-objectives bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens per batch")
    parser.add_argument("--vocab", type=int, default=32000, help="V, the full vocab")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (processes)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads per rank",
    )
    parser.add_argument("--skip-naive", action="store_true", help="skip the ntloss baseline")
    args = parser.parse_args(argv)
    if args.vocab % args.tp:
        parser.error(f"--vocab {args.vocab} is not divisible by --tp {args.tp}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, args.tp, _free_port_cached(), args, results))
        for r in range(args.tp)
    ]
    for proc in procs:
        proc.start()
    rows = results.get()
    for proc in procs:
        proc.join()
    print(report(rows, args))
    return 0


_PORT: list[int] = []


def _free_port_cached() -> int:
    if not _PORT:
        _PORT.append(_free_port())
    return _PORT[0]


if __name__ == "__main__":
    raise SystemExit(main())
