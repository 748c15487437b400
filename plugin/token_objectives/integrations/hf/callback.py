"""ObjectiveLogCallback: the objective's components in Trainer's own logs.

At each of Trainer's training logs, the totals ObjectiveLoss kept since the last one (summed
over micro-batches and accumulation steps) are all-reduced over every process and turned into
means (objectives.components), then added to the `logs` that the report_to integrations write
("train/ntl" in TensorBoard) and to state.log_history. It must run before those integrations'
own on_log, so ObjectiveLoss.attach puts it first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from token_objectives.objectives.components import component_means


def log_key(name: str) -> str:
    """"lm loss" -> "lm_loss": Trainer's log keys."""
    return name.replace(" ", "_")


class ObjectiveLogCallback(TrainerCallback):
    """Adds lm_loss, ce, ntl, number_tokens and pdl_weight to Trainer's training logs.

    One all-reduce (SUM, fp64 [6]) over the default process group per log, on every rank
    (Trainer logs on every rank; only its writers are rank 0's).
    """

    def __init__(self, objectives) -> None:
        self.objectives = objectives

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation and end-of-training summaries
            return
        totals = self.objectives.take_totals()
        if totals is None:
            totals = torch.zeros(6, dtype=torch.float64, device=args.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        values = {log_key(name): value
                  for name, value in component_means(totals, self.objectives.config).items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
