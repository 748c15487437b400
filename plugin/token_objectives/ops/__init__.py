"""The math and the kernels: per-shard statistics, their autograd Functions (logits and fused LM
head), the Triton kernels, digit runs and vocab-parallel argmax / sampling. Imports torch (and
triton) only, never the rest of the package."""
