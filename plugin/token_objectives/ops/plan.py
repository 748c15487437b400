"""What one call of the objective is, apart from its logits: the plain types and constants that
the torch stages (`statistics`), the Triton kernels (`triton_kernels`) and the fused LM head
(`fused_head`) share. Imports torch and `layout` only.

- `VocabShard`: which global ids this TP rank's logits [T, V/tp] hold, and its number tokens.
- `Columns`: the optional statistics to compute (so the SUM all-reduce carries only those).
- `Distance`: the Wasserstein ground distance D(v, u), with ntloss's optional squash.
- `LabelCheck`: this rank's label check, raised on every rank after the MAX all-reduce.
- `Plan`: all of the above plus the real vocab size, the rows per chunk and the kernel.
- `RowChunk`: the per-row tensors of one slice of rows (targets, and for backward the saved
  statistics and their upstream gradient), sliced chunk by chunk.
- `resolve_kernel`: "torch" stages or "triton" kernels for logits on a device in a dtype
  (`triton_launcher_problem`: whether Triton can launch here at all).

Column layouts: the partial sums are [T, SUM_COLUMNS = 7] (S, z_y, sum z, Q, E, W, M) and the
statistics [T, NUM_STATISTICS = 6] (lse, target, mean, yhat, was, mass). With Gaussian number
targets on (Columns.gaussian_sigma > 0) both gain columns, and only then: the sums
[T, 9] (..., G = sum_N g z, Z = sum_N g) and the statistics [T, 7] (..., soft = G / Z), where
g_j = exp(-(v_j - u)**2 / (2 sigma**2)) (`gaussian_weights`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from token_objectives.ops.layout import VocabLayout

NUM_STATISTICS = 6
SUM_COLUMNS = 7
GAUSSIAN_SUMS = (7, 8)  # G, Z
GAUSSIAN_STATISTIC = 6  # soft


def gaussian_weights(values: torch.Tensor, targets: torch.Tensor,
                     inv_sigma: float) -> torch.Tensor:
    """values [..., n] of number tokens, targets [..., 1] -> the un-normalised Gaussian target
    g = exp(-((v - u) / sigma)**2 / 2) [..., n]; inv_sigma = 1 / sigma."""
    offset = (values - targets) * inv_sigma
    return (-0.5 * offset * offset).exp()


@dataclass(frozen=True)
class Distance:
    """Ground distance D(v, u) of the Wasserstein term between number values v and the target u.

    Plain |v - u| by default. With ntloss's `squash_factor` s, non-zero distances are mapped
    affinely from [d_min, d_max] (the smallest non-zero and the largest distance between any two
    number values) onto [1, s], so the farthest number costs s times the nearest wrong one.
    """

    squash_min: float | None = None
    squash_scale: float = 1.0

    @classmethod
    def for_values(cls, number_values: torch.Tensor, squash_factor: float | None) -> Distance:
        """number_values: [N] the values of the number tokens (a NumberTable's finite ones)."""
        if squash_factor is None:
            return cls()
        values = number_values.double().unique()
        if values.numel() < 2:
            raise ValueError("squash_factor needs at least two distinct number values")
        diffs = (values[:, None] - values[None, :]).abs()
        d_min = diffs[diffs > 0].min().item()
        d_max = diffs.max().item()
        if d_max == d_min:
            # Every pair is equally far apart: ntloss divides by zero here; all distances are 1.
            return cls(squash_min=d_min, squash_scale=0.0)
        return cls(squash_min=d_min, squash_scale=(squash_factor - 1.0) / (d_max - d_min))

    def __call__(self, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """values [..., n], targets [..., 1] -> distances [..., n]."""
        diff = (values - targets).abs()
        if self.squash_min is None:
            return diff
        squashed = 1.0 + (diff - self.squash_min) * self.squash_scale
        return torch.where(diff == 0, torch.zeros_like(diff), squashed)

    def max_distance(self, number_values: torch.Tensor) -> float:
        """The largest distance between two of the number values [N]."""
        values = number_values.double()
        spread = (values.max() - values.min()).reshape(1)
        return float(self(spread, torch.zeros(1, dtype=spread.dtype)).item())


@dataclass(frozen=True)
class VocabShard:
    """What one TP rank needs to know about its slice of the vocabulary.

    layout: which global ids the shard holds, the global padded and real vocab sizes.
    real_width: local columns that are real tokens; [real_width, width) is vocab padding.
    number_cols: long [n] local column ids of number tokens; number_values: float32 [n].
    number_groups: int32 [n], each number token's group (its digit count) when NTL compares a
        target only with the number tokens of the target's group; None: one group for all.
    """

    layout: VocabLayout
    number_cols: torch.Tensor
    number_values: torch.Tensor
    number_groups: torch.Tensor | None = None

    @property
    def grouped(self) -> bool:
        return self.number_groups is not None

    @property
    def vocab_start(self) -> int:
        return self.layout.vocab_start

    @property
    def width(self) -> int:
        return self.layout.width

    @property
    def real_width(self) -> int:
        return self.layout.real_width


def vocab_shard(
    values: torch.Tensor | None, layout: VocabLayout, device: torch.device,
    groups: torch.Tensor | None = None,
) -> VocabShard:
    """The number tokens inside this rank's `layout`. values: [V] a value per global id, NaN
    for non-numbers (NumberTable.values); None: no number tokens. groups: int [V] the group of
    each number token (NumberTable.digit_counts of a grouped table), None: one group."""
    if values is None:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return VocabShard(layout, empty, empty.float())
    window = slice(layout.vocab_start, layout.vocab_start + layout.width)
    local_values = values[window]
    cols = torch.nonzero(~torch.isnan(local_values)).flatten()
    return VocabShard(
        layout=layout,
        number_cols=cols.to(device),
        number_values=local_values[cols].to(device=device, dtype=torch.float32),
        number_groups=None if groups is None else groups[window][cols].to(
            device=device, dtype=torch.int32),
    )


@dataclass(frozen=True)
class Columns:
    """Which optional statistics to compute; the SUM all-reduce carries only these."""

    numbers: bool = False  # yhat and mass (and the denominators they need)
    wasserstein: bool = False
    mean_logit: bool = False
    # sigma of the Gaussian number target (0: off): the soft statistic, G and Z summed.
    gaussian_sigma: float = 0.0

    @property
    def gaussian(self) -> bool:
        return self.gaussian_sigma > 0

    @property
    def sum_width(self) -> int:
        """Columns of the partial sums: 7, or 9 with the Gaussian target."""
        return SUM_COLUMNS + (len(GAUSSIAN_SUMS) if self.gaussian else 0)

    @property
    def stat_width(self) -> int:
        """Columns of the statistics: 6, or 7 with the Gaussian target."""
        return NUM_STATISTICS + (1 if self.gaussian else 0)

    def summed(self) -> list[int]:
        """Indices of the [T, sum_width] partial-sum columns that these statistics need."""
        needed = [0, 1]
        if self.mean_logit:
            needed.append(2)
        if self.numbers:
            needed += [3, 4, 5, 6] if self.wasserstein else [3, 4, 6]
        if self.gaussian:
            needed += list(GAUSSIAN_SUMS)
        return sorted(needed)


@dataclass(frozen=True)
class LabelCheck:
    """The outcome of this rank's label check, raised after the MAX all-reduce under TP so that
    every rank raises it together. bad: 0-dim, 1 where a label is out of range (no host sync on
    the GPU); message: the error (CPU only; None when the labels are fine)."""

    bad: torch.Tensor | None = None
    message: str | None = None


@dataclass(frozen=True)
class Plan:
    """Everything about one call but the tensors: this rank's shard, the statistics to compute,
    the Wasserstein distance, the real (unpadded) vocab size and the rows per chunk."""

    shard: VocabShard
    columns: Columns
    distance: Distance
    real_vocab: int
    rows: int
    kernel: str = "torch"  # "torch" stages or the "triton" kernels (see resolve_kernel)
    labels: LabelCheck = LabelCheck()


KERNELS = ("auto", "torch", "triton")
KERNEL_ENV = "TOKEN_OBJECTIVES_KERNEL"


def resolve_kernel(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """"torch" or "triton" for logits on `device` in `dtype`.

    requested None reads $TOKEN_OBJECTIVES_KERNEL (default "auto"). "auto" takes the Triton
    kernels on CUDA when triton is importable, the logits are not fp64 and Triton's launcher
    can be built and loaded here (`triton_launcher_problem`); else the torch stages, with one
    warning when only the launcher is missing. "triton" insists, and also runs on CPU under
    Triton's interpreter (TRITON_INTERPRET=1, for tests).
    """
    requested = requested or os.environ.get(KERNEL_ENV) or "auto"
    if requested not in KERNELS:
        raise ValueError(
            f"unknown kernel {requested!r}: pass kernel= (or set ${KERNEL_ENV}) to one of "
            f"{', '.join(KERNELS)}"
        )
    if requested == "torch":
        return "torch"
    has_triton = importlib.util.find_spec("triton") is not None
    runs_here = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if requested == "auto":
        if not (has_triton and device.type == "cuda" and dtype != torch.float64):
            return "torch"
        problem = triton_launcher_problem()
        if problem is not None:
            _warn_torch_stages(problem)
            return "torch"
        return "triton"
    if dtype == torch.float64:
        raise ValueError("the Triton kernels accumulate in fp32: use kernel='torch' for fp64")
    if not has_triton:
        raise ValueError("kernel='triton' needs the triton package: pip install triton")
    if not runs_here:
        raise ValueError(
            f"kernel='triton' with logits on {device.type}: Triton runs on CUDA, or on CPU "
            f"under its interpreter (set TRITON_INTERPRET=1); else use kernel='torch'"
        )
    return "triton"


@functools.lru_cache(maxsize=1)
def triton_launcher_problem() -> str | None:
    """Why Triton could not launch a kernel here, or None. Triton builds a small C launcher the
    first time a kernel runs, with a C compiler against Python's headers, and links it to
    libcuda: without them a job would fail at its first step, long after it was queued."""
    compiler = os.environ.get("CC") or shutil.which("clang") or shutil.which("gcc")
    if not compiler:
        return "no C compiler for Triton's launcher (install gcc, or set $CC)"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python.h in {include!r} for Triton's launcher (install python3-dev)"
    try:
        from triton.backends.nvidia.driver import libcuda_dirs

        dirs = libcuda_dirs()
    except Exception as error:  # noqa: BLE001 - any failure to find libcuda means no launch
        reason = " ".join(str(error).split()) or type(error).__name__
    else:
        if any(os.path.exists(os.path.join(path, "libcuda.so.1")) for path in dirs):
            return None
        reason = f"not in {dirs}"
    return f"Triton cannot find libcuda.so.1 ({reason}; set $TRITON_LIBCUDA_PATH to its folder)"


@functools.lru_cache(maxsize=1)
def _warn_torch_stages(problem: str) -> None:
    warnings.warn(f"kernel='auto' runs the torch stages, not the Triton kernels: {problem}",
                  RuntimeWarning, stacklevel=3)


# Rows per chunk are chosen so that a chunk's fp32 working copy stays near this many elements
# (4 MiB in fp32): large enough that per-chunk overhead is small, small enough to stay in cache.
CHUNK_ELEMENTS = 1 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits; fp64 stays fp64 (for gradcheck and references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(width: int, rows: int | None = None, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk: `rows` if given, else as many as fit `elements` (at least 1)."""
    return max(1, rows if rows is not None else elements // max(width, 1))


def row_chunks(total: int, rows: int) -> Iterator[slice]:
    """The slices [start, start + rows) that cover [0, total)."""
    for start in range(0, total, rows):
        yield slice(start, min(start + rows, total))


@dataclass(frozen=True)
class RowChunk:
    """The per-row tensors of one slice of t rows, besides its logits [t, V/tp].

    targets: long [t] global ids (in range; ignored positions already mapped to 0).
    target_values: [t] the target's value, 0 where it is not a number.
    Backward only (None in forward), in the accumulation dtype: stats [t, 6 or 7] the
    statistics, log_q [t] log sum_N exp(z) (`statistics.number_log_normaliser`), grads [t, 6 or
    7] the upstream gradient of stats, gauss_scale [t] 1 / Z (the Gaussian target's normaliser,
    0 where Z = 0; None when the target is off).
    target_groups: int32 [t] with a grouped shard: the target's group; the row's number
    softmax, its mass and the Gaussian target cover only the number tokens of that group (-1,
    a target that is no number: every number token). None otherwise.

    A whole batch's RowChunk indexed by a slice of rows is that chunk's.
    """

    targets: torch.Tensor
    target_values: torch.Tensor
    stats: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    grads: torch.Tensor | None = None
    gauss_scale: torch.Tensor | None = None
    target_groups: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> RowChunk:
        return RowChunk(*(None if t is None else t[rows] for t in (
            self.targets, self.target_values, self.stats, self.log_q, self.grads,
            self.gauss_scale, self.target_groups)))

    def backward_rows(self, stats, log_q, grads, gauss_scale) -> RowChunk:
        """These rows with what backward adds: the saved statistics and their gradient."""
        return RowChunk(self.targets, self.target_values, stats, log_q, grads, gauss_scale,
                        self.target_groups)

    def __len__(self) -> int:
        return self.targets.shape[0]
