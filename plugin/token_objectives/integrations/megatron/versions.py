"""Where megatron-core 0.16.x and 0.19.x differ, for the objectives: the one place that asks.

- The loss door. 0.19's `GPTModel.forward(..., output_processor=)` hands a hook the decoder's
  hidden states, the output layer and its (tied) weight and the labels, in place of the output
  layer and the cross-entropy: the objectives use it. 0.16 has no such argument: the objectives
  replace the model's `compute_language_model_loss` (and, for the fused head, stand in for the
  output layer's forward).
- The CPU. 0.19's gradient buffer waits on `torch.cuda.current_stream()` before each gradient
  reduction (for CUDA-graph replays); 0.16 never asks for a stream. `cpu_patches` answers
  both on a machine without a GPU.
- Megatron-LM's loop. 0.19's `pretrain_gpt.py` builds the model from a `GPTModelConfig`, whose
  `pre_wrap_hooks` attach the objectives; 0.16's calls a `model_provider`, which
  `wrap_model_provider` wraps.

Other releases are not refused, but warned about once: the features are looked up, not the number.
"""

from __future__ import annotations

import functools
import inspect
import warnings

from token_objectives.tables.errors import TokenObjectivesWarning

SUPPORTED = ((0, 16), (0, 19))


@functools.cache
def core_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the installed megatron-core."""
    from megatron.core import package_info

    version = (package_info.MAJOR, package_info.MINOR, package_info.PATCH)
    if version[:2] not in SUPPORTED:
        warnings.warn(
            f"megatron-core {'.'.join(map(str, version))} is not one token_objectives is tested "
            f"with ({', '.join(f'{a}.{b}.x' for a, b in SUPPORTED)}): the objectives look its "
            f"features up, but check a short run against a supported release",
            TokenObjectivesWarning,
            stacklevel=2,
        )
    return version


@functools.cache
def has_output_processor() -> bool:
    """True where GPTModel.forward takes `output_processor` (megatron-core 0.19 on)."""
    from megatron.core.models.gpt import GPTModel

    core_version()
    return "output_processor" in inspect.signature(GPTModel.forward).parameters



def load_optimizer_state(optimizer, state: dict, saved_lr_range: tuple[float, float] | None,
                         ) -> None:
    """`optimizer.load_state_dict(state)` for a checkpoint saved under another lr range.

    saved_lr_range: the checkpoint's (train.lr, train.min_lr) where they differ from the
    optimizer's groups' (max_lr, min_lr); None where they are the same. megatron-core 0.19
    pairs the saved parameter groups with the current ones by keys that include max_lr and
    min_lr (0.16 by position), so the groups take the checkpoint's range for the load; the
    loaded groups then carry it, and the caller overrides it or keeps it.
    """
    if saved_lr_range is not None:
        max_lr, min_lr = saved_lr_range
        for group in optimizer.param_groups:
            group.update({key: value for key, value in (("max_lr", max_lr), ("min_lr", min_lr))
                          if key in group})
    optimizer.load_state_dict(state)
