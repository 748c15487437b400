"""Which global vocab ids a TP rank's logits hold, and the check that the shards tile the vocab.

A rank's logits are the columns [vocab_start, vocab_start + width) of the global padded vocab
[0, vocab_size); ids in [real_vocab, vocab_size) are padding (Megatron pads to a multiple of
128 * TP; the tokenizer's own size is real_vocab). Megatron shards evenly. DeepSpeed AutoTP's
vocab-parallel lm_head gives uneven shards when TP does not divide V (V = 9 at TP = 2: 5 and 4
columns), so the layout is stated by the caller and only defaults to the even one.

Every rank's layout rides on the objective's MAX all-reduce (`layout_rows`), so each rank sees
all of them and `check_gathered` raises the same error on every rank, before the second
all-reduce: a bad layout or a bad label never leaves one rank raising while the others wait in a
collective.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# The layout travels in the statistics' dtype; fp32 holds integers exactly up to 2**24.
MAX_EXACT_ID = 1 << 24
ROW = 5  # vocab_start, width, vocab_size, real_vocab, bad label (0 / 1)

UNEVEN_FIX = (
    "for uneven shards pass each rank's vocab_start= (the global id of its first column) and "
    "the global vocab_size= (DeepSpeed AutoTP: lm_head.vocab_start_index and lm_head.vocab_size)"
)


@dataclass(frozen=True)
class VocabLayout:
    """This rank's slice of the vocab. `source` names where vocab_size came from (for errors)."""

    vocab_start: int
    width: int
    vocab_size: int
    real_vocab: int
    source: str = "vocab_size="

    @property
    def real_width(self) -> int:
        """Local columns that are real tokens; [real_width, width) is padding."""
        return min(max(self.real_vocab - self.vocab_start, 0), self.width)


