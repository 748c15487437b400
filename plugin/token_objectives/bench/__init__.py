"""`token-objectives bench`: the T x V x TP grid, its baselines and the measuring; and
`bench-hf`, one transformers.Trainer step.

    grid_cli, hf_cli   the two commands' flags, parsed before torch is imported
    grid               the grid's processes, measuring and report (`bench`)
    methods            the methods measured and the bytes saved for backward
    hf                 the Trainer step (`bench-hf`)
    gpu_check          the kernels against the torch stages on a GPU
"""

# The methods the grid measures, named by the flags before `methods` (torch) is imported.
LOGIT_METHODS = ("megatron", "megatron_fused", "naive", "unchunked", "ours", "ours_gaussian")
HEAD_METHODS = ("head_unfused", "head_fused")
# bench-hf's three ways (hf_cli.DESCRIPTION).
HF_METHODS = ("hf", "ours", "ours_fused")
