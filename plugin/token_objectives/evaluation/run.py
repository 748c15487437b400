"""`token-objectives evaluate`: its arguments, and `evaluate`, which the training loop calls too.

    token-objectives evaluate --checkpoint runs/quickstart --config configs/tiny.yaml \\
        --data eval.jsonl --out metrics.json
    token-objectives evaluate --hf-model hf_dir --data eval.jsonl --out metrics.json

--checkpoint is read by the function the caller passes: the command's entry point is
`training.evaluation_checkpoint.main`, which passes its `load_megatron_checkpoint`, since reading
a Megatron-loop checkpoint needs the loop's model builder and evaluation/ never imports training/.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from token_objectives.evaluation.problems import Problem, read_problems
from token_objectives.evaluation.report import build_report, format_table, write_report
from token_objectives.tables.errors import InputError
from token_objectives.tables.output_files import check_output_path

__all__ = ["CheckpointLoader", "add_arguments", "evaluate", "main", "run_from_args"]

# (--checkpoint, --config, --set overrides) -> a generator (evaluation.generate.MegatronGenerator)
CheckpointLoader = Callable[[str, str, Sequence[str]], object]


def evaluate(generator, problems: Sequence[Problem], max_new_tokens: int = 16,
             batch_size: int = 32, stop_at_newline: bool = True, progress: bool = False,
             source: dict | None = None) -> dict:
    """The report (`report.build_report`) of `generator`'s greedy answers to `problems`;
    generator: an `evaluation.generate` MegatronGenerator or HFGenerator."""
    generations = generator.generate([p.prompt for p in problems], max_new_tokens, batch_size,
                                     stop_at_newline=stop_at_newline, progress=progress)
    return build_report(problems, generations, source)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a Megatron-loop checkpoint: the run's output.dir, "
                       "its checkpoints/ (the latest complete step) or one step_N directory; "
                       "needs --config")
    model.add_argument("--hf-model", help="a local Hugging Face model directory (with its "
                       "tokenizer)")
    parser.add_argument("--config", help="--checkpoint: the run config (YAML) it was trained "
                        "with")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="--checkpoint: override a value of "
                        "the run config (e.g. data.tokenizer=PATH)")
    parser.add_argument("--data", required=True, help='JSONL of {"prompt", "answer"} lines')
    parser.add_argument("--out", required=True, help="the JSON report to write")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per batch (32)")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="the most tokens generated per prompt (16)")
    parser.add_argument("--keep-newlines", action="store_true", help="generate past the first "
                        "newline (by default a generation ends there)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace, load_checkpoint: CheckpointLoader) -> int:
    """The command: read, check, generate, score, print the table, write the JSON.
    load_checkpoint: reads --checkpoint (see the module docstring)."""
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.checkpoint is not None and args.config is None:
        raise InputError("--checkpoint needs --config, the run config (YAML) it was trained with")
    problems = read_problems(args.data)
    check_output_path(args.out, "--out")
    if args.checkpoint is not None:
        generator = load_checkpoint(args.checkpoint, args.config, args.overrides)
        source = {"checkpoint": str(args.checkpoint), "config": str(args.config)}
    else:
        from token_objectives.evaluation.generate import HFGenerator

        generator = HFGenerator(args.hf_model)
        source = {"hf_model": str(args.hf_model)}
    source.update(data=str(args.data), max_new_tokens=args.max_new_tokens)
    report = evaluate(generator, problems, args.max_new_tokens, args.batch_size,
                      stop_at_newline=not args.keep_newlines, progress=not args.no_progress,
                      source=source)
    write_report(args.out, report)
    print(format_table(report["metrics"]))
    print(f"report: {args.out}")
    return 0


def main(argv: Sequence[str] | None, load_checkpoint: CheckpointLoader) -> int:
    """`token-objectives evaluate ARGS`: parse ARGS, then `run_from_args`."""
    parser = argparse.ArgumentParser(
        prog="token-objectives evaluate",
        description="greedy answers to JSONL problems, scored by their last number (accuracy, "
        "MAE, R², digit error), from a Megatron-loop checkpoint or a local HF model")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), load_checkpoint)
