"""Small patches that let megatron-core train on a machine without a GPU (gloo, CPU tensors).

Used only when CUDA is unavailable; `apply()` is idempotent and `revert()` undoes it. Every
patched callable keeps the original as `__wrapped__` and carries a marker attribute.

What megatron-core 0.16 and 0.19 need on CPU:
- `torch.cuda.current_device()` is asked for the device to allocate on: answer the CPU.
- `torch.cuda.synchronize()` is called around timers and checkpoints: a no-op.
- `torch.cuda.current_stream()` (0.19's gradient buffer waits on it before each reduction): a
  stream whose waits are no-ops, as every CPU op has finished when it returns.
- The CUDA RNG tracker's `fork()` (dropout in tensor-parallel regions) swaps CUDA RNG states:
  a null context, so dropout draws from the CPU generator.
- Activation recompute (`CheckpointFunction`) saves and restores the CUDA RNG state around the
  recomputed forward: it saves and restores the CPU generator's state instead.
- Factories called with `device="cuda"` (the pipeline schedules' token counters, the optimizer's
  found-inf flags, grad-norm buffers): allocated on the CPU instead.
- `Tensor.cuda()` (tied embeddings across pipeline stages move the shared weight): stays put.
- Gradient clipping asserts that gradients are `torch.cuda.FloatTensor`: the same scaling by
  max_norm / (total_norm + 1e-6), on CPU tensors.
- The distributed optimizer's constructor sorts parameters by `Tensor.type()` names
  ('torch.cuda.BFloat16Tensor', ...): inside it alone, CPU tensors answer with those names.
Sequence parallelism and gradient-accumulation fusion stay off (they need CUDA kernels).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_MARKER = "_token_objectives_cpu_patch"
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")
_patched: list[tuple[object, str, object]] = []


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def _cpu_factory(original):
    @functools.wraps(original)
    def factory(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original(*args, **kwargs)

    setattr(factory, _MARKER, True)
    return factory


def _set(owner: object, name: str, replacement) -> None:
    original = getattr(owner, name)
    if getattr(original, _MARKER, False):
        return
    setattr(replacement, _MARKER, True)
    if not hasattr(replacement, "__wrapped__"):
        replacement.__wrapped__ = original
    _patched.append((owner, name, original))
    setattr(owner, name, replacement)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _get_cpu_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cuda_type_names(init):
    """`init` run with `Tensor.type()` (no arguments) naming CPU tensors as CUDA ones."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        original = torch.Tensor.type

        def type_name(tensor, dtype=None, non_blocking=False, **options):
            if dtype is None and not options and tensor.device.type == "cpu":
                return original(tensor).replace("torch.", "torch.cuda.", 1)
            return original(tensor, dtype, non_blocking, **options)

        torch.Tensor.type = type_name
        try:
            return init(self, *args, **kwargs)
        finally:
            torch.Tensor.type = original

    return wrapped


def _stay_on_cpu(self, device=None, non_blocking=False, memory_format=None):
    return self


class _HostStream:
    """What megatron-core 0.19's gradient buffer asks of `torch.cuda.current_stream()`: on the
    CPU every op has finished when it returns, so waiting is a no-op."""

    def wait_event(self, event) -> None:
        return None

    def wait_stream(self, stream) -> None:
        return None

    def synchronize(self) -> None:
        return None


def needed() -> bool:
    """True on a machine without a usable GPU."""
    return not torch.cuda.is_available()


def apply() -> None:
    """Patch torch and megatron-core for CPU training. Safe to call more than once."""
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as tp_random

    def current_device():
        return torch.device("cpu")

    def synchronize(device=None):
        return None

    def fork(self, name=None):
        return contextlib.nullcontext()

    _set(torch.cuda, "current_device", current_device)
    _set(torch.cuda, "synchronize", synchronize)
    _set(torch.cuda, "current_stream", lambda device=None: _HostStream())
    _set(tp_random.CudaRNGStatesTracker, "fork", fork)
    _set(tp_random, "_get_cuda_rng_state", _get_cpu_rng_state)
    _set(tp_random, "_set_cuda_rng_state", _set_cpu_rng_state)
    _set(megatron_optimizer, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)
    _set(torch.Tensor, "cuda", _stay_on_cpu)
    _set(DistributedOptimizer, "__init__", _cuda_type_names(DistributedOptimizer.__init__))
    for name in _FACTORIES:
        _set(torch, name, _cpu_factory(getattr(torch, name)))


def revert() -> None:
    """Undo every patch `apply()` made."""
    while _patched:
        owner, name, original = _patched.pop()
        setattr(owner, name, original)
