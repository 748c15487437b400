"""ObjectiveConfig: every field's type and range checks, its metadata, and the PDL table it asks
for (frequencies.pdl_weights_for)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from token_objectives import ObjectiveConfig
from token_objectives.objectives.options import options_of
from token_objectives.objectives.pdl import pdl_weights_for
from token_objectives.tables.frequencies import pdl_weights
from token_objectives.training.config import config_from_dict

COUNTS = np.array([0, 5, 1, 0, 40, 3, 0, 2], dtype=np.int64)

# (field, a value of the wrong type or not finite) for every field.
WRONG = [
    ("ntl", 1), ("ntl", True),
    ("ntl_weight", None), ("ntl_weight", "0.3"), ("ntl_weight", True), ("ntl_weight", math.nan),
    ("squash_factor", "2"), ("squash_factor", math.inf),
    ("reweigh", 1), ("reweigh", "true"), ("reweigh", None),
    ("huber_delta", None), ("huber_delta", -math.inf),
    ("number_level_float", 0),
    ("max_number_length", 2.0), ("max_number_length", True), ("max_number_length", None),
    ("pdl_alpha", None), ("pdl_alpha", math.nan), ("pdl_alpha", "0.2"), ("pdl_alpha", False),
    ("pdl_normalization", None), ("pdl_normalization", 1),
    ("pdl_eps", None), ("pdl_eps", math.nan), ("pdl_eps", "1"),
    ("pdl_unseen", None), ("pdl_unseen", "0.5"), ("pdl_unseen", math.nan), ("pdl_unseen", True),
    ("pdl_normalize_table", 1), ("pdl_normalize_table", None),
    ("label_smoothing", None), ("label_smoothing", math.nan),
    ("z_loss", None), ("z_loss", math.inf), ("z_loss", "1e-4"),
    ("gaussian_sigma", None), ("gaussian_sigma", math.nan), ("gaussian_sigma", math.inf),
    ("gaussian_sigma", "1.0"), ("gaussian_sigma", True),
    ("ignore_index", None), ("ignore_index", -100.0), ("ignore_index", False),
]

OUT_OF_RANGE = [
    ("ntl", "cosine"), ("ntl_weight", -0.1), ("squash_factor", 1.0), ("huber_delta", 0.0),
    ("max_number_length", 0), ("pdl_alpha", -1.0), ("pdl_normalization", "mean"),
    ("pdl_eps", -1.0), ("pdl_unseen", -0.5), ("pdl_unseen", "max"),
    ("label_smoothing", 1.0), ("label_smoothing", -0.1), ("z_loss", -1e-4),
    ("gaussian_sigma", -0.5),
]


def test_every_field_is_covered_by_a_wrong_type_case():
    assert {name for name, _ in WRONG} == {f.name for f in dataclasses.fields(ObjectiveConfig)}


@pytest.mark.parametrize("name,value", WRONG + OUT_OF_RANGE,
                         ids=[f"{n}={v!r}" for n, v in WRONG + OUT_OF_RANGE])
def test_a_bad_value_is_a_value_error_naming_the_field_and_what_it_accepts(name, value):
    accepts = options_of(ObjectiveConfig)[name].accepts
    with pytest.raises(ValueError) as error:
        ObjectiveConfig(**{name: value})
    assert str(error.value).startswith(f"{name}: expected {accepts}, got {value!r}")


def test_squash_factor_outside_was_names_the_fix():
    with pytest.raises(ValueError, match=r"^squash_factor: applies to ntl='was' only .*remove"):
        ObjectiveConfig(ntl="mse", squash_factor=2.0)


def test_an_int_is_a_float_and_stays_one():
    config = ObjectiveConfig(ntl_weight=1, pdl_alpha=1, z_loss=0, pdl_unseen=0)
    assert config.ntl_weight == 1.0 and isinstance(config.ntl_weight, float)
    assert isinstance(config.pdl_alpha, float) and isinstance(config.pdl_unseen, float)
    assert ObjectiveConfig(max_number_length=np.int64(5)).max_number_length == 5
    assert ObjectiveConfig(ntl=None, squash_factor=None).ntl is None


def test_every_field_has_help_and_accepts():
    for option in dataclasses.fields(ObjectiveConfig):
        assert option.metadata.get("help"), option.name
        assert options_of(ObjectiveConfig)[option.name].accepts, option.name
    assert ObjectiveConfig.__dataclass_fields__["ntl"].metadata["choices"][0] == "was"


def test_yaml_section_takes_the_pdl_options_and_names_a_wrong_key():
    run = config_from_dict({"objectives": {"pdl_alpha": 0.5, "pdl_eps": 2, "pdl_unseen": 0.0,
                                           "pdl_normalize_table": False}})
    config = run.objectives
    assert (config.pdl_eps, config.pdl_unseen, config.pdl_normalize_table) == (2.0, 0.0, False)
    assert config_from_dict({"objectives": {"pdl_unseen": "rarest"}}).objectives.pdl_unseen \
        == "rarest"
    for key, value in (("pdl_normalize_table", "yes"), ("pdl_eps", None), ("pdl_unseen", [1])):
        with pytest.raises(ValueError, match=rf"objectives\.{key}|^{key}: expected"):
            config_from_dict({"objectives": {key: value}})


@pytest.mark.parametrize("eps,unseen,normalize", [(1.0, "rarest", True), (0.5, 0.25, False),
                                                  (3.0, 0.0, True)])
def test_pdl_weights_for_passes_every_pdl_option(eps, unseen, normalize):
    config = ObjectiveConfig(pdl_alpha=0.7, pdl_eps=eps, pdl_unseen=unseen,
                             pdl_normalize_table=normalize)
    expected = pdl_weights(COUNTS, 0.7, eps=eps, unseen_weight=None if unseen == "rarest"
                           else unseen, normalize=normalize)
    torch.testing.assert_close(pdl_weights_for(config, COUNTS), expected, rtol=0, atol=0)
    raw = (COUNTS.astype(np.float64) + eps) ** -0.7
    if unseen != "rarest" and not normalize:
        torch.testing.assert_close(pdl_weights_for(config, COUNTS).double(),
                                   torch.from_numpy(np.where(COUNTS > 0, raw, unseen)))


def test_pdl_weights_for_refuses_alpha_zero():
    with pytest.raises(ValueError, match="pdl_alpha is 0"):
        pdl_weights_for(ObjectiveConfig(), COUNTS)
