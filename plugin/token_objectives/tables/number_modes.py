"""The `number_tokens` option's modes and its one help text, apart from `tables.numbers` (which
imports torch) so that a command's `--help` lists them without loading torch."""

from __future__ import annotations

# "auto" resolves to "digit" or "groups" from the vocabulary (numbers.resolve_number_tokens).
NUMBER_TOKEN_MODES = ("auto", "digit", "groups", "multi")
# The one help text of the option on every surface (ds_config, YAML, flags, HF, CLI).
NUMBER_TOKENS_HELP = (
    "which tokens are number tokens for NTL and the Gaussian target: 'auto' (digit when the "
    "vocabulary's number tokens are all single digits, else groups), 'digit' (one digit), "
    "'groups' (runs of digits such as Llama-3's 1-3 digit tokens; a target is compared with the "
    "tokens of its own digit count) or 'multi' (integers and decimals, all compared by value, "
    "as ntloss's digit_level=False)"
)
