"""What a run was trained with, kept with each checkpoint and compared when a run resumes.

A stamp is a JSON-able dict of four sections, each a flat {user-facing key: value}:
    model       the model's shape (a different value is a different model)
    schedule    the optimizer and its learning-rate schedule (train.lr, train.steps, ...)
    objectives  the objectives and their tables (objectives.*, the tokenizer's identity, the
                frequency file's sha256)
    layout      informational (TP, PP, DP): never compared here
Both loops build one (`megatron_stamp`, `deepspeed_stamp`) and save it with every checkpoint; on
resume `check_resume` compares the checkpoint's with the run's before any step:
- a different model is refused as a different model (the checkpoint is fine; the config or the
  output folder is not), whatever the options;
- a changed schedule follows `resume_schedule`: "refuse" (the default: an error naming every
  changed key and both ways out), "override" (the config's schedule from the resumed step on:
  Megatron-LM's --override-opt_param-scheduler) or "checkpoint" (the checkpoint's, the config's
  is ignored: --use-checkpoint-opt_param-scheduler);
- changed objectives or tables follow `resume_objectives`: "refuse" (the default) or
  "override" (train on with the new ones).
Pure Python, no communication: every rank reads the same stamp and decides the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from token_objectives.training.checkpointing import write_atomically

STAMP_FILE = "run.json"
SECTIONS = ("model", "schedule", "objectives", "layout")
RESUME_SCHEDULE = ("refuse", "override", "checkpoint")
RESUME_OBJECTIVES = ("refuse", "override")


def file_identity(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (a frequency table), None without one."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def objectives_section(config, number_tokens: str, tokenizer_identity: str | None,
                       frequencies: str | Path | None) -> dict:
    """The objectives section: every ObjectiveConfig field, the number-token mode, and the
    identities of the tokenizer and the frequency file the tables came from."""
    section = {f"objectives.{key}": value for key, value in asdict(config).items()}
    section["number_tokens"] = number_tokens
    section["tokenizer (identity)"] = tokenizer_identity
    section["frequencies (sha256)"] = file_identity(frequencies)
    return section


def megatron_stamp(cfg, padded_vocab: int, global_batch: int, tokenizer_identity: str | None,
                   data_parallel: int) -> dict:
    """The stamp of a Megatron-loop run (training.config.RunConfig)."""
    shape = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "num_query_groups", "normalization", "swiglu", "tie_embeddings")
    train = cfg.train
    return {
        "model": {**{f"model.{k}": getattr(cfg.model, k) for k in shape},
                  "padded vocab (model.vocab_size, make_vocab_size_divisible_by x parallel.tensor)":
                      padded_vocab},
        "schedule": {
            "train.lr": train.lr, "train.min_lr": train.min_lr,
            "train.warmup_steps": train.warmup_steps, "train.steps": train.steps,
            "train.lr_decay_style": train.lr_decay_style,
            "train.weight_decay": train.weight_decay, "train.adam_beta1": train.adam_beta1,
            "train.adam_beta2": train.adam_beta2, "global batch (samples)": global_batch,
        },
        "objectives": {
            **objectives_section(cfg.objectives, cfg.data.number_tokens, tokenizer_identity,
                                 cfg.data.frequencies),
        },
        "layout": {"parallel.tensor": cfg.parallel.tensor,
                   "parallel.pipeline": cfg.parallel.pipeline, "data parallel": data_parallel},
    }


def deepspeed_stamp(model_config, optimizer: Mapping[str, Any], scheduler: Any,
                    global_batch: int, cfg, tokenizer_identity: str | None) -> dict:
    """The stamp of a DeepSpeed-loop run: the HF model config's shape, ds_config's optimizer
    params and scheduler section (whose total_num_steps is the schedule's length: train.steps
    alone may grow on a resume), and the run config's (training.config.RunConfig) objectives
    as megatron_stamp has them."""
    shape = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    params = dict(optimizer.get("params", {}))
    return {
        "model": {f"model.{k}": getattr(model_config, k, None) for k in shape},
        "schedule": {
            **{f"optimizer.params.{k}": list(v) if isinstance(v, tuple) else v
               for k, v in sorted(params.items())},
            "scheduler": scheduler, "global batch (samples)": global_batch,
        },
        "objectives": objectives_section(cfg.objectives, cfg.data.number_tokens,
                                         tokenizer_identity, cfg.data.frequencies),
        "layout": {},
    }


def stamp_files(stamp: dict) -> dict[str, str]:
    """{run.json: the stamp as text}: the files a checkpoint keeps it in (written before the
    checkpoint's manifest, so that the manifest covers them)."""
    return {STAMP_FILE: json.dumps(stamp, indent=1, sort_keys=True)}


def write_stamp(directory: str | Path, stamp: dict) -> None:
    """The stamp as `directory`/run.json (before the directory's manifest is written)."""
    for name, text in stamp_files(stamp).items():
        write_atomically(Path(directory) / name, text)


def read_stamp(directory: str | Path) -> dict | None:
    """The stamp saved in a checkpoint directory; None for checkpoints from before stamps."""
    path = Path(directory) / STAMP_FILE
    if not path.is_file():
        return None
    stamp = json.loads(path.read_text(encoding="utf-8"))
    # DeepSpeed-loop stamps from when the objectives were a ds_config section: the same values.
    stamp["objectives"] = {key.replace("token_objectives.", "objectives.", 1): value
                           for key, value in stamp.get("objectives", {}).items()}
    return stamp


@dataclass(frozen=True)
class ResumeChanges:
    """How a run differs from the checkpoint it resumes: "key: there -> here" lines per
    section, and the checkpoint's stamp."""

    model: list[str]
    schedule: list[str]
    objectives: list[str]
    saved: dict

    def effective(self, current: dict, resume_schedule: str) -> dict:
        """The stamp the resumed run trains under, for its next checkpoints: the config's,
        with the checkpoint's schedule where it was kept ("checkpoint")."""
        if resume_schedule == "checkpoint" and self.schedule:
            return {**current, "schedule": self.saved["schedule"]}
        return current


def _normalised(value: Any) -> Any:
    # JSON turned tuples into lists and may have written 1 for 1.0: compare as JSON does.
    return json.loads(json.dumps(value))


def changes(saved: dict, current: dict) -> ResumeChanges:
    """The keys whose values differ between a checkpoint's stamp and the run's."""
    found = {}
    for section in ("model", "schedule", "objectives"):
        there, here = saved.get(section, {}), _normalised(current.get(section, {}))
        found[section] = [
            f"{key}: {there.get(key)!r} in the checkpoint, {here.get(key)!r} now"
            for key in sorted(set(there) | set(here))
            if there.get(key) != here.get(key)
        ]
    return ResumeChanges(**found, saved=saved)


def model_changes(directory: str | Path, current: dict) -> list[str]:
    """The model keys on which a checkpoint's stamp and `current` disagree ([] without a
    stamp): a config that does not describe the checkpoint's model."""
    saved = read_stamp(directory)
    return [] if saved is None else changes(saved, current).model


def check_resume(directory: str | Path, current: dict, resume_schedule: str,
                 resume_objectives: str, schedule_option: str, objectives_option: str
                 ) -> ResumeChanges | None:
    """Compare the checkpoint in `directory` with the run's stamp before anything is loaded.

    Raises ValueError for a different model, and for a changed schedule / changed objectives
    that the options do not allow; returns the changes (None: the checkpoint has no stamp).
    schedule_option / objectives_option: how the user spells the two options (in messages).
    """
    if resume_schedule not in RESUME_SCHEDULE:
        raise ValueError(f"{schedule_option} must be one of {list(RESUME_SCHEDULE)}, "
                         f"got {resume_schedule!r}")
    if resume_objectives not in RESUME_OBJECTIVES:
        raise ValueError(f"{objectives_option} must be one of {list(RESUME_OBJECTIVES)}, "
                         f"got {resume_objectives!r}")
    saved = read_stamp(directory)
    if saved is None:
        return None
    found = changes(saved, current)
    if found.model:
        raise ValueError(
            f"checkpoint {directory} holds a different model than this config describes "
            f"({'; '.join(found.model)}). The checkpoint is intact: to resume it, restore these "
            f"settings; to train this model, write to another output folder")
    if found.schedule and resume_schedule == "refuse":
        raise ValueError(
            f"resuming {directory} with a changed optimizer schedule "
            f"({'; '.join(found.schedule)}). Say which one to follow: {schedule_option} "
            f"override (the config's, from the resumed step on) or {schedule_option} "
            f"checkpoint (the checkpoint's; the config's values are ignored)")
    if found.objectives and resume_objectives == "refuse":
        raise ValueError(
            f"resuming {directory} with changed objectives or tables "
            f"({'; '.join(found.objectives)}). Pass {objectives_option} override to train on "
            f"with the new ones, or restore these settings")
    return found
