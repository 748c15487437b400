"""DeepSpeed: the "token_objectives" ds_config section and its loss callable (section.py), and
DeepSpeed's CPU workarounds (cpu.py)."""
