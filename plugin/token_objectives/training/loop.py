"""The run loop both training loops share: one `run_loop` over a `Trainer` that steps, saves and
resumes, plus the record of a step, the run result, the console line and the non-finite check.

`training.megatron` and `training.deepspeed` hold what differs (model, data, forward/backward,
checkpoint format); everything a run does around its steps is here, once:

    install the SIGUSR1/SIGTERM flag (before the slow start-up) -> build the trainer -> resume
    -> drop the metrics lines after the resumed step -> step to the target, writing each step's
    metrics, printing every log_interval, saving on a signal (any rank's), every save_interval
    and at exit_interval -> save the last step if it was not saved -> after a signal, tell the
    launcher (training.torchrun) this worker stopped cleanly -> RunResult.
"""

from __future__ import annotations

import math
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from token_objectives.training.checkpointing import PreemptionFlag
from token_objectives.training.metrics import MetricsWriter
from token_objectives.training.torchrun import report_clean_stop, report_failed_stop

# The components the console line shows, in this order, when a step reports them.
CONSOLE_VALUES = ("lm loss", "ce", "ntl", "ce part", "ntl part")


@dataclass
class StepRecord:
    """What one optimizer step reports; `row` is its metrics.jsonl line.

    values: report name -> mean over the global batch ("lm loss", "ce", ...); sampling: the
    scheduled-sampling values (sampling.mix.LOG_NAMES), empty without it; evaluation: the
    "eval/<metric>" values of a step that ran train.eval_interval's evaluation, else empty.
    grad_norm is None where the loop does not know it.
    """

    step: int
    values: dict[str, float]
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    sampling: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)

    @property
    def row(self) -> dict[str, float | int | None]:
        return {"step": self.step, **self.values, **self.sampling, "lr": self.lr,
                "grad_norm": self.grad_norm, "tokens_per_s": self.tokens_per_s,
                **self.evaluation}

    def __getitem__(self, name: str) -> float | int | None:
        return self.row[name]


@dataclass
class RunResult:
    logs: list[StepRecord] = field(default_factory=list)
    last_step: int = 0
    stopped_by_signal: bool = False
    resumed_from: int | None = None


class Trainer(Protocol):
    """What `run_loop` needs of a loop. Every method is called on every rank (collectives)."""

    step: int  # optimizer steps done
    metrics: MetricsWriter
    device: torch.device  # where the any-rank signal flag is all-reduced (NCCL needs CUDA)
    print_rank: int  # the global rank that prints the console lines

    def train_step(self) -> StepRecord: ...

    def save(self) -> object: ...

    def resume(self) -> int | None: ...

    def close(self) -> None: ...


def check_gradients(step: int, finite: bool, detail: str, fix: str) -> None:
    """Stop the run before an update with a non-finite gradient is applied.

    step: the step being taken (1-based); detail: what was found ("the gradient norm is nan");
    fix: what to change on resuming. Raises FloatingPointError when not `finite`.
    """
    if not finite:
        raise FloatingPointError(f"step {step}: {detail}; the update was not applied. Resume "
                                 f"from the last checkpoint with {fix}")


class _Blame(dict):
    """Which non-finite component a message names first: a plain component before its weighted
    part, any other before "lm loss", the sum that is non-finite whenever one of them is."""

    def __missing__(self, name: str) -> int:
        return 4


_BLAME_ORDER = _Blame({"ce": 0, "ntl": 1, "ce part": 2, "ntl part": 3, "lm loss": 5})


def check_losses(step: int, values: Mapping[str, float], fix: str) -> None:
    """Stop the run before the update of a step whose loss is not finite.

    values: the step's per-component means, already reduced over the global batch (every rank
    holds the same, so every rank raises); fix: what to change on resuming. Raises
    FloatingPointError naming the non-finite component (the most specific one), with the
    others for context.
    """
    bad = sorted((name for name, value in values.items() if not math.isfinite(value)),
                 key=_BLAME_ORDER.get)
    if bad:
        others = ", ".join(f"{name} {value:.4g}" for name, value in values.items()
                           if name != bad[0])
        raise FloatingPointError(
            f"step {step}: the loss component {bad[0]!r} is {values[bad[0]]} ({others}); the "
            f"update was not applied. Check the data (labels, loss mask) and the number table; "
            f"resume from the last checkpoint with {fix}")


