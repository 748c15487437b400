"""A pool of real gloo worker processes, started once per test session.

Starting torch.distributed (and importing megatron-core) costs seconds per process, so the workers
stay up and run one task after another. A task is a picklable module-level function; it runs on
every rank at once, with real collectives, and each rank's return value comes back in rank order.
Inside a task, `tp_group(size)` gives this rank's tensor-parallel group of that size (contiguous
ranks, as Megatron lays TP out).
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_GROUPS: dict[int, dist.ProcessGroup | None] = {}
TASK_TIMEOUT_S = 300


def tp_group(size: int) -> dist.ProcessGroup | None:
    """This rank's TP group of `size` ranks (None for size 1: the whole vocab is local).
    Size 3 exists on ranks 0-2 only (see `in_tp_group`)."""
    return _GROUPS[size]


def in_tp_group(size: int) -> bool:
    """Whether this rank belongs to a TP group of `size` (every rank does, but for size 3)."""
    return size in _GROUPS


COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter", "all_to_all",
    "all_to_all_single", "send", "recv", "isend", "irecv", "barrier",
)


@contextmanager
def counted_collectives() -> Iterator[Counter]:
    """Counts calls of every torch.distributed collective; the real functions still run."""
    counter: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            counter[name] += 1
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in COLLECTIVES:
            setattr(dist, name, counting(name))
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def initialize_model_parallel(**sizes) -> set:
    """megatron-core's parallel_state.initialize_model_parallel(**sizes) inside a task; returns
    the process groups that existed before, for `destroy_model_parallel`."""
    from megatron.core import parallel_state

    before = set(dist.distributed_c10d._world.pg_map)
    parallel_state.initialize_model_parallel(**sizes)
    return before


def destroy_model_parallel(before: set) -> None:
    """megatron-core's destroy_model_parallel, then every process group made since `before`.
    megatron-core only drops its references; c10d keeps each group and its gloo threads, which
    wake up while the worker waits for its next task (measured: +52 threads a call; after a
    session's tasks an idle worker held ~370 and used ~10% of a core)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    for group in [g for g in list(dist.distributed_c10d._world.pg_map) if g not in before]:
        dist.destroy_process_group(group)


def _make_groups(world_size: int) -> None:
    _GROUPS[1] = None
    size = 2
    while size <= world_size:
        for start in range(0, world_size, size):
            ranks = list(range(start, start + size))
            group = dist.new_group(ranks) if size < world_size else dist.group.WORLD
            if dist.get_rank() in ranks:
                _GROUPS[size] = group
        size *= 2
    if world_size > 3:
        # A TP size that divides no power of two: ranks 0-2; the others are left out of it.
        group = dist.new_group([0, 1, 2])
        if dist.get_rank() < 3:
            _GROUPS[3] = group


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Workers have no GPU: the Triton kernels run under the interpreter, which must be on
    # before triton is first imported.
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    _make_groups(world_size)
    results.put((rank, "ready", None))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args = item
        try:
            results.put((rank, "ok", fn(*args)))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerPool:
    """`world_size` gloo processes on this machine; `run(fn, *args)` runs fn on all of them."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, port, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._collect("ready")

    def _collect(self, expected: str) -> list:
        out: dict[int, object] = {}
        errors = []
        while len(out) + len(errors) < self.world_size:
            try:
                rank, status, payload = self._results.get(timeout=TASK_TIMEOUT_S)
            except queue.Empty:
                dead = [p.pid for p in self._procs if not p.is_alive()]
                raise RuntimeError(f"worker pool timed out (dead workers: {dead})") from None
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
            else:
                out[rank] = payload
        if errors:
            raise RuntimeError("task failed on a worker:\n" + "\n".join(errors))
        return [out[rank] for rank in range(self.world_size)]

    def run(self, fn, *args) -> list:
        for tasks in self._tasks:
            tasks.put((fn, args))
        return self._collect("ok")

    def close(self) -> None:
        for tasks in self._tasks:
            tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
