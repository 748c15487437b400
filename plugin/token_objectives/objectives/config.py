"""ObjectiveConfig: which objectives are on and their settings, one declaration per option.

Each field carries its help text, what it accepts and its choices in `field.metadata`, so the
other surfaces (the DeepSpeed section, the Megatron-LM flags, the YAML `objectives` section) are
made from `dataclasses.fields(ObjectiveConfig)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from token_objectives.objectives import options
from token_objectives.objectives.options import Option, option
from token_objectives.tables.numbers import NUMBER_TOKEN_MODES, NUMBER_TOKENS_HELP

NTL_FLAVOURS = ("was", "mse", "l1", "huber", "number")
PDL_NORMALIZATIONS = ("token", "weighted_mean")
PDL_UNSEEN_RULES = ("rarest",)

# Which tokens are number tokens: a key of the YAML `data` section and of the ds_config section,
# the Megatron-LM --number-tokens flag and objective_loss_from_options' keyword, all made from
# this one declaration (NUMBER_TOKENS.field() in a config dataclass, NUMBER_TOKENS.checked(value)
# elsewhere).
NUMBER_TOKENS = Option("number_tokens", (str,), default="auto", help=NUMBER_TOKENS_HELP,
                       choices=NUMBER_TOKEN_MODES)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which objectives are on, and their settings.

    Every field is declared with `options.option`: its help text, choices and range live in its
    metadata, and `options.options_of(ObjectiveConfig)` is the one list the other surfaces are
    made from and checked by: the YAML `objectives:` section (from_dict), the ds_config
    "token_objectives" section, the Megatron-LM flags and HF's objective_loss_from_options. A
    wrong type, a NaN or a value out of range is a ValueError `name: expected <accepts>, got
    <value!r>` (options.check); None turns an optional option off (`ntl`, `squash_factor`).

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
      (training.deepspeed.counted_denominator); Megatron's loss_func divides by a token count.

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

    ntl: str | None = option(
        "was", choices=NTL_FLAVOURS,
        help="NTL flavour: 'was' (Wasserstein-1, ntloss.NTLoss), 'mse' | 'l1' | 'huber' (on the "
        "expected value, ntloss.NTLossDotProduct), 'number' (whole numbers from digit runs, "
        "ntloss.NumberLevelLoss), or None for no NTL",
    )
    ntl_weight: float = option(0.3, low=0, help="lambda, the NTL term's weight")
    squash_factor: float | None = option(
        None, low=1, open="low",
        help="ntl='was' only: how much worse the farthest number is than the nearest wrong one",
    )
    reweigh: bool = option(
        True, help="ntloss's reweighing of NTL by the probability mass on number tokens",
        off_help="turn off ntloss's reweighing of NTL by the probability mass on number tokens "
        "(ntloss reweigh=False; on by default)",
    )
    huber_delta: float = option(1.0, low=0, open="low", help="ntl='huber' only: the Huber delta")
    number_level_float: bool = option(
        False, help="ntl='number' only: read a '.' between digit runs as a decimal point"
    )
    max_number_length: int = option(
        20, low=1, help="ntl='number' only: the most digits one number is assembled from"
    )
    pdl_alpha: float = option(
        0.0, low=0,
        help="PDL exponent: w[t] = (count[t] + pdl_eps) ** -pdl_alpha; > 0 needs a frequencies "
        "file",
    )
    pdl_normalization: str = option(
        "token", choices=PDL_NORMALIZATIONS,
        help="the loss denominator: 'token' (sum / counted tokens) or 'weighted_mean' (sum / sum "
        "of the counted tokens' PDL weights, NTL and z-loss included; DeepSpeed loop only)",
    )
    pdl_eps: float = option(
        1.0, low=0, help="PDL: added to every count before the power, (count + eps) ** -alpha"
    )
    pdl_unseen: str | float = option(
        "rarest", choices=PDL_UNSEEN_RULES, low=0,
        help="PDL weight of tokens with count 0 (special tokens, vocab padding): 'rarest' (the "
        "rarest seen token's weight) or a weight on the un-normalised (count + eps) ** -alpha "
        "scale (0: never trained on)",
    )
    pdl_normalize_table: bool = option(
        True,
        help="PDL: scale the weight table to a corpus-weighted mean of 1 (not the loss "
        "denominator: that is pdl_normalization)",
        off_help="PDL: leave the weight table unscaled, (count + eps) ** -alpha, instead of "
        "scaling it to a corpus-weighted mean of 1 (scaled by default)",
    )
    label_smoothing: float = option(
        0.0, low=0, high=1, open="high", help="label smoothing over the global real vocab"
    )
    gaussian_sigma: float = option(
        0.0, low=0,
        help="Gaussian number targets: for a number target of value u the CE target becomes "
        "q_j ~ exp(-(v_j - u)**2 / (2 sigma**2)) over the number tokens (by value), against "
        "the full softmax; 0: plain CE. Replaces the one-hot CE term of number targets only "
        "(PDL weight and label smoothing apply to it as to CE; NTL keeps its one-hot target)",
    )
    z_loss: float = option(0.0, low=0, help="coefficient of the z-loss lse**2")
    ignore_index: int = option(-100, help="label of positions without a target")

    def __post_init__(self) -> None:
        options.check(self)
        if self.squash_factor is not None and self.ntl != "was":
            raise ValueError(
                f"squash_factor: applies to ntl='was' only (ntl is {self.ntl!r}); remove it"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ObjectiveConfig:
        """Build from a config section; an unknown key is an error that lists the valid ones."""
        return options.from_mapping(cls, values, "objectives")

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