def resolve_layout(
    width: int,
    tp_rank: int,
    tp_size: int,
    *,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    real_vocab_size: int | None = None,
    table_size: int | None = None,
    table_real: int | None = None,
) -> VocabLayout:
    """The layout from the caller's arguments, a NumberTable's sizes (table_size, table_real)
    and the even default (vocab_start = tp_rank * width, vocab_size = width * tp_size).

    Raises here only for what is the same on every rank (the global sizes); what differs per
    rank is checked after the MAX all-reduce by `check_gathered`.
    """
    for name, value in (("vocab_start", vocab_start), ("vocab_size", vocab_size),
                        ("real_vocab_size", real_vocab_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int or None, got {value!r}")
    if width < 1:
        raise ValueError(f"the logits hold {width} vocab columns on this rank; each needs >= 1")
    source = "vocab_size="
    if table_size is not None:
        if vocab_size is not None and vocab_size != table_size:
            raise ValueError(
                f"vocab_size={vocab_size} but the NumberTable has {table_size} entries; build it "
                f"with NumberTable.from_tokenizer(tokenizer, vocab_size={vocab_size})"
            )
        if real_vocab_size is not None and real_vocab_size != table_real:
            raise ValueError(
                f"real_vocab_size={real_vocab_size} but the NumberTable's tokenizer has "
                f"{table_real} ids (its valid_vocab_size); pass the tokenizer's size"
            )
        vocab_size, real_vocab_size, source = table_size, table_real, "the NumberTable"
    if vocab_start is None:
        if vocab_size is not None and tp_size > 1 and vocab_size % tp_size != 0:
            raise ValueError(
                f"the vocab size {vocab_size} is not divisible by the tensor-parallel size "
                f"{tp_size}; pad the vocab to a multiple of 128*TP (Megatron: "
                f"--make-vocab-size-divisible-by) and build the NumberTable with "
                f"vocab_size=<padded size>, or {UNEVEN_FIX}"
            )
        vocab_start = tp_rank * width
    if vocab_size is None:
        vocab_size = width * tp_size
    if real_vocab_size is None:
        real_vocab_size = vocab_size
    if not 1 <= real_vocab_size <= vocab_size:
        raise ValueError(
            f"real_vocab_size {real_vocab_size} must lie in [1, vocab_size={vocab_size}]"
        )
    if vocab_size > MAX_EXACT_ID:
        raise ValueError(f"vocab_size {vocab_size} is above the supported {MAX_EXACT_ID}")
    return VocabLayout(vocab_start, width, vocab_size, real_vocab_size, source)


def layout_rows(layout: VocabLayout, tp_rank: int, tp_size: int, bad_label: torch.Tensor,
                like: torch.Tensor) -> torch.Tensor:
    """[tp * ROW] in like's dtype: this rank's row filled in, every other row -1, so that a MAX
    all-reduce hands every rank all rows. bad_label: a 0-dim tensor, 1 if a label is bad."""
    rows = _rows_template(layout, tp_rank, tp_size, like.dtype, like.device).clone()
    rows[tp_rank, 4] = bad_label.to(like.dtype)
    return rows.flatten()


@functools.lru_cache(maxsize=64)
def _rows_template(layout: VocabLayout, tp_rank: int, tp_size: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """[tp, ROW] with this rank's layout, built (a host -> device copy) once per layout."""
    rows = torch.full((tp_size, ROW), -1.0, dtype=dtype)
    rows[tp_rank, :4] = torch.tensor(
        [layout.vocab_start, layout.width, layout.vocab_size, layout.real_vocab], dtype=dtype)
    return rows.to(device)


def layout_problem(rows: list[list[int]], source: str = "vocab_size=") -> str | None:
    """What is wrong with the ranks' layouts [[start, width, vocab, real, bad], ...], or None."""
    sizes = sorted({row[2] for row in rows})
    reals = sorted({row[3] for row in rows})
    if len(sizes) > 1 or len(reals) > 1:
        widths = [row[1] for row in rows]
        return (f"the TP ranks disagree on the global vocab: vocab_size {sizes}, real vocab "
                f"{reals} (columns per rank {widths}); pass the same vocab_size= and "
                f"real_vocab_size= on every rank; {UNEVEN_FIX}")
    vocab = sizes[0]
    spans = sorted((row[0], row[0] + row[1]) for row in rows)
    end = 0
    for start, stop in spans:
        if start != end:
            break
        end = stop
    else:
        if end == vocab:
            return None
    widths = {row[1] for row in rows}
    held = ", ".join(f"[{start}, {stop})" for start, stop in
                     ((row[0], row[0] + row[1]) for row in rows))
    if len(widths) == 1 and len(rows) * rows[0][1] != vocab:
        width = rows[0][1]
        return (f"logits hold {width} vocab columns per rank x TP={len(rows)} = "
                f"{width * len(rows)}, but {source} has {vocab} entries; build it with "
                f"NumberTable.from_tokenizer(tokenizer, vocab_size={width * len(rows)}) if that "
                f"is the model's padded vocab, or {UNEVEN_FIX}")
    return (f"the TP ranks' vocab shards {held} do not tile [0, {vocab}) without a gap or an "
            f"overlap; {UNEVEN_FIX}")


def check_gathered(gathered: torch.Tensor, tp_rank: int, source: str,
                   label_error: str | None) -> None:
    """Raise the same error on every rank for a bad layout, then for a bad label on any rank.

    gathered: [tp * ROW] after the MAX all-reduce. label_error: this rank's own message (None if
    its labels are fine). On CUDA the check is a device-side assert, with no host sync.
    """
    rows = gathered.reshape(-1, ROW)
    if gathered.is_cuda:
        _assert_on_device(rows)
        return
    values = [[int(v) for v in row] for row in rows.tolist()]
    problem = layout_problem(values, source)
    if problem is not None:
        raise ValueError(problem)
    flagged = [rank for rank, row in enumerate(values) if row[4] > 0]
    if flagged:
        raise ValueError(label_error or f"a label on TP rank {flagged[0]} is not a token id "
                                        f"in [0, {values[0][3]}) nor ignore_index; the TP ranks "
                                        f"must see the same labels")


def _assert_on_device(rows: torch.Tensor) -> None:
    starts, widths, sizes, reals, bad = rows.unbind(-1)
    order = torch.argsort(starts)
    starts, ends = starts[order], (starts + widths)[order]
    contiguous = (starts[1:] == ends[:-1]).all() & (starts[0] == 0) & (ends[-1] == sizes[0])
    agree = (sizes == sizes[0]).all() & (reals == reals[0]).all()
    torch._assert_async(contiguous & agree, f"the TP ranks' vocab shards do not tile the vocab; "
                                            f"{UNEVEN_FIX}")
    torch._assert_async(~(bad > 0).any(), "labels must be token ids below the real vocab size or "
                                          "ignore_index")
