"""Hugging Face Transformers and TRL: the objectives in `Trainer` and `SFTTrainer`.

    objectives = objective_loss_from_options({"ntl": "was"}, tokenizer_dir, model=model)
    trainer = Trainer(model, args, ..., compute_loss_func=objectives)
    objectives.attach(trainer)    # optional: per-component logs; needed for fused=True

loss.py: ObjectiveLoss, the `compute_loss_func` on the logits; fused.py: the model patch that
computes the loss from the last hidden state and the lm_head weight; callback.py: the
per-component logs.
"""

from token_objectives.integrations.hf.callback import ObjectiveLogCallback
from token_objectives.integrations.hf.fused import patch_model, unpatch_model
from token_objectives.integrations.hf.loss import (
    ObjectiveLoss,
    objective_loss_from_options,
    shift_labels,
)

__all__ = [
    "ObjectiveLogCallback",
    "ObjectiveLoss",
    "objective_loss_from_options",
    "patch_model",
    "shift_labels",
    "unpatch_model",
]
