"""Pretraining a Hugging Face Llama under DeepSpeed (ZeRO-1/2/3, AutoTP) with the objectives.

`run(cfg, ds_config)` is the loop `launch/pretrain_deepspeed.py` starts under torchrun or the
`deepspeed` launcher. Two files configure it, each setting in one of them (`check_run_config`):
the YAML run config the Megatron loop reads too (training.config: steps, intervals, seed, data,
output, objectives, scheduled sampling, model.hf_config, model.seq_length, model.recompute,
model.fused_lm_head) and the ds_config, which keeps what DeepSpeed's engine reads (ZeRO, batch
sizes, optimizer and scheduler, gradient clipping, bf16/fp16, AutoTP, monitors).

The model is `LlamaForCausalLM` from model.hf_config, a local JSON (nothing is downloaded); the
data is megatron-core's GPTDataset over .bin/.idx; the loss is the run config's objectives (an
`Objective` under AutoTP's layout) on `engine(input_ids).logits`, never HF's built-in loss.
Under AutoTP with `vocab_parallel_lm_head` the logits stay [b, s, V/tp]. With
model.fused_lm_head the decoder's hidden states and the lm_head weight go to `Objective.fused`
instead, and no logits are made (ZeRO-1/2, with or without AutoTP).
The optimizer is torch's AdamW from the ds_config's "optimizer" params, passed as DeepSpeed's
client optimizer (nothing JIT-built; see deepspeed_cpu for the other CPU workarounds).

Normalisation. Each micro-batch's backward loss is

    sum_t loss_t * mask_t * (dp_size * gas) / N

where N is the GLOBAL count of counted tokens of the step (all micro-batches, all DP ranks; the
sum of PDL weights with pdl_normalization="weighted_mean"). DeepSpeed divides by gas in
`engine.backward` and averages gradients over DP, so the gradient is that of sum(loss) / N.

Batch-scheduled sampling (the run config's `scheduled_sampling` section, docs/sampling.md): when
p > 0, each micro-batch first runs through `engine(...)` under torch.no_grad() in eval mode; its
logits ([b, s, V/tp] under AutoTP with a vocab-parallel lm_head) become ids without a vocab
gather, and the training pass runs on the mixed inputs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from token_objectives.integrations.deepspeed import cpu as deepspeed_cpu
from token_objectives.integrations.deepspeed.checkpoint_writes import deferred_write_errors
from token_objectives.integrations.deepspeed.section import (
    SECTION,
    DeepSpeedObjectives,
    log_components,
    tensor_parallel_group,
    vocab_parallel_head_shard,
)
from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.objectives.loss import ObjectiveOutput
from token_objectives.objectives.objective import Objective
from token_objectives.scheduled_sampling.mix import ScheduledSampler, sample_indices
from token_objectives.tables.tokenizers import tokenizer_identity
from token_objectives.training import checkpointing, run_stamp
from token_objectives.training.checkpointing import write_atomically
from token_objectives.training.config import RunConfig
from token_objectives.training.gpt_data import (
    MegatronTokenizer,
    Repeated,
    gpt_dataset,
    micro_batches,
)
from token_objectives.training.loop import (  # noqa: F401 (any_rank_signalled: public here too)
    RunResult,
    SkippedSteps,
    StepRecord,
    any_rank_signalled,
    check_gradients,
    check_losses,
    format_step,
    run_loop,
)
from token_objectives.training.metrics import MetricsWriter, MonitorSink

CHECKPOINTS = "checkpoints"
_TAG = re.compile(r"global_step(\d+)")
METRICS = "metrics.jsonl"
VOCAB_MULTIPLE = 64  # the model vocab is the tokenizer's, padded to a multiple of this
_OPTIMIZER_KEYS = {"lr", "betas", "eps", "weight_decay"}


format_row = format_step


# ------------------------------------------------------------------------------------ ds_config


def set_key(config: dict, assignment: str) -> None:
    """Apply one `a.b.c=VALUE` override in place; VALUE is JSON (`false`, `2`, `"x"`) or a string.

    e.g. `bf16.enabled=false`, `scheduler.params.warmup_num_steps=100`.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"override {assignment!r} is not KEY=VALUE (e.g. bf16.enabled=false)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    *parents, last = key.split(".")
    node = config
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {assignment!r}: {name!r} is not an object in the ds_config")
        node = child
    node[last] = value


def load_ds_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """The ds_config JSON at `path` with `set_key` overrides applied."""
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    for assignment in overrides:
        set_key(config, assignment)
    return config


