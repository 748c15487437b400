"""Reference-answer correction data: greedy answers from a local HF model, written as .bin/.idx
with a loss-mask sidecar (`token-objectives build-correction-data`).

    build_data   the builder (imports torch, numpy and transformers)
    cli          the command: its flags, parsed before the builder is imported
"""

# Shared by the builder's defaults and the command's flags, which must not import the builder.
DEFAULT_MARKER = "\nCorrection:\n"
ON_BAD_LINE = ("error", "skip")
