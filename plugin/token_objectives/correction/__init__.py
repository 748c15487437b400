"""Reference-answer correction data: greedy answers from a local HF model, written as .bin/.idx
with a loss-mask sidecar (`token-objectives build-correction-data`)."""
