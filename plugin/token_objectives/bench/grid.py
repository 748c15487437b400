"""`token-objectives bench`'s measuring: CE+NTL+PDL against Megatron's CE, a naive version and
ntloss, over a grid of T, V and TP. What it measures and prints: grid_cli.DESCRIPTION (the
command's --help); its flags: grid_cli."""

from __future__ import annotations

import argparse
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from token_objectives import NumberTable
from token_objectives.bench import HEAD_METHODS, LOGIT_METHODS
from token_objectives.bench.methods import Problem, measure
from token_objectives.tables.errors import InputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# HBM bandwidth of the GPU, GB/s, from the vendors' data sheets (matched on the device name).
PEAK_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("H800", 3350.0),
            ("B200", 8000.0), ("GB200", 8000.0), ("A100-SXM4-80GB", 2039.0),
            ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("A10", 600.0))


def peak_bandwidth_gbs(device: str) -> float | None:
    """The data-sheet HBM bandwidth of GPU 0, or None (CPU, or a GPU not in PEAK_GBS)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


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


def synthetic_tables(vocab: int, device: torch.device) -> tuple[torch.Tensor, NumberTable]:
    """Zipf-like PDL weights fp32 [V] and a number table with the digits at ids 0..9."""
    counts = (1e7 / torch.arange(1, vocab + 1, dtype=torch.float64)).floor()
    weights = (counts + 1) ** -0.5
    weights = (weights / ((weights * counts).sum() / counts.sum())).float().to(device)
    values = torch.full((vocab,), float("nan"))
    values[:10] = torch.arange(10.0)
    return weights, NumberTable.from_values(values)


def _labels(tokens: int, vocab: int, device: torch.device) -> torch.Tensor:
    """long [T]: random ids, a tenth of them digits (number tokens)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(10, vocab - 1, (tokens,), generator=gen)
    digits = torch.rand(tokens, generator=gen) < 0.1
    labels[digits] = torch.randint(0, 10, (int(digits.sum()),), generator=gen)
    return labels.to(device)


def _shard(rows: int, cols: int, scale: float, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)
            * scale).to(dtype)


def estimate_bytes(method: str, tokens: int, vocab: int, tp: int, hidden: int,
                   dtype: torch.dtype, forward_only: bool = False) -> int:
    """Rough per-rank peak of `method`: enough to skip what cannot fit, not a measurement."""
    item = torch.finfo(dtype).bits // 8
    shard = tokens * (vocab // tp)
    if forward_only and method == "head_unfused":  # the logits, kept for backward
        return shard * item + (tokens + vocab // tp) * hidden * item * 2
    if method == "naive":  # the gathered logits, their fp32 copy, softmax and gradient
        return tokens * vocab * (item + 12) + shard * item * 2
    if method == "head_fused":
        return (tokens + vocab // tp) * hidden * item * 4
    # input, its fresh copy and the gradient, plus fp32 temporaries
    return shard * (3 * item + (4 if method in ("unchunked", "megatron_fused") else 0))


def _worker(rank: int, world: int, port: int, args, results) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
        rank=rank, world_size=world, timeout=timedelta(minutes=60),
    )
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group() if world > 1 else None
    rows = []
    for vocab in args.vocab:
        weights, numbers = synthetic_tables(vocab, device)
        naive_ntl = None
        if "naive" in args.methods:
            import ntloss

            naive_ntl = ntloss.NTLoss(_synthetic_tokenizer(vocab), vocab_size=vocab)
        for tokens in args.tokens:
            for dtype_name in args.dtypes:
                rows += _run_config(args, rank, world, group, device, tokens, vocab,
                                    DTYPES[dtype_name], dtype_name, weights, numbers, naive_ntl)
    parallel_state.destroy_model_parallel()
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def _run_config(args, rank, world, group, device, tokens, vocab, dtype, dtype_name, weights,
                numbers, naive_ntl) -> list[dict]:
    width = vocab // world
    budget = args.max_gb * 2**30 / world
    wanted = [m for m in args.methods if args.memory_only is False or m in HEAD_METHODS]
    fits = {m: estimate_bytes(m, tokens, vocab, world, args.hidden, dtype,
                              args.memory_only) <= budget for m in wanted}
    needs_logits = any(fits[m] for m in wanted if m in LOGIT_METHODS)
    needs_head = any(fits[m] for m in wanted if m in HEAD_METHODS)
    problem = Problem(
        logits=(_shard(tokens, width, 2.0, dtype, device, 1 + rank) if needs_logits else None),
        hidden=(_shard(tokens, args.hidden, 1.0, dtype, device, 100) if needs_head else None),
        weight=(_shard(width, args.hidden, args.hidden**-0.5 * 2, dtype, device, 200 + rank)
                if needs_head else None),
        labels=_labels(tokens, vocab, device), pdl_weights=weights, numbers=numbers,
        group=group, naive_ntl=naive_ntl,
    )
    base = {"tp": world, "tokens": tokens, "vocab": vocab, "dtype": dtype_name}
    rows = []
    for method in wanted:
        row = dict(base, method=method)
        if not fits[method]:
            need = estimate_bytes(method, tokens, vocab, world, args.hidden, dtype,
                                  args.memory_only)
            row["skipped"] = f"needs ~{need / 2**30:.0f} GiB/rank"
        else:
            try:
                result = measure(method, problem, 0 if args.memory_only else args.repeats,
                                 device)
                row.update(vars(result))
            except Exception as error:  # a baseline that does not run here is reported, not fatal
                row["skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0][:60]}"
        rows.append(row)
        if rank == 0:
            print(_row_line(row), flush=True)
    return rows


def _row_line(row: dict) -> str:
    head = f"TP={row['tp']} T={row['tokens']} V={row['vocab']} {row['dtype']} {row['method']}"
    if "skipped" in row:
        return f"{head}: skipped ({row['skipped']})"
    return (f"{head}: {row['seconds'] * 1e3:.1f} ms, saved {row['saved_bytes'] / 2**20:.1f} MiB, "
            f"{row['big_saved']} logits-sized")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(rows: list[dict], args) -> str:
    """One table per (TP, T, V, dtype); ratios against Megatron's CE, or the unfused head."""
    lines = [
        f"{args.device}, {args.threads} thread(s) per rank; loss = CE + NTL-WAS + PDL "
        f"(megatron* = CE alone); median of {args.repeats}, fwd+bwd; h={args.hidden} for the "
        f"head methods; saved = bytes autograd keeps for backward (the logits included; for "
        f"the head methods, beyond hidden and weight); big = saved tensors of >= T*V/tp/2 "
        f"elements; GB/s = 3 logits' bytes (read fwd, read + write bwd) / time; % peak = of "
        f"{_peak_words(args)}",
        f"{'TP':>2} {'T':>6} {'V':>7} {'dtype':<5} {'method':<15}{'ms':>10}{'x ref':>7}"
        f"{'saved MiB':>11}{'x ref':>7}{'big':>4}{'peak MiB':>10}{'GB/s':>7}{'% peak':>7}",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["tp"], row["tokens"], row["vocab"], row["dtype"]), []).append(row)
    for key, group_rows in groups.items():
        by_method = {r["method"]: r for r in group_rows}
        for row in group_rows:
            ref = by_method.get("head_unfused" if row["method"] in HEAD_METHODS else "megatron")
            lines.append(_table_line(key, row, ref, getattr(args, "peak_gbs", None)))
    return "\n".join(lines)


def _peak_words(args) -> str:
    if getattr(args, "peak_gbs", None):
        return f"the data-sheet {args.peak_gbs:.0f} GB/s"
    return "a peak not known here (--peak-gbs)"


def _ratio(value, ref, field) -> str:
    if ref is None or "skipped" in ref or not ref.get(field):
        return f"{'-':>7}"
    return f"{value / ref[field]:>7.2f}" if value < 1000 * ref[field] else f"{'>999':>7}"


def _table_line(key: tuple, row: dict, ref: dict | None, peak_gbs: float | None = None) -> str:
    tp, tokens, vocab, dtype = key
    head = f"{tp:>2} {tokens:>6} {vocab:>7} {dtype:<5} {row['method']:<15}"
    if "skipped" in row:
        return f"{head}skipped: {row['skipped']}"
    seconds = f"{row['seconds'] * 1e3:>10.1f}" if row["seconds"] else f"{'-':>10}"
    time_ratio = _ratio(row["seconds"], ref, "seconds") if row["seconds"] else f"{'-':>7}"
    peak = f"{row['peak_bytes'] / 2**20:>10.0f}" if row["peak_bytes"] is not None else f"{'-':>10}"
    bandwidth = share = f"{'-':>7}"
    if row["seconds"] and row["method"] not in HEAD_METHODS:
        moved = 3 * tokens * (vocab // tp) * torch.finfo(DTYPES[dtype]).bits // 8
        gbs = moved / row["seconds"] / 1e9
        bandwidth = f"{gbs:>7.1f}"
        if peak_gbs:
            share = f"{100 * gbs / peak_gbs:>6.0f}%"
    return (f"{head}{seconds}{time_ratio}{row['saved_bytes'] / 2**20:>11.1f}"
            f"{_ratio(row['saved_bytes'], ref, 'saved_bytes')}{row['big_saved']:>4}{peak}"
            f"{bandwidth}{share}")


def run(args: argparse.Namespace) -> int:
    """The grid of `args` (grid_cli's flags, parsed): print the report; returns 0. Raises
    InputError when --tp asks for more GPUs than there are."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtypes = args.dtypes or (["bf16"] if args.device == "cuda" else ["fp32"])
    if args.memory_only:
        args.repeats = 0
    if args.device == "cuda" and max(args.tp) > torch.cuda.device_count():
        raise InputError(f"--tp {max(args.tp)} needs as many GPUs; {torch.cuda.device_count()} "
                         f"here")
    if args.max_gb is None:
        args.max_gb = _default_budget_gb(args.device)
    if args.peak_gbs is None:
        args.peak_gbs = peak_bandwidth_gbs(args.device)
    rows = []
    for tp in args.tp:
        rows += _run_tp(tp, args)
    print(report(rows, args))
    return 0


def _default_budget_gb(device: str) -> float:
    if device == "cuda":
        return 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    return 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _run_tp(tp: int, args) -> list[dict]:
    budget = args.max_gb
    if args.device == "cuda":  # per GPU, and each rank has its own
        args.max_gb = budget * tp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, tp, port, args, results)) for r in range(tp)]
    for proc in procs:
        proc.start()
    try:
        rows = _collect(results, procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
        args.max_gb = budget
    return rows


def _collect(results, procs) -> list[dict]:
    """Rank 0's rows; fails instead of waiting forever when a rank dies."""
    import queue

    while True:
        try:
            return results.get(timeout=5)
        except queue.Empty as empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"a bench rank exited with code {dead[0].exitcode}; see above") from empty
