"""One source for the objective options: the YAML `objectives` section, the ds_config
"token_objectives" section and the Megatron-LM flags all carry every ObjectiveConfig field, and
a value set through each surface reaches the ObjectiveConfig it builds."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest

from token_objectives import ObjectiveConfig
from token_objectives.integrations.deepspeed.section import read_section
from token_objectives.integrations.megatron.hook import (
    add_objective_args,
    objective_config_from_args,
)
from token_objectives.training.config import load_config

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
