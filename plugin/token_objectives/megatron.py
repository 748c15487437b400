"""Megatron-Core integration: the objectives inside a GPTModel, a loss_func, and CLI arguments.

No math lives here. `attach_objectives(model, objectives)` makes a megatron-core `GPTModel`
compute its per-token loss with `objective_loss` on the vocab-sharded logits [s, b, V/tp]; the
logits are never gathered. The per-token components travel on the returned loss tensor (not in
a global), and `loss_func` turns them into Megatron's (loss sum, token count, report) triple, so
the training loop normalises by the GLOBAL token count across DP and micro-batches.

For Megatron-LM's `pretrain_gpt.py`, three lines (see the README):

    from token_objectives import megatron as token_objectives_megatron
    model_provider = token_objectives_megatron.wrap_model_provider(model_provider)
    loss_func = token_objectives_megatron.loss_func
    # and pass extra_args_provider=token_objectives_megatron.add_objective_args to pretrain()
"""

from __future__ import annotations

import argparse
import types
from dataclasses import dataclass
from typing import Any

import torch

from token_objectives.frequencies import load_frequencies, pdl_weights
from token_objectives.fused_linear import fused_linear_objective_loss
from token_objectives.objectives import ObjectiveConfig, ObjectiveOutput, objective_loss
from token_objectives.vocab import NumberTable

_COMPONENTS_ATTR = "token_objectives_components"
_ATTACHED_ATTR = "_token_objectives_attached"


@dataclass(frozen=True)
class LossComponents:
    """Per-token parts of the loss, each [b, s] fp32, before the loss mask.

    ce: plain cross-entropy. ce_part: everything but the NTL term (PDL-weighted, smoothed CE
    plus z-loss). ntl: the NTL term before ntl_weight. is_number: where NTL is counted.
    weight: the PDL weight of each target.
    """

    ce: torch.Tensor
    ce_part: torch.Tensor
    ntl: torch.Tensor
    is_number: torch.Tensor
    weight: torch.Tensor


