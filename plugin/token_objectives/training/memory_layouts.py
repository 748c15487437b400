"""`token-objectives plan-memory`: a Megatron-loop YAML or a ds_config + model config -> the
per-GPU estimate of `memory_plan`, printed as a table; exit 1 when less than 10% is left free."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from token_objectives.tables.errors import InputError
from token_objectives.training.memory_plan import (
    FP32,
    Layout,
    Shape,
    advice,
    format_plan,
    plan,
)

HEADROOM = 0.10


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-objectives plan-memory",
        description="Estimate (from the shapes, not measured) the per-GPU memory of a layout: "
        "weights, gradients, optimizer state, activations per micro-batch and the loss.")
    parser.add_argument("--config", required=True,
                        help="a Megatron-loop YAML (configs/llama3.2-3b.yaml) or a ds_config "
                        "JSON (with --model-config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="YAML overrides, as the launch script")
    parser.add_argument("--model-config", help="DeepSpeed: the HF model config JSON")
    parser.add_argument("--ds-set", dest="ds_overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="DeepSpeed: ds_config overrides")
    parser.add_argument("--gpus", type=_count, default=8, help="GPUs in the job (default 8)")
    parser.add_argument("--tp", type=_count, help="DeepSpeed: AutoTP size (default: the "
                        "ds_config's tensor_parallel.autotp_size or 1)")
    parser.add_argument("--seq-length", type=_count, default=4096,
                        help="DeepSpeed: tokens per sequence (default 4096)")
    parser.add_argument("--recompute", choices=("none", "full"),
                        help="DeepSpeed: activation checkpointing (default: full when the "
                        "ds_config has an activation_checkpointing section)")
    parser.add_argument("--spec", choices=("te", "local"),
                        help="Megatron: the layer spec to estimate (default: model.layer_spec; "
                        "auto is estimated as te, flash attention, as on a GPU node with TE)")
    parser.add_argument("--gpu-memory", type=_gibibytes, default=80.0,
                        help="GiB per GPU (default 80)")
    return parser


def _count(text: str) -> int:
    """argparse type of --gpus, --tp and --seq-length: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer: pass 1 or more")
    return value


