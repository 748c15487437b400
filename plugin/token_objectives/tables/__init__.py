"""What the objectives read from a tokenizer and a corpus: tokenizer loading, number-token tables,
token-frequency counts and their files. Imports nothing else from the package."""