@dataclass
class Objectives:
    """What a model needs to compute the objectives: the config and the per-token tables."""

    config: ObjectiveConfig
    numbers: NumberTable | None
    pdl_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.config.pdl_normalization != "token":
            raise ValueError(
                "Megatron normalises by an integer token count: use pdl_normalization='token' "
                "(the weight table is already normalised to a corpus mean of 1)"
            )

    @classmethod
    def build(
        cls,
        config: ObjectiveConfig,
        padded_vocab_size: int,
        tokenizer: Any = None,
        number_tokens: str = "digit",
        frequencies_path: str | None = None,
    ) -> Objectives:
        """Tables for a model whose output layer has `padded_vocab_size` rows.

        tokenizer: a local path or tokenizer object (needed for NTL and to pin the vocab size).
        frequencies_path: a `token-objectives count-frequencies` file (needed for PDL).
        """
        if number_tokens not in ("digit", "multi"):
            raise ValueError(f"number_tokens must be 'digit' or 'multi', got {number_tokens!r}")
        numbers = None
        if tokenizer is not None:
            numbers = NumberTable.from_tokenizer(
                tokenizer, vocab_size=padded_vocab_size, digit_level=number_tokens == "digit"
            )
        elif config.uses_numbers:
            raise ValueError(f"ntl={config.ntl!r} needs the tokenizer to find number tokens")
        weights = None
        if config.pdl_alpha > 0:
            if frequencies_path is None:
                raise ValueError(
                    "pdl_alpha > 0 needs a token-frequency table: run `token-objectives "
                    f"count-frequencies --vocab-size {padded_vocab_size} ...` and pass its path"
                )
            identity = numbers.tokenizer_identity if numbers is not None else None
            table = load_frequencies(frequencies_path, vocab_size=padded_vocab_size,
                                     tokenizer_identity=identity)
            weights = pdl_weights(table.counts, alpha=config.pdl_alpha)
        return cls(config, numbers, weights)

    def per_token_loss(
        self, labels: torch.Tensor, logits: torch.Tensor, tp_group, weight=None
    ) -> torch.Tensor:
        """labels [b, s], logits [s, b, V/tp] -> loss [b, s] fp32 carrying its LossComponents.

        With `weight` (the output layer's shard [V/tp, h]), `logits` are the hidden states
        [s, b, h] and the fused LM head + loss runs instead.
        """
        labels_sb = labels.transpose(0, 1)
        if weight is None:
            out = objective_loss(logits, labels_sb, self.config, self.numbers,
                                 self.pdl_weights, tp_group, seq_dim=0)
        else:
            out = fused_linear_objective_loss(logits, weight, labels_sb, self.config,
                                              self.numbers, self.pdl_weights, tp_group,
                                              seq_dim=0)
        return self._with_components(out)

    def _with_components(self, out: ObjectiveOutput) -> torch.Tensor:
        def to_bs(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(0, 1).contiguous()

        loss = to_bs(out.loss)
        ntl = to_bs(out.ntl)
        components = LossComponents(
            ce=to_bs(out.ce).detach(),
            ce_part=(loss - self.config.ntl_weight * ntl).detach(),
            ntl=ntl.detach(),
            is_number=to_bs(out.is_number),
            weight=to_bs(out.weight).detach(),
        )
        setattr(loss, _COMPONENTS_ATTR, components)
        return loss


def components_of(output_tensor: torch.Tensor) -> LossComponents | None:
    """The LossComponents a model attached to its per-token loss, if any."""
    return getattr(output_tensor, _COMPONENTS_ATTR, None)


class _FusedHead:
    """Stands in for a GPTModel's output layer while labels are given: hands the hidden states
    through and remembers the weight, so the loss can run the fused LM head + objectives.
    Without labels (generation) the real output layer runs."""

    def __init__(self, output_layer) -> None:
        self.output_layer = output_layer
        self.original_forward = output_layer.forward  # bound before it is replaced
        self.active = False
        self.weight = None

    def __call__(self, hidden, weight=None, runtime_gather_output=None):
        if not self.active:
            return self.original_forward(hidden, weight=weight,
                                         runtime_gather_output=runtime_gather_output)
        self.weight = self.output_layer.weight if weight is None else weight
        return hidden, None


def attach_objectives(model, objectives: Objectives, fused_head: bool = False):
    """Make a megatron-core GPTModel (or any LanguageModule) compute `objectives` as its loss.

    fused_head: skip the output layer's forward when labels are given and compute the loss
    from the hidden states and the output weight (with tied embeddings, the word-embedding
    shard, which gets the gradient), never materialising the [s, b, V/tp] logits.
    Idempotent: attaching again replaces the objectives. `detach_objectives` undoes it.
    Returns the model.
    """
    detach_objectives(model)
    head = _FusedHead(model.output_layer) if fused_head else None

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        weight = None
        if head is not None and head.active:
            weight, head.weight = head.weight, None
        return getattr(self, _ATTACHED_ATTR).per_token_loss(labels, logits,
                                                            self.pg_collection.tp, weight)

    setattr(model, _ATTACHED_ATTR, objectives)
    model.compute_language_model_loss = types.MethodType(compute_language_model_loss, model)
    if head is not None:
        original_forward = model.forward

        def forward(*args, **kwargs):
            head.active = kwargs.get("labels") is not None
            try:
                return original_forward(*args, **kwargs)
            finally:
                head.active = False

        model.output_layer.forward = head.__call__
        model.forward = forward
        model._token_objectives_head = (head, original_forward)
    return model


def detach_objectives(model):
    """Restore the model's own output layer and cross-entropy loss."""
    if hasattr(model, _ATTACHED_ATTR):
        delattr(model, _ATTACHED_ATTR)
        del model.compute_language_model_loss
    if hasattr(model, "_token_objectives_head"):
        del model.output_layer.forward
        del model.forward
        del model._token_objectives_head
    return model


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None):
    """Megatron's loss_func contract with per-token normalisation.

    loss_mask [b, s], output_tensor: the model's per-token loss [b, s].
    Returns (loss sum, token count (int), report); each report value is a [sum, count] pair that
    the training loop all-reduces over DP and logs as sum / count:
      "lm loss" = "ce part" + ntl_weight * "ntl part" (both per counted token), "ce" (plain
      cross-entropy), "ntl" (per number token), "number tokens" (fraction), "pdl weight"
      (mean); "ce part" is the PDL-weighted cross-entropy.
    """
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.reshape(-1).float()
    tokens = mask.sum()
    loss_sum = (losses * mask).sum()
    report = {"lm loss": torch.stack([loss_sum.detach(), tokens])}
    parts = components_of(output_tensor)
    if parts is not None:
        numbers = (parts.is_number.reshape(-1).float() * mask).sum()
        ntl_sum = (parts.ntl.reshape(-1) * mask).sum()
        report["ce part"] = torch.stack([(parts.ce_part.reshape(-1) * mask).sum(), tokens])
        report["ntl part"] = torch.stack([ntl_sum, tokens])
        report["ce"] = torch.stack([(parts.ce.reshape(-1) * mask).sum(), tokens])
        # Megatron-LM divides without a guard: a batch without numbers logs 0, not NaN.
        report["ntl"] = torch.stack([ntl_sum, numbers.clamp_min(1)])
        report["number tokens"] = torch.stack([numbers, tokens])
        report["pdl weight"] = torch.stack([(parts.weight.reshape(-1) * mask).sum(), tokens])
    return loss_sum, tokens.to(torch.int), report


