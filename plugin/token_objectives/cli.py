"""`token-objectives` command line: count-frequencies, inspect-vocab, build-correction-data,
ensemble, evaluate, check-kernels, plan-memory, bench, bench-hf.

`token-objectives COMMAND --help` lists a command's options; `token-objectives --version` prints
the package's version."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence

from token_objectives.tables.errors import InputError, TokenObjectivesWarning
from token_objectives.version import __version__

PROG = "token-objectives"

# Every subcommand is declared here one way: its name -> (the module whose `main(argv) -> int`
# parses the rest of the command line and runs it, the line `token-objectives --help` shows).
# The module is imported only when its command runs, and imports torch (or transformers,
# megatron-core, triton) only after its parse, so that `--help` is immediate.
COMMANDS: dict[str, tuple[str, str]] = {
    "count-frequencies": (
        "token_objectives.tables.count_frequencies",
        "count token ids over a corpus into a frequencies file (for PDL weights)",
    ),
    "inspect-vocab": (
        "token_objectives.tables.inspect_vocab",
        "list the number tokens of a tokenizer",
    ),
    "build-correction-data": (
        "token_objectives.correction.cli",
        "reference-answer correction data: the model's greedy answers + reference answers",
    ),
    "ensemble": (
        "token_objectives.ensemble.cli",
        "GaC token-level ensemble of local models with different tokenizers",
    ),
    # evaluation.run's command, given the Megatron-loop checkpoint reader of training/.
    "evaluate": (
        "token_objectives.training.evaluation_checkpoint",
        "greedy answers to JSONL problems, scored by their last number (accuracy, MAE, R², "
        "digit error), from a Megatron-loop checkpoint or a local HF model",
    ),
    "check-kernels": (
        "token_objectives.ops.kernel_check",
        "compile every Triton kernel variant ahead of time (no GPU needed) and print registers, "
        "spills and the inner loop's SASS instructions per element",
    ),
    "plan-memory": (
        "token_objectives.training.memory_layouts",
        "per-GPU memory estimate of a training config",
    ),
    "bench": (
        "token_objectives.bench.grid_cli",
        "benchmark the objectives",
    ),
    "bench-hf": (
        "token_objectives.bench.hf_cli",
        "one transformers.Trainer step: HF's loss vs ours, on the logits and fused",
    ),
}


def _parser() -> argparse.ArgumentParser:
    """The command name alone; each command's module parses its own options."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `token-objectives` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _parser().parse_args(argv[:1]).command
    try:
        with _warnings_as_lines(command):
            result = importlib.import_module(COMMANDS[command][0]).main(argv[1:])
    # Only bad inputs become one line; any other exception is a bug and keeps its traceback.
    except (InputError, OSError) as error:
        return _report(command, error)
    except ImportError as error:
        if (error.name or "").startswith("token_objectives"):
            raise
        return _report(command, error)
    return 0 if result is None else int(result)


@contextlib.contextmanager
def _warnings_as_lines(command: str) -> Iterator[None]:
    """While `command` runs, each TokenObjectivesWarning is one line on stderr, without Python's
    source line; any other warning shows as Python shows it. The filters still decide which
    warnings show (once per place, or none under PYTHONWARNINGS=ignore)."""
    with warnings.catch_warnings():
        python_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, TokenObjectivesWarning):
                python_show(message, category, filename, lineno, file, line)
                return
            text = " ".join(str(message).split())
            print(f"{PROG} {command}: warning: {text}", file=sys.stderr if file is None else file)

        warnings.showwarning = show
        yield


def _report(command: str, error: Exception) -> int:
    """Print `error` as one line on stderr; returns the exit code 2."""
    message = " ".join(str(error).split())
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
