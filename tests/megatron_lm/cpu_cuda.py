"""Test only: what Megatron-LM's loop (megatron.training 0.19) asks of CUDA, answered on a
machine without a GPU, on top of `token_objectives.integrations.megatron.cpu_patches` (the
megatron-core ones). Applied by tests/megatron_lm/pretrain_gpt.py when CUDA is unavailable.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from token_objectives.integrations.megatron import cpu_patches


def apply() -> None:
    from megatron.training import arguments, training

    cpu_patches.apply()
    # validate_args asks for the GPU's architecture (Blackwell or not) at TP > 1: none.
    arguments.get_device_arch_version = lambda: 0
    # pretrain asserts CUDA unless initialize_megatron is told Megatron's own allow_no_cuda.
    training.initialize_megatron = functools.partial(training.initialize_megatron,
                                                     allow_no_cuda=True)
    # pretrain warms the fused CUDA kernels (bias+SwiGLU, bias+dropout+add) up on CUDA
    # tensors: nothing to warm on the CPU.
    training.set_jit_fusion_options = lambda tp_size=None: None
    # Megatron-LM sets up its model-parallel groups (and seeds) only where it counts a device:
    # one, "set" as the current one (the CPU).
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    # DDP is built under a side stream: the CPU's single "stream" (cpu_patches' current_stream).
    torch.cuda.Stream = lambda *args, **kwargs: torch.cuda.current_stream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    # The RNG tracker's seeding reads the CUDA generator's state: the CPU one's.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
