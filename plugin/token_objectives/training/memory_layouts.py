"""`token-objectives plan-memory`: a Megatron-loop YAML, or the DeepSpeed loop's run config +
ds_config (the files its launcher takes) -> the per-GPU estimate of `memory_plan`, printed as a
table; exit 1 when less than 10% is left free."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from token_objectives.tables.errors import InputError
from token_objectives.training.memory_advice import advice
from token_objectives.training.memory_plan import FP32, Layout, Shape, format_plan, plan

HEADROOM = 0.10

# Flags of the DeepSpeed mode before it read the loop's run config -> what says it now.
REPLACED_FLAGS = {
    "--model-config": "the model is the run config's model.hf_config (in the file or --set "
                      "model.hf_config=PATH)",
    "--seq-length": "the sequence length is the run config's model.seq_length (in the file or "
                    "--set model.seq_length=N)",
    "--recompute": "recompute is the run config's model.recompute (in the file or --set "
                   "model.recompute=full|none)",
    "--tp": "the AutoTP size is the ds_config's tensor_parallel.autotp_size (in the file or "
            "--ds-set tensor_parallel.autotp_size=N)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-objectives plan-memory",
        description="Estimate (from the shapes, not measured) the per-GPU memory of a layout: "
        "weights, gradients, optimizer state, activations per micro-batch and the loss. The "
        "Megatron loop: --config run.yaml. The DeepSpeed loop: --config run.yaml "
        "--deepspeed_config ds.json, the two files its launcher takes.")
    parser.add_argument("--config", required=True,
                        help="the YAML run config: the Megatron loop's (configs/llama3.2-3b.yaml)"
                        ", or with --deepspeed_config the DeepSpeed loop's "
                        "(configs/deepspeed/llama3.2-3b.yaml: model.hf_config, seq_length, "
                        "recompute, fused_lm_head)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="DeepSpeed: the ds_config JSON (ZeRO stage, micro-batch, AutoTP "
                        "size, bf16/fp16), e.g. configs/deepspeed/3b_zero1.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="run-config overrides, as the launch "
                        "scripts")
    parser.add_argument("--ds-set", dest="ds_overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="DeepSpeed: ds_config overrides, as "
                        "launch/pretrain_deepspeed.py")
    parser.add_argument("--gpus", type=_count, default=8, help="GPUs in the job (default 8)")
    parser.add_argument("--spec", choices=("te", "local"),
                        help="Megatron: the layer spec to estimate (default: model.layer_spec; "
                        "auto is estimated as te, flash attention, as on a GPU node with TE)")
    parser.add_argument("--gpu-memory", type=_gibibytes, default=80.0,
                        help="GiB per GPU (default 80)")
    for flag in REPLACED_FLAGS:  # refused by _check_flags, saying what replaces each
        parser.add_argument(flag, dest="replaced_" + flag[2:].replace("-", "_"),
                            help=argparse.SUPPRESS)
    return parser


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A replaced flag, a ds_config as --config, --ds-set without one or --spec with one: a
    usage error."""
    for flag, replacement in REPLACED_FLAGS.items():
        if getattr(args, "replaced_" + flag[2:].replace("-", "_")) is not None:
            parser.error(f"{flag} is no longer read: {replacement}, as the DeepSpeed loop "
                         f"reads it")
    if args.config.endswith(".json"):
        parser.error(f"--config {args.config} is a ds_config: pass it as --deepspeed_config, "
                     f"with the DeepSpeed loop's YAML run config as --config (e.g. "
                     f"configs/deepspeed/llama3.2-3b.yaml)")
    if args.ds_overrides and not args.deepspeed_config:
        parser.error("--ds-set overrides a ds_config: pass it as --deepspeed_config")
    if args.spec and args.deepspeed_config:
        parser.error(f"--spec {args.spec} picks the Megatron loop's layer spec, which the "
                     f"DeepSpeed loop does not have (its Llama attention is the Hugging Face "
                     f"model's): leave --spec out with --deepspeed_config")


def _count(text: str) -> int:
    """argparse type of --gpus: an integer >= 1."""
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


