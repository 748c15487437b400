"""GaC token-level ensembling of models with different tokenizers (`token-objectives ensemble`):
the union vocab, re-tokenising, the generation loop and its CLI."""
