"""What the objectives read from a tokenizer and a corpus: tokenizer loading, number-token tables,
token-frequency counts and their files; and the inputs and outputs of the commands: errors.py
(InputError, a bad input), jsonl.py (one JSONL line), indexed_dataset.py (the .bin/.idx check),
output_files.py (output paths and --mode). Imports nothing else from the package."""
