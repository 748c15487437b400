"""`token-objectives` command line: count-frequencies, inspect-vocab, build-correction-data,
ensemble, evaluate, check-kernels, plan-memory, bench, bench-hf."""

from __future__ import annotations

import argparse
import re
import sys

from token_objectives.tables.errors import InputError
from token_objectives.tables.output_files import add_mode_argument

PROG = "token-objectives"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    count = commands.add_parser(
        "count-frequencies",
        help="count token ids over a corpus into a frequencies file (for PDL weights)",
    )
    count.add_argument("--output", required=True, help="frequencies file to write (safetensors)")
    source = count.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data-prefix", nargs="+", metavar="PREFIX", help="Megatron indexed datasets (.bin/.idx)"
    )
    source.add_argument(
        "--text", nargs="+", metavar="FILE",
        help="UTF-8 text files, tokenized as preprocess_data.py does: one document per line (a "
        "JSON object's --json-key field in .json/.jsonl), plus its end-of-document token",
    )
    count.add_argument(
        "--tokenizer",
        help="local tokenizer path; required for --text, recorded as the identity otherwise",
    )
    count.add_argument(
        "--vocab-size", type=int, help="the model's padded vocab size (default: tokenizer size)"
    )
    count.add_argument(
        "--no-append-eod", dest="append_eod", action="store_false",
        help="--text: count no end-of-document token (for data built without preprocess_data's "
        "--append-eod); by default one is counted per non-empty document",
    )
    count.add_argument("--eod-id", type=int,
                       help="--text: the end-of-document id (default: the tokenizer's)")
    count.add_argument("--json-key", default="text",
                       help="--text: the document field of .json/.jsonl lines (default: text)")
    count.add_argument("--chunk-tokens", type=int, default=1 << 24, help=argparse.SUPPRESS)
    count.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mode_argument(count)

    inspect = commands.add_parser("inspect-vocab", help="list the number tokens of a tokenizer")
    inspect.add_argument("tokenizer", help="local tokenizer path")
    inspect.add_argument("--number-tokens", choices=("auto", "digit", "groups", "multi"),
                         default="auto", help="the mode to list (default auto: digit or groups, "
                         "from the vocabulary)")
    inspect.add_argument("--vocab-size", type=int, help="the model's padded vocab size")
    inspect.add_argument("--text", nargs="+", metavar="FILE",
                         help="UTF-8 text files: print the share of their digits that NTL "
                         "reaches under each mode")

    from token_objectives.correction.build_data import add_arguments as add_correction_arguments

    add_correction_arguments(commands.add_parser(
        "build-correction-data",
        help="reference-answer correction data: the model's greedy answers + reference answers",
    ))

    from token_objectives.ensemble.cli import add_arguments as add_ensemble_arguments

    add_ensemble_arguments(commands.add_parser(
        "ensemble", help="GaC token-level ensemble of local models with different tokenizers"
    ))

    from token_objectives.evaluation.run import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(commands.add_parser(
        "evaluate", help="greedy answers to JSONL problems, scored by their last number "
        "(accuracy, MAE, R², digit error), from a Megatron-loop checkpoint or a local HF model"
    ))

    kernels = commands.add_parser(
        "check-kernels",
        help="compile every Triton kernel variant ahead of time (no GPU needed) and print "
        "registers, spills and the inner loop's SASS instructions per element",
    )
    kernels.add_argument("--arch", nargs="+", default=["sm_80", "sm_90", "sm_100"], type=_arch,
                         help="architectures to compile for (default: sm_80 sm_90 sm_100)")
    kernels.add_argument("--dtype", nargs="+", choices=("bf16", "fp16", "fp32"),
                         default=["bf16", "fp16", "fp32"], help="logits dtypes (default: all)")

    commands.add_parser("plan-memory", help="per-GPU memory estimate of a training config "
                        "(`plan-memory --help`)", add_help=False)
    commands.add_parser("bench", help="benchmark the objectives (`bench --help`)", add_help=False)
    commands.add_parser("bench-hf", help="one transformers.Trainer step: HF's loss vs ours, "
                        "on the logits and fused (`bench-hf --help`)", add_help=False)
    return parser