def _gibibytes(text: str) -> float:
    """argparse type of --gpu-memory: a finite number of GiB > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of GiB: pass the "
                                         f"memory of one GPU, e.g. 80")
    return value


def megatron_layout(path: str, overrides: Sequence[str], gpus: int,
                    spec: str | None) -> tuple[Shape, Layout, str]:
    """(shape, layout, header) of a Megatron-loop YAML on `gpus` GPUs."""
    from token_objectives.training.config import load_config, padded_vocab_size

    cfg = load_config(path, overrides)
    model, parallel = cfg.model, cfg.parallel
    if model.vocab_size is None:
        raise ValueError("model.vocab_size is not set: plan-memory needs it (the tokenizer's "
                         "size), e.g. --set model.vocab_size=128256")
    model_parallel = parallel.tensor * parallel.pipeline
    if gpus % model_parallel:
        raise ValueError(f"--gpus {gpus} is not a multiple of parallel.tensor x "
                         f"parallel.pipeline = {model_parallel}")
    data = gpus // model_parallel
    spec = spec or ("te" if model.layer_spec == "auto" else model.layer_spec)
    shape = Shape(model.num_layers, model.hidden_size, model.ffn_hidden_size,
                  model.num_attention_heads, model.num_query_groups or model.num_attention_heads,
                  padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by,
                                    parallel.tensor), model.tie_embeddings)
    bf16 = model.dtype == "bf16"
    layout = Layout(
        seq=model.seq_length, micro_batch=parallel.micro_batch_size, tensor=parallel.tensor,
        pipeline=parallel.pipeline, data=data, dtype_bytes=2 if bf16 else FP32,
        master_params=bf16,
        optimizer_shards=data if parallel.use_distributed_optimizer else 1,
        recompute=model.recompute_mode, attention="flash" if spec == "te" else "local",
        torch_norms=spec == "local", fused_head=model.fused_lm_head,
        sequence_parallel=parallel.sequence_parallel)
    header = (f"{path}: Megatron loop, {gpus} GPUs = TP {parallel.tensor} x PP "
              f"{parallel.pipeline} x DP {data}; micro-batch {layout.micro_batch} x seq "
              f"{layout.seq}; {spec} spec; recompute {layout.recompute}; distributed optimizer "
              f"{'on' if parallel.use_distributed_optimizer else 'off'}; sequence parallel "
              f"{'on' if parallel.sequence_parallel else 'off'}")
    return shape, layout, header


def deepspeed_layout(path: str, overrides: Sequence[str], model_path: str, gpus: int,
                     tp: int | None, seq: int, recompute: str | None
                     ) -> tuple[Shape, Layout, str]:
    """(shape, layout, header) of a ds_config + HF Llama config on `gpus` GPUs."""
    from token_objectives.training.deepspeed import VOCAB_MULTIPLE, load_ds_config

    ds = load_ds_config(path, list(overrides))
    with open(model_path, encoding="utf-8") as handle:
        hf = json.load(handle)
    tp = tp or _ds_count(path, "tensor_parallel.autotp_size",
                         (ds.get("tensor_parallel") or {}).get("autotp_size", 1))
    micro_batch = _ds_count(path, "train_micro_batch_size_per_gpu",
                            ds.get("train_micro_batch_size_per_gpu", 1))
    if gpus % tp:
        raise ValueError(f"--gpus {gpus} is not a multiple of the AutoTP size {tp}")
    data = gpus // tp
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    bf16 = bool((ds.get("bf16") or {}).get("enabled", False))
    fp16 = bool((ds.get("fp16") or {}).get("enabled", False))
    half = bf16 or fp16
    grad_fp32 = ds.get("data_types", {}).get("grad_accum_dtype") == "fp32" or not half
    recompute = recompute or ("full" if ds.get("activation_checkpointing") else "none")
    vocab = hf.get("vocab_size") or 0
    vocab = -(-vocab // (VOCAB_MULTIPLE * tp)) * VOCAB_MULTIPLE * tp
    shape = Shape(hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"],
                  hf["num_attention_heads"],
                  hf.get("num_key_value_heads") or hf["num_attention_heads"], vocab,
                  bool(hf.get("tie_word_embeddings", False)))
    layout = Layout(
        seq=seq, micro_batch=micro_batch, tensor=tp,
        data=data, dtype_bytes=2 if half else FP32, grad_bytes=FP32 if grad_fp32 else 2,
        master_params=half, optimizer_shards=data if stage >= 1 else 1,
        grad_shards=data if stage >= 2 else 1, param_shards=data if stage >= 3 else 1,
        recompute=recompute, attention="flash", torch_norms=True,
        fused_head=bool((ds.get("token_objectives") or {}).get("fused_lm_head", False)),
        grad_in_place=False)
    header = (f"{path} + {model_path}: DeepSpeed loop, {gpus} GPUs = AutoTP {tp} x DP {data}; "
              f"ZeRO {stage}; micro-batch {layout.micro_batch} x seq {seq}; sdpa (flash) "
              f"attention; recompute {recompute}")
    return shape, layout, header


def _ds_count(path: str, key: str, value) -> int:
    """A count of the ds_config at `path`: an integer >= 1, else ValueError naming the key."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or isinstance(value, bool):
        raise ValueError(f"{path}: {key} is {value!r}, plan-memory needs an integer >= 1; set "
                         f"it in the file or with --ds-set {key}=N")
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """Print the estimate; 0 when at least 10% of --gpu-memory is left, 1 otherwise. A config
    that cannot be planned (a ValueError naming the file and key) is an InputError."""
    args = _parser().parse_args(argv)
    try:
        return _plan_memory(args)
    except ValueError as error:
        raise InputError(str(error)) from error


def _plan_memory(args: argparse.Namespace) -> int:
    if args.config.endswith(".json"):
        if not args.model_config:
            raise ValueError(f"{args.config} is a ds_config: pass --model-config (the HF model "
                             f"config JSON, e.g. configs/deepspeed/llama3.2-3b.json)")
        shape, layout, header = deepspeed_layout(args.config, args.ds_overrides,
                                                 args.model_config, args.gpus, args.tp,
                                                 args.seq_length, args.recompute)
    else:
        shape, layout, header = megatron_layout(args.config, args.overrides, args.gpus, args.spec)
    result = plan(shape, layout)
    print(format_plan(result, args.gpu_memory, header))
    budget = args.gpu_memory * (1 << 30)
    if result.total > (1 - HEADROOM) * budget:
        print(f"plan-memory: leaves less than {HEADROOM:.0%} of {args.gpu_memory:g} GiB free; "
              f"{advice(result, layout)}", file=sys.stderr)
        return 1
    return 0
