"""megatron-core layer specs for our GPT models: Transformer Engine's (flash attention, fused
norm+linear) when it imports, else the local spec with torch norms that support sequence
parallelism.

megatron-core's local spec falls back to `WrappedTorchNorm` when Apex is missing, which refuses
sequence parallelism: under it a norm sees only its rank's slice of the sequence, so its weight
gradient is partial, and megatron-core sums such gradients over TP (in finalize_model_grads)
only for parameters marked `sequence_parallel`. `SequenceParallelTorchNorm` is the same torch
norm with that mark, as Apex's FusedLayerNorm sets it.
"""

from __future__ import annotations

import dataclasses

import torch


class SequenceParallelTorchNorm:
    """A torch LayerNorm / RMSNorm (config.normalization) whose parameters carry
    `sequence_parallel = config.sequence_parallel`. Built by megatron-core's spec machinery
    with the norm arguments its modules pass."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"model.normalization must be RMSNorm or LayerNorm for the local "
                             f"layer spec, got {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def uses_transformer_engine(layer_spec: str) -> bool:
    """model.layer_spec: "te" requires Transformer Engine, "auto" takes it when it imports."""
    if layer_spec == "local":
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        if layer_spec == "te":
            raise ImportError("model.layer_spec: te needs transformer_engine, which does not "
                              "import here; install it or set model.layer_spec: auto") from None
        return False
    return True


def decoder_block_spec(model_cfg, config):
    """The spec of this pipeline stage's decoder block (its layers and the final norm), for
    GPTModel's transformer_layer_spec or a TransformerBlock."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if uses_transformer_engine(model_cfg.layer_spec):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization=model_cfg.normalization)
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(
        layer.submodules, input_layernorm=SequenceParallelTorchNorm,
        pre_mlp_layernorm=SequenceParallelTorchNorm))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelTorchNorm)
