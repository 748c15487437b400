"""The logged components mean one thing everywhere: the same tiny batch, logged through each
surface, gives the same names (objectives.components.COMPONENT_NAMES, in each framework's
spelling) and the same values:

- Trainer's logs (integrations.hf: ObjectiveLoss.reduce per micro-batch, then
  ObjectiveLogCallback.on_log);
- a DeepSpeed monitor (integrations.deepspeed.section.log_components) and the DeepSpeed loop's
  metrics.jsonl row and monitor tags;
- Megatron-LM's report (hook.wrap_loss_func around a stand-in for pretrain_gpt.py's loss_func,
  summed as Megatron-LM's train_step sums it);
- the Megatron loop's metrics.jsonl row and TensorBoard tags (hook.loss_func's reports through
  training.megatron.report_values).

The counts are counts: "number tokens" is the step's number of counted number tokens, an
integer, on every surface; the share is "number token share". docs/metrics.md's table of
spellings is checked against the code.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch
from cases import make_case

from token_objectives import Objective, ObjectiveConfig
from token_objectives.integrations.deepspeed.section import log_components
from token_objectives.integrations.hf.callback import ObjectiveLogCallback
from token_objectives.integrations.hf.loss import ObjectiveLoss
from token_objectives.integrations.megatron import hook
from token_objectives.objectives.components import COMPONENT_NAMES, COUNT_NAMES, log_key
from token_objectives.training import deepspeed as deepspeed_loop
from token_objectives.training import megatron as megatron_loop
from token_objectives.training.loop import StepRecord
from token_objectives.training.metrics import current_row, read_rows

REPO = Path(__file__).resolve().parents[1]
# PDL, label smoothing, z-loss and NTL-WAS at weight 0.7: every term of the loss is there.
ALL = ObjectiveConfig(ntl="was", squash_factor=3.0, pdl_alpha=0.3, label_smoothing=0.05,
                      z_loss=1e-3, ntl_weight=0.7)
PLAIN = ObjectiveConfig(ntl="mse", ntl_weight=0.3)  # no PDL, smoothing or z-loss


def _batch(config: ObjectiveConfig):
    """(objective, logits [b, s, V], labels [b, s] all real ids, loss_mask [b, s] 0/1): the
    cases' ignored positions become mask zeros, so Megatron (no ignore_index) counts the same
    tokens."""
    case = make_case("metrics", config, seed=5, batch=2, seq=24)
    ignored = case.labels == config.ignore_index
    labels = case.labels.masked_fill(ignored, 0)
    mask = (case.loss_mask != 0).float() * ~ignored
    return Objective(config, case.numbers, case.pdl_weights), case.logits, labels, mask


def _hand_counts(objective, logits, labels, mask) -> tuple[int, int]:
    out = objective(logits, labels, loss_mask=mask)
    return int(out.counted.sum()), int(out.ntl_positions.sum())


def _trainer_logs(objective, logits, labels, mask, steps: int = 1) -> dict[str, float]:
    """Trainer: each row a micro-batch, reduced as compute_loss_func; one log after `steps`
    optimizer steps of this same batch."""
    objectives = ObjectiveLoss(objective)
    callback = ObjectiveLogCallback(objectives)
    state = types.SimpleNamespace(global_step=0, log_history=[])
    args = types.SimpleNamespace(device=torch.device("cpu"))
    callback.on_train_begin(args, state, None)
    for _ in range(steps):
        for row in range(labels.shape[0]):
            objectives.reduce(objective(logits[row:row + 1], labels[row:row + 1],
                                        loss_mask=mask[row:row + 1]), None)
        state.global_step += 1
    logs = {"loss": 0.0}
    callback.on_log(args, state, None, logs=logs)
    return {key: value for key, value in logs.items() if key != "loss"}


class _Monitor:
    enabled = True

    def __init__(self) -> None:
        self.events = []

    def write_events(self, events) -> None:
        self.events += events


def _deepspeed(objective, logits, labels, mask) -> tuple[dict, list]:
    """log_components on the step's output (the monitor's events too)."""
    engine = types.SimpleNamespace(monitor=_Monitor())
    values = log_components(engine, objective(logits, labels, loss_mask=mask), 3,
                            objective.config)
    return values, engine.monitor.events


def _megatron_reports(objective, logits, labels, mask, loss_fn) -> dict[str, torch.Tensor]:
    """Each row a micro-batch through a GPTModel's per-token loss and `loss_fn`; the reports'
    pairs summed as Megatron-LM's train_step and our loop sum them (one DP rank)."""
    objectives = hook.Objectives(objective)
    reports = []
    for row in range(labels.shape[0]):
        per_token = objectives.per_token_loss(labels[row:row + 1],
                                              logits[row:row + 1].transpose(0, 1), None)
        reports.append(loss_fn(mask[row:row + 1], per_token)[-1])
    return {name: torch.stack([r[name] for r in reports]).sum(0) for name in reports[0]}


