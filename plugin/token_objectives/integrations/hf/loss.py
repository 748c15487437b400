"""ObjectiveLoss: CE + NTL + PDL as `transformers.Trainer(compute_loss_func=...)`.

Trainer calls `compute_loss_func(outputs, labels, num_items_in_batch)` once per micro-batch, with
`num_items_in_batch` the count of labels[..., 1:] != -100 over the whole accumulated batch and
(average_tokens_across_devices, the default) over every data-parallel rank; it then multiplies
the loss by the number of processes, which DDP's gradient mean divides out again. A loss that
is the micro-batch's SUM over that global count therefore gives the gradient of the global
batch's mean, whatever the accumulation steps and device count. Trainer does not normalise a
custom loss itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from token_objectives.integrations.autotp import AutoTPObjectives, vocab_parallel_head_shard
from token_objectives.integrations.causal_lm import shift_labels
from token_objectives.objectives import options as checker
from token_objectives.objectives.config import NUMBER_TOKENS, ObjectiveConfig
from token_objectives.objectives.loss import ObjectiveOutput
from token_objectives.objectives.objective import Objective, ObjectiveDoor

# What Trainer counts num_items_in_batch over (labels.ne(-100)), and every HF collator writes.
HF_IGNORE_INDEX = -100


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    else:
        logits = getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, tuple | list) and outputs:
            logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "ObjectiveLoss needs the model's logits [b, s, V] in outputs.logits; the model "
            f"returned {type(outputs).__name__} without them (with ObjectiveLoss(fused=True), "
            "call objectives.attach(trainer) instead of passing compute_loss_func)"
        )
    return logits


class ObjectiveLoss(ObjectiveDoor):
    """`loss = objectives(outputs, labels, num_items_in_batch=None)`, Trainer's compute_loss_func.

    objective: the Objective (its config, its tables over the model's vocab V, padding
        included; `objective_loss_from_options` builds it from options, a tokenizer and a
        frequency file). Its ignore_index must be -100 and its pdl_normalization "token".
    fused: compute the loss from the last hidden state [b, s, h] and the lm_head weight [V, h]
        (Objective.fused), never holding the [b, s, V] logits; needs `attach(trainer)`, which
        makes the model compute it (fused.py).
    Under Trainer's DeepSpeed AutoTP with a vocab-parallel lm_head the logits stay this rank's
    shard [b, s, V/tp] and the vocab-parallel objective runs on it (two all-reduces over the TP
    group; integrations.autotp); `attach` lets it read an uneven shard's ids from the model.
    rows_per_chunk, kernel: as Objective's.

    outputs.logits: [b, s, V]; labels: [b, s] unshifted, -100 where there is no target (the
    shift is done here, as in HF's causal-LM loss). Returns the scalar
    sum(per-token loss) / num_items_in_batch, or / the counted tokens of this batch when Trainer
    gives no count (evaluation). No collective; the logged components are all-reduced at log
    time by ObjectiveLogCallback.
    """

    def __init__(self, objective: Objective, *, fused: bool = False,
                 rows_per_chunk: int | None = None, kernel: str | None = None) -> None:
        config = objective.config
        if config.ignore_index != HF_IGNORE_INDEX:
            raise ValueError(
                f"ignore_index={config.ignore_index}: Trainer counts num_items_in_batch over "
                f"labels != {HF_IGNORE_INDEX} and HF collators mark padding with it; set "
                f"ignore_index={HF_IGNORE_INDEX}"
            )
        if config.pdl_normalization != "token":
            raise ValueError(
                "pdl_normalization='weighted_mean' divides by the global sum of PDL weights, "
                "which Trainer does not count (its num_items_in_batch is a token count); use "
                "pdl_normalization='token' with Trainer"
            )
        self.objective = objective
        self.fused = fused
        # The layout: full logits, or under Trainer's DeepSpeed AutoTP this rank's shard.
        self.core = AutoTPObjectives(objective)
        self.chunking = {"rows_per_chunk": rows_per_chunk, "kernel": kernel}
        self._pending: torch.Tensor | None = None
        self._model: torch.nn.Module | None = None  # attach's, to read an AutoTP head shard

    def __call__(self, outputs: Any, labels: torch.Tensor | None,
                 num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if self.fused:
            raise ValueError(
                "ObjectiveLoss(fused=True) computes the loss inside the model's forward, from "
                "the hidden states; as compute_loss_func it would get the logits the model "
                "already built. Call objectives.attach(trainer) and pass no compute_loss_func"
            )
        labels = self._checked_labels(labels)
        logits = _logits_of(outputs)
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                f"ObjectiveLoss takes a causal LM's [b, s, V] logits and its unshifted [b, s] "
                f"labels"
            )
        self._read_head_shard(logits.shape[-1])
        output = self.core.causal_lm(logits, labels, **self.chunking)
        return self.reduce(output, num_items_in_batch)

    def fused_objective(self, hidden: torch.Tensor, weight: torch.Tensor,
                        labels: torch.Tensor | None) -> ObjectiveOutput:
        """Per-token objectives from hidden [b, s, h] and the lm_head weight [V, h], for the
        unshifted labels [b, s]; no [b, s, V] tensor is kept for backward."""
        labels = self._checked_labels(labels)
        return self.core.fused(hidden, weight, shift_labels(labels), **self.chunking)

    def reduce(self, output: ObjectiveOutput,
               num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        """The scalar loss of `output`: its sum / num_items_in_batch (Trainer's global count of
        targets), or / its own counted tokens when None. Under autograd (training), its totals
        are kept for the next log."""
        if torch.is_grad_enabled():
            totals = output.totals().detach().to(torch.float64)
            self._pending = totals if self._pending is None else self._pending + totals
        return self.core.mean(output, num_items_in_batch)

    def take_totals(self) -> torch.Tensor | None:
        """fp64 [6]: the ObjectiveOutput.totals() summed since the last call (None if none)."""
        totals, self._pending = self._pending, None
        return totals

    def attach(self, trainer) -> Any:
        """Put the objectives into a built `transformers.Trainer` (or TRL's SFTTrainer): the
        loss (compute_loss_func, or with fused=True the model's own forward, fused.py) and the
        per-component logs (ObjectiveLogCallback, first, so every report_to sees them).
        Idempotent; returns the trainer."""
        from token_objectives.integrations.hf.callback import ObjectiveLogCallback
        from token_objectives.integrations.hf.fused import patch_model

        if getattr(trainer, "_loss_shifts_labels", True) is False:
            raise ValueError(
                f"Trainer counts num_items_in_batch over the unshifted labels for "
                f"{type(trainer.model).__name__} (its loss_type is not a causal LM's), so the "
                f"shifted objective would be divided by too many tokens; ObjectiveLoss is for "
                f"causal LMs (*ForCausalLM)"
            )
        if self.fused:
            if type(trainer).__module__.startswith("trl."):
                raise ValueError(
                    f"{type(trainer).__name__} runs its own fused lm_head for its metrics; use "
                    f"ObjectiveLoss(fused=False) as its compute_loss_func"
                )
            patch_model(trainer.model, self)
            # Trainer then gives the labels and num_items_in_batch to the model's forward.
            trainer.compute_loss_func = None
            trainer.model_accepts_loss_kwargs = True
        else:
            trainer.compute_loss_func = self
        self._model = trainer.model
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [c for c in callbacks if not isinstance(c, ObjectiveLogCallback)]
        callbacks.insert(0, ObjectiveLogCallback(self))
        return trainer

    def _checked_labels(self, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                "ObjectiveLoss got labels=None: the batch has no 'labels'. Give the dataset a "
                "labels column or use DataCollatorForLanguageModeling(tokenizer, mlm=False); "
                "with a datasets.Dataset, keep the column (label_names=['labels'])"
            )
        if labels.dim() < 2:
            raise ValueError(f"labels must be [b, s] token ids, got shape {tuple(labels.shape)}")
        return labels

    def _read_head_shard(self, width: int) -> None:
        """Under AutoTP the lm_head is replaced when Trainer prepares the model: read this
        rank's vocab shard from the attached model once the logits are narrower."""
        if (self.core.head_shard is None and self._model is not None
                and width != self.objective.vocab_size):
            self.core.use_head_shard(vocab_parallel_head_shard(self._model))


def objective_loss_from_options(
    options: ObjectiveConfig | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    frequencies: str | None = None,
    *,
    model: Any = None,
    vocab_size: int | None = None,
    real_vocab_size: int | None = None,
    number_tokens: str = "auto",
    fused: bool = False,
    **kwargs: Any,
) -> ObjectiveLoss:
    """ObjectiveLoss from ObjectiveConfig's options (a mapping, or a config), the tokenizer (a
    local path, or the trainer's processing_class) and a count-frequencies file. The mapping
    is checked by objectives.options as the YAML `objectives` section is (an unknown key lists
    the valid ones; `objectives.key: expected <accepts>, got <value!r>`; None turns an optional
    option off). vocab_size: the model's padded V (default model.config.vocab_size, else the
    tokenizer's). number_tokens: which tokens are number tokens, 'auto', 'digit', 'groups' or
    'multi' (objectives.config.NUMBER_TOKENS, tables.numbers.NUMBER_TOKENS_HELP). kwargs:
    ObjectiveLoss's keywords."""
    if isinstance(options, ObjectiveConfig):
        config = options
    else:
        config = checker.from_mapping(ObjectiveConfig, dict(options or {}), "objectives",
                                      text=True)
    number_tokens = NUMBER_TOKENS.checked(number_tokens)
    if vocab_size is None and model is not None:
        vocab_size = model.config.vocab_size
    objective = Objective.build(config, tokenizer=tokenizer, frequencies=frequencies,
                                vocab_size=vocab_size, real_vocab_size=real_vocab_size,
                                number_tokens=number_tokens)
    return ObjectiveLoss(objective, fused=fused, **kwargs)