def split_optimizer(ds_config: Mapping[str, Any]) -> tuple[Callable, dict]:
    """(a factory params -> torch.optim.AdamW, the ds_config without its "optimizer" section).

    The section's params (lr, betas, eps, weight_decay) configure torch's AdamW, which DeepSpeed
    takes as the client optimizer: nothing is JIT-built (see deepspeed_cpu). A factory rather
    than an instance, so it sees the parameters after AutoTP / ZeRO-3 have replaced them.
    """
    config = copy.deepcopy(dict(ds_config))
    section = config.pop("optimizer", None) or {"type": "AdamW", "params": {}}
    kind = str(section.get("type", "AdamW")).lower()
    if kind not in ("adam", "adamw"):
        raise ValueError(f'ds_config["optimizer"].type must be "AdamW" (torch\'s), got {kind!r}')
    params = dict(section.get("params", {}))
    unknown = sorted(set(params) - _OPTIMIZER_KEYS)
    if unknown:
        raise ValueError(f'unknown key(s) {unknown} in ds_config["optimizer"].params; valid: '
                         f"{sorted(_OPTIMIZER_KEYS)}")
    params.setdefault("lr", 1e-3)
    params["betas"] = tuple(params.get("betas", (0.9, 0.95)))
    _check_optimizer_params(params)

    def factory(parameters) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_groups(parameters, params.get("weight_decay", 0.01)),
                                 **params)

    return factory, config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _check_optimizer_params(params: Mapping[str, Any]) -> None:
    """Each AdamW param a value torch takes, else an error naming the ds_config key."""
    where = 'ds_config["optimizer"].params'
    rules = {"lr": ("a number > 0", lambda v: _is_number(v) and v > 0),
             "eps": ("a number > 0", lambda v: _is_number(v) and v > 0),
             "weight_decay": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
             "betas": ("two numbers in [0, 1), e.g. [0.9, 0.95]",
                       lambda v: len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v))}
    for key, (accepts, ok) in rules.items():
        if key in params and not ok(params[key]):
            raise ValueError(f"{where}.{key} must be {accepts}, got {params[key]!r} (set it in "
                             f"the ds_config or with --ds-set optimizer.params.{key}=...)")


def decay_groups(parameters, weight_decay: float) -> list[dict]:
    """AdamW's param groups: weight decay on the matrices (embeddings and projections), none on
    the norms' gains and biases (fewer than 2 dims; ZeRO-3's partitioned parameters are judged
    by their full `ds_shape`)."""
    decay, no_decay = [], []
    for parameter in parameters:
        shape = getattr(parameter, "ds_shape", parameter.shape)
        (decay if len(shape) >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def zero_stage(ds_config: Mapping[str, Any] | None) -> int:
    """The ds_config's ZeRO stage (0 when it has none)."""
    zero = (ds_config or {}).get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0


def uses_fused_head(model, ds_config: Mapping[str, Any]) -> bool:
    """Whether model.fused_lm_head (the run config's model section) asks for the fused LM head,
    which needs the lm_head weight (or its AutoTP shard) whole on each rank."""
    if model.fused_lm_head and zero_stage(ds_config) == 3:
        raise ValueError(
            "model.fused_lm_head needs the whole lm_head weight on each rank, which ZeRO stage 3 "
            "partitions: use stage 1 or 2 (with AutoTP for a vocab-parallel head), or set "
            "model.fused_lm_head: false"
        )
    return model.fused_lm_head


def with_output_paths(ds_config: dict, output_dir: str | Path) -> dict:
    """An empty tensorboard/csv_monitor output_path means `<output_dir>/tensorboard` (csv)."""
    config = copy.deepcopy(ds_config)
    for name, folder in (("tensorboard", "tensorboard"), ("csv_monitor", "csv")):
        section = config.get(name)
        if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
            section["output_path"] = str(Path(output_dir) / folder)
    return config


# ----------------------------------------------------------------------------------- run config

# Run-config keys the DeepSpeed loop does not read, and why (a value away from the default is
# named in a warning).
_NOT_READ = {
    **{f"model.{key}": "the model's shape is model.hf_config's" for key in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
        "normalization", "norm_epsilon", "swiglu", "rotary_base", "tie_embeddings",
        "init_method_std", "vocab_size", "make_vocab_size_divisible_by", "layer_spec")},
    **{f"parallel.{key}": "ZeRO and AutoTP are the ds_config's" for key in (
        "pipeline", "use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather",
        "sequence_parallel")},
    "train.keep_checkpoints": "every tag is kept",
    **{key: "no greedy evaluation in this loop (run `token-objectives evaluate`)" for key in (
        "train.eval_interval", "train.eval_batch_size", "train.eval_max_new_tokens",
        "data.eval_data")},
}
# The ds_config's "token_objectives" keys and where the run config holds them.
_SECTION_HOMES = {"tokenizer": "data.tokenizer", "frequencies": "data.frequencies",
                  "number_tokens": "data.number_tokens", "fused_lm_head": "model.fused_lm_head",
                  "scheduled_sampling": "the scheduled_sampling section",
                  **{f.name: f"objectives.{f.name}" for f in fields(ObjectiveConfig)}}
_DECAY_STYLES = {None: "constant", "WarmupLR": "constant", "WarmupDecayLR": "linear",
                 "WarmupCosineLR": "cosine"}