def _megatron_lm_loss_func(loss_mask, output_tensor, model=None):
    """pretrain_gpt.py's loss_func (core_v0.16.1) as far as the report goes."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def _surfaces(config: ObjectiveConfig) -> dict[str, dict[str, float]]:
    """name -> value on every surface, under the component names (Trainer's keys mapped back)."""
    objective, logits, labels, mask = _batch(config)
    micro_batches = labels.shape[0]
    trainer = _trainer_logs(objective, logits, labels, mask)
    deepspeed, _ = _deepspeed(objective, logits, labels, mask)
    wrapped = hook.wrap_loss_func(_megatron_lm_loss_func, reports_per_step=lambda: micro_batches)
    summed = _megatron_reports(objective, logits, labels, mask, wrapped)
    megatron_lm = {name: float(pair[0] / pair[1]) for name, pair in summed.items()}
    ours = megatron_loop.report_values(_megatron_reports(
        objective, logits, labels, mask,
        lambda m, t: hook.loss_func(m, t, reports_per_step=micro_batches)))
    megatron_row = StepRecord(1, ours, 1e-3, 1.0, 100.0).row
    deepspeed_row = StepRecord(1, deepspeed, 1e-3, 1.0, 100.0).row
    names = {log_key(name): name for name in COMPONENT_NAMES}
    return {"Trainer": {names[key]: value for key, value in trainer.items()},
            "DeepSpeed monitor": deepspeed, "Megatron-LM": megatron_lm,
            "Megatron loop": {n: megatron_row[n] for n in COMPONENT_NAMES if n in megatron_row},
            "DeepSpeed loop": {n: deepspeed_row[n] for n in COMPONENT_NAMES if n in deepspeed_row}}


@pytest.mark.parametrize("config", [ALL, PLAIN], ids=["all", "plain"])
def test_every_surface_logs_the_same_names_and_values(config):
    surfaces = _surfaces(config)
    reference = surfaces["DeepSpeed monitor"]
    for surface, values in surfaces.items():
        assert tuple(values) == COMPONENT_NAMES, surface
        for name in COMPONENT_NAMES:
            if name in COUNT_NAMES:
                assert values[name] == reference[name], (surface, name)
            else:
                assert values[name] == pytest.approx(reference[name], rel=1e-5), (surface, name)
    # How they add up (docs/metrics.md).
    for values in surfaces.values():
        assert values["lm loss"] == pytest.approx(
            values["ce part"] + config.ntl_weight * values["ntl part"], rel=1e-5)
        assert values["ntl part"] == pytest.approx(
            values["ntl"] * values["number token share"], rel=1e-5)
        assert values["number token share"] == pytest.approx(
            values["number tokens"] / values["counted tokens"], rel=1e-6)
        if config is PLAIN:  # no PDL, smoothing or z-loss: ce part is the plain CE
            assert values["lm loss"] == pytest.approx(
                values["ce"] + config.ntl_weight * values["ntl"] * values["number token share"],
                rel=1e-5)
            assert values["pdl weight"] == 1.0


def test_number_tokens_is_the_steps_count_on_every_surface():
    objective, logits, labels, mask = _batch(ALL)
    tokens, numbers = _hand_counts(objective, logits, labels, mask)
    assert numbers > 1 and tokens > numbers
    for surface, values in _surfaces(ALL).items():
        assert values["number tokens"] == numbers, surface
        assert values["counted tokens"] == tokens, surface
        assert values["number token share"] == pytest.approx(numbers / tokens), surface
    # A Trainer log over 3 steps gives the count per step, not their sum; the means stay.
    once, thrice = (_trainer_logs(objective, logits, labels, mask, steps) for steps in (1, 3))
    assert thrice["number_tokens"] == numbers and thrice["counted_tokens"] == tokens
    assert thrice["ntl"] == pytest.approx(once["ntl"], rel=1e-12)
    # Megatron-LM's train_step sums the pairs of every micro-batch of every DP rank: 2 ranks
    # of this batch give twice the count, exactly.
    wrapped = hook.wrap_loss_func(_megatron_lm_loss_func, reports_per_step=lambda: 4)
    rank = _megatron_reports(objective, logits, labels, mask, wrapped)
    both = {name: pair * 2 for name, pair in rank.items()}  # the DP all-reduce of 2 ranks
    assert float(both["number tokens"][0] / both["number tokens"][1]) == 2 * numbers
    assert float(both["counted tokens"][0] / both["counted tokens"][1]) == 2 * tokens


def test_the_spellings_of_each_framework():
    objective, logits, labels, mask = _batch(ALL)
    values, events = _deepspeed(objective, logits, labels, mask)
    assert [(tag, step) for tag, _, step in events] == [(f"Train/{n}", 3) for n in values]
    record = StepRecord(1, values, 1e-3, 1.0, 100.0)
    assert [tag for tag, _ in deepspeed_loop.tensorboard_scalars(record)] == \
        [f"Train/{name}" for name in COMPONENT_NAMES]
    assert [tag for tag, _ in megatron_loop.tensorboard_scalars(record)][:len(values)] == \
        [f"loss/{name}" for name in COMPONENT_NAMES]
    assert list(_trainer_logs(objective, logits, labels, mask)) == \
        [name.replace(" ", "_") for name in COMPONENT_NAMES]


def _docs_table() -> dict[str, list[str]]:
    """docs/metrics.md's table of spellings: component name -> its row's cells."""
    rows = {}
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 6:
            rows[cells[0].strip("`")] = [re.sub(r"^`|`$", "", cell) for cell in cells]
    return rows


def test_the_docs_table_is_what_the_code_writes():
    rows = _docs_table()
    assert tuple(rows) == COMPONENT_NAMES
    for name, (jsonl, megatron_tb, deepspeed_tb, megatron_lm, trainer, hf_tb) in rows.items():
        assert (jsonl, megatron_tb, deepspeed_tb, megatron_lm, trainer, hf_tb) == (
            name, f"loss/{name}", f"Train/{name}", name, log_key(name), f"train/{log_key(name)}")


def test_a_metrics_file_from_before_the_counts_reads_as_a_share(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lm loss": 2.5, "number tokens": 0.25}\n'
                    '{"step": 2, "lm loss": 2.4, "counted tokens": 40, "number tokens": 10, '
                    '"number token share": 0.25}\n{"step": 3, "lm lo')  # a torn last line
    old, new = read_rows(path)
    assert old == {"step": 1, "lm loss": 2.5, "number token share": 0.25}
    assert new["number tokens"] == 10 and current_row(new) == new
