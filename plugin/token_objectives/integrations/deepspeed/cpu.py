"""DeepSpeed on a machine without a GPU: the CPU workarounds of the DeepSpeed path, in one place.

Applied only when `torch.cuda.is_available()` is False (`needed()`); with CUDA, `init_distributed`
is plain `deepspeed.init_distributed()`.

1. No JIT-built shm comm op. `deepspeed.comm.torch.TorchBackend.__init__` calls `build_shm_op()`,
   which compiles the C++ `deepspeed_shm_comm` extension on the CPU accelerator when DeepSpeed
   finds it compatible (a C++ toolchain and tens of seconds per process). Marking it incompatible
   in `deepspeed.ops.__compatible_ops__` before `deepspeed.init_distributed` makes `build_shm_op()`
   return None, and DeepSpeed's collectives go straight to torch.distributed.
2. The gloo backend, named explicitly: the CPU accelerator would pick "ccl" when oneCCL is
   installed, and gloo is what torch ships and the tests use.
3. No JIT-built optimizer. DeepSpeed's own Adam/AdamW (FusedAdam, DeepSpeedCPUAdam) are C++/CUDA
   ops built on first use. The training loop therefore always passes torch's `AdamW` as the client
   optimizer (`training.deepspeed.split_optimizer`, one code path on CPU and GPU); ZeRO-1/2/3 and
   AutoTP wrap it as they would their own.
"""

from __future__ import annotations

import torch

SHM_OP = "deepspeed_shm_comm"
BACKEND = "gloo"


def needed() -> bool:
    """True without CUDA: the workarounds apply."""
    return not torch.cuda.is_available()


def disable_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its shm comm op. Idempotent; call before
    `deepspeed.init_distributed`. Undo: `deepspeed.ops.__compatible_ops__.pop(SHM_OP)`."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


def init_distributed() -> None:
    """`deepspeed.init_distributed`, over gloo without the shm op when there is no GPU.

    Reads torchrun's / the deepspeed launcher's environment; a no-op when already initialised.
    """
    import deepspeed

    if needed():
        disable_shm_comm_op()
        deepspeed.init_distributed(dist_backend=BACKEND)
    else:
        deepspeed.init_distributed()
