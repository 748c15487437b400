"""A checkpoint writer that survives the signal it is saving for.

megatron-core's filesystem writer (`dist_checkpointing.strategies.filesystem_async`, the default
torch_dist save strategy, in 0.16 and 0.19 alike) collects its results through a queue of a
multiprocessing Manager, a spawned process started by the first save and kept for the run. The
Manager lives in the worker's process group with default signal handlers, so a group-wide
SIGTERM (torchrun's agent, `scancel`, SLURM's time limit) kills it: every save after the first
then fails with BrokenPipeError, the emergency save included. The writer processes it forks per
save inherit the worker's own handlers (the run loop's preemption flag) and are not at risk.

`keep_writer_queue_through_signals` starts that Manager here instead, ignoring the job's
signals, and hands megatron-core its queue. Idempotent; no communication.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from multiprocessing.managers import SyncManager

# The signals a job receives before its processes are killed: SLURM's warning, scancel and the
# time limit, the launcher's interrupt.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_manager: SyncManager | None = None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _ignore_job_signals() -> None:
    for signum in JOB_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # Held back since the fork (see keep_writer_queue_through_signals); ignored now, so any
    # that arrived are dropped.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)
    # Deaf to the job's signals, it must not outlive the worker (a SIGKILLed worker runs no
    # finalizer): Linux ends it with its parent.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def keep_writer_queue_through_signals() -> None:
    """Give megatron-core's filesystem writer a results queue whose Manager ignores SIGTERM,
    SIGUSR1 and SIGINT; it ends with this process (on Linux also when this one is killed)."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None and filesystem_async._results_queue is not None:
        return
    _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    # The first save is often the emergency one: a job signal landing while the Manager starts
    # killed it before _ignore_job_signals ran (seen under SLURM). Held back in this thread
    # meanwhile, the spawned process inherits the mask; this process gets them afterwards.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        _manager.start(initializer=_ignore_job_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    filesystem_async._results_queue = _manager.Queue()
