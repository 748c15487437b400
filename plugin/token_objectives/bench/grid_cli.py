"""`token-objectives bench`: its flags, parsed before the measuring of `grid` (torch,
megatron-core) is imported, so that `--help` and a usage error are immediate."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from token_objectives.bench import HEAD_METHODS, LOGIT_METHODS

__all__ = ["DESCRIPTION", "main"]

DESCRIPTION = """\
CE+NTL+PDL against Megatron's CE, a naive version and ntloss.

Over a grid of T (tokens), V (vocab) and TP sizes, each of TP processes holds a [T, V/tp] logits
shard (or hidden states [T, h] and an output-layer shard [V/tp, h]) and runs every method of
bench_methods forward + backward, in one run: median time, bytes saved for backward (CPU and
GPU), saved tensors as large as the logits, and peak memory (GPU). Ratios are against
Megatron's CE on the same logits, and for the fused LM head against the unfused head.
Configurations whose tensors would not fit in --max-gb are reported as skipped. Not a test.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """`token-objectives bench ARGS`: parse ARGS, then `grid.run`."""
    parser = argparse.ArgumentParser(prog="token-objectives bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536],
                        help="T, tokens per batch (a grid)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072],
                        help="V, the full vocab (a grid)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2],
                        help="tensor-parallel sizes (processes; GPUs on CUDA)")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16", "fp16"),
                        help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--methods", nargs="+", default=list(LOGIT_METHODS + HEAD_METHODS),
                        choices=list(LOGIT_METHODS + HEAD_METHODS))
    parser.add_argument("--hidden", type=int, default=256, help="h for the head methods")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads per rank")
    parser.add_argument("--max-gb", type=float, help="memory for all ranks together "
                        "(default: 60%% of RAM on CPU, 90%% of a GPU's memory per rank)")
    parser.add_argument("--peak-gbs", type=float,
                        help="the GPU's HBM bandwidth in GB/s (default: from its name)")
    parser.add_argument("--memory-only", action="store_true",
                        help="head methods only, saved bytes only (no timing)")
    args = parser.parse_args(argv)
    for tp in args.tp:
        for vocab in args.vocab:
            if vocab % tp:
                parser.error(f"--vocab {vocab} is not divisible by --tp {tp}")
    from token_objectives.bench import grid

    return grid.run(args)
