"""`token-objectives count-frequencies`: count token ids over a corpus (Megatron indexed datasets
or UTF-8 text) into a frequencies file, the counts PDL weights are made from."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from token_objectives.tables.errors import InputError
from token_objectives.tables.output_files import add_mode_argument, check_output_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-objectives count-frequencies",
        description="count token ids over a corpus into a frequencies file (for PDL weights)")
    parser.add_argument("--output", required=True, help="frequencies file to write (safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data-prefix", nargs="+", metavar="PREFIX", help="Megatron indexed datasets (.bin/.idx)"
    )
    source.add_argument(
        "--text", nargs="+", metavar="FILE",
        help="UTF-8 text files, tokenized as preprocess_data.py does: one document per line (a "
        "JSON object's --json-key field in .json/.jsonl), plus its end-of-document token",
    )
    parser.add_argument(
        "--tokenizer",
        help="local tokenizer path; required for --text, recorded as the identity otherwise",
    )
    parser.add_argument(
        "--vocab-size", type=int, help="the model's padded vocab size (default: tokenizer size)"
    )
    parser.add_argument(
        "--no-append-eod", dest="append_eod", action="store_false",
        help="--text: count no end-of-document token (for data built without preprocess_data's "
        "--append-eod); by default one is counted per non-empty document",
    )
    parser.add_argument("--eod-id", type=int,
                        help="--text: the end-of-document id (default: the tokenizer's)")
    parser.add_argument("--json-key", default="text",
                        help="--text: the document field of .json/.jsonl lines (default: text)")
    parser.add_argument("--chunk-tokens", type=int, default=1 << 24, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mode_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Count and write the file, print a summary; returns 0. Raises InputError on a bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    # After the parse: --help and a usage error load no numpy or tokenizers.
    from token_objectives.tables.frequencies import (
        count_indexed_dataset,
        count_text_files,
        save_frequencies,
    )
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
