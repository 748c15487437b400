"""The help texts say what each option does, on every surface: a `--...-no-...` flag says that
it turns its option off (not what the option does when on), and `number_tokens` has the one help
text of tables.numbers on the Megatron-LM flags, the ds_config section and inspect-vocab."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from token_objectives import ObjectiveConfig
from token_objectives.tables.numbers import NUMBER_TOKENS_HELP


def _flags() -> dict[str, argparse.Action]:
    from token_objectives.integrations.megatron import hook

    parser = hook.add_objective_args(argparse.ArgumentParser())
    parser.format_help()  # every help string formats (a stray % would raise)
    return parser._option_string_actions


def test_every_bool_on_by_default_says_what_turning_it_off_does():
    hints = typing.get_type_hints(ObjectiveConfig)
    on_by_default = [option for option in dataclasses.fields(ObjectiveConfig)
                     if hints[option.name] is bool and option.default is True]
    assert {option.name for option in on_by_default} >= {"reweigh", "pdl_normalize_table"}
    for option in on_by_default:
        assert option.metadata.get("off_help"), option.name


def test_the_megatron_no_flags_describe_turning_the_option_off():
    flags = _flags()
    fields = ObjectiveConfig.__dataclass_fields__
    for flag, name in (("--ntl-no-reweigh", "reweigh"),
                       ("--pdl-no-normalize-table", "pdl_normalize_table")):
        action = flags[flag]
        assert isinstance(action, argparse._StoreFalseAction), flag
        assert action.help == fields[name].metadata["off_help"], flag
        assert action.help != fields[name].metadata["help"], flag
    assert flags["--ntl-no-reweigh"].help.startswith("turn off")
    assert "unscaled" in flags["--pdl-no-normalize-table"].help


def test_number_tokens_has_its_help_on_every_surface():
    from token_objectives.integrations.deepspeed.section import TokenObjectivesConfig
    from token_objectives.tables.inspect_vocab import _parser

    assert _flags()["--number-tokens"].help == NUMBER_TOKENS_HELP
    key = TokenObjectivesConfig.__dataclass_fields__["number_tokens"]
    assert key.metadata["help"] == NUMBER_TOKENS_HELP and key.default == "auto"
    inspect = _parser()._option_string_actions["--number-tokens"]
    assert NUMBER_TOKENS_HELP in inspect.help
