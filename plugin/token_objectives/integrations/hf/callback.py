"""ObjectiveLogCallback: the objective's components in Trainer's own logs.

At each of Trainer's training logs, the totals ObjectiveLoss kept since the last one (summed
over micro-batches and accumulation steps) are all-reduced over every process and turned into
the components of objectives.components, under Trainer's snake_case keys ("lm_loss",
"number_tokens": a count per optimizer step, the mean over the steps since the last log), then
added to the `logs` that the report_to integrations write ("train/ntl" in TensorBoard) and to
state.log_history. It must run before those integrations' own on_log, so ObjectiveLoss.attach
puts it first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from token_objectives.integrations.autotp import tensor_parallel_group
from token_objectives.objectives.components import component_values
from token_objectives.objectives.components import log_key as log_key  # its former home


class ObjectiveLogCallback(TrainerCallback):
    """Adds lm_loss, ce_part, ntl_part, ce, ntl, counted_tokens, number_tokens,
    number_token_share and pdl_weight to Trainer's training logs.

    One all-reduce (SUM, fp64 [6]) over the default process group per log, on every rank
    (Trainer logs on every rank; only its writers are rank 0's). The ranks of an AutoTP group
    hold copies of one batch: the sums are divided by the group's size, so a token counts once.
    """

    def __init__(self, objectives) -> None:
        self.objectives = objectives
        self.last_logged_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_logged_step = state.global_step  # a resumed run starts counting here

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation and end-of-training summaries
            return
        totals = self.objectives.take_totals()
        if totals is None:
            totals = torch.zeros(6, dtype=torch.float64, device=args.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
            group = tensor_parallel_group()
            if group is not None:
                totals = totals / dist.get_world_size(group)
        steps = max(state.global_step - self.last_logged_step, 1)
        self.last_logged_step = state.global_step
        values = {log_key(name): value for name, value in
                  component_values(totals, self.objectives.config, steps).items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