def _engine_values(ds_config: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """Run-config key -> (the ds_config key that owns it here, its value there, with
    DeepSpeed's and split_optimizer's defaults). The global batch is checked once the engine
    has it (Trainer)."""
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    lr = params.get("lr", 1e-3)
    betas = list(params.get("betas", (0.9, 0.95))) + [None, None]
    scheduler = ds_config.get("scheduler") or {}
    kind, schedule = scheduler.get("type"), scheduler.get("params") or {}
    lr_key, min_lr_key = "optimizer.params.lr", "scheduler (its floor: optimizer.params.lr x " \
        "cos_min_ratio)"
    min_lr = {None: lr, "WarmupCosineLR": lr * schedule.get("cos_min_ratio", 1e-4)}.get(kind)
    if kind in ("WarmupLR", "WarmupDecayLR"):
        # These two warm up to warmup_max_lr (WarmupLR: the optimizer's lr when absent) and
        # ignore optimizer.params.lr; WarmupDecayLR decays to warmup_min_lr, WarmupLR stays at
        # its peak.
        lr_key = "scheduler.params.warmup_max_lr"
        lr = schedule.get("warmup_max_lr", lr if kind == "WarmupLR" else 1e-3)
        if kind == "WarmupLR":
            min_lr_key, min_lr = "scheduler.params.warmup_max_lr (WarmupLR holds its peak)", lr
        else:
            min_lr_key, min_lr = "scheduler.params.warmup_min_lr", schedule.get("warmup_min_lr",
                                                                                 0.0)
    bf16, fp16 = ((ds_config.get(name) or {}).get("enabled") for name in ("bf16", "fp16"))
    values = {
        "train.lr": (lr_key, lr),
        "train.adam_beta1": ("optimizer.params.betas[0]", betas[0]),
        "train.adam_beta2": ("optimizer.params.betas[1]", betas[1]),
        "train.weight_decay": ("optimizer.params.weight_decay", params.get("weight_decay", 0.01)),
        "train.clip_grad": ("gradient_clipping", ds_config.get("gradient_clipping", 0.0)),
        "train.warmup_steps": ("scheduler.params.warmup_num_steps",
                               schedule.get("warmup_num_steps", 1000) if kind else 0),
        "train.min_lr": (min_lr_key, min_lr),
        "train.lr_decay_style": ("scheduler.type", _DECAY_STYLES.get(kind, kind)),
        "parallel.tensor": ("tensor_parallel.autotp_size",
                            (ds_config.get("tensor_parallel") or {}).get("autotp_size", 1)),
        "model.dtype": ("bf16.enabled / fp16.enabled",
                        "bf16" if bf16 else "fp16" if fp16 else "fp32"),
        "output.tensorboard": ("tensorboard.enabled",
                               bool((ds_config.get("tensorboard") or {}).get("enabled"))),
    }
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    if isinstance(micro, int):
        values["parallel.micro_batch_size"] = ("train_micro_batch_size_per_gpu", micro)
    return values


def _set_values(cfg: RunConfig, *, away_from_default: bool = False) -> dict[str, Any]:
    """`section.key` -> value for every run-config key the YAML file or a --set gave
    (cfg.given), whatever its value: `train.clip_grad: 1.0` written out is a setting even
    though 1.0 is the default. A RunConfig built in code (given None), or away_from_default:
    the keys set away from their defaults."""
    found = {}
    for name in ("model", "parallel", "train", "data", "output"):
        section = getattr(cfg, name)
        found.update({f"{name}.{f.name}": getattr(section, f.name) for f in fields(section)
                      if (f"{name}.{f.name}" in cfg.given
                          if cfg.given is not None and not away_from_default
                          else getattr(section, f.name) != f.default)})
    return found


def _agrees(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, float) and isinstance(theirs, (int, float)):
        return math.isclose(ours, theirs, rel_tol=1e-9)
    return ours == theirs


def check_schedule_length(cfg: RunConfig, ds_config: Mapping[str, Any]) -> None:
    """A decaying ds_config scheduler (WarmupDecayLR, WarmupCosineLR) has its own length,
    scheduler.params.total_num_steps: it must be train.steps, the run's, or the schedule ends
    before the run or is cut off at train.steps."""
    scheduler = ds_config.get("scheduler") or {}
    total = (scheduler.get("params") or {}).get("total_num_steps")
    if scheduler.get("type") in ("WarmupDecayLR", "WarmupCosineLR") and \
            isinstance(total, int) and total != cfg.train.steps:
        raise ValueError(
            f"train.steps = {cfg.train.steps} in the run config, scheduler.params."
            f"total_num_steps = {total} in the ds_config: the {scheduler['type']} schedule "
            f"would not end with the run. Make both equal (e.g. --ds-set "
            f"scheduler.params.total_num_steps={cfg.train.steps})")


def check_run_config(cfg: RunConfig, ds_config: Mapping[str, Any], *,
                     needs_data: bool = True, resuming: bool = False) -> list[str]:
    """Refuse a setting both files make; return a note per run-config key this loop does not
    read (set away from its default). needs_data=False (`plan-memory`, which reads no data)
    skips the check that data.train_prefix and data.tokenizer are set. resuming: the output
    folder has a checkpoint to resume, whose stamp holds its schedule (total_num_steps
    included): train.steps may then grow past it, and a changed schedule follows
    train.resume_schedule, so check_schedule_length is not applied.

    Each setting has one owner. The ds_config owns what DeepSpeed's engine reads: a run-config
    key that could say the same (train.lr, train.adam_beta1/2, train.weight_decay,
    train.clip_grad, train.warmup_steps, train.min_lr, train.lr_decay_style, parallel.tensor,
    parallel.micro_batch_size, model.dtype, output.tensorboard) given in the YAML file or with
    --set, even at its default value, must agree; one left out is the ds_config's.
    The run config owns the objectives: a ds_config "token_objectives" section is refused (it
    stays the door for a user's own loop, `section.from_ds_config`).
    """
    if ds_config.get(SECTION) is not None:
        section = ds_config[SECTION]
        moves = [f"{key} -> {_SECTION_HOMES.get(key, 'no such key')}"
                 for key in (section if isinstance(section, Mapping) else {})]
        raise ValueError(
            f'the ds_config has a "{SECTION}" section, which this loop does not read: its '
            f"objectives are the run config's (objectives, scheduled_sampling, data.tokenizer, "
            f"data.frequencies, data.number_tokens, model.fused_lm_head). Move each key "
            f"({', '.join(moves) or 'none'}) into the run config and delete the section")
    if cfg.model.hf_config is None:
        raise ValueError("model.hf_config is not set: the DeepSpeed loop's model is a local "
                         "LlamaConfig JSON (e.g. configs/deepspeed/tiny_llama.json)")
    if cfg.model.recompute_mode == "selective":
        raise ValueError("model.recompute: selective is the Megatron loop's; the DeepSpeed loop "
                         "recomputes whole decoder layers: set model.recompute: full or none")
    for key in ("data.train_prefix", "data.tokenizer") if needs_data else ():
        if getattr(cfg.data, key.split(".")[1]) is None:
            raise ValueError(f"{key} is not set: the DeepSpeed loop needs it")
    if not resuming:
        check_schedule_length(cfg, ds_config)
    set_here = _set_values(cfg)
    clashes = [f"{key} = {set_here[key]!r} in the run config, {owner} = {value!r} in the "
               f"ds_config" for key, (owner, value) in _engine_values(ds_config).items()
               if key in set_here and not _agrees(set_here[key], value)]
    if clashes:
        raise ValueError(
            f"{'; '.join(clashes)}. The DeepSpeed loop takes these from the ds_config: set "
            f"them there (or with --ds-set) and leave the run-config keys out, or make both "
            f"equal")
    away = _set_values(cfg, away_from_default=True)
    return [f"{key} = {away[key]!r} is not read by the DeepSpeed loop: {why}"
            for key, why in _NOT_READ.items() if key in away]


def check_global_batch(cfg: RunConfig, global_batch: int) -> None:
    """parallel.global_batch_size, when set, must be the engine's (from the ds_config)."""
    wanted = cfg.parallel.global_batch_size
    if wanted is not None and wanted != global_batch:
        raise ValueError(
            f"parallel.global_batch_size = {wanted} in the run config, but the ds_config gives "
            f"{global_batch} samples per step (train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x data-parallel size): the DeepSpeed loop takes the "
            f"batch sizes from the ds_config; set them there and leave "
            f"parallel.global_batch_size out, or make both equal")


# ---------------------------------------------------------------------------------------- model


def llama_config(path: str | Path, tokenizer_vocab: int):
    """LlamaConfig from a local JSON; a null/absent vocab_size is the tokenizer's, padded."""
    from transformers import LlamaConfig

    with open(path, encoding="utf-8") as handle:
        values = json.load(handle)
    if values.get("vocab_size") is None:
        values["vocab_size"] = -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if values["vocab_size"] < tokenizer_vocab:
        raise ValueError(f"{path}: vocab_size {values['vocab_size']} is smaller than the "
                         f"tokenizer's {tokenizer_vocab} ids; raise it or set it to null")
    return LlamaConfig(**values)


def build_model(config, seed: int, ds_config: Mapping[str, Any] | None = None
                ) -> torch.nn.Module:
    """LlamaForCausalLM with weights drawn from `seed`, the same at every ZeRO stage and
    world size.

    Under ZeRO stage 3 the model is built inside `deepspeed.zero.Init` (transformers does so
    once it holds the ds_config), so every parameter is partitioned as its module is built
    and no rank ever holds the whole fp32 model; the weights are then drawn one parameter at
    a time on rank 0 and scattered (`GatheredParameters(modifier_rank=0)`).
    """
    from transformers import LlamaForCausalLM

    if zero_stage(ds_config) != 3:
        model = LlamaForCausalLM(config).float()  # DeepSpeed casts to bf16/fp16 if asked
        seeded_init(model, seed, config.initializer_range, partitioned=False)
        return model
    from transformers.integrations import HfDeepSpeedConfig

    # transformers reads the ds_config through a weak reference: the model keeps it alive.
    hf_ds_config = HfDeepSpeedConfig(dict(ds_config))
    model = LlamaForCausalLM._from_config(config)
    model._token_objectives_hf_ds_config = hf_ds_config
    seeded_init(model, seed, config.initializer_range, partitioned=True)
    return model


def seeded_init(model: torch.nn.Module, seed: int, std: float, partitioned: bool) -> None:
    """Each parameter from a generator seeded by (seed, its name): matrices N(0, std), as
    transformers' Llama init, norm gains 1, biases 0. partitioned: ZeRO-3 parameters, gathered
    one at a time and partitioned again on leaving the context (every rank draws the same;
    DeepSpeed keeps the first rank's)."""
    for name, param in model.named_parameters():
        gather = contextlib.nullcontext()
        if partitioned:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([param], modifier_rank=0)
        with gather, torch.no_grad():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in name.rsplit(".", 2)[-2] else 0.0)
                continue
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=generator) * std)


