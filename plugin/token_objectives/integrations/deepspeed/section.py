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
number and 1 is not a bool (an int is a number: JSON writes 1.0 as 1).

`objective_from_ds_config` is the door for a training loop of one's own
(docs/deepspeed-own-loop.md): it returns the objectives, whose `causal_lm(logits, labels)` and
`mean(output)` give a micro-batch's loss from the unshifted labels; under AutoTP with a
vocab-parallel lm_head the logits stay sharded [..., V/tp] and the vocab-parallel loss runs on
the shard (two all-reduces, no gather).
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
from token_objectives.tables.tokenizers import TokenizerLike

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


def objective_from_ds_config(
    ds_config: Mapping[str, Any] | str | Path,
    tokenizer: TokenizerLike | None = None,
    *,
    vocab_size: int | None = None,
    real_vocab_size: int | None = None,
    numbers: NumberTable | None = None,
) -> DeepSpeedObjectives:
    """The objectives of a ds_config's "token_objectives" section, for a training loop of
    one's own: the section checked, its tables made now (a missing one fails here, naming the
    key and the fix, not at the first call).

        objectives = objective_from_ds_config("ds_config.json", vocab_size=V)
        output = objectives.causal_lm(logits, labels)  # [b, s, V or V/tp], unshifted [b, s]
        engine.backward(objectives.mean(output))       # sum / counted tokens

    ds_config: the dict or a JSON path. tokenizer: a local path or a tokenizer object, for the
        number tokens (NTL, gaussian_sigma) and the identity the frequency file must have been
        counted with; default the section's "tokenizer" (giving both, different, is refused).
    vocab_size: the model's padded vocab V, which tells full logits from an AutoTP shard and
        must be the frequency file's length (default: the tokenizer's size).
    real_vocab_size: the tokenizer's size when there is no number table to state it, so the
        padding columns still leave the softmax. numbers: a NumberTable made already.
    Returns the DeepSpeedObjectives (its Objective is `.objective`).
    """
    section = read_section(ds_config)
    if section is None:
        raise ValueError(
            f'the ds_config has no "{SECTION}" section: add one, e.g. "{SECTION}": '
            f'{{"ntl": "was", "tokenizer": "tokenizer.model"}} ({{"ntl": null}}: cross-entropy '
            f"only)"
        )
    tokenizer = _one_tokenizer(section, tokenizer)
    config = section.objective_config()
    if config.pdl_alpha > 0 and section.frequencies is None:
        raise ValueError(
            f'ds_config["{SECTION}"].pdl_alpha = {config.pdl_alpha} needs "frequencies": the '
            "output of `token-objectives count-frequencies --tokenizer <tokenizer> "
            '--vocab-size <model vocab>`; or set "pdl_alpha": 0'
        )
    if numbers is None and config.uses_numbers:
        numbers = numbers_from_section(section, vocab_size, tokenizer)
    try:
        objective = Objective.build(config, tokenizer=tokenizer, numbers=numbers,
                                    frequencies=section.frequencies, vocab_size=vocab_size,
                                    real_vocab_size=real_vocab_size,
                                    number_tokens=section.number_tokens)
    except ValueError as error:
        raise ValueError(f'ds_config["{SECTION}"]: {error}') from None
    return DeepSpeedObjectives(objective)


# The former name (keyword-only tables now: numbers=; PDL weights come from "frequencies").
from_ds_config = objective_from_ds_config


def _one_tokenizer(section: TokenObjectivesConfig,
                   tokenizer: TokenizerLike | None) -> TokenizerLike | None:
    """The tokenizer argument or the section's "tokenizer", refused when both name one and
    they differ."""
    if tokenizer is None or section.tokenizer is None:
        return section.tokenizer if tokenizer is None else tokenizer
    if (isinstance(tokenizer, str | Path)
            and Path(tokenizer).resolve() == Path(section.tokenizer).resolve()):
        return tokenizer
    raise ValueError(
        f'the tokenizer is given twice: ds_config["{SECTION}"].tokenizer = '
        f"{section.tokenizer!r} and tokenizer={tokenizer!r}; drop one"
    )


def numbers_from_section(section: TokenObjectivesConfig, vocab_size: int | None,
                         tokenizer: TokenizerLike | None = None) -> NumberTable | None:
    """The NumberTable the section asks for, over `vocab_size` ids (default: the tokenizer's
    size), from `tokenizer` or the section's "tokenizer" (None without NTL or the Gaussian
    number target)."""
    if section.ntl is None and section.gaussian_sigma == 0:
        return None
    asks = (f"ntl = {section.ntl!r}" if section.ntl is not None
            else f"gaussian_sigma = {section.gaussian_sigma}")
    tokenizer = section.tokenizer if tokenizer is None else tokenizer
    if tokenizer is None:
        off = '"ntl": null' if section.ntl is not None else '"gaussian_sigma": 0'
        raise ValueError(
            f'ds_config["{SECTION}"].{asks} needs "tokenizer" for its number tokens: a local '
            f"path in the section, or objective_from_ds_config(..., tokenizer=path or "
            f"tokenizer object); or set {off}"
        )
    # The tables' one builder, asked for the number table alone (PDL's table needs a file).
    numbers_only = dataclasses.replace(section.objective_config(), pdl_alpha=0.0)
    try:
        return objective_tables(numbers_only, tokenizer, None, vocab_size,
                                section.number_tokens)[0]
    except ValueError as error:
        raise ValueError(
            f'ds_config["{SECTION}"].{asks} with tokenizer '
            f"{tokenizer!r} (number_tokens {section.number_tokens!r}): {error}"
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
