"""The training-run config: a YAML file of sections, each a small dataclass, plus overrides.

Sections: model, parallel, train, data, objectives (ObjectiveConfig), scheduled_sampling
(ScheduledSamplingConfig, off by default), output. An unknown section
or key is an error that names it and lists the valid ones; `--set section.key=value` overrides
take YAML values. Every key is declared with `objectives.options.option` (its choices and its
range) and checked by the one checker (`options.check`, `options.from_mapping`): every size is a
positive integer, every interval and count >= 0, every rate a finite number in its range; a bad
value is a ValueError `section.key: expected <accepts>, got <value!r>`, and null (None) is off
for every key whose type allows it. An int key takes a number written as a float only when it
is an exact integer (`--set train.steps=1e3` is 1000).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from token_objectives.objectives import options
from token_objectives.objectives.config import NUMBER_TOKENS, ObjectiveConfig
from token_objectives.objectives.options import option
from token_objectives.scheduled_sampling.schedule import ScheduledSamplingConfig
from token_objectives.training.checkpointing import CORRUPT_POLICIES
from token_objectives.training.run_stamp import RESUME_OBJECTIVES, RESUME_SCHEDULE

RECOMPUTE = ("none", "selective", "full")
LAYER_SPECS = ("auto", "te", "local")


@dataclass(frozen=True)
class ModelConfig:
    """A GPT decoder (megatron-core GPTModel; layer_spec picks Transformer Engine or local)."""

    num_layers: int = option(2, low=1)
    hidden_size: int = option(64, low=1)
    ffn_hidden_size: int = option(256, low=1)
    num_attention_heads: int = option(4, low=1)
    num_query_groups: int | None = option(None, low=1)  # GQA; None: a KV head per query head
    seq_length: int = option(128, low=1)
    normalization: str = option("RMSNorm", choices=("RMSNorm", "LayerNorm"))
    norm_epsilon: float = option(1e-5, low=0, open="low")
    swiglu: bool = True
    rotary_base: float = option(10000.0, low=0, open="low")
    tie_embeddings: bool = True
    init_method_std: float = option(0.02, low=0, open="low")
    vocab_size: int | None = option(None, low=1)  # None: the tokenizer's; padded as Megatron
    make_vocab_size_divisible_by: int = option(128, low=1)
    dtype: str = option("fp32", choices=("fp32", "bf16"))
    # "none" | "selective" (core attention) | "full" (every layer)
    recompute: str = option("none", choices=RECOMPUTE)
    recompute_activations: bool = False  # the older spelling of recompute: full
    # "auto" (Transformer Engine when it imports) | "te" | "local"
    layer_spec: str = option("auto", choices=LAYER_SPECS)
    fused_lm_head: bool = False  # the loss straight from hidden states: no [s, b, V/tp] logits
    # The DeepSpeed loop's model: a local Hugging Face LlamaConfig JSON (configs/deepspeed/);
    # its shape is the JSON's, so the shape keys above are the Megatron loop's only.
    hf_config: str | None = None

    def __post_init__(self) -> None:
        options.check(self, "model")
        if self.recompute_activations and self.recompute not in ("none", "full"):
            raise ValueError(f"model.recompute_activations: true means model.recompute: full, "
                             f"which contradicts model.recompute: {self.recompute}; drop "
                             f"recompute_activations")
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
    tensor: int = option(1, low=1)
    pipeline: int = option(1, low=1)
    micro_batch_size: int = option(4, low=1)
    # None: micro_batch_size * data-parallel size
    global_batch_size: int | None = option(None, low=1)
    use_distributed_optimizer: bool = False  # fp32 optimizer state sharded over DP
    overlap_grad_reduce: bool = False  # gradient reduction overlapped with the backward
    overlap_param_gather: bool = False  # distributed optimizer: gather overlapped with forward
    # Activations outside the TP regions (norms, residual, dropout) split along the sequence
    # over the TP ranks; the fused LM head gathers them itself. Needs tensor > 1.
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        options.check(self, "parallel")
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("parallel.sequence_parallel splits the sequence over the "
                             "tensor-parallel ranks and needs parallel.tensor > 1; set "
                             "parallel.sequence_parallel: false at tensor: 1")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("parallel.overlap_param_gather needs "
                             "parallel.use_distributed_optimizer: true")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = option(100, low=1)
    lr: float = option(1e-3, low=0, open="low")
    min_lr: float = option(1e-4, low=0)
    warmup_steps: int = option(10, low=0)
    # megatron-core's OptimizerParamScheduler styles (WSD needs settings this schema lacks).
    lr_decay_style: str = option("cosine", choices=("constant", "linear", "cosine",
                                                    "inverse-square-root"))
    weight_decay: float = option(0.01, low=0)
    adam_beta1: float = option(0.9, low=0, high=1, open="high")
    adam_beta2: float = option(0.95, low=0, high=1, open="high")
    clip_grad: float = option(1.0, low=0)
    seed: int = option(1234, low=0)
    log_interval: int = option(1, low=1)
    save_interval: int = option(0, low=0)  # 0: save only at the end and on a signal
    # >0: save and exit when step % exit_interval == 0 (time-sliced jobs)
    exit_interval: int = option(0, low=0)
    keep_checkpoints: int = option(0, low=0)  # >0: keep only the newest N complete ones
    # stop after N updates in a row the optimizer skipped; 0: never
    max_skipped_steps: int = option(10, low=0)
    # "fallback" (to the previous one) | "stop"
    on_corrupt_checkpoint: str = option("fallback", choices=CORRUPT_POLICIES)
    # >0: greedy-answer data.eval_data every N steps (Megatron loop)
    eval_interval: int = option(0, low=0)
    eval_batch_size: int = option(32, low=1)  # prompts per generation batch
    eval_max_new_tokens: int = option(16, low=1)  # the most tokens generated per prompt
    # A resume whose optimizer schedule (lr, min_lr, warmup, steps, decay, weight decay, betas,
    # global batch) differs from the checkpoint's: "refuse" (an error naming each changed key),
    # "override" (the config's: Megatron-LM's --override-opt_param-scheduler) or "checkpoint"
    # (the checkpoint's: --use-checkpoint-opt_param-scheduler).
    resume_schedule: str = option("refuse", choices=RESUME_SCHEDULE)
    # A resume with other objectives or tables (objectives.*, data.number_tokens, the tokenizer,
    # the frequency file): "refuse" or "override" (train on with the new ones).
    resume_objectives: str = option("refuse", choices=RESUME_OBJECTIVES)

    def __post_init__(self) -> None:
        options.check(self, "train")
        # Cross-key rules, in the checker's words: what the key takes, given the other key.
        if self.min_lr > self.lr:
            raise options.refusal("train.min_lr", f"a number <= train.lr ({self.lr}), as the "
                                  "schedule decays from lr down to min_lr", self.min_lr)
        if not self.warmup_steps < self.steps:
            raise options.refusal("train.warmup_steps",
                                  f"an int in [0, train.steps = {self.steps})",
                                  self.warmup_steps)


@dataclass(frozen=True)
class DataConfig:
    tokenizer: str | None = None
    train_prefix: str | None = None  # Megatron .bin/.idx prefix
    frequencies: str | None = None  # `token-objectives count-frequencies` output, for PDL
    number_tokens: str = NUMBER_TOKENS.field()  # tables.numbers.NUMBER_TOKEN_MODES
    eval_data: str | None = None  # JSONL of {"prompt", "answer"}, for train.eval_interval

    def __post_init__(self) -> None:
        options.check(self, "data")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    tensorboard: bool = True

    def __post_init__(self) -> None:
        options.check(self, "output")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    scheduled_sampling: ScheduledSamplingConfig = field(default_factory=ScheduledSamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # The `section.key` names the YAML file or a --set gave (config_from_dict), whatever their
    # values; None for a RunConfig built in code (then a key away from its default counts).
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)

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
    return options.from_mapping(_SECTION_TYPES[name], values, name, text=True)


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid: {sorted(_SECTION_TYPES)}")
    given = frozenset(f"{name}.{key}" for name, values in raw.items()
                      if isinstance(values, Mapping) for key in values)
    return RunConfig(**{name: _section(name, {} if raw.get(name) is None else raw[name])
                        for name in _SECTION_TYPES}, given=given)


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
