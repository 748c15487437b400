"""`token-objectives evaluate`: greedy answers to {"prompt", "answer"} problems, scored by the
last number of each generation (numbers.py, metrics.py), from a Megatron-loop checkpoint or a
local Hugging Face model (generate.py), reported as a table and a JSON file (report.py)."""