def deepspeed_layout(path: str, ds_path: str, overrides: Sequence[str],
                     ds_overrides: Sequence[str], gpus: int
                     ) -> tuple[Shape, Layout, str, list[str], int]:
    """(shape, layout, header, notes, ZeRO stage) of the DeepSpeed loop's run config + ds_config
    on `gpus` GPUs, read as the loop reads them: the model (model.hf_config), sequence length,
    recompute and fused head from the run config; ZeRO stage, micro-batch, AutoTP size and dtype
    from the ds_config. A setting both make and disagree on is refused as the loop refuses it
    (`check_run_config`); notes: the run-config keys the loop does not read."""
    from token_objectives.training.config import load_config
    from token_objectives.training.deepspeed import (
        VOCAB_MULTIPLE,
        check_run_config,
        load_ds_config,
        uses_fused_head,
        zero_stage,
    )

    cfg = load_config(path, overrides)
    ds = load_ds_config(ds_path, list(ds_overrides))
    notes = check_run_config(cfg, ds, needs_data=False)
    model = cfg.model
    with open(model.hf_config, encoding="utf-8") as handle:
        hf = json.load(handle)
    vocab = hf.get("vocab_size")
    if vocab is None:  # the tokenizer's, padded, as llama_config makes it
        if cfg.data.tokenizer is None:
            raise ValueError(f"{model.hf_config}: vocab_size is null, which the loop takes from "
                             f"the tokenizer: set data.tokenizer (--set data.tokenizer=PATH) or "
                             f"vocab_size in the file")
        from token_objectives.tables.tokenizers import list_vocab, load_tokenizer

        size = list_vocab(load_tokenizer(cfg.data.tokenizer)).size
        vocab = -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    tp = _ds_count(ds_path, "tensor_parallel.autotp_size",
                   (ds.get("tensor_parallel") or {}).get("autotp_size", 1))
    micro_batch = _ds_count(ds_path, "train_micro_batch_size_per_gpu",
                            ds.get("train_micro_batch_size_per_gpu", 1))
    if gpus % tp:
        raise ValueError(f"--gpus {gpus} is not a multiple of the AutoTP size {tp}")
    data = gpus // tp
    stage = zero_stage(ds)
    bf16 = bool((ds.get("bf16") or {}).get("enabled", False))
    fp16 = bool((ds.get("fp16") or {}).get("enabled", False))
    half = bf16 or fp16
    grad_fp32 = ds.get("data_types", {}).get("grad_accum_dtype") == "fp32" or not half
    recompute = model.recompute_mode
    vocab = -(-vocab // (VOCAB_MULTIPLE * tp)) * VOCAB_MULTIPLE * tp
    shape = Shape(hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"],
                  hf["num_attention_heads"],
                  hf.get("num_key_value_heads") or hf["num_attention_heads"], vocab,
                  bool(hf.get("tie_word_embeddings", False)))
    layout = Layout(
        seq=model.seq_length, micro_batch=micro_batch, tensor=tp,
        data=data, dtype_bytes=2 if half else FP32, grad_bytes=FP32 if grad_fp32 else 2,
        master_params=half, optimizer_shards=data if stage >= 1 else 1,
        grad_shards=data if stage >= 2 else 1, param_shards=data if stage >= 3 else 1,
        recompute=recompute, attention="flash", torch_norms=True,
        fused_head=uses_fused_head(model, ds), grad_in_place=False)
    header = (f"{path} + {ds_path} ({model.hf_config}): DeepSpeed loop, {gpus} GPUs = AutoTP "
              f"{tp} x DP {data}; ZeRO {stage}; micro-batch {layout.micro_batch} x seq "
              f"{layout.seq}; sdpa (flash) attention; recompute {recompute}; fused head "
              f"{'on' if layout.fused_head else 'off'}")
    return shape, layout, header, notes, stage


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
    parser = _parser()
    args = parser.parse_args(argv)
    _check_flags(parser, args)
    try:
        return _plan_memory(args)
    except ValueError as error:
        raise InputError(str(error)) from error


def _plan_memory(args: argparse.Namespace) -> int:
    if args.deepspeed_config:
        shape, layout, header, notes, stage = deepspeed_layout(
            args.config, args.deepspeed_config, args.overrides, args.ds_overrides, args.gpus)
        for note in notes:
            print(f"plan-memory: note: {note}", file=sys.stderr)
        loop = "deepspeed"
    else:
        shape, layout, header = megatron_layout(args.config, args.overrides, args.gpus, args.spec)
        loop, stage = "megatron", 0
    result = plan(shape, layout)
    print(format_plan(result, args.gpu_memory, header))
    budget = args.gpu_memory * (1 << 30)
    if result.total > (1 - HEADROOM) * budget:
        print(f"plan-memory: leaves less than {HEADROOM:.0%} of {args.gpu_memory:g} GiB free; "
              f"{advice(result, layout, loop, stage)}", file=sys.stderr)
        return 1
    return 0
