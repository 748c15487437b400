"""Choosing tokens from vocab-parallel logits without gathering the vocabulary.

Each tensor-parallel (TP) rank holds a logits shard z[..., j] for the global ids j in
[vocab_start, vocab_start + V/tp). Both choices below reduce the shard to one int64 key per row,
then make ONE all-reduce (MAX over the TP group, int64 [rows]); at TP = 1 they make none:

- `vocab_parallel_argmax`: the key packs (the value as an order-preserving integer, the id
  reversed), so the maximum key is the largest value and, among equal values, the LOWEST global
  id: exactly torch.argmax on the gathered vocab, ties included, whatever the TP size.
- `vocab_parallel_sample`: Gumbel-max, argmax_j z_j / t + g_j. The Gumbel noise g_j is a pure
  function of (seed, position, global id j) computed with integer and IEEE +, -, *, / ops only
  (no library log/exp, whose last bit may differ between vectorised and scalar code), so TP = 1,
  2 and 4 draw bit-identical noise and pick the same tokens.

Vocabulary padding: columns with global id >= real_vocab are never chosen. Padding is a suffix
of the global vocab, so it is a suffix of each shard and is simply sliced off.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["counter_uniform", "stream_seed", "vocab_parallel_argmax", "vocab_parallel_sample"]

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_LN2 = 0.6931471805599453
_SQRT2 = 1.4142135623730951
# Elements per noise chunk: bounds the int64 temporaries of `vocab_parallel_sample` (~8 of them).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


# ------------------------------------------------------------------------- counter-based noise


def _splitmix64(value: int) -> int:
    """One splitmix64 output for a Python int state (exact, mod 2**64)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stream_seed(*parts: int | str) -> int:
    """A 64-bit seed from (run seed, step, stream name, ...): a different stream per use."""
    value = 0
    for part in parts:
        data = part.encode() if isinstance(part, str) else int(part).to_bytes(16, "little",
                                                                               signed=True)
        for start in range(0, len(data), 8):
            value = _splitmix64(value ^ int.from_bytes(data[start:start + 8], "little"))
    return value


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32), with no int64 overflow."""
    low = (x & 0xFFFF) * constant
    high = ((x >> 16) * constant) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit bijective integer hash (Wellons' lowbias32) on int64 lanes in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_keys(seed: int, positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-row hashes of (seed, position) [N], and the seed's key for the column hash."""
    words = [_splitmix64(seed + i) & _MASK32 for i in range(3)]
    # No host sync on a GPU: the check fails asynchronously there.
    torch._assert_async((positions >= 0).all(), "positions must be >= 0 (global token counters)")
    rows = _mix32((positions & _MASK32) ^ words[0])
    rows = _mix32(rows ^ (positions >> 32) ^ words[1])
    return rows, words[2]


