"""One source for the objective options: the YAML `objectives` section, the ds_config
"token_objectives" section, the Megatron-LM flags and HF's options all carry every
ObjectiveConfig field, a value set through each surface reaches the ObjectiveConfig it builds,
and one checker (objectives.options) answers a bad value with the same message everywhere."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest

from token_objectives import ObjectiveConfig
from token_objectives.integrations.deepspeed.section import read_section
from token_objectives.integrations.hf import objective_loss_from_options
from token_objectives.integrations.megatron import hook as megatron_hook
from token_objectives.integrations.megatron.hook import (
    add_objective_args,
    objective_config_from_args,
)
from token_objectives.tables.numbers import NUMBER_TOKEN_MODES
from token_objectives.training.config import config_from_dict, load_config

# A value for every field other than its default, with the Megatron-LM flag that sets it. A new
# ObjectiveConfig field fails test_every_field_has_a_sample until it is added here, and then
# the tests below check that every surface takes it.
SAMPLES = {
    "ntl": ("mse", "--ntl mse"),
    "ntl_weight": (0.7, "--ntl-weight 0.7"),
    "squash_factor": (None, ""),  # only with ntl="was": set in its own case below
    "reweigh": (False, "--ntl-no-reweigh"),
    "huber_delta": (2.5, "--ntl-huber-delta 2.5"),
    "number_level_float": (True, "--ntl-number-level-float"),
    "max_number_length": (7, "--ntl-max-number-length 7"),
    "pdl_alpha": (0.4, "--pdl-alpha 0.4"),
    "pdl_eps": (3.0, "--pdl-eps 3"),
    "pdl_unseen": (0.25, "--pdl-unseen 0.25"),
    "pdl_normalize_table": (False, "--pdl-no-normalize-table"),
    "pdl_normalization": ("weighted_mean", None),  # fixed under Megatron: token counts
    "label_smoothing": (0.05, "--label-smoothing 0.05"),
    "z_loss": (1e-3, "--objective-z-loss 0.001"),
    "gaussian_sigma": (0.5, "--objective-gaussian-sigma 0.5"),
    "ignore_index": (-1, None),  # Megatron marks no target with the loss mask
}
SQUASH = {"ntl": "was", "squash_factor": 3.0}
FIELDS = [f.name for f in dataclasses.fields(ObjectiveConfig)]


def _options() -> dict:
    return {name: value for name, (value, _) in SAMPLES.items() if name != "squash_factor"}


def test_every_field_has_a_sample():
    assert set(SAMPLES) == set(FIELDS)
    defaults = ObjectiveConfig()
    for name, (value, _) in SAMPLES.items():
        if name != "squash_factor":
            assert getattr(defaults, name) != value, name


@pytest.mark.parametrize("options", [_options(), SQUASH], ids=["all", "squash"])
def test_the_yaml_section_takes_every_field(options):
    config = load_config(None, [f"objectives.{k}={v if v is not None else 'null'}"
                                for k, v in options.items()]).objectives
    for name, value in options.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize("options", [_options(), SQUASH], ids=["all", "squash"])
def test_the_ds_config_section_takes_every_field(options):
    section = read_section({"token_objectives": dict(options)})
    config = section.objective_config()
    for name, value in options.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize("options", [_options(), SQUASH], ids=["all", "squash"])
def test_the_megatron_lm_flags_take_every_field_but_the_fixed_ones(options):
    argv = []
    for name, value in options.items():
        flag = SAMPLES[name][1] if name != "squash_factor" else f"--ntl-squash-factor {value}"
        if name == "ntl" and "squash_factor" in options:
            flag = f"--ntl {value}"
        if flag is not None:
            argv += shlex.split(flag)
    args = add_objective_args(argparse.ArgumentParser()).parse_args(argv)
    config = objective_config_from_args(args)
    for name, value in options.items():
        expected = value if SAMPLES[name][1] is not None else getattr(ObjectiveConfig(), name)
        assert getattr(config, name) == expected, name


# ------------------------------------------------------------------------- one checker
# The same bad input, fed to every surface, gets the same message: `<where>: expected
# <accepts>, got <value!r>`, where <where> is the key as that surface spells it.
SURFACES = ("yaml", "ds_config", "megatron_lm", "hf")
WHERE = {
    "yaml": "objectives.{key}",
    "ds_config": 'invalid ds_config["token_objectives"]: {key}',
    "megatron_lm": "argument {flag}",
    "hf": "objectives.{key}",
}


def _flag(key: str) -> str:
    return {field.name: flag for field, flag, _ in megatron_hook._config_options()}[key]


def _megatron_lm(values: dict) -> ObjectiveConfig:
    """The values as Megatron-LM's command line spells them (None: `none`), parsed, then read."""
    argv = []
    for key, value in values.items():
        argv += [_flag(key), "none" if value is None else str(value)]
    parser = add_objective_args(argparse.ArgumentParser(exit_on_error=False))
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as error:
        raise ValueError(str(error)) from None
    return objective_config_from_args(args)