# ------------------------------------------------------------------------------------ parallel


def data_parallel_group():
    """DeepSpeed's DP group when AutoTP is on (None: the world)."""
    from deepspeed.utils import groups

    try:
        return groups._get_data_parallel_group()
    except (AssertionError, AttributeError):
        return None


def data_parallel() -> tuple[int, int]:
    """(rank, size) in the data-parallel group: DeepSpeed's when AutoTP is on, else the world."""
    group = data_parallel_group()
    if group is None:
        return dist.get_rank(), dist.get_world_size()
    return dist.get_rank(group), dist.get_world_size(group)


def counted_denominator(batches: list[dict], objectives: DeepSpeedObjectives) -> torch.Tensor:
    """This rank's share of N: counted tokens (or their PDL weights) over its micro-batches.

    A token is counted where loss_mask != 0 and label != ignore_index, as ObjectiveOutput.counted.
    With pdl_normalization="weighted_mean" N is the sum of w[label] over the counted tokens,
    whatever their mask value; the numerator, sum(loss * mask), holds the NTL and z-loss terms
    too, so they are divided by that sum of weights as well (ObjectiveConfig's docstring).
    """
    total = torch.zeros((), dtype=torch.float64, device=batches[0]["labels"].device)
    ignore = objectives.config.ignore_index
    weighted = (objectives.config.pdl_normalization == "weighted_mean"
                and objectives.pdl_weights is not None)
    for batch in batches:
        labels = batch["labels"]
        counted = (batch["loss_mask"] != 0) & (labels != ignore)
        if weighted:
            targets = torch.where(counted, labels, torch.zeros_like(labels))
            weights = objectives.objective.tables.on_device(objectives.pdl_weights,
                                                            total.device)[targets]
            total += (weights * counted).sum(dtype=torch.float64)
        else:
            total += counted.sum(dtype=torch.float64)
    return total