NTL_CHOICES = ("was", "mse", "l1", "huber", "number", "none")


def add_objective_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM `extra_args_provider`: the objectives' command-line flags."""
    group = parser.add_argument_group("token objectives")
    group.add_argument("--ntl", choices=NTL_CHOICES, default="was",
                       help="Number Token Loss flavour; 'none' for CE only")
    group.add_argument("--ntl-weight", type=float, default=0.3, help="lambda of the NTL term")
    group.add_argument("--ntl-squash-factor", type=float, default=None)
    group.add_argument("--ntl-no-reweigh", action="store_true",
                       help="turn off ntloss's reweighing by the number-token mass")
    group.add_argument("--number-tokens", choices=("digit", "multi"), default="digit")
    group.add_argument("--pdl-alpha", type=float, default=0.0, help="PDL exponent; 0 = off")
    group.add_argument("--pdl-frequencies", type=str, default=None,
                       help="token-frequency file from `token-objectives count-frequencies`")
    group.add_argument("--objective-z-loss", type=float, default=0.0)
    group.add_argument("--objective-tokenizer", type=str, default=None,
                       help="local tokenizer for the number tokens (default: --tokenizer-model)")
    return parser


def objective_config_from_args(args: argparse.Namespace) -> ObjectiveConfig:
    return ObjectiveConfig(
        ntl=None if args.ntl == "none" else args.ntl,
        ntl_weight=args.ntl_weight,
        squash_factor=args.ntl_squash_factor,
        reweigh=not args.ntl_no_reweigh,
        pdl_alpha=args.pdl_alpha,
        label_smoothing=getattr(args, "label_smoothing", 0.0) or 0.0,
        z_loss=args.objective_z_loss,
    )


def objectives_from_args(args: argparse.Namespace) -> Objectives:
    """Objectives from Megatron-LM's parsed args (needs args.padded_vocab_size)."""
    tokenizer = args.objective_tokenizer or getattr(args, "tokenizer_model", None)
    return Objectives.build(
        objective_config_from_args(args),
        padded_vocab_size=args.padded_vocab_size,
        tokenizer=tokenizer,
        number_tokens=args.number_tokens,
        frequencies_path=args.pdl_frequencies,
    )


def wrap_model_provider(model_provider):
    """Megatron-LM: wrap `model_provider` so that each GPTModel it builds uses the objectives."""

    def provider(*args, **kwargs):
        from megatron.training import get_args  # Megatron-LM, not megatron-core

        model = model_provider(*args, **kwargs)
        if getattr(model, "post_process", True):
            attach_objectives(model, objectives_from_args(get_args()))
        return model

    provider.__wrapped__ = model_provider
    return provider
