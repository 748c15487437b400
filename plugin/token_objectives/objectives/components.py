"""The logged components of the objective: one list of names and one set of formulas for every
surface that logs them (the Megatron and DeepSpeed loops' metrics.jsonl and TensorBoard,
DeepSpeed's monitor, Megatron-LM's loss report, Trainer's logs). docs/metrics.md explains them.

    lm loss             what is trained: the per-token losses summed over the counted tokens,
                        / N (N: the counted tokens; the sum of their PDL weights with
                        pdl_normalization="weighted_mean")
    ce part             lm loss without its NTL term (PDL-weighted, smoothed CE + z-loss), / N
    ntl part            the NTL sum / N, before ntl_weight (lm loss = ce part
                        + ntl_weight * ntl part)
    ce                  plain cross-entropy per counted token
    ntl                 the NTL term per number token, before ntl_weight
    counted tokens      a COUNT: tokens with a target and loss_mask != 0, per optimizer step
    number tokens       a COUNT: the counted tokens where NTL is counted, per optimizer step
    number token share  number tokens / counted tokens
    pdl weight          the mean PDL weight over the counted tokens (1 without PDL)

A count covers one optimizer step's global batch (a log covering several steps gives the mean
per step); every other entry is a ratio of two sums over what the log covers.
"""

from __future__ import annotations

import torch

from token_objectives.objectives.config import ObjectiveConfig

COMPONENT_NAMES = ("lm loss", "ce part", "ntl part", "ce", "ntl", "counted tokens",
                   "number tokens", "number token share", "pdl weight")
COUNT_NAMES = ("counted tokens", "number tokens")
# The entries that need the config's ntl_weight to be split out of the loss.
PART_NAMES = ("ce part", "ntl part")


def log_key(name: str) -> str:
    """"number token share" -> "number_token_share": Trainer's log keys (snake_case, as its own
    "grad_norm" and "learning_rate")."""
    return name.replace(" ", "_")


def component_values(totals: torch.Tensor, config: ObjectiveConfig | None = None,
                     steps: int = 1) -> dict[str, float]:
    """ObjectiveOutput.totals() [6], summed over everything the log covers, each token once
    -> the COMPONENT_NAMES values.

    steps: the optimizer steps the totals cover; the counts are per step (their mean).
    config: the objective's; None leaves out "ce part" and "ntl part" (they need ntl_weight)
    and takes pdl_normalization as "token". No collective, one host sync.
    """
    loss, tokens, ce, ntl, numbers, weight = totals.detach().to(torch.float64).tolist()
    weighted = config is not None and config.pdl_normalization == "weighted_mean"
    denominator = weight if weighted and weight > 0 else max(tokens, 1)
    values = {"lm loss": loss / denominator}
    if config is not None:
        values["ce part"] = (loss - config.ntl_weight * ntl) / denominator
        values["ntl part"] = ntl / denominator
    values.update({
        "ce": ce / max(tokens, 1),
        "ntl": ntl / max(numbers, 1),
        "counted tokens": tokens / steps,
        "number tokens": numbers / steps,
        "number token share": numbers / max(tokens, 1),
        "pdl weight": weight / max(tokens, 1),
    })
    return values


component_means = component_values  # its former name