def _uniform_from(rows: torch.Tensor, column_key: int, ids: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1): (2k + 1) / 2**24 with k the hash's top 23 bits (exact)."""
    mixed = _mix32(rows[:, None] ^ _mix32(ids ^ column_key)[None, :])
    mixed = _mix32((mixed + rows[:, None]) & _MASK32)  # breaks the xor symmetry of rows and ids
    return ((mixed >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def counter_uniform(seed: int, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Uniforms u[n, c] in (0, 1), a pure function of (seed, positions[n], ids[c]).

    positions: [N] int64 >= 0 (e.g. global sample index * seq_length + token position);
    ids: [C] int64 in [0, 2**32) (global vocab ids). Float32 with 23 random bits; never 0 or 1.
    The same on every device and for any batching of the rows or columns.
    """
    rows, column_key = _row_keys(seed, positions.to(torch.int64).reshape(-1))
    return _uniform_from(rows, column_key, ids.to(torch.int64).reshape(-1))


def deterministic_log(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float32 values from +, -, *, / and bit operations only.

    x = m * 2**e with m in [sqrt(2)/2, sqrt(2)); log m = 2 atanh(s), s = (m - 1) / (m + 1),
    |s| <= 0.172, series to s**9 (error < 1e-9, below float32 rounding). Every op is IEEE
    correctly rounded and each is its own kernel (no FMA contraction), so the result does not
    depend on SIMD vs scalar code paths; the same is expected on a GPU (checked on CPU only).
    """
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) - 127
    mantissa = ((bits & 0x7FFFFF) | (127 << 23)).to(torch.int32).view(torch.float32)
    high = mantissa > _SQRT2
    mantissa = torch.where(high, mantissa * 0.5, mantissa)
    exponent = (exponent + high.to(torch.int64)).to(torch.float32)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = s2 * (2.0 / 9.0) + (2.0 / 7.0)
    for coefficient in (2.0 / 5.0, 2.0 / 3.0, 2.0):
        series = series * s2 + coefficient
    return exponent * _LN2 + series * s


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """g = -log(-log u): with u in [2**-24, 1 - 2**-24], g lies in [-2.81, 16.6]."""
    return -deterministic_log(-deterministic_log(uniform))


# --------------------------------------------------------------------------------- the choice


def _shard_layout(logits: torch.Tensor, tp_group, vocab_start: int | None,
                  real_vocab: int | None) -> tuple[int, int]:
    """(global id of the shard's first column, number of real (unpadded) columns)."""
    width = logits.shape[-1]
    if vocab_start is None:
        rank = dist.get_rank(tp_group) if tp_group is not None else 0
        vocab_start = rank * width
    real = width if real_vocab is None else min(max(real_vocab - vocab_start, 0), width)
    if vocab_start + width > _MASK32:
        raise ValueError(f"vocab ids up to {vocab_start + width} do not fit the 32-bit key")
    return vocab_start, real


def _packed_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by (value, then LOWER id): value's order-preserving int32 bits in the
    high half, 2**32 - 1 - id in the low half. values: float32 [N], ids: int64 [N]."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse order
    return ordered * (1 << 32) + (_MASK32 - ids)


def _local_best(scores: torch.Tensor, first_id: int) -> torch.Tensor:
    """scores [N, C] (bf16/fp16/fp32) -> packed key of each row's max (first index among equals).

    The argmax runs in the scores' own dtype (no float32 copy of a bf16 shard); only the N
    maxima are widened, exactly.
    """
    index = scores.argmax(dim=-1)
    values = scores.gather(-1, index[:, None]).squeeze(-1).float()
    return _packed_keys(values, index + first_id)


def _reduce_keys(keys: torch.Tensor, tp_group) -> torch.Tensor:
    """The one collective: all-reduce MAX of the packed keys; returns the global ids."""
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(keys, op=dist.ReduceOp.MAX, group=tp_group)
    return _MASK32 - (keys & _MASK32)


def vocab_parallel_argmax(logits: torch.Tensor, tp_group=None, *, vocab_start: int | None = None,
                          real_vocab: int | None = None) -> torch.Tensor:
    """Global argmax ids [...] of vocab-sharded logits [..., V/tp] (any float dtype).

    Equal to torch.argmax over the gathered, unpadded vocab: ties go to the lowest global id.
    Values are compared as float32 (exact for bf16/fp16/fp32 logits; fp64 is rounded first).
    vocab_start: the global id of this shard's column 0 (default tp_rank * V/tp).
    real_vocab: ids >= real_vocab are padding and never chosen (default: none is padding).
    Collectives: one all-reduce (MAX, int64 [rows]) when tp_group has > 1 rank, else none.
    """
    start, real = _shard_layout(logits, tp_group, vocab_start, real_vocab)
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype == torch.float64:
        flat = flat.float()  # the key holds float32 values: compare what every rank compares
    if real > 0:
        keys = _local_best(flat[:, :real], start)
    else:
        keys = torch.full((flat.shape[0],), _INT64_MIN, dtype=torch.int64, device=flat.device)
    return _reduce_keys(keys, tp_group).reshape(logits.shape[:-1])


def vocab_parallel_sample(logits: torch.Tensor, temperature: float, seed: int, tp_group=None, *,
                          positions: torch.Tensor | None = None, vocab_start: int | None = None,
                          real_vocab: int | None = None,
                          chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Global ids [...] drawn from softmax(z / temperature) over the vocab, by Gumbel-max.

    logits: [..., V/tp] this rank's shard. seed: a 64-bit int (e.g. stream_seed(run_seed, step,
    "sample")). positions: [...] int64 >= 0, one counter per row that names the token being
    drawn (e.g. global sample index * seq_length + position); default 0, 1, 2, ... over the
    flattened rows. The noise of (seed, position, global id) does not depend on the TP size,
    the shard or the chunking, so every layout draws the same tokens.
    The float32 noise has 23 random bits: a token more than ~19.4 below the best z / t is never
    drawn (its probability is < 4e-9). The noise is built in chunks of at most chunk_elements.
    Collectives: one all-reduce (MAX, int64 [rows]) when tp_group has > 1 rank, else none.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use vocab_parallel_argmax for greedy), "
                         f"got {temperature}")
    start, real = _shard_layout(logits, tp_group, vocab_start, real_vocab)
    flat = logits.reshape(-1, logits.shape[-1])
    rows = flat.shape[0]
    if positions is None:
        positions = torch.arange(rows, device=flat.device)
    positions = positions.to(device=flat.device, dtype=torch.int64).reshape(-1)
    if positions.numel() != rows:
        raise ValueError(f"positions has {positions.numel()} entries for {rows} rows of logits")
    keys = torch.full((rows,), _INT64_MIN, dtype=torch.int64, device=flat.device)
    if real == 0 or rows == 0:
        return _reduce_keys(keys, tp_group).reshape(logits.shape[:-1])
    row_keys, column_key = _row_keys(seed, positions)
    columns = max(1, min(real, chunk_elements))
    rows_per_chunk = max(1, chunk_elements // columns)
    for first_column in range(0, real, columns):
        last_column = min(first_column + columns, real)
        ids = torch.arange(start + first_column, start + last_column, device=flat.device)
        for first_row in range(0, rows, rows_per_chunk):
            chosen = slice(first_row, first_row + rows_per_chunk)
            scores = flat[chosen, first_column:last_column].float()
            if temperature != 1.0:
                scores = scores / temperature
            scores = scores + _gumbel(_uniform_from(row_keys[chosen], column_key, ids))
            keys[chosen] = torch.maximum(keys[chosen], _local_best(scores, start + first_column))
    return _reduce_keys(keys, tp_group).reshape(logits.shape[:-1])
