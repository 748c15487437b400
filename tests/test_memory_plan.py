"""plan-memory's per-layer figures against what megatron-core layers of the Llama-3.2-3B shape
really keep, measured on CPU: saved-tensor bytes (unique storages, parameters excluded) of
1- and 2-layer blocks at s = 256, b = 1, bf16, TP = 4 on the gloo pool; parameter bytes and
the fp32 gradient buffer of megatron-core's DDP. The expected values are the measurements
(saved bytes counted by the bench's `saved_for_backward`). Also: the command's output, its exit
code when the layout does not fit, the shipped 3B configs' headroom, and its suggestions, which
never name a lever the config pulls already."""

from __future__ import annotations

import pytest
import torch
from dist_pool import destroy_model_parallel, initialize_model_parallel

from token_objectives.cli import main
from token_objectives.training.memory_advice import (
    LAST_RESORT,
    advice,
    deepspeed_levers,
    megatron_levers,
)
from token_objectives.training.memory_plan import (
    Layout,
    Shape,
    activation_terms,
    layer_parameters,
    plan,
    stage_parameters,
)

SHAPE = dict(hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24, num_query_groups=8,
             vocab_size=128256, dtype="bf16", layer_spec="local")
SEQ, TP = 256, 4


def measure_task() -> dict:
    """Per recompute mode, per-layer saved bytes (2-layer minus 1-layer block, forward only:
    what is saved is known once the graph is built); parameter, DDP-gradient and GPTModel
    parameter bytes. On this TP rank."""
    from token_objectives.integrations.megatron import cpu_patches
    from token_objectives.training.config import ModelConfig, ParallelConfig, RunConfig
    from token_objectives.training.megatron import build_model

    cpu_patches.apply()
    groups_before = initialize_model_parallel(tensor_model_parallel_size=TP)
    try:
        torch.manual_seed(0)
        result = {mode: _measure_mode(mode) for mode in ("none", "selective", "full")}
        with torch.device("meta"):
            gpt = build_model(RunConfig(model=ModelConfig(num_layers=1, seq_length=SEQ, **SHAPE),
                                        parallel=ParallelConfig(tensor=TP)),
                              128256, None, initialize=False)
        result["gpt_params"] = sum(p.nbytes for p in gpt.parameters())
        return result
    finally:
        destroy_model_parallel(groups_before)


def _measure_mode(recompute: str) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    from token_objectives.bench.methods import saved_for_backward
    from token_objectives.training.config import ModelConfig, ParallelConfig, RunConfig
    from token_objectives.training.layer_specs import decoder_block_spec
    from token_objectives.training.megatron import transformer_config

    saved, params, grads = {}, {}, {}
    for layers in (1, 2):
        model_cfg = ModelConfig(num_layers=layers, seq_length=SEQ, recompute=recompute,
                                **SHAPE)
        cfg = RunConfig(model=model_cfg, parallel=ParallelConfig(tensor=TP))
        config = transformer_config(cfg, initialize=False)
        block = TransformerBlock(config, decoder_block_spec(model_cfg, config))
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True), block)
        rope = RotaryEmbedding(128, 1.0, rotary_base=500000)(SEQ)
        x = torch.randn(SEQ, 1, 3072, dtype=torch.bfloat16, requires_grad=True)
        saved[layers], _ = saved_for_backward(
            lambda: ddp(x, attention_mask=None, rotary_pos_emb=rope),  # noqa: B023
            list(block.parameters()), big=1 << 62)
        params[layers] = sum(p.nbytes for p in block.parameters())
        grads[layers] = sum(p.main_grad.nbytes for p in block.parameters())
    return {"layer": saved[2] - saved[1], "layer_params": params[2] - params[1],
            "layer_grads": grads[2] - grads[1]}


def _estimate(recompute: str) -> int:
    shape = Shape(1, 3072, 8192, 24, 8, 128256)
    layout = Layout(seq=SEQ, micro_batch=1, tensor=TP, recompute=recompute, attention="local",
                    torch_norms=True)
    terms = activation_terms(shape, layout)
    # What the forward saves; the layer that recompute rebuilds is a backward peak.
    return sum(value for name, value in terms.items() if "recomputed in backward" not in name)


@pytest.fixture(scope="module")
def measured(pool4) -> dict:
    return pool4.run(measure_task)[0]


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_layer_activations_match_the_measurement(measured, recompute):
    real, estimate = measured[recompute]["layer"], _estimate(recompute)
    print(f"{recompute}: measured {real / 2**20:.2f} MiB, estimated {estimate / 2**20:.2f} MiB")
    assert abs(estimate - real) <= 0.05 * real