def _through(surface: str, values: dict) -> ObjectiveConfig:
    if surface == "yaml":
        return config_from_dict({"objectives": values}).objectives
    if surface == "ds_config":
        return read_section({"token_objectives": values}).objective_config()
    if surface == "megatron_lm":
        return _megatron_lm(values)
    return objective_loss_from_options(values).config


def _message(surface: str, values: dict) -> str:
    with pytest.raises(ValueError) as error:
        _through(surface, values)
    return str(error.value)


def _where(surface: str, key: str) -> str:
    return WHERE[surface].format(key=key, flag=_flag(key))


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize(("key", "value", "accepts"), [
    ("ntl_weight", "abc", "a number >= 0"),  # a wrong type
    ("ntl_weight", -0.5, "a number >= 0"),  # out of range
    ("label_smoothing", 1, "a number in [0, 1)"),  # out of range, an open end
    ("max_number_length", 0, "an int >= 1"),
    ("ntl", "cosine", "one of 'was', 'mse', 'l1', 'huber', 'number', or None"),  # no such choice
    ("squash_factor", 1, "a number > 1, or None"),
    ("ntl_weight", None, "a number >= 0"),  # null for an option that cannot be off
])
def test_a_bad_value_gets_the_same_message_on_every_surface(surface, key, value, accepts):
    values = {"ntl": "was", key: value} if key == "squash_factor" else {key: value}
    assert _message(surface, values) == f"{_where(surface, key)}: expected {accepts}, got " \
                                        f"{value!r}"


@pytest.mark.parametrize("surface", SURFACES)
def test_null_is_off_on_every_surface(surface):
    config = _through(surface, {"ntl": None, "squash_factor": None})
    assert config.ntl is None and config.squash_factor is None and not config.uses_numbers


def test_the_yaml_text_reads_the_same_as_the_yaml_values():
    """`--set` values and a YAML file are YAML: `null` is off, "abc" is refused by name."""
    assert load_config(None, ["objectives.ntl=null"]).objectives.ntl is None
    with pytest.raises(ValueError) as error:
        load_config(None, ["objectives.ntl_weight=abc"])
    assert str(error.value) == "objectives.ntl_weight: expected a number >= 0, got 'abc'"


@pytest.mark.parametrize("surface", ["yaml", "ds_config", "hf"])
def test_an_unknown_key_lists_the_valid_ones_on_every_surface(surface):
    message = _message(surface, {"ntl_wieght": 0.3})
    section = "token_objectives" if surface == "ds_config" else "objectives"
    assert f"unknown key(s) ['ntl_wieght'] in config section '{section}'; valid keys: [" \
        in message
    assert all(repr(name) in message for name in FIELDS)


def test_an_unknown_megatron_lm_flag_is_argparse_s_error(capsys):
    """Megatron-LM owns its parser: an unknown flag is its `unrecognized arguments`."""
    with pytest.raises(SystemExit):
        add_objective_args(argparse.ArgumentParser()).parse_args(["--ntl-wieght", "0.3"])
    assert "unrecognized arguments: --ntl-wieght 0.3" in capsys.readouterr().err


@pytest.mark.parametrize("surface", SURFACES)
def test_number_tokens_choices_are_the_same_on_every_surface(surface):
    accepts = f"one of {', '.join(repr(mode) for mode in NUMBER_TOKEN_MODES)}"
    where = {"yaml": "data.number_tokens", "megatron_lm": "argument --number-tokens",
             "ds_config": 'invalid ds_config["token_objectives"]: number_tokens',
             "hf": "number_tokens"}[surface]
    with pytest.raises(ValueError) as error:
        if surface == "yaml":
            config_from_dict({"data": {"number_tokens": "all"}})
        elif surface == "ds_config":
            read_section({"token_objectives": {"number_tokens": "all"}})
        elif surface == "hf":
            objective_loss_from_options({}, number_tokens="all")
        else:
            parser = add_objective_args(argparse.ArgumentParser(exit_on_error=False))
            try:
                parser.parse_args(["--number-tokens", "all"])
            except argparse.ArgumentError as parse_error:
                raise ValueError(str(parse_error)) from None
    assert str(error.value) == f"{where}: expected {accepts}, got 'all'"


def test_a_namespace_not_made_by_the_parser_is_checked_by_flag():
    args = add_objective_args(argparse.ArgumentParser()).parse_args([])
    args.ntl_weight = "abc"
    with pytest.raises(ValueError, match=r"^--ntl-weight: expected a number >= 0, got 'abc'$"):
        objective_config_from_args(args)
