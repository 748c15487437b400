"""The training-run config: a YAML file of sections, each a small dataclass, plus overrides.

Sections: model, parallel, train, data, objectives (ObjectiveConfig), scheduled_sampling
(ScheduledSamplingConfig, off by default), output. An unknown section
or key is an error that names it and lists the valid ones; `--set section.key=value` overrides
take YAML values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.objectives.sections import section_from_mapping
from token_objectives.scheduled_sampling.schedule import ScheduledSamplingConfig


@dataclass(frozen=True)
class ModelConfig:
    """A GPT decoder (megatron-core GPTModel with the local layer spec)."""

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
    recompute_activations: bool = False
    fused_lm_head: bool = False  # the loss straight from hidden states: no [s, b, V/tp] logits

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"model.dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )


@dataclass(frozen=True)
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    micro_batch_size: int = 4
    global_batch_size: int | None = None  # None: micro_batch_size * data-parallel size


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
    on_corrupt_checkpoint: str = "fallback"  # "fallback" (to the previous one) | "stop"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
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
    number_tokens: str = "digit"  # "digit" | "multi"


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
    return RunConfig(**{name: _section(name, raw.get(name) or {}) for name in _SECTION_TYPES})


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`section.key=value` strings (value in YAML) applied to a raw config dict (a copy)."""
    merged = {name: dict(values or {}) for name, values in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value")
        merged.setdefault(section, {})[name] = yaml.safe_load(value)
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
