"""ObjectiveConfig: which objectives are on and their settings, one declaration per option.

Each field carries its help text, what it accepts and its choices in `field.metadata`, so the
other surfaces (the DeepSpeed section, the Megatron-LM flags, the YAML `objectives` section) are
made from `dataclasses.fields(ObjectiveConfig)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

NTL_FLAVOURS = ("was", "mse", "l1", "huber", "number")
PDL_NORMALIZATIONS = ("token", "weighted_mean")
PDL_UNSEEN_RULES = ("rarest",)


def _option(default: Any, accepts: str, help: str, choices: tuple[str, ...] = (),
            off_help: str = "") -> Any:
    """A config field whose help text, accepted values and choices live in its metadata, so the
    DeepSpeed section, the Megatron-LM flags and the docs are all made from one place.

    off_help: for a bool that is on by default, what turning it off does: the help of the
    Megatron-LM flag that does it (--ntl-no-reweigh), where `help` would say the opposite."""
    metadata = {"help": help, "accepts": accepts}
    if choices:
        metadata["choices"] = choices
    if off_help:
        metadata["off_help"] = off_help
    return dataclasses.field(default=default, metadata=metadata)


def _type_error(name: str, accepts: str, value: Any, why: str = "") -> ValueError:
    return ValueError(f"{name}: expected {accepts}, got {value!r}{why}")


def _checked_value(name: str, hint: Any, accepts: str, value: Any) -> Any:
    """`value` if it has one of the types `hint` allows (an int is a float, a bool is neither),
    as a float for a float field; a NaN or an infinity is refused."""
    kinds = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in kinds:
            return None
        raise _type_error(name, accepts, value)
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if kind is int and isinstance(value, Integral):
            return int(value)
        if kind is float and isinstance(value, Real):
            if not math.isfinite(value):
                raise _type_error(name, accepts, value, " (not a finite number)")
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    raise _type_error(name, accepts, value)


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ObjectiveConfig)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which objectives are on, and their settings.

    Every field's help text is its metadata["help"] (and metadata["accepts"] says what it takes);
    `dataclasses.fields(ObjectiveConfig)` is the one list the other surfaces are made from: the
    YAML `objectives:` section (from_dict), the ds_config "token_objectives" section and the
    Megatron-LM flags. A wrong type, a NaN or a value out of range is a ValueError that names
    the field and what it accepts.

    PDL has two normalisations that are easy to confuse:
    - pdl_normalize_table scales the weight TABLE so its corpus-weighted mean is 1
      (sum(counts * w) / sum(counts) == 1, frequencies.pdl_weights(normalize=...)); it changes the
      loss scale, not what the loss is divided by.
    - pdl_normalization picks the loss DENOMINATOR N of sum_t loss_t * mask_t / N:
      "token": N = the number of counted tokens (mask != 0 and label != ignore_index);
      "weighted_mean": N = the sum of w[y_t] over the counted tokens, as the PDL reference code.
      With "weighted_mean" the NTL and z-loss terms, which carry no PDL weight themselves, are
      divided by that same sum of weights: the whole per-token loss is, not the CE alone. With a
      normalised table that sum is about the token count, so NTL and z-loss keep about their
      scale; without it they scale by 1 / (mean weight). Only the DeepSpeed loop implements it
      (deepspeed_training.counted_denominator); Megatron's loss_func divides by a token count.

    gaussian_sigma > 0 (the NTL authors' GaussianLabelSmoother, tum-ai/number-token-loss): for a
    number target of value u, q_j = g_j / sum_N g with g_j = exp(-(v_j - u)**2 / (2 sigma**2))
    over every number token j (by value: tokens of equal value get equal mass; non-number tokens
    none), and the CE term becomes -sum_j q_j log p_j under the full softmax. Non-number targets
    keep plain CE; sigma -> 0 is CE on the number target (when no other token shares its value).
    It composes as the one-hot term it replaces:
      loss_t = w[y] * ((1 - eps) * gce + eps * smooth) + z * lse**2 + lambda * ntl,
    i.e. the target distribution is (1 - eps) q + eps / V_real, weighted by the target token's
    PDL weight. ObjectiveOutput.ce stays the plain CE (perplexity). NTL keeps ntloss's one-hot
    target: the reference repo feeds q to its Wasserstein term too, but the CDF distance to q
    needs prefix sums across vocab shards in value order, which no per-shard sum in the two
    all-reduces can carry.
    """

    ntl: str | None = _option(
        "was", "one of 'was', 'mse', 'l1', 'huber', 'number', or None",
        "NTL flavour: 'was' (Wasserstein-1, ntloss.NTLoss), 'mse' | 'l1' | 'huber' (on the "
        "expected value, ntloss.NTLossDotProduct), 'number' (whole numbers from digit runs, "
        "ntloss.NumberLevelLoss), or None for no NTL",
        NTL_FLAVOURS,
    )
    ntl_weight: float = _option(0.3, "a number >= 0", "lambda, the NTL term's weight")
    squash_factor: float | None = _option(
        None, "a number > 1, or None",
        "ntl='was' only: how much worse the farthest number is than the nearest wrong one",
    )
    reweigh: bool = _option(
        True, "a bool", "ntloss's reweighing of NTL by the probability mass on number tokens",
        off_help="turn off ntloss's reweighing of NTL by the probability mass on number tokens "
        "(ntloss reweigh=False; on by default)",
    )
    huber_delta: float = _option(1.0, "a number > 0", "ntl='huber' only: the Huber delta")
    number_level_float: bool = _option(
        False, "a bool", "ntl='number' only: read a '.' between digit runs as a decimal point"
    )
    max_number_length: int = _option(
        20, "an int >= 1", "ntl='number' only: the most digits one number is assembled from"
    )
    pdl_alpha: float = _option(
        0.0, "a number >= 0",
        "PDL exponent: w[t] = (count[t] + pdl_eps) ** -pdl_alpha; > 0 needs a frequencies file",
    )
    pdl_normalization: str = _option(
        "token", "one of 'token', 'weighted_mean'",
        "the loss denominator: 'token' (sum / counted tokens) or 'weighted_mean' (sum / sum of "
        "the counted tokens' PDL weights, NTL and z-loss included; DeepSpeed loop only)",
        PDL_NORMALIZATIONS,
    )
    pdl_eps: float = _option(
        1.0, "a number >= 0", "PDL: added to every count before the power, (count + eps) ** -alpha"
    )
    pdl_unseen: str | float = _option(
        "rarest", "'rarest' or a number >= 0",
        "PDL weight of tokens with count 0 (special tokens, vocab padding): 'rarest' (the rarest "
        "seen token's weight) or a weight on the un-normalised (count + eps) ** -alpha scale "
        "(0: never trained on)",
        PDL_UNSEEN_RULES,
    )
    pdl_normalize_table: bool = _option(
        True, "a bool",
        "PDL: scale the weight table to a corpus-weighted mean of 1 (not the loss denominator: "
        "that is pdl_normalization)",
        off_help="PDL: leave the weight table unscaled, (count + eps) ** -alpha, instead of "
        "scaling it to a corpus-weighted mean of 1 (scaled by default)",
    )
    label_smoothing: float = _option(
        0.0, "a number in [0, 1)", "label smoothing over the global real vocab"
    )
    gaussian_sigma: float = _option(
        0.0, "a number >= 0",
        "Gaussian number targets: for a number target of value u the CE target becomes "
        "q_j ~ exp(-(v_j - u)**2 / (2 sigma**2)) over the number tokens (by value), against "
        "the full softmax; 0: plain CE. Replaces the one-hot CE term of number targets only "
        "(PDL weight and label smoothing apply to it as to CE; NTL keeps its one-hot target)",
    )
    z_loss: float = _option(0.0, "a number >= 0", "coefficient of the z-loss lse**2")
    ignore_index: int = _option(-100, "an int", "label of positions without a target")

    def __post_init__(self) -> None:
        hints = _field_types()
        for option in dataclasses.fields(self):
            value = _checked_value(option.name, hints[option.name], option.metadata["accepts"],
                                   getattr(self, option.name))
            # Frozen: normalise an int given for a float field (JSON writes 1 for 1.0).
            object.__setattr__(self, option.name, value)
            choices = option.metadata.get("choices", ())
            if isinstance(value, str) and value not in choices:
                raise _type_error(option.name, option.metadata["accepts"], value)
        ranges = {
            "ntl_weight": self.ntl_weight >= 0,
            "squash_factor": self.squash_factor is None or self.squash_factor > 1,
            "huber_delta": self.huber_delta > 0,
            "max_number_length": self.max_number_length >= 1,
            "pdl_alpha": self.pdl_alpha >= 0,
            "pdl_eps": self.pdl_eps >= 0,
            "pdl_unseen": isinstance(self.pdl_unseen, str) or self.pdl_unseen >= 0,
            "label_smoothing": 0.0 <= self.label_smoothing < 1.0,
            "z_loss": self.z_loss >= 0,
            "gaussian_sigma": self.gaussian_sigma >= 0,
        }
        for name, ok in ranges.items():
            if not ok:
                accepts = self.__dataclass_fields__[name].metadata["accepts"]
                raise _type_error(name, accepts, getattr(self, name))
        if self.squash_factor is not None and self.ntl != "was":
            raise ValueError(
                f"squash_factor: applies to ntl='was' only (ntl is {self.ntl!r}); remove it"
            )

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> ObjectiveConfig:
        """Build from a config section; an unknown key is an error that lists the valid ones."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown objective option(s) {unknown}; valid options are {sorted(known)}"
            )
        return cls(**options)

    @property
    def uses_numbers(self) -> bool:
        """Whether a NumberTable is needed: NTL or Gaussian number targets are on."""
        return self.ntl is not None or self.gaussian_sigma > 0

    def number_options(self) -> str:
        """The options that need the number tokens, for error messages ("ntl='was'")."""
        on = [f"ntl={self.ntl!r}"] if self.ntl is not None else []
        if self.gaussian_sigma > 0:
            on.append(f"gaussian_sigma={self.gaussian_sigma}")
        return " and ".join(on)
