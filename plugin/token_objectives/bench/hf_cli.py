"""`token-objectives bench-hf`: its flags, parsed before the measuring of `hf` (torch,
transformers) is imported, so that `--help` and a usage error are immediate."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from token_objectives.bench import HF_METHODS

__all__ = ["DESCRIPTION", "main"]

DESCRIPTION = """\
One `transformers.Trainer` step (forward + backward of `Trainer.training_step`) of a
LlamaForCausalLM, three ways:

  hf          the model's own loss (HF's ForCausalLMLoss: CE alone, on the [b, s, V] logits)
  ours        ObjectiveLoss as compute_loss_func (CE + NTL-WAS + PDL on the logits)
  ours_fused  ObjectiveLoss(fused=True): the same from the hidden states, no logits

Median time over --repeats steps after one warm-up, and the bytes autograd saves for backward
beyond the parameters (bench.methods.saved_for_backward; `big`: saved tensors of at least half
the logits), plus peak memory on CUDA. Ratios are against `hf`. Not a test.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """`token-objectives bench-hf ARGS`: parse ARGS, then `hf.run`."""
    parser = argparse.ArgumentParser(prog="token-objectives bench-hf", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="default: bf16 on CUDA")
    parser.add_argument("--methods", nargs="+", choices=HF_METHODS, default=list(HF_METHODS))
    args = parser.parse_args(argv)
    from token_objectives.bench import hf

    return hf.run(args)
