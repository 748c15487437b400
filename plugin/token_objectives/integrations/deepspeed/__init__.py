"""DeepSpeed: the "token_objectives" ds_config section and its loss callable (section.py), and
DeepSpeed's CPU workarounds (cpu.py).

    from token_objectives.integrations.deepspeed import objective_from_ds_config

is the door for a DeepSpeed training loop of one's own (docs/deepspeed-own-loop.md).
"""

from token_objectives.integrations.deepspeed.section import (
    DeepSpeedObjectives,
    log_components,
    objective_from_ds_config,
    read_section,
)

__all__ = ["DeepSpeedObjectives", "log_components", "objective_from_ds_config", "read_section"]
