"""`token-objectives build-correction-data`: its flags, parsed before `build_data` (torch, numpy,
transformers) is imported, so that `--help` and a usage error are immediate."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from token_objectives.correction import DEFAULT_MARKER, ON_BAD_LINE
from token_objectives.tables.output_files import add_mode_argument

__all__ = ["add_arguments", "main", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `build-correction-data` flags."""
    parser.add_argument("--input", required=True, help='JSONL file: {"prompt": ..., '
                        '"answer": ...} per line')
    parser.add_argument("--model", required=True,
                        help="local Hugging Face causal-LM directory that answers the prompts")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.bin/.idx and PREFIX_loss_mask.bin/.idx")
    parser.add_argument("--tokenizer", help="the training run's tokenizer (default: --model)")
    parser.add_argument("--marker", default=DEFAULT_MARKER,
                        help="text between the own answer and the reference (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="length limit of the own answer (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="prompts per generate call (default: %(default)s)")
    parser.add_argument("--on-bad-line", choices=ON_BAD_LINE, default="error",
                        help="error (default): stop and list the bad lines; skip: leave them "
                             "out and list them")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the generating model (default: %(default)s)")
    parser.add_argument("--device", help="device of the generating model (default: cuda if "
                                         "available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mode_argument(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """`token-objectives build-correction-data`: build, print a summary; returns 0."""
    from token_objectives.correction.build_data import build_correction_data

    data = build_correction_data(
        args.input, args.model, args.output_prefix, tokenizer_path=args.tokenizer,
        marker=args.marker, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        on_bad_line=args.on_bad_line, dtype=args.dtype, device=args.device,
        progress=not args.no_progress, mode=args.mode,
    )
    print(f"wrote {data.num_documents} documents, {data.num_tokens} tokens "
          f"({data.num_loss_tokens} in the loss) -> {data.prefix}.bin/.idx + "
          f"{data.mask_prefix}.bin/.idx; skipped {len(data.skipped)} bad line(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`token-objectives build-correction-data ARGS`: parse ARGS, then `run_from_args`."""
    parser = argparse.ArgumentParser(
        prog="token-objectives build-correction-data",
        description="reference-answer correction data: the model's greedy answers + reference "
        "answers")
    return run_from_args(add_arguments(parser).parse_args(argv))