def concat_outputs(outputs: list[ObjectiveOutput]) -> ObjectiveOutput:
    """One ObjectiveOutput over all micro-batches (flattened, detached), for the logs."""
    names = ("loss", "ce", "ntl", "ntl_positions", "weight", "counted")
    return ObjectiveOutput(**{name: torch.cat([getattr(o, name).detach().reshape(-1)
                                               for o in outputs]) for name in names})


def gradients_finite(engine) -> bool:
    """Collective (one all-reduce over the world, one host sync): whether every gradient the
    coming `engine.step()` would apply is finite.

    Reads what DeepSpeed holds between the boundary backward and the step: ZeRO-3's flat buffer
    of this rank's reduced gradient partition, ZeRO-1/2's averaged_gradients (the same), or the
    parameters' .grad without ZeRO. The all-reduce covers the DP partitions and the TP shards.
    """
    optimizer = engine.optimizer
    flat = getattr(optimizer, "grad_partitions_flat_buffer", None)
    averaged = getattr(optimizer, "averaged_gradients", None) or {}
    if engine.zero_optimization_stage() == 3 and flat is not None:
        grads = [flat]
    elif engine.zero_optimization_stage() in (1, 2):
        grads = [grad for group in averaged.values() if group is not None
                 for grad in (group if isinstance(group, (list, tuple)) else [group])
                 if grad is not None]
    else:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    bad = torch.zeros((), dtype=torch.int32, device=engine.device)
    for grad in grads:
        bad += (~torch.isfinite(grad)).any().to(bad.device, torch.int32)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def tensorboard_scalars(record: StepRecord) -> list[tuple[str, float]]:
    """The monitor's tags of a step: Train/<component> and Train/sampling/..."""
    return [(f"Train/{name}", value) for name, value in (*record.values.items(),
                                                          *record.sampling.items())]


# -------------------------------------------------------------------------------------- trainer


