"""The quickstart's data: a number-rich corpus, a sentencepiece tokenizer, .bin/.idx and a
token-frequency table, all built locally."""
