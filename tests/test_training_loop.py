"""The training core both loops share, without a process group: the console line, the metrics
writer's resume truncation and the non-finite check (the loops themselves run for real in
test_megatron_training.py and test_deepspeed.py)."""

from __future__ import annotations

import json
import math

import pytest

from token_objectives.training.loop import (
    SkippedSteps,
    StepRecord,
    check_gradients,
    check_losses,
    format_step,
)
from token_objectives.training.metrics import MetricsWriter


def _record(step: int, **values: float) -> StepRecord:
    return StepRecord(step, values, lr=1e-3, grad_norm=0.5, tokens_per_s=1234.0)


def test_console_line_prints_a_nan_rather_than_leaving_it_out():
    line = format_step(_record(3, **{"lm loss": math.nan, "ce": 2.0, "ntl": math.inf}), 10)
    assert line == ("step     3/10 | lm loss nan | ce 2.0000 | ntl inf | lr 1.00e-03 | "
                    "grad norm 0.500 | 1,234 tok/s")


def test_console_line_without_a_grad_norm_and_with_sampling():
    record = StepRecord(1, {"lm loss": 1.0}, 0.0, None, 10.0,
                        {"sampling/p": 0.5, "sampling/replaced_of_all": 0.25})
    assert format_step(record, 2) == ("step     1/2 | lm loss 1.0000 | sampling p 0.500 "
                                      "replaced 0.250 | lr 0.00e+00 | 10 tok/s")


def test_resume_truncation_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path, enabled=True)
    for step in (1, 2, 3):
        writer.write(_record(step, ce=1.0))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"step": 4, "c')  # a kill mid-write
    writer.forget_after(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    writer.write(_record(3, ce=1.0))
    assert json.loads(path.read_text().splitlines()[-1]) == _record(3, ce=1.0).row


def test_a_rank_that_does_not_log_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=False)
    writer.write(_record(1))
    writer.forget_after(0)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_non_finite_gradient_is_an_error_that_names_the_step_and_the_fix():
    check_gradients(5, True, "the gradient norm is 1.0", "a lower lr")
    with pytest.raises(FloatingPointError, match=r"^step 5: the gradient norm is nan; the update "
                       r"was not applied\. Resume from the last checkpoint with a lower lr$"):
        check_gradients(5, False, "the gradient norm is nan", "a lower lr")


def test_a_non_finite_loss_component_is_an_error_that_names_it_the_step_and_what_to_check():
    check_losses(12, {"lm loss": 2.5, "ce": 2.31, "ntl": 0.1}, "a lower train.lr")
    with pytest.raises(FloatingPointError, match=(
            r"^step 12: the loss component 'ntl' is nan \(lm loss nan, ce 2\.31, ntl part nan\); "
            r"the update was not applied\. Check the data \(labels, loss mask\) and the number "
            r"table; resume from the last checkpoint with a lower train\.lr$")):
        check_losses(12, {"lm loss": math.nan, "ce": 2.31, "ntl part": math.nan,
                          "ntl": math.nan}, "a lower train.lr")
    with pytest.raises(FloatingPointError, match=r"^step 3: the loss component 'ce' is inf "):
        check_losses(3, {"lm loss": 1.0, "ce": math.inf}, "a lower lr")


def test_skipped_updates_stop_the_run_after_the_limit_in_a_row_only():
    skipped = SkippedSteps(3, "train.max_skipped_steps")
    for step, applied in enumerate([False, False, True, False, False], start=1):
        skipped.record(step, applied)  # never 3 in a row
    with pytest.raises(FloatingPointError, match=r"^step 6: the optimizer skipped the update 3 "
                       r"steps in a row \(train.max_skipped_steps = 3\)"):
        skipped.record(6, False)
    never = SkippedSteps(0, "--max-skipped-steps")
    for step in range(1, 100):
        never.record(step, False)


def test_console_line_and_row_of_a_step_that_evaluated():
    record = StepRecord(4, {"lm loss": 1.0}, 0.0, None, 10.0,
                        evaluation={"eval/exact_accuracy": 0.5, "eval/mae": 1.25})
    assert format_step(record, 8) == ("step     4/8 | lm loss 1.0000 | lr 0.00e+00 | 10 tok/s | "
                                      "eval exact_accuracy 0.5 mae 1.25")
    assert record.row["eval/mae"] == 1.25 and "eval/mae" not in _record(4).row
