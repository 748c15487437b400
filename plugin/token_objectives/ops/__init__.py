"""The math and the kernels: per-shard statistics, their autograd Functions (logits and fused LM
head), the Triton kernels, digit runs and vocab-parallel argmax / sampling. Imports torch (and
triton) only, never the rest of the package.

    plan            the plain types of one call (VocabShard, Columns, Distance, LabelCheck, Plan),
                    the per-chunk RowChunk, resolve_kernel and the column layouts
    statistics      the torch stages, the chunk walks forward and backward, and
                    VocabParallelStatistics on logits [T, V/tp] (2 all-reduces fwd, 0 bwd)
    fused_head      FusedLinearStatistics on hidden [T, h] and weight [V/tp, h], never holding the
                    logits (2 all-reduces fwd, 1 bwd: grad_hidden)
    triton_kernels  the Triton kernels of the two stages (imported only when plan.kernel is
                    "triton"; imports nothing from statistics)
    layout          which global ids a rank's logits hold, and the check that the shards tile
    number_level    digit runs -> whole numbers (number-level NTL)
    sampling        vocab-parallel argmax and Gumbel-max sampling (1 all-reduce)
"""
