"""The fused path: a causal LM whose forward computes the objective from its last hidden state
and its lm_head weight, never building the [b, s, V] logits (ObjectiveLoss(fused=True)).

`patch_model(model, objectives)` replaces two forwards on the instance (idempotent; the
originals stay in `__wrapped__`, `unpatch_model` puts them back):
- the model's: with labels, it runs the decoder (`get_decoder()`) for the hidden states
  [b, s, h] and calls the lm_head MODULE with them and the labels; it returns a
  CausalLMOutputWithPast whose loss is the objective and whose logits are None. Without labels
  it is the original forward.
- the lm_head's: called with labels it returns the loss (Objective.fused on its own
  weight), else its original linear.
The loss runs inside the lm_head's own forward, so DDP sees the weight used in forward, and
DeepSpeed ZeRO-3's module hooks gather the partitioned weight for it and gather it again for
the backward, which recomputes the logits chunk by chunk from it. Where the weight is still
partitioned when the head runs (the head called outside the engine's forward), the forward
gathers it with deepspeed.zero.GatheredParameters, as TRL and Liger needed; a backward there
would need it gathered again, which only the module hooks inside the engine provide.

Trainer then computes no loss itself: `ObjectiveLoss.attach` clears compute_loss_func and lets
Trainer give the labels and num_items_in_batch to the model, as it does for HF's own loss.
"""

from __future__ import annotations

import contextlib
import inspect
import types

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

MARKER = "_token_objectives"
# Output-layer transforms the fused head does not apply; a model with one gets an error.
_UNSUPPORTED = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def gathered(weight: torch.nn.Parameter) -> contextlib.AbstractContextManager:
    """deepspeed.zero.GatheredParameters([weight]) when ZeRO-3 has it partitioned, else a null
    context (without ZeRO-3, or inside the head's forward where ZeRO-3 gathered it)."""
    status = getattr(weight, "ds_status", None)
    if status is None:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if status == ZeroParamStatus.AVAILABLE:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight])


def _head_forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                  num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """lm_head: hidden [b, s, h] -> logits [b, s, V]; with labels [b, s], the scalar loss."""
    if labels is None:
        return self.__wrapped__(hidden)
    objectives = getattr(self, MARKER)
    with gathered(self.weight):
        output = objectives.fused_objective(hidden, self.weight, labels)
    return objectives.reduce(output, num_items_in_batch)


def _model_forward(self, *args, labels: torch.Tensor | None = None,
                   num_items_in_batch: torch.Tensor | int | None = None, **kwargs):
    """The causal LM's forward; with labels, the fused objective instead of the logits."""
    if labels is None:
        return self.__wrapped__(*args, **kwargs)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    head = self.get_output_embeddings()
    if getattr(head, MARKER, None) is None:
        raise ValueError(
            f"ObjectiveLoss(fused=True): the lm_head was replaced after patch_model (by "
            f"{type(head).__name__}: DeepSpeed AutoTP's tp_model_init does this); the fused "
            f"head runs under DDP and ZeRO-1/2/3, not AutoTP: use fused=False there"
        )
    hidden = self.get_decoder()(*args, **kwargs, return_dict=True).last_hidden_state
    loss = head(hidden, labels=labels, num_items_in_batch=num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss)


def _check_supported(model: torch.nn.Module) -> torch.nn.Module:
    """The model's lm_head, when the fused path computes what its forward would."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or not hasattr(model, "get_decoder"):
        raise ValueError(
            f"ObjectiveLoss(fused=True) needs a causal LM with get_decoder() and a Linear "
            f"get_output_embeddings() (a *ForCausalLM); {type(model).__name__} has none: use "
            f"fused=False"
        )
    if head.bias is not None:
        raise ValueError("ObjectiveLoss(fused=True): the lm_head has a bias, which the fused "
                         "head does not add; use fused=False")
    config = getattr(model, "config", None)
    for name in _UNSUPPORTED:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(
                f"ObjectiveLoss(fused=True): the model's config.{name} transforms the logits, "
                f"which the fused head does not; use fused=False"
            )
    return head


def _with_signature_of(forward, original):
    """`forward(self, ...)` that reports the bound method `original`'s signature: Trainer drops
    the batch keys that the forward's signature does not name (remove_unused_columns)."""

    def patched(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    patched.__signature__ = inspect.signature(original.__func__)
    return patched


def patch_model(model: torch.nn.Module, objectives) -> torch.nn.Module:
    """Make `model` (an unwrapped *ForCausalLM) compute `objectives` fused when given labels.
    Idempotent: a second call only swaps the objectives. Returns the model."""
    head = _check_supported(model)
    for module, forward in ((model, _model_forward), (head, _head_forward)):
        if getattr(module, MARKER, None) is None:
            original = module.forward
            module.__wrapped__ = original
            # The original's signature: Trainer drops the batch keys that forward's signature
            # does not name (remove_unused_columns).
            # A bound method, so that wrappers which rebind forward.__func__ (accelerate's
            # mixed precision) keep working.
            module.forward = types.MethodType(_with_signature_of(forward, original), module)
        setattr(module, MARKER, objectives)
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_model (a no-op on a model it never patched)."""
    for module in (model, model.get_output_embeddings()):
        if getattr(module, MARKER, None) is not None:
            module.forward = module.__wrapped__
            del module.__wrapped__
            setattr(module, MARKER, None)
    return model
