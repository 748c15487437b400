"""The training-run config: a YAML file of sections, each a small dataclass, plus overrides.

Sections: model, parallel, train, data, objectives (ObjectiveConfig), scheduled_sampling
(ScheduledSamplingConfig, off by default), output. An unknown section
or key is an error that names it and lists the valid ones; `--set section.key=value` overrides
take YAML values. Every size is a positive integer, every interval and count >= 0, every rate a
finite number in its range; a bad value is a ValueError naming `section.key`. An int key takes a
number written as a float only when it is an exact integer (`--set train.steps=1e3` is 1000).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.objectives.sections import section_from_mapping
from token_objectives.scheduled_sampling.schedule import ScheduledSamplingConfig
from token_objectives.tables.numbers import NUMBER_TOKEN_MODES, NUMBER_TOKENS_HELP
from token_objectives.training.run_stamp import RESUME_OBJECTIVES, RESUME_SCHEDULE


def _check_sizes(section: str, config: object, names: Sequence[str], least: int) -> None:
    """Each of `names` (None allowed where the field allows it) is an int >= least."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < least:
            what = "a positive integer" if least == 1 else f"an integer >= {least}"
            raise ValueError(f"{section}.{name} must be {what}, got {value}")


def _check_number(section: str, name: str, value: float, low: float, high: float = math.inf,
                  low_open: bool = False, high_open: bool = False) -> None:
    """`value` is finite and lies in the interval from low to high (open where asked)."""
    inside = math.isfinite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not inside:
        interval = (f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                    if math.isfinite(high) else f"{'>' if low_open else '>='} {low}")
        raise ValueError(f"{section}.{name} must be a finite number "
                         f"{'in ' if math.isfinite(high) else ''}{interval}, got {value}")


RECOMPUTE = ("none", "selective", "full")
LAYER_SPECS = ("auto", "te", "local")