def _arch(text: str) -> str:
    if re.fullmatch(r"sm_\d+a?", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an architecture: use e.g. sm_90")
    return text


def _count_frequencies(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from token_objectives.tables.frequencies import (
        count_indexed_dataset,
        count_text_files,
        save_frequencies,
    )
    from token_objectives.tables.output_files import check_output_path
    from token_objectives.tables.tokenizers import list_vocab, load_tokenizer, tokenizer_identity

    if args.text and not args.tokenizer:
        parser.error("count-frequencies --text needs --tokenizer")
    # Before the counting, which can take hours: a path that cannot be written fails now.
    check_output_path(args.output, "--output")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    vocab_size = args.vocab_size
    if tokenizer is not None:
        tokenizer_size = list_vocab(tokenizer).size
        if vocab_size is None:
            vocab_size = tokenizer_size
        elif vocab_size < tokenizer_size:
            raise InputError(
                f"--vocab-size {vocab_size} is smaller than the tokenizer's {tokenizer_size} ids "
                f"of {args.tokenizer}; pass the model's padded vocab size (>= {tokenizer_size})"
            )
    if vocab_size is None:
        parser.error("count-frequencies --data-prefix needs --vocab-size or --tokenizer")
    progress = not args.no_progress
    if args.text:
        counts = count_text_files(args.text, tokenizer, vocab_size, progress=progress,
                                  append_eod=args.append_eod, eod_id=args.eod_id,
                                  json_key=args.json_key)
        sources = f"{len(args.text)} text file(s)"
    else:
        counts = count_indexed_dataset(args.data_prefix, vocab_size, args.chunk_tokens, progress)
        sources = f"{len(args.data_prefix)} indexed dataset(s)"
    if tokenizer is not None and counts[tokenizer_size:].any():
        found = int(counts[tokenizer_size:].nonzero()[0][0]) + tokenizer_size
        raise InputError(
            f"the data holds token id {found}, which {args.tokenizer} ({tokenizer_size} ids) "
            f"cannot produce: the data was built with another tokenizer; pass --tokenizer the "
            f"one it was preprocessed with")
    # Without a tokenizer the file cannot be checked against one later: record that plainly.
    identity = tokenizer_identity(tokenizer) if tokenizer is not None else "unknown"
    save_frequencies(args.output, counts, tokenizer_identity=identity, vocab_size=vocab_size,
                     mode=args.mode)
    print(
        f"counted {int(counts.sum())} tokens, {int((counts > 0).sum())} distinct ids of "
        f"{vocab_size}, from {sources} -> {args.output} (tokenizer {identity})"
    )
    return 0


def _inspect_vocab(args: argparse.Namespace) -> int:
    from token_objectives.tables.numbers import NumberTable, digit_share
    from token_objectives.tables.tokenizers import as_tokenizer

    tokenizer = as_tokenizer(args.tokenizer)
    table = NumberTable.from_tokenizer(tokenizer, vocab_size=args.vocab_size,
                                       number_tokens=args.number_tokens)
    print(table.describe())
    for path in args.text or ():
        try:
            lines = open(path, encoding="utf-8").read().splitlines()  # noqa: SIM115
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"--text {path}: cannot read it as UTF-8 text ({error})") from None
        digits = sum(ch.isascii() and ch.isdigit() for line in lines for ch in line)
        print(f"digits of {path} that NTL reaches ({digits} digits):")
        for mode in ("digit", "groups", "multi"):
            chosen = "  <- this table" if mode == table.mode else ""
            print(f"  {mode:<7}{digit_share(lines, tokenizer, mode):>8.1%}{chosen}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `token-objectives` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from token_objectives.bench.grid import main as bench_main

        result = bench_main(argv[1:])
        return 0 if result is None else int(result)
    if argv[:1] == ["plan-memory"]:
        from token_objectives.training.memory_layouts import main as plan_memory

        try:
            return plan_memory(argv[1:])
        except (ValueError, OSError) as error:
            return _report("plan-memory", error)
    if argv[:1] == ["bench-hf"]:
        from token_objectives.bench.hf import main as bench_hf_main

        return bench_hf_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "count-frequencies":
            return _count_frequencies(args, parser)
        if args.command == "build-correction-data":
            from token_objectives.correction.build_data import run_from_args

            return run_from_args(args)
        if args.command == "ensemble":
            from token_objectives.ensemble.cli import run as run_ensemble

            return run_ensemble(args)
        if args.command == "evaluate":
            from token_objectives.evaluation.run import run_from_args as run_evaluate
            from token_objectives.training.evaluation_checkpoint import load_megatron_checkpoint

            return run_evaluate(args, load_megatron_checkpoint)
        if args.command == "check-kernels":
            from token_objectives.ops.kernel_check import run as check_kernels

            return check_kernels(tuple(args.arch), tuple(args.dtype))
        return _inspect_vocab(args)
    # Only bad inputs become one line; any other exception is a bug and keeps its traceback.
    except (InputError, OSError) as error:
        return _report(args.command, error)
    except ImportError as error:
        if (error.name or "").startswith("token_objectives"):
            raise
        return _report(args.command, error)


def _report(command: str, error: Exception) -> int:
    """Print `error` as one line on stderr; returns the exit code 2."""
    message = " ".join(str(error).split())
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
