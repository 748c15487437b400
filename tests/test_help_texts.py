"""The help texts say what each option does, on every surface: a `--...-no-...` flag says that
it turns its option off (not what the option does when on), and `number_tokens` has the one help
text of tables.numbers on the Megatron-LM flags, the ds_config section and inspect-vocab. Every
`token-objectives ... --help` and `--version` answers without importing torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from token_objectives import ObjectiveConfig
from token_objectives.cli import COMMANDS
from token_objectives.tables.numbers import NUMBER_TOKENS_HELP
from token_objectives.version import __version__


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


# -------------------------------------------------------------- --help and --version, at once

# What a command may import only after its parse: seconds of start-up each.
HEAVY = ("torch", "transformers", "megatron", "deepspeed", "triton", "numpy", "tokenizers")
_RUN_MAIN = """\
import contextlib, io, json, sys
from token_objectives.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as stop:
        code = stop.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
print(json.dumps({"code": code, "out": out.getvalue(), "heavy": heavy}))
"""


def _main_in_a_fresh_process(*argv: str) -> dict:
    """`cli.main(argv)` in a new interpreter: its exit code, stdout and the HEAVY modules it
    loaded."""
    code = f"HEAVY = {HEAVY!r}\n{_RUN_MAIN}"
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_loads_no_torch(command):
    """`token-objectives [COMMAND] --help` imports none of HEAVY: each command parses its flags
    before it imports what runs it, so --help answers at once."""
    argv = ["--help"] if command is None else [command, "--help"]
    result = _main_in_a_fresh_process(*argv)
    assert result["code"] == 0
    assert result["out"].startswith(f"usage: token-objectives {command or ''}".rstrip())
    assert result["heavy"] == [], f"{command} --help imported {result['heavy']}"


def test_version_prints_the_package_version():
    result = _main_in_a_fresh_process("--version")
    assert result["code"] == 0
    assert result["out"] == f"token-objectives {__version__}\n"
