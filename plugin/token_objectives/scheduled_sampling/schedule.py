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

from token_objectives.objectives import options
from token_objectives.objectives.options import option

__all__ = ["MODES", "SCHEDULES", "ScheduledSamplingConfig"]

SCHEDULES = ("constant", "linear", "exponential", "inverse_sigmoid")
MODES = ("argmax", "sample")


@dataclass(frozen=True)
class ScheduledSamplingConfig:
    """Batch-scheduled sampling: replace input tokens by the model's own predictions.

    enabled: off by default; off (or p = 0) trains exactly as without this section.
    schedule / max_p / warmup_steps / k / c: p(step), see the module docstring.
    mode: "argmax" (greedy) or "sample" (from softmax(logits / temperature)).
    The fields are declared with `options.option` and checked by `options.check`: the YAML
    `scheduled_sampling` section and the ds_config section's "scheduled_sampling" object are
    made from them (options.from_mapping); None leaves k and c unset.
    """

    enabled: bool = option(False, help="replace input tokens by the model's own predictions")
    schedule: str = option("constant", choices=SCHEDULES, help="p(step), see the module docstring")
    max_p: float = option(0.25, low=0, high=1, help="the most p reaches")
    warmup_steps: int = option(0, low=0, help="steps of teacher forcing (p = 0) first")
    k: float | None = option(None, help="exponential: 0 < k < 1; inverse_sigmoid: k >= 1; "
                             "linear: the start, p = 1 - k (default 1)")
    c: float | None = option(None, low=0, open="low",
                             help="linear only: the increase of p per step")
    mode: str = option("argmax", choices=MODES,
                       help="'argmax' (greedy) or 'sample' (from softmax(logits / temperature))")
    temperature: float = option(1.0, low=0, open="low",
                                help="mode sample: the softmax temperature")

    def __post_init__(self) -> None:
        """Each option by its declaration (options.check); then the parameters each schedule
        needs."""
        where = "scheduled_sampling"
        options.check(self, where)
        self._check_schedule_parameters(where)

    def _check_schedule_parameters(self, where: str) -> None:
        name = self.schedule
        if name == "constant" and (self.k is not None or self.c is not None):
            raise ValueError(f"{where}: the constant schedule takes no k or c; remove them or "
                             f"choose schedule: linear | exponential | inverse_sigmoid")
        if name != "linear" and self.c is not None:
            raise ValueError(f"{where}.c is the slope of the linear schedule only; remove it")
        if name == "linear":
            if self.c is None:
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