@dataclass(frozen=True)
class ModelConfig:
    """A GPT decoder (megatron-core GPTModel; layer_spec picks Transformer Engine or local)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA; None = one KV head per query head
    seq_length: int = 128
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    init_method_std: float = 0.02
    vocab_size: int | None = None  # None: the tokenizer's; padded as Megatron does
    make_vocab_size_divisible_by: int = 128
    dtype: str = "fp32"  # "fp32" | "bf16"
    recompute: str = "none"  # "none" | "selective" (core attention) | "full" (every layer)
    recompute_activations: bool = False  # the older spelling of recompute: full
    layer_spec: str = "auto"  # "auto" (Transformer Engine when it imports) | "te" | "local"
    fused_lm_head: bool = False  # the loss straight from hidden states: no [s, b, V/tp] logits
    # The DeepSpeed loop's model: a local Hugging Face LlamaConfig JSON (configs/deepspeed/);
    # its shape is the JSON's, so the shape keys above are the Megatron loop's only.
    hf_config: str | None = None

    def __post_init__(self) -> None:
        _check_sizes("model", self, ("num_layers", "hidden_size", "ffn_hidden_size",
                                     "num_attention_heads", "num_query_groups", "seq_length",
                                     "vocab_size", "make_vocab_size_divisible_by"), 1)
        for name in ("norm_epsilon", "rotary_base", "init_method_std"):
            _check_number("model", name, getattr(self, name), 0.0, low_open=True)
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"model.dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"model.recompute must be one of {list(RECOMPUTE)}, "
                             f"got {self.recompute!r}")
        if self.recompute_activations and self.recompute not in ("none", "full"):
            raise ValueError(f"model.recompute_activations: true means model.recompute: full, "
                             f"which contradicts model.recompute: {self.recompute}; drop "
                             f"recompute_activations")
        if self.layer_spec not in LAYER_SPECS:
            raise ValueError(f"model.layer_spec must be one of {list(LAYER_SPECS)}, "
                             f"got {self.layer_spec!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def recompute_mode(self) -> str:
        """model.recompute, with recompute_activations: true read as "full"."""
        return "full" if self.recompute_activations else self.recompute


@dataclass(frozen=True)
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    micro_batch_size: int = 4
    global_batch_size: int | None = None  # None: micro_batch_size * data-parallel size
    use_distributed_optimizer: bool = False  # fp32 optimizer state sharded over DP
    overlap_grad_reduce: bool = False  # gradient reduction overlapped with the backward
    overlap_param_gather: bool = False  # distributed optimizer: gather overlapped with forward
    # Activations outside the TP regions (norms, residual, dropout) split along the sequence
    # over the TP ranks; the fused LM head gathers them itself. Needs tensor > 1.
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        _check_sizes("parallel", self, ("tensor", "pipeline", "micro_batch_size",
                                        "global_batch_size"), 1)
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("parallel.sequence_parallel splits the sequence over the "
                             "tensor-parallel ranks and needs parallel.tensor > 1; set "
                             "parallel.sequence_parallel: false at tensor: 1")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("parallel.overlap_param_gather needs "
                             "parallel.use_distributed_optimizer: true")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 1
    save_interval: int = 0  # 0: save only at the end and on a signal
    exit_interval: int = 0  # >0: save and exit when step % exit_interval == 0 (time-sliced jobs)
    keep_checkpoints: int = 0  # >0: keep only the newest N complete checkpoints
    max_skipped_steps: int = 10  # stop after N updates in a row the optimizer skipped; 0: never
    on_corrupt_checkpoint: str = "fallback"  # "fallback" (to the previous one) | "stop"
    eval_interval: int = 0  # >0: greedy-answer data.eval_data every N steps (Megatron loop)
    eval_batch_size: int = 32  # prompts per generation batch
    eval_max_new_tokens: int = 16  # the most tokens generated per prompt
    # A resume whose optimizer schedule (lr, min_lr, warmup, steps, decay, weight decay, betas,
    # global batch) differs from the checkpoint's: "refuse" (an error naming each changed key),
    # "override" (the config's: Megatron-LM's --override-opt_param-scheduler) or "checkpoint"
    # (the checkpoint's: --use-checkpoint-opt_param-scheduler).
    resume_schedule: str = "refuse"
    # A resume with other objectives or tables (objectives.*, data.number_tokens, the tokenizer,
    # the frequency file): "refuse" or "override" (train on with the new ones).
    resume_objectives: str = "refuse"

    def __post_init__(self) -> None:
        _check_sizes("train", self, ("steps", "log_interval", "eval_batch_size",
                                     "eval_max_new_tokens"), 1)
        _check_sizes("train", self, ("save_interval", "exit_interval", "keep_checkpoints",
                                     "max_skipped_steps", "seed", "eval_interval"), 0)
        _check_number("train", "lr", self.lr, 0.0, low_open=True)
        _check_number("train", "min_lr", self.min_lr, 0.0)
        _check_number("train", "weight_decay", self.weight_decay, 0.0)
        _check_number("train", "clip_grad", self.clip_grad, 0.0)
        for name in ("adam_beta1", "adam_beta2"):
            _check_number("train", name, getattr(self, name), 0.0, 1.0, high_open=True)
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr "
                             f"({self.lr}): the schedule decays from lr down to min_lr")
        for name, choices in (("resume_schedule", RESUME_SCHEDULE),
                              ("resume_objectives", RESUME_OBJECTIVES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"train.{name} must be one of {list(choices)}, got "
                                 f"{getattr(self, name)!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) must lie in [0, train.steps = "
                f"{self.steps})"
            )


@dataclass(frozen=True)
class DataConfig:
    tokenizer: str | None = None
    train_prefix: str | None = None  # Megatron .bin/.idx prefix
    frequencies: str | None = None  # `token-objectives count-frequencies` output, for PDL
    number_tokens: str = "auto"  # tables.numbers.NUMBER_TOKEN_MODES
    eval_data: str | None = None  # JSONL of {"prompt", "answer"}, for train.eval_interval

    def __post_init__(self) -> None:
        if self.number_tokens not in NUMBER_TOKEN_MODES:
            raise ValueError(f"data.number_tokens must be one of {list(NUMBER_TOKEN_MODES)}, "
                             f"got {self.number_tokens!r}: {NUMBER_TOKENS_HELP}")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    tensorboard: bool = True


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    scheduled_sampling: ScheduledSamplingConfig = field(default_factory=ScheduledSamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.train.eval_interval:
            if self.data.eval_data is None:
                raise ValueError("train.eval_interval needs data.eval_data: set it to a JSONL "
                                 'file of {"prompt", "answer"} lines, or set '
                                 "train.eval_interval: 0")
            if self.parallel.pipeline > 1:
                raise ValueError(
                    "train.eval_interval is not supported with parallel.pipeline > 1 (greedy "
                    "generation runs the whole model on each rank); set train.eval_interval: 0 "
                    "and run `token-objectives evaluate` on a checkpoint instead")


_SECTION_TYPES = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "objectives": ObjectiveConfig,
    "scheduled_sampling": ScheduledSamplingConfig,
    "output": OutputConfig,
}


def _section(name: str, values: Mapping[str, Any]):
    return section_from_mapping(_SECTION_TYPES[name], name, values)


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid: {sorted(_SECTION_TYPES)}")
    return RunConfig(**{name: _section(name, {} if raw.get(name) is None else raw[name])
                        for name in _SECTION_TYPES})


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`section.key=value` strings (value in YAML) applied to a raw config dict (a copy)."""
    merged = {name: dict(values) if isinstance(values, Mapping) else values
              for name, values in raw.items()}  # a section that is not a mapping: named later
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value")
        target = merged.get(section)
        if target is None:
            target = merged[section] = {}
        if not isinstance(target, dict):
            raise ValueError(f"override {item!r}: config section {section!r} must be a mapping, "
                             f"got {target!r}")
        target[name] = yaml.safe_load(value)
    return merged


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (or start from defaults when path is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a run config is a mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides))


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's padding: round up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple
