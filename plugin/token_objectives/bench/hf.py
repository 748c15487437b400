"""`token-objectives bench-hf`'s measuring: one `transformers.Trainer` step of a
LlamaForCausalLM with HF's loss and ours. What it measures and prints: hf_cli.DESCRIPTION
(the command's --help); its flags: hf_cli."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from token_objectives.bench.grid import synthetic_tables
from token_objectives.bench.methods import CONFIG, saved_for_backward


def _trainer(method: str, model, numbers, weights, device: str):
    from transformers import Trainer, TrainingArguments

    from token_objectives import Objective
    from token_objectives.integrations.hf import ObjectiveLoss

    args = TrainingArguments(output_dir="/tmp/token_objectives_bench_hf", report_to="none",
                             use_cpu=device == "cpu", save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1
    if method != "hf":
        ObjectiveLoss(Objective(CONFIG, numbers, weights),
                      fused=method == "ours_fused").attach(trainer)
    return trainer


def measure(method: str, args) -> dict:
    """Seconds, saved bytes, big saved tensors and (CUDA) peak bytes of one training_step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from token_objectives.integrations.hf import unpatch_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq)).to(device=device, dtype=dtype)
    weights, numbers = synthetic_tables(args.vocab, device)
    trainer = _trainer(method, model, numbers, weights, args.device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    count = torch.tensor(args.batch * (args.seq - 1), device=device)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        return trainer.training_step(model, {"input_ids": ids, "labels": ids}, count)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    times = []
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    logits_bytes = args.batch * args.seq * args.vocab * (2 if dtype == torch.bfloat16 else 4)
    saved, big = saved_for_backward(step, list(model.parameters()), logits_bytes // 2)
    peak = None
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    unpatch_model(model)
    return {"method": method, "seconds": statistics.median(times), "saved_bytes": saved,
            "big_saved": big, "peak_bytes": peak}


def report(rows: list[dict], args) -> str:
    ref = rows[0]
    lines = [
        f"{args.device} {args.dtype}, LlamaForCausalLM h={args.hidden} layers={args.layers} "
        f"V={args.vocab}, batch {args.batch} x seq {args.seq}; Trainer.training_step (fwd + bwd), "
        f"median of {args.repeats}; saved = bytes autograd keeps beyond the parameters; big = "
        f"saved tensors of >= half the logits; hf = CE alone, ours = CE + NTL-WAS + PDL",
        f"{'method':<12}{'ms':>10}{'x hf':>7}{'saved MiB':>11}{'x hf':>7}{'big':>4}"
        f"{'peak MiB':>10}",
    ]
    for row in rows:
        peak = f"{row['peak_bytes'] / 2**20:>10.0f}" if row["peak_bytes"] is not None else \
            f"{'-':>10}"
        lines.append(
            f"{row['method']:<12}{row['seconds'] * 1e3:>10.1f}"
            f"{row['seconds'] / ref['seconds']:>7.2f}{row['saved_bytes'] / 2**20:>11.1f}"
            f"{row['saved_bytes'] / max(ref['saved_bytes'], 1):>7.2f}{row['big_saved']:>4}{peak}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The methods of `args` (hf_cli's flags, parsed): print the report; returns 0."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    rows = [measure(method, args) for method in args.methods]
    print(report(rows, args))
    return 0