@dataclass
class SkippedSteps:
    """Counts the optimizer's consecutive skipped updates (a loss scaler's overflow) and stops
    the run after `limit` in a row; limit 0 never stops. `flag` names the setting."""

    limit: int
    flag: str
    in_a_row: int = 0

    def record(self, step: int, applied: bool) -> None:
        """After the optimizer step `step` (1-based): raises FloatingPointError on the
        `limit`-th skipped update in a row."""
        self.in_a_row = 0 if applied else self.in_a_row + 1
        if self.limit and self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"step {step}: the optimizer skipped the update {self.in_a_row} steps in a row "
                f"({self.flag} = {self.limit}): the gradients keep overflowing. Check the data "
                f"and the loss scaling; resume from the last checkpoint with a lower lr")


def any_rank_signalled(flag: PreemptionFlag, device: torch.device | str = "cpu") -> bool:
    """Collective: True on every rank when any rank got SIGUSR1/SIGTERM (a tensor on `device`,
    so NCCL can carry it too)."""
    got = torch.tensor([0 if flag.received is None else 1], device=device)
    dist.all_reduce(got, op=dist.ReduceOp.MAX)
    return bool(got.item())


def format_step(record: StepRecord, total: int) -> str:
    """The console line of a step; a NaN or inf value is printed as such, never left out."""
    parts = [f"step {record.step:>5}/{total}"]
    parts += [f"{name} {record.values[name]:.4f}" for name in CONSOLE_VALUES
              if name in record.values]
    if record.sampling:
        parts.append(f"sampling p {record.sampling['sampling/p']:.3f} replaced "
                     f"{record.sampling['sampling/replaced_of_all']:.3f}")
    parts.append(f"lr {record.lr:.2e}")
    if record.grad_norm is not None:
        parts.append(f"grad norm {record.grad_norm:.3f}")
    parts.append(f"{record.tokens_per_s:,.0f} tok/s")
    if record.evaluation:
        parts.append("eval " + " ".join(f"{name.removeprefix('eval/')} {value:.4g}"
                                        for name, value in record.evaluation.items()))
    return " | ".join(parts)


def run_loop(build: Callable[[], Trainer], steps: int, save_interval: int = 0,
             log_interval: int = 1, stop_after: int | None = None, exit_interval: int = 0,
             printer: Callable[[str], object] | None = print) -> RunResult:
    """Train to `steps` (or `stop_after` more steps), resuming from the latest checkpoint.

    Saves every `save_interval` steps, at the end, on SIGUSR1/SIGTERM on any rank (then returns
    with stopped_by_signal) and at every `exit_interval` before `steps` (then returns). One
    all-reduce per step for the signal flag, besides the trainer's own collectives.
    """
    flag = PreemptionFlag().install()  # before the slow start-up: a signal there is not lost
    trainer = None
    try:
        trainer = build()
        result = RunResult(resumed_from=trainer.resume())
        trainer.metrics.forget_after(trainer.step)  # those steps are done again: no repeats
        saved, done = trainer.step, 0
        while trainer.step < steps and (stop_after is None or done < stop_after):
            record = trainer.train_step()
            done += 1
            trainer.metrics.write(record)
            result.logs.append(record)
            if printer and dist.get_rank() == trainer.print_rank and (
                    record.step % log_interval == 0):
                printer(format_step(record, steps))
            if any_rank_signalled(flag, trainer.device):
                try:
                    trainer.save()
                except BaseException as error:
                    report_failed_stop(trainer.step, error)  # the launcher names the cause
                    raise
                saved = trainer.step
                result.stopped_by_signal = True
                break
            if exit_interval and trainer.step % exit_interval == 0 and trainer.step < steps:
                trainer.save()
                saved = trainer.step
                break
            if save_interval and trainer.step % save_interval == 0:
                trainer.save()
                saved = trainer.step
        if saved != trainer.step:
            trainer.save()
        result.last_step = trainer.step
        if result.stopped_by_signal or flag.received is not None:  # saved after the signal
            if flag.received is not None:
                # Per worker, with its host: shows which ranks the signal itself reached.
                rank = dist.get_rank() if dist.is_initialized() else 0
                print(f"rank {rank} on {socket.gethostname()}: "
                      f"{signal.Signals(flag.received).name} received, checkpoint of step "
                      f"{trainer.step} saved", file=sys.stderr, flush=True)
            report_clean_stop(trainer.step)
        return result
    finally:
        flag.uninstall()
        if trainer is not None:
            trainer.close()


def finish_distributed() -> None:
    """The end of a launch script: every rank waits for the others, then tears its process group
    down. A rank whose interpreter exits while gloo still has work in flight on another rank can
    abort ("terminate called without an active exception") after the run has succeeded."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
