"""The batch-scheduled sampling config and its schedules for the replacement probability p.

Bengio et al. (2015) schedule eps_i, the probability of feeding the GROUND-TRUTH token at step
i. Here p is the probability of feeding the model's own token instead, so p = 1 - eps, capped:

    i = step - warmup_steps     (step = optimizer steps already taken: 0 for the first one)
    p(step) = 0 for step < warmup_steps (teacher forcing); after it:
    constant:         p = max_p
    linear:           eps_i = max(1 - max_p, k - c * i)       p = clip(1 - k + c * i, 0, max_p)
    exponential:      eps_i = k ** i, 0 < k < 1               p = min(max_p, 1 - k ** i)
    inverse_sigmoid:  eps_i = k / (k + exp(i / k)), k >= 1    p = min(max_p, 1 - eps_i)

Bengio's linear schedule has a floor eps (the least teacher forcing); here that floor is
1 - max_p. With the default k = 1, linear grows from p = 0 by c per step and reaches max_p after
max_p / c steps. Note that inverse_sigmoid starts at p = 1 / (1 + k) right after the warm-up,
as Bengio's formula does: pick k large (hundreds to thousands of steps) for a slow start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MODES", "SCHEDULES", "ScheduledSamplingConfig"]

SCHEDULES = ("constant", "linear", "exponential", "inverse_sigmoid")
MODES = ("argmax", "sample")


@dataclass(frozen=True)
class ScheduledSamplingConfig:
    """Batch-scheduled sampling: replace input tokens by the model's own predictions.

    enabled: off by default; off (or p = 0) trains exactly as without this section.
    schedule / max_p / warmup_steps / k / c: p(step), see the module docstring.
    mode: "argmax" (greedy) or "sample" (from softmax(logits / temperature)).
    """

    enabled: bool = False
    schedule: str = "constant"
    max_p: float = 0.25
    warmup_steps: int = 0
    k: float | None = None
    c: float | None = None
    mode: str = "argmax"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        where = "scheduled_sampling"
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{where}.schedule must be one of {list(SCHEDULES)}, "
                             f"got {self.schedule!r}")
        if self.mode not in MODES:
            raise ValueError(f"{where}.mode must be one of {list(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.max_p <= 1.0:
            raise ValueError(f"{where}.max_p must lie in [0, 1], got {self.max_p}")
        if self.warmup_steps < 0:
            raise ValueError(f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.temperature > 0:
            raise ValueError(f"{where}.temperature must be > 0 (mode: argmax for greedy), got "
                             f"{self.temperature}")
        self._check_schedule_parameters(where)

    def _check_schedule_parameters(self, where: str) -> None:
        name = self.schedule
        if name == "constant" and (self.k is not None or self.c is not None):
            raise ValueError(f"{where}: the constant schedule takes no k or c; remove them or "
                             f"choose schedule: linear | exponential | inverse_sigmoid")
        if name != "linear" and self.c is not None:
            raise ValueError(f"{where}.c is the slope of the linear schedule only; remove it")
        if name == "linear":
            if self.c is None or self.c <= 0:
                raise ValueError(f"{where}: schedule linear needs c > 0, the increase of p per "
                                 f"step (c = max_p / N reaches max_p after N steps), got {self.c}")
        elif name == "exponential":
            if self.k is None or not 0 < self.k < 1:
                raise ValueError(f"{where}: schedule exponential needs 0 < k < 1 (eps = k**i; "
                                 f"e.g. k: 0.999), got {self.k}")
        elif name == "inverse_sigmoid" and (self.k is None or self.k < 1):
            raise ValueError(f"{where}: schedule inverse_sigmoid needs k >= 1 (eps = k / (k + "
                             f"exp(i / k)); e.g. k: 500), got {self.k}")

    def probability(self, step: int) -> float:
        """p for the optimizer step `step` (0-based: the number of steps already taken).

        Always 0 when the section is disabled or during the warm-up.
        """
        if not self.enabled or step < self.warmup_steps:
            return 0.0
        i = step - self.warmup_steps
        if self.schedule == "constant":
            p = self.max_p
        elif self.schedule == "linear":
            k = 1.0 if self.k is None else self.k
            p = 1.0 - k + self.c * i
        elif self.schedule == "exponential":
            p = 1.0 - self.k ** i
        else:
            exponent = i / self.k
            # exp overflows past ~709; eps is 0 to double precision long before that.
            p = 1.0 if exponent > 700 else 1.0 - self.k / (self.k + math.exp(exponent))
        return min(max(p, 0.0), self.max_p)
