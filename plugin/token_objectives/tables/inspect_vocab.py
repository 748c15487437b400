"""`token-objectives inspect-vocab`: the number tokens of a tokenizer, and with --text the share
of a text's digits that NTL reaches under each mode."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from token_objectives.tables.errors import InputError
from token_objectives.tables.number_modes import NUMBER_TOKEN_MODES, NUMBER_TOKENS_HELP


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="token-objectives inspect-vocab",
                                     description="list the number tokens of a tokenizer")
    parser.add_argument("tokenizer", help="local tokenizer path")
    parser.add_argument("--number-tokens", choices=NUMBER_TOKEN_MODES, default="auto",
                        help=f"the mode to list (default auto): {NUMBER_TOKENS_HELP}")
    parser.add_argument("--vocab-size", type=int, help="the model's padded vocab size")
    parser.add_argument("--text", nargs="+", metavar="FILE",
                        help="UTF-8 text files: print the share of their digits that NTL "
                        "reaches under each mode")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (and the digit shares); returns 0. Raises InputError on a bad input."""
    args = _parser().parse_args(argv)
    # After the parse: --help and a usage error load no torch.
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
        for mode in (m for m in NUMBER_TOKEN_MODES if m != "auto"):
            chosen = "  <- this table" if mode == table.mode else ""
            print(f"  {mode:<7}{digit_share(lines, tokenizer, mode):>8.1%}{chosen}")
    return 0