def test_weights_and_gradients_match_the_measurement(measured):
    real = measured["none"]
    shape = Shape(1, 3072, 8192, 24, 8, 128256)
    # The local spec keeps its norm weights in fp32: 12 KiB a layer that the plan counts at 2
    # bytes, hence the tolerance.
    assert layer_parameters(shape, TP) * 2 == pytest.approx(real["layer_params"], rel=1e-3)
    assert layer_parameters(shape, TP) * 4 == real["layer_grads"]  # DDP's fp32 buffer
    assert stage_parameters(shape, TP) * 2 == pytest.approx(measured["gpt_params"], rel=1e-3)


def test_plan_memory_prints_the_table_and_its_last_line(capsys):
    assert main(["plan-memory", "--config", "configs/llama3.2-3b.yaml"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("activations") for line in lines)
    assert lines[-1].startswith("total per GPU: ") and lines[-1].endswith(" GiB of 80 GiB")


def test_plan_memory_fails_a_layout_without_headroom(capsys):
    code = main(["plan-memory", "--config", "configs/llama3.2-3b.yaml", "--set",
                 "parallel.tensor=1", "--set", "parallel.sequence_parallel=false", "--set",
                 "model.recompute=none", "--set",
                 "parallel.use_distributed_optimizer=false", "--set",
                 "parallel.overlap_param_gather=false", "--set",
                 "parallel.micro_batch_size=8", "--spec", "local"])
    captured = capsys.readouterr()
    assert code == 1
    assert "less than 10% of 80 GiB free" in captured.err and "recompute" in captured.err


DS_3B = ["--config", "configs/deepspeed/llama3.2-3b.yaml", "--deepspeed_config"]


@pytest.mark.parametrize("argv", [
    ["--config", "configs/llama3.2-3b.yaml"],
    [*DS_3B, "configs/deepspeed/zero1.json", "--set", "model.recompute=none",
     "--ds-set", "tensor_parallel.autotp_size=2", "--ds-set", "train_micro_batch_size_per_gpu=1"],
])
def test_shipped_3b_configs_leave_headroom(argv, capsys):
    assert main(["plan-memory", *argv]) == 0
    total = capsys.readouterr().out.strip().splitlines()[-1].split()[3]
    assert float(total) <= 72.0


@pytest.mark.parametrize(("ds_config", "tp", "total"), [
    ("3b_zero1.json", 2, "15.7"), ("3b_zero2.json", 2, "11.2"), ("3b_zero3.json", 1, "10.1")])
def test_deepspeed_3b_plans_read_the_loops_two_files(ds_config, tp, total, capsys):
    """The DeepSpeed 3B run as slurm/deepspeed_3b.sbatch assembles it: seq 4096 and full
    recompute from the run config, ZeRO, micro-batch 1 and bf16 from the ds_config, AutoTP as
    the sbatch sets it (the figures the README quotes)."""
    assert main(["plan-memory", *DS_3B, f"configs/deepspeed/{ds_config}",
                 "--ds-set", f"tensor_parallel.autotp_size={tp}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"AutoTP {tp} x DP {8 // tp}" in lines[0]
    assert "micro-batch 1 x seq 4096" in lines[0] and "recompute full" in lines[0]
    assert lines[-1] == f"total per GPU: {total} GiB of 80 GiB"


def test_deepspeed_plan_reads_the_fused_head_from_the_run_config(capsys):
    """model.fused_lm_head: true in the run config (the loop's only switch for it) drops the
    [s, b, V/t] logits and their gradient for the fused head's chunk."""
    argv = ["plan-memory", *DS_3B, "configs/deepspeed/3b_zero1.json",
            "--ds-set", "tensor_parallel.autotp_size=2"]
    assert main(argv) == 0
    unfused = capsys.readouterr().out
    assert main([*argv, "--set", "model.fused_lm_head=true"]) == 0
    fused = capsys.readouterr().out
    assert "fused head off" in unfused and "logits [s, b, V/t]" in unfused
    assert "fused head on" in fused and "logits [s, b, V/t]" not in fused
    assert "fused head chunk" in fused
    assert fused.splitlines()[-1] == "total per GPU: 14.8 GiB of 80 GiB"


# ----------------------------------------------------------------------- what it suggests

MEGATRON_3B = ["plan-memory", "--config", "configs/llama3.2-3b.yaml", "--gpu-memory", "10"]


def test_plan_memory_suggests_the_distributed_optimizer_only_when_it_is_off(capsys):
    """The shipped 3B config (distributed optimizer on, DP 4) in 10 GiB: the model part is the
    largest, and the suggestion names the other levers, not the one that is on."""
    assert main(MEGATRON_3B) == 1
    on = capsys.readouterr().err
    assert main([*MEGATRON_3B, "--set", "parallel.use_distributed_optimizer=false",
                 "--set", "parallel.overlap_param_gather=false"]) == 1
    off = capsys.readouterr().err
    assert "the largest part is model" in on and "the largest part is model" in off
    assert "use_distributed_optimizer" not in on and "parallel.tensor" in on
    assert "parallel.use_distributed_optimizer: true" in off


@pytest.mark.parametrize(("ds_config", "suggested"), [
    ("3b_zero1.json", "zero_optimization.stage: 2"),
    ("3b_zero2.json", "zero_optimization.stage: 3"),
    ("3b_zero3.json", None)])
def test_plan_memory_suggests_only_a_higher_zero_stage(ds_config, suggested, capsys):
    assert main(["plan-memory", *DS_3B, f"configs/deepspeed/{ds_config}",
                 "--gpu-memory", "1"]) == 1
    err = capsys.readouterr().err
    assert "the largest part is model" in err
    if suggested:
        assert suggested in err
    else:
        assert "zero_optimization.stage" not in err and "autotp_size" in err


def _suggested(loop: str, layout: Layout, stage: int = 0) -> str:
    """Every lever suggested for any part of the plan, as one text."""
    levers = megatron_levers(layout) if loop == "megatron" else deepspeed_levers(layout, stage)
    return "; ".join(lever for section in levers.values() for lever in section)


PULLED = dict(seq=4096, micro_batch=1, tensor=2, data=4, optimizer_shards=4, recompute="full",
              attention="flash", sequence_parallel=True, fused_head=True)


# (loop, the setting that pulls a lever, the lever's key in a suggestion)
LEVERS = [
    ("megatron", dict(optimizer_shards=1), "parallel.use_distributed_optimizer"),
    ("megatron", dict(recompute="none"), "model.recompute"),
    ("megatron", dict(recompute="selective"), "model.recompute: full"),
    ("megatron", dict(attention="local"), "model.layer_spec: te"),
    ("megatron", dict(sequence_parallel=False), "parallel.sequence_parallel"),
    ("megatron", dict(fused_head=False), "model.fused_lm_head"),
    ("megatron", dict(micro_batch=4), "parallel.micro_batch_size"),
    ("deepspeed", dict(recompute="none"), "model.recompute: full"),
    ("deepspeed", dict(fused_head=False), "model.fused_lm_head: true"),
    ("deepspeed", dict(micro_batch=4), "train_micro_batch_size_per_gpu"),
]


@pytest.mark.parametrize(("loop", "unpulled", "key"), LEVERS)
def test_a_lever_is_suggested_only_while_it_is_not_pulled(loop, unpulled, key):
    """With every lever of the loop pulled, no suggestion names one of them; with one let go,
    that one is suggested."""
    pulled = Layout(**PULLED)
    assert key not in _suggested(loop, pulled, stage=2)
    assert key in _suggested(loop, Layout(**{**PULLED, **unpulled}), stage=2)


def test_zero_3_and_the_fused_head_exclude_each_other_in_the_suggestions():
    """The DeepSpeed loop refuses the fused head under ZeRO 3: each suggestion says so."""
    fused = Layout(**PULLED)
    assert "stage: 3 (now 2; shards over DP 4) (with model.fused_lm_head: false)" in _suggested(
        "deepspeed", fused, stage=2)
    unfused = Layout(**{**PULLED, "fused_head": False, "optimizer_shards": 4, "grad_shards": 4,
                        "param_shards": 4})
    assert "model.fused_lm_head: true (no [s, b, V/t] logits) with zero_optimization.stage 1 or " \
           "2" in _suggested("deepspeed", unfused, stage=3)
    assert "zero_optimization.stage:" not in _suggested("deepspeed", unfused, stage=3)


def test_one_gpu_of_data_parallelism_leaves_nothing_to_shard():
    """At DP 1 neither sharding nor a higher model-parallel size is possible on the job's GPUs."""
    alone = Layout(seq=4096, micro_batch=1, tensor=8, data=1)
    for loop in ("megatron", "deepspeed"):
        text = _suggested(loop, alone)
        assert "use_distributed_optimizer" not in text and "zero_optimization" not in text
        assert "parallel.tensor" not in text and "autotp_size" not in text


def test_with_every_lever_pulled_the_advice_says_so():
    """Full recompute, flash attention, micro-batch 1 and the fused head at DP 1: the largest
    part (the model) has no lever left in the config."""
    shape = Shape(layers=28, hidden=3072, ffn=8192, heads=24, groups=8, vocab=128256)
    layout = Layout(seq=4096, micro_batch=1, tensor=8, data=1, recompute="full",
                    attention="flash", sequence_parallel=True, fused_head=True)
    line = advice(plan(shape, layout), layout, "megatron")
    assert line.startswith("the largest part is model") and line.endswith(LAST_RESORT)
