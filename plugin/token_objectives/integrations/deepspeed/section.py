"""DeepSpeed integration: the objectives switched on by a "token_objectives" ds_config section.

    {
      "train_micro_batch_size_per_gpu": 8,
      "zero_optimization": {"stage": 2},
      "token_objectives": {"ntl": "was", "ntl_weight": 0.3, "pdl_alpha": 0.2,
                           "tokenizer": "tokenizer.model", "frequencies": "freqs.safetensors",
                           "scheduled_sampling": {"enabled": true, "schedule": "linear",
                                                  "max_p": 0.25, "c": 0.001}}
    }

DeepSpeed ignores unknown top-level sections, so ours is validated here, by the checker of every
config surface (objectives.options): an unknown key lists the valid ones, a bad value reads
`invalid ds_config["token_objectives"]: key: expected <accepts>, got <value!r>`, and `null` turns
an optional option off (`"ntl": null` is CE only). JSON is read as written: "0.5" is not a
number and 1 is not a bool (an int is a number: JSON writes 1.0 as 1). `from_ds_config`
returns `objectives(logits, labels)`; under AutoTP with a vocab-parallel lm_head the logits stay
sharded [..., V/tp] and the vocab-parallel loss runs on the shard (two all-reduces, no gather).
The optional "scheduled_sampling" object holds the keys of the Megatron YAML section of the same
name (`scheduled_sampling.schedule.ScheduledSamplingConfig`), checked the same way.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from token_objectives.integrations.autotp import (  # noqa: F401 (public names here too)
    AutoTPObjectives,
    tensor_parallel_group,
    vocab_parallel_head_shard,
)
from token_objectives.objectives import options
from token_objectives.objectives.components import component_values
from token_objectives.objectives.config import NUMBER_TOKENS, ObjectiveConfig
from token_objectives.objectives.loss import ObjectiveOutput
from token_objectives.objectives.objective import Objective
from token_objectives.objectives.options import option
from token_objectives.objectives.tables import objective_tables
from token_objectives.scheduled_sampling.schedule import ScheduledSamplingConfig
from token_objectives.tables.numbers import NumberTable

SECTION = "token_objectives"


def _objective_keys() -> list[tuple[str, Any, Any]]:
    """Every ObjectiveConfig field as a section key: the same declaration (type, default,
    help, choices, range)."""
    hints = typing.get_type_hints(ObjectiveConfig)
    declared = options.options_of(ObjectiveConfig)
    return [(field.name, hints[field.name], declared[field.name].field())
            for field in dataclasses.fields(ObjectiveConfig)]


_ObjectiveKeys = dataclasses.make_dataclass("_ObjectiveKeys", _objective_keys(), frozen=True)


@dataclass(frozen=True)
class TokenObjectivesConfig(_ObjectiveKeys):
    """The "token_objectives" section. Keys are ObjectiveConfig's (made from its declarations:
    a new option is a key without anyone adding it here), plus where the tables come from:
    `tokenizer` (local path, for the number tokens), `number_tokens`
    (tables.numbers.NUMBER_TOKEN_MODES, default "auto") and `frequencies` (a `token-objectives
    count-frequencies` file, for PDL), the `scheduled_sampling` object and `fused_lm_head`.
    Checked at construction by objectives.options, as every surface; a missing tokenizer or
    frequencies file is named."""

    tokenizer: str | None = option(None, help="local tokenizer (HF directory, tokenizer.json or "
                                   "SentencePiece model), for the number tokens")
    number_tokens: str = NUMBER_TOKENS.field()
    frequencies: str | None = option(None, help="a `token-objectives count-frequencies` file, "
                                     "for PDL")
    scheduled_sampling: dict[str, Any] | None = option(
        None, help="the keys of the YAML scheduled_sampling section (ScheduledSamplingConfig)")
    fused_lm_head: bool = option(False, help="compute the loss from the hidden states and the "
                                 "lm_head weight, never holding the logits")

    def __post_init__(self) -> None:
        options.check(self)
        for key in ("tokenizer", "frequencies"):
            path = getattr(self, key)
            if path is not None and not Path(path).exists():
                raise ValueError(f"{key}: file {path!r} does not exist")
        self.objective_config()  # the cross-key rules (squash_factor, ...)
        self.sampling_config()

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(**{field.name: getattr(self, field.name)
                                  for field in dataclasses.fields(ObjectiveConfig)})

    def sampling_config(self) -> ScheduledSamplingConfig:
        """The "scheduled_sampling" object (disabled when absent); ValueError names a bad key."""
        return options.from_mapping(ScheduledSamplingConfig, self.scheduled_sampling or {},
                                    "scheduled_sampling", text=True)


def _load_ds_config(ds_config: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(ds_config, Mapping):
        return ds_config
    with open(ds_config, encoding="utf-8") as handle:
        return json.load(handle)


def read_section(ds_config: Mapping[str, Any] | str | Path) -> TokenObjectivesConfig | None:
    """The validated "token_objectives" section of a ds_config (dict or JSON path), or None.

    Raises ValueError naming the offending key (unknown key, wrong type, missing file).
    """
    raw = _load_ds_config(ds_config).get(SECTION)
    if raw is None:
        return None
    keys = {key: key for key in options.options_of(TokenObjectivesConfig)}  # named within it
    try:
        return options.from_mapping(TokenObjectivesConfig, raw, SECTION, spelling=keys)
    except ValueError as error:
        raise ValueError(f'invalid ds_config["{SECTION}"]: {error}') from None


# The section's loss callable: AutoTP's layout handling, shared with the HF adapter.
DeepSpeedObjectives = AutoTPObjectives


def from_ds_config(
    ds_config: Mapping[str, Any] | str | Path,
    numbers: NumberTable | None = None,
    pdl_weights: torch.Tensor | None = None,
    vocab_size: int | None = None,
    real_vocab_size: int | None = None,
) -> DeepSpeedObjectives:
    """Validate the "token_objectives" section and return the loss callable (an Objective
    under AutoTP's layout), its tables made now: a missing one fails here, not at the first
    call.

    numbers: the number table over the model's (padded) vocab; None: made from the section's
    "tokenizer" when the section needs one (NTL or the Gaussian target).
    vocab_size: the model's padded vocab, which tells full logits from an AutoTP shard when
    there is no table to tell it (ntl null, no PDL); default: the tables' size.
    real_vocab_size: the tokenizer's size, so that without a table the padding columns still
    leave the softmax (a table states its own).
    pdl_weights: [V] weights; when None and the section has pdl_alpha > 0, they are built from
    the section's `frequencies` file (checked against the vocab and the tokenizer's identity).
    """
    section = read_section(ds_config)
    if section is None:
        raise ValueError(f'the ds_config has no "{SECTION}" section')
    config = section.objective_config()
    if pdl_weights is not None:
        objective = Objective(config, numbers, pdl_weights, vocab_size=vocab_size,
                              real_vocab_size=real_vocab_size)
        return DeepSpeedObjectives(objective)
    if config.pdl_alpha > 0 and section.frequencies is None:
        raise ValueError(
            f'ds_config["{SECTION}"].pdl_alpha > 0 needs "frequencies": the output of '
            "`token-objectives count-frequencies`"
        )
    if numbers is None and config.uses_numbers:
        numbers = numbers_from_section(section, vocab_size)
    objective = Objective.build(config, tokenizer=section.tokenizer, numbers=numbers,
                                frequencies=section.frequencies, vocab_size=vocab_size,
                                real_vocab_size=real_vocab_size,
                                number_tokens=section.number_tokens)
    return DeepSpeedObjectives(objective)


def numbers_from_section(section: TokenObjectivesConfig, vocab_size: int) -> NumberTable | None:
    """The NumberTable the section asks for, over `vocab_size` ids (None without NTL or the
    Gaussian number target)."""
    if section.ntl is None and section.gaussian_sigma == 0:
        return None
    asks = (f"ntl = {section.ntl!r}" if section.ntl is not None
            else f"gaussian_sigma = {section.gaussian_sigma}")
    if section.tokenizer is None:
        raise ValueError(f'ds_config["{SECTION}"].{asks} needs "tokenizer"')
    # The tables' one builder, asked for the number table alone (PDL's table needs a file).
    numbers_only = dataclasses.replace(section.objective_config(), pdl_alpha=0.0)
    try:
        return objective_tables(numbers_only, section.tokenizer, None, vocab_size,
                                section.number_tokens)[0]
    except ValueError as error:
        raise ValueError(
            f'ds_config["{SECTION}"].{asks} with tokenizer '
            f"{section.tokenizer!r} (number_tokens {section.number_tokens!r}): {error}"
        ) from None


def log_components(engine, output: ObjectiveOutput, step: int,
                   config: ObjectiveConfig | None = None) -> dict[str, float]:
    """The components (objectives.components) of `output`, reduced over DeepSpeed's DP group,
    written to DeepSpeed's monitor (its "tensorboard" / "csv_monitor" sections) as
    "Train/<name>" by global rank 0. Returns them.

    output: the step's whole output on this rank (every micro-batch of the step: the counts
    "counted tokens" and "number tokens" are those of what it holds, over DP). config: the
    objective's; without it "ce part" and "ntl part" are left out and "lm loss" is per counted
    token. One all-reduce (SUM, fp64 [6]) when torch.distributed is initialized."""
    totals = output.totals().detach().to(torch.float64)
    group = None
    try:
        from deepspeed.utils import groups

        group = groups._get_data_parallel_group()
    except (AssertionError, AttributeError, ImportError):
        group = None
    if dist.is_initialized():
        dist.all_reduce(totals, group=group)
    values = component_values(totals, config)
    monitor = getattr(engine, "monitor", None)
    writes = not dist.is_initialized() or dist.get_rank() == 0
    if monitor is not None and getattr(monitor, "enabled", False) and writes:
        monitor.write_events([(f"Train/{name}", value, step) for name, value in values.items()])
    return values
