"""Greedy generation shared by the readers above it: hf.py, greedy answers of a local Hugging Face
causal LM, which `evaluation/` (evaluate --hf-model) and `correction/` (build-correction-data)
both use. Imports nothing else from the package."""
