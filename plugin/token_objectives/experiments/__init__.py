"""The objectives experiment: CE against CE + NTL / Gaussian targets / PDL on an arithmetic task
a tiny model learns on a CPU, with paired seeds and 95% intervals (docs/experiments/README.md).

arithmetic.py: the problems, the held-out split and the training batches; vocabularies.py: the
digit-level and the Llama-3 tokenization of them; run.py: one arm at one seed, trained and
scored; statistics.py: paired differences with intervals; figures.py: the PNG figures;
report.py: the markdown table made from results.json.

Depends on the core one way: it uses the objectives, tables, evaluation metrics and the Hugging
Face door (ObjectiveLoss); nothing in the package imports it.
"""
