"""What `token-objectives plan-memory` suggests when a layout leaves too little free: the levers
that shrink the plan's largest part, named by the config key that pulls each, and only those the
config does not pull already (no "turn on the distributed optimizer" when it is on, no
"recompute" under full recompute)."""

from __future__ import annotations

from token_objectives.training.memory_plan import GIB, Layout, Plan

LOOPS = ("megatron", "deepspeed")
# What is left when every lever is pulled already.
LAST_RESORT = ("every lever of this config is pulled already: more GPUs (--gpus), GPUs with more "
               "memory or a shorter model.seq_length")


def advice(result: Plan, layout: Layout, loop: str, zero_stage: int = 0) -> str:
    """One line: the largest part of `result` and the levers of `loop` ("megatron" or
    "deepspeed", whose ZeRO stage is `zero_stage`) not in effect in `layout` that shrink it."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    by_section: dict[str, int] = {}
    for section, _, value in result.rows:
        by_section[section] = by_section.get(section, 0) + value
    largest = max(by_section, key=by_section.__getitem__)
    if loop == "megatron":
        levers = megatron_levers(layout)[largest]
    else:
        levers = deepspeed_levers(layout, zero_stage)[largest]
    return (f"the largest part is {largest} ({by_section[largest] / GIB:.1f} GiB): "
            f"{'; '.join(levers) or LAST_RESORT}")


def megatron_levers(layout: Layout) -> dict[str, list[str]]:
    """Per section of the plan, the Megatron loop's levers that `layout` does not pull yet."""
    spare_gpus = layout.data > 1  # data-parallel ranks that sharding or model parallelism can use
    shard = ([f"parallel.use_distributed_optimizer: true (shards the optimizer state over DP "
              f"{layout.data})"] if spare_gpus and layout.optimizer_shards == 1 else [])
    model_parallel = ([f"a higher parallel.tensor (now {layout.tensor}; GPUs taken from DP "
                       f"{layout.data})"] if spare_gpus else [])
    pipeline = ([f"a higher parallel.pipeline (now {layout.pipeline})"] if spare_gpus else [])
    recompute = {"none": ["model.recompute: selective (then full)"],
                 "selective": ["model.recompute: full"], "full": []}[layout.recompute]
    smaller_batch = ([f"a smaller parallel.micro_batch_size (now {layout.micro_batch})"]
                     if layout.micro_batch > 1 else [])
    flash = (["the te layer spec (model.layer_spec: te / --spec te): flash attention keeps no "
              "[b, a/t, s, s] scores"] if layout.attention == "local" else [])
    sequence = (["parallel.sequence_parallel: true (splits the layers' [s, b, h] tensors over "
                 "the TP ranks)"] if layout.tensor > 1 and not layout.sequence_parallel else [])
    fused = ["model.fused_lm_head: true (no [s, b, V/t] logits)"] if not layout.fused_head else []
    return {
        "model": shard + model_parallel + pipeline,
        "activations": recompute + flash + sequence + smaller_batch + model_parallel,
        "loss": fused + smaller_batch + model_parallel,
    }


def deepspeed_levers(layout: Layout, zero_stage: int) -> dict[str, list[str]]:
    """Per section of the plan, the DeepSpeed loop's levers that `layout` under ZeRO stage
    `zero_stage` does not pull yet."""
    spare_gpus = layout.data > 1
    zero = []
    if spare_gpus and zero_stage < 3:
        # ZeRO 3 partitions the lm_head weight, which the fused head needs whole.
        caveat = " (with model.fused_lm_head: false)" if (
            zero_stage == 2 and layout.fused_head) else ""
        zero = [f"zero_optimization.stage: {zero_stage + 1} (now {zero_stage}; shards over DP "
                f"{layout.data}){caveat}"]
    autotp = ([f"a higher tensor_parallel.autotp_size (now {layout.tensor}; GPUs taken from DP "
               f"{layout.data})"] if spare_gpus else [])
    # The DeepSpeed loop recomputes whole decoder layers or nothing.
    recompute = ["model.recompute: full"] if layout.recompute == "none" else []
    smaller_batch = ([f"a smaller train_micro_batch_size_per_gpu (now {layout.micro_batch})"]
                     if layout.micro_batch > 1 else [])
    fused = []
    if not layout.fused_head:
        fused = ["model.fused_lm_head: true (no [s, b, V/t] logits)"
                 + (" with zero_optimization.stage 1 or 2" if zero_stage == 3 else "")]
    return {
        "model": zero + autotp,
        "activations": recompute + smaller_batch + autotp,
        "loss": fused + smaller_batch + autotp,
    }