class Trainer:
    """The engine, objectives and data of one run (every rank builds one); `loop.run_loop`
    runs it."""

    def __init__(self, cfg: RunConfig, ds_config: dict) -> None:
        """cfg: the YAML run config (training.config.load_config); ds_config: the parsed
        ds_config dict (load_ds_config)."""
        import deepspeed

        self.cfg, self.ds_config = cfg, ds_config
        unread = check_run_config(
            cfg, ds_config, resuming=(Path(cfg.output.dir) / CHECKPOINTS / "latest").is_file())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed_cpu.init_distributed()
        if dist.get_rank() == 0:
            for note in unread:
                warnings.warn(note, stacklevel=2)
        seed, data = cfg.train.seed, cfg.data
        self.tokenizer = MegatronTokenizer(data.tokenizer)
        model_config = llama_config(cfg.model.hf_config, self.tokenizer.vocab_size)
        self.vocab_size = model_config.vocab_size
        self.objectives = DeepSpeedObjectives(Objective.build(
            cfg.objectives, tokenizer=data.tokenizer, frequencies=data.frequencies,
            vocab_size=self.vocab_size, real_vocab_size=self.tokenizer.vocab_size,
            number_tokens=data.number_tokens))
        self.sampler = None
        if cfg.scheduled_sampling.enabled:
            self.sampler = ScheduledSampler(cfg.scheduled_sampling, seed, self.tokenizer.eod,
                                            real_vocab=self.tokenizer.vocab_size,
                                            pad_id=self.tokenizer.pad)

        self.fused_head = uses_fused_head(cfg.model, ds_config)
        optimizer, engine_config = split_optimizer(ds_config)
        engine_config = with_output_paths(engine_config, cfg.output.dir)
        model = build_model(model_config, seed, engine_config)
        if cfg.model.recompute_mode == "full":  # torch.utils.checkpoint per decoder layer
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=engine_config)
        self.head_shard = vocab_parallel_head_shard(self.engine.module)
        self.objectives.use_head_shard(self.head_shard)
        self.dp_rank, self.dp_size = data_parallel()
        self.gas = self.engine.gradient_accumulation_steps()
        self.micro_batch_size = self.engine.train_micro_batch_size_per_gpu()
        self.global_batch = self.micro_batch_size * self.gas * self.dp_size
        check_global_batch(cfg, self.global_batch)
        out = Path(cfg.output.dir)
        self.checkpoint_dir = out / CHECKPOINTS
        self.dataset = Repeated(gpt_dataset(data.train_prefix, cfg.model.seq_length, seed,
                                            self.tokenizer, None, out / "data_cache"))
        self.stamp = run_stamp.deepspeed_stamp(
            model_config, ds_config.get("optimizer", {}), ds_config.get("scheduler"),
            self.global_batch, cfg, tokenizer_identity(self.tokenizer._tokenizer))
        self.step = 0
        self.skipped = SkippedSteps(cfg.train.max_skipped_steps, "train.max_skipped_steps")
        logging = dist.get_rank() == 0
        monitor = getattr(self.engine, "monitor", None)
        sink = None
        if logging and monitor is not None and getattr(monitor, "enabled", False):
            sink = MonitorSink(monitor)
        self.metrics = MetricsWriter(out / METRICS, logging, sink, tensorboard_scalars)
        self.device = self.engine.device
        self.print_rank = 0

    # ------------------------------------------------------------------ data and loss
    def step_batches(self, step: int) -> list[dict]:
        """This DP rank's `gas` micro-batches of global step `step` (0-based), on the device."""
        device = self.engine.device
        return [{k: v.to(device) for k, v in batch.items()}
                for batch in micro_batches(self.dataset, step, self.micro_batch_size,
                                           self.dp_rank, self.dp_size, self.gas)]

    def scheduled_inputs(self, batches: list[dict]) -> tuple[list[dict], dict[str, float]]:
        """The step's micro-batches with scheduled-sampling inputs, and the values to log.

        p = 0 (warm-up, max_p 0): the batches come back untouched and no pass runs.
        """
        ids = sample_indices(self.step, self.micro_batch_size, self.dp_rank, self.dp_size,
                             self.gas)
        return self.sampler.mix_step(batches, self.step, list(ids), self._predict,
                                     data_parallel_group())

    def _predict(self, batches: list[dict], ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Predicted ids [b, s] per micro-batch, from no-grad forwards (one TP all-reduce each
        under AutoTP with a vocab-parallel head)."""
        predictions = []
        # eval(): the prediction is the model's inference behaviour (no dropout); the tiny and
        # 3B configs have none, so this only matters for models that do.
        self.engine.eval()
        try:
            for batch, sample_ids in zip(batches, ids, strict=True):
                with torch.no_grad():
                    logits = self.engine(input_ids=batch["tokens"]).logits  # [b, s, V or V/tp]
                sharded = logits.shape[-1] != self.vocab_size
                group = tensor_parallel_group() if sharded else None
                if sharded and group is None:
                    raise ValueError(f"logits have {logits.shape[-1]} vocab columns, the model "
                                     f"{self.vocab_size}, and no AutoTP group is set up")
                start = self.head_shard[0] if sharded and self.head_shard else None
                predictions.append(self.sampler.predict(logits, group, self.step, sample_ids,
                                                        start))
                del logits
        finally:
            self.engine.train()
        return predictions

    def global_denominator(self, batches: list[dict]) -> float:
        """N of the step: all-reduced over DP (TP ranks hold the same batch)."""
        total = counted_denominator(batches, self.objectives)
        dist.all_reduce(total, group=data_parallel_group())
        return max(float(total.item()), 1.0)

    def batch_objectives(self, batch: dict) -> ObjectiveOutput:
        """The objectives of one micro-batch: from the logits [b, s, V or V/tp], or with
        fused_lm_head from the decoder's hidden states [b, s, h] and the lm_head weight shard,
        bypassing the lm_head module (the fused loss all-reduces grad_hidden over AutoTP
        itself, as the column-parallel head would)."""
        if not self.fused_head:
            logits = self.engine(input_ids=batch["tokens"]).logits
            return self.objectives(logits, batch["labels"], loss_mask=batch["loss_mask"])
        # Through engine(...), not the inner module: DeepSpeed's forward arms its backward
        # prologue (gradient clearing and the accumulation boundary of its optimizers). The
        # head runs on the last position only; the loss takes the final (normed) hidden states.
        outputs = self.engine(input_ids=batch["tokens"], output_hidden_states=True,
                              logits_to_keep=1)
        return self.objectives.fused(outputs.hidden_states[-1], self.engine.module.lm_head.weight,
                                     batch["labels"], loss_mask=batch["loss_mask"])

    def forward_backward(self, batches: list[dict]) -> ObjectiveOutput:
        """Forward + backward of every micro-batch; gradients ready, optimizer not stepped.

        Returns the per-token outputs of all micro-batches (detached, flattened).
        """
        scale = self.dp_size * self.gas / self.global_denominator(batches)
        outputs = []
        for batch in batches:
            out = self.batch_objectives(batch)
            self.engine.backward(out.loss.sum(dtype=torch.float32) * scale)
            outputs.append(out)
            if len(outputs) < len(batches):
                self.engine.step()  # inside the accumulation window: no update, counters only
        return concat_outputs(outputs)

    def train_step(self) -> StepRecord:
        """One optimizer step over the global batch. Raises FloatingPointError before
        engine.step() when a loss component is inf or NaN, or (without fp16) a gradient is (the
        update is not applied), and after train.max_skipped_steps updates in a row that DeepSpeed
        skipped (its fp16 loss scaler's overflows, which lower the scale and are not fatal)."""
        start = time.perf_counter()
        batches = self.step_batches(self.step)
        sampling = {}
        if self.sampler is not None:
            batches, sampling = self.scheduled_inputs(batches)
        output = self.forward_backward(batches)
        # Reduced before engine.step() (one host sync): a NaN loss stops every rank before the
        # update, even with finite gradients. No engine: the metrics writer sends them to the
        # monitor, with the sampling values.
        values = log_components(None, output, self.step + 1, self.objectives.config)
        fix = 'a lower ds_config["optimizer"].params.lr'
        check_losses(self.step + 1, values, fix)
        if not self.engine.fp16_enabled():  # fp16: an overflow is the loss scaler's to skip
            check_gradients(self.step + 1, gradients_finite(self.engine),
                            "a gradient is inf or NaN", f"{fix} or gradient_clipping")
        self.engine.step()
        self.step += 1
        self.skipped.record(self.step, self.engine.was_step_applied())
        elapsed = time.perf_counter() - start
        grad_norm = self.engine.get_global_grad_norm()
        return StepRecord(self.step, values, self.engine.get_lr()[0],
                          float(grad_norm) if grad_norm is not None else None,
                          self.global_batch * self.cfg.model.seq_length / elapsed, sampling)

    def close(self) -> None:
        self.metrics.close()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Collective. `latest` names the new tag only once every rank has written its part and
        rank 0 its MANIFEST.json (size and sha256 of every file of the tag).

        DeepSpeed's own `latest` is written by rank 0 without waiting for the other ranks'
        optimizer shards, so it is written here instead: after a barrier, and atomically. A
        write that fails on any rank (a full disk, ...) lets every rank finish DeepSpeed's
        collectives (`deferred_write_errors`), then removes the tag, keeps `latest` and raises
        CheckpointSaveError on every rank.
        """
        tag = f"global_step{self.step}"
        directory = self.checkpoint_dir / tag
        error: BaseException | None = None
        if dist.get_rank() == 0 and directory.is_dir() and self._latest_tag() != tag:
            shutil.rmtree(directory)  # a save of this tag killed before `latest` named it
        dist.barrier()
        try:
            with deferred_write_errors(self.engine) as failed_writes:
                self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag,
                                            client_state={"step": self.step}, save_latest=False)
            error = failed_writes[0] if failed_writes else None
        except Exception as caught:
            error = caught
        if not checkpointing.any_rank_failed(error, self.device):
            try:
                if dist.get_rank() == 0:
                    run_stamp.write_stamp(directory, self.stamp)
                checkpointing.write_manifest(directory)  # collective: every rank hashes a share
            except OSError as caught:
                error = caught
        if not checkpointing.any_rank_failed(error, self.device) and dist.get_rank() == 0:
            try:
                write_atomically(self.checkpoint_dir / "latest", tag)
            except OSError as caught:
                error = caught
        if checkpointing.any_rank_failed(error, self.device):
            kept = self._latest_tag()
            if dist.get_rank() == 0 and kept != tag:
                shutil.rmtree(directory, ignore_errors=True)
            raise checkpointing.CheckpointSaveError(checkpointing.save_failure(
                directory, error, None if kept is None else self.checkpoint_dir / kept)
            ) from error
        dist.barrier()

    def _latest_tag(self) -> str | None:
        latest = self.checkpoint_dir / "latest"
        return latest.read_text(encoding="utf-8").strip() if latest.is_file() else None

    def _tags(self, below: int | None = None) -> list[str]:
        """The tag directories (global_stepN) there are, oldest first; those before step
        `below` if given."""
        found = []
        if self.checkpoint_dir.is_dir():
            for entry in self.checkpoint_dir.iterdir():
                match = _TAG.fullmatch(entry.name)
                if match and entry.is_dir() and (below is None or int(match.group(1)) < below):
                    found.append((int(match.group(1)), entry.name))
        return [name for _, name in sorted(found)]

    def _earlier_tags_fix(self, tag: str) -> str:
        step = _TAG.fullmatch(tag)
        earlier = self._tags(below=int(step.group(1)) if step else None)
        if not earlier:
            return f"no earlier tag exists: delete {self.checkpoint_dir / 'latest'} to start over"
        return (f"use an earlier tag: write one of [{', '.join(earlier)}] into "
                f"{self.checkpoint_dir / 'latest'}")

    def resume(self) -> int | None:
        """Load the tag `latest` names, if any, once its files match its manifest; returns its
        step. A corrupt tag is reported and skipped for the previous one (on_corrupt_checkpoint
        "fallback": `latest` is rewritten to it) or stops the run ("stop")."""
        policy = self.cfg.train.on_corrupt_checkpoint
        checkpointing.check_policy(policy)
        tag = self._latest_tag()
        if tag is None:
            return None
        if not (self.checkpoint_dir / tag).is_dir():
            raise ValueError(f"{self.checkpoint_dir}: `latest` names tag {tag!r}, which does not "
                             f"exist; {self._earlier_tags_fix(tag)}")
        while (problem := checkpointing.agreed_problem(self.checkpoint_dir / tag)) is not None:
            match = _TAG.fullmatch(tag)
            earlier = self._tags(below=int(match.group(1)) if match else None)
            fallback = earlier[-1] if earlier else None
            checkpointing.handle_corrupt(
                self.checkpoint_dir / tag, problem, policy,
                None if fallback is None else self.checkpoint_dir / fallback,
                f"{self._earlier_tags_fix(tag)}, or set train.on_corrupt_checkpoint=fallback")
            if dist.get_rank() == 0:
                if fallback is None:
                    (self.checkpoint_dir / "latest").unlink()
                else:
                    write_atomically(self.checkpoint_dir / "latest", fallback)
            dist.barrier()
            if fallback is None:
                return None
            tag = fallback
        train = self.cfg.train
        found = run_stamp.check_resume(self.checkpoint_dir / tag, self.stamp,
                                       train.resume_schedule, train.resume_objectives,
                                       "train.resume_schedule", "train.resume_objectives")
        override = found is not None and bool(found.schedule) and \
            train.resume_schedule == "override"
        if found is not None:
            self.stamp = found.effective(self.stamp, train.resume_schedule)
        try:
            path, state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag,
                                                      load_lr_scheduler_states=not override)
        except Exception as error:
            raise ValueError(f"checkpoint {self.checkpoint_dir / tag} could not be loaded "
                             f"({type(error).__name__}: {error}); "
                             f"{self._earlier_tags_fix(tag)}") from error
        if path is None:
            raise ValueError(f"checkpoint {self.checkpoint_dir / tag} could not be loaded; "
                             f"{self._earlier_tags_fix(tag)}")
        self.step = int(state["step"])
        if override:
            self._override_schedule()
        return self.step

    def _override_schedule(self) -> None:
        """The ds_config's optimizer params and scheduler from the resumed step on: the loaded
        optimizer state came back with the checkpoint's lr, betas, eps and weight decay."""
        params = dict(self.ds_config.get("optimizer", {}).get("params", {}))
        for group in self.engine.optimizer.param_groups:
            for key in ("lr", "eps"):
                if key in params:
                    group[key] = params[key]
            if "betas" in params:
                group["betas"] = tuple(params["betas"])
            if "weight_decay" in params and group.get("weight_decay", 0.0) > 0:
                group["weight_decay"] = params["weight_decay"]  # the no-decay group keeps 0
        scheduler = self.engine.lr_scheduler
        if scheduler is not None:  # a fresh scheduler of the new section, moved to this step
            scheduler.step(self.step - 1)


def run(cfg: RunConfig, ds_config: dict, printer=print) -> RunResult:
    """Train to train.steps, resuming from `latest`; saves every train.save_interval steps, at
    every train.exit_interval (then returns), at the end, and on SIGUSR1 / SIGTERM (then
    returns with stopped_by_signal). ds_config: the parsed ds_config (load_ds_config)."""
    Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
    train = cfg.train
    return run_loop(lambda: Trainer(cfg, ds_config), train.steps, train.save_interval,
                    train.log_interval, None, train.exit_interval, printer)
