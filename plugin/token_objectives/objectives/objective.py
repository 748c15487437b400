"""`Objective`: CE + NTL + PDL of one run, built once and called with data only.

    objective = Objective.build(config, tokenizer=..., frequencies=..., vocab_size=V)
    out = objective(logits, labels, tp_group=tp)             # logits [..., V/tp]
    out = objective.fused(hidden, weight, labels, tp_group=tp)  # no [..., V/tp] logits held

It holds the ObjectiveConfig, its tables (the NumberTable over the padded vocab V, the PDL
weights [V]), the vocab layout (V, the tokenizer's real size) and their device copies (its own
`DeviceTables`, made on first use), and checks them together once, when built. Every door (the
Megatron hook and Megatron-LM functions, the DeepSpeed section, the HF loss and fused head,
AutoTP, both loops, bench) builds one; `objective_loss` and `fused_linear_objective_loss` are
the functional forms, which build a new one per call (no device copies kept between calls).

Communication: forward, two all-reduces over tp_group (the statistics' MAX and SUM); backward,
none on the logits path; the fused head all-reduces grad_hidden [T, h] over TP (under sequence
parallelism: an all-gather of the hidden states forward, an all-gather and a reduce-scatter
backward instead).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.objectives.device_tables import DeviceTables
from token_objectives.objectives.loss import ObjectiveOutput, compose, prepare_targets
from token_objectives.objectives.tables import objective_tables, stated_vocab
from token_objectives.ops.fused_head import fused_linear_statistics
from token_objectives.ops.statistics import vocab_parallel_statistics
from token_objectives.tables.numbers import NumberTable
from token_objectives.tables.tokenizers import TokenizerLike


class Objective:
    """CE + NTL + PDL per token, vocab-parallel, for one model's vocabulary.

    config: which objectives and their settings. numbers: NumberTable over the padded vocab V
    (needed when config.uses_numbers). pdl_weights: fp32 [V] (needed when pdl_alpha > 0; see
    `build` for making both from a tokenizer and a frequency file).
    vocab_size: the global padded vocab V (default: the NumberTable's size, else the PDL
        table's, else the logits' width times the TP size at each call).
    real_vocab_size: the tokenizer's size; columns at or past it are padding, outside every
        softmax (default: the NumberTable's valid_vocab_size, else V).
    vocab_size / real_vocab_size as attributes: the sizes the tables state (None: unknown).
    """

    def __init__(self, config: ObjectiveConfig, numbers: NumberTable | None = None,
                 pdl_weights: torch.Tensor | None = None, *, vocab_size: int | None = None,
                 real_vocab_size: int | None = None) -> None:
        if config.uses_numbers and numbers is None:
            raise ValueError(f"{config.number_options()} needs a NumberTable; pass numbers= "
                             f"(or build with tokenizer=), or set ntl=None and "
                             f"gaussian_sigma=0")
        if config.pdl_alpha > 0 and pdl_weights is None:
            raise ValueError(
                "pdl_alpha > 0 needs pdl_weights: build them with "
                "token_objectives.tables.frequencies.pdl_weights(load_frequencies(path).counts, "
                "alpha), or build the objective with frequencies="
            )
        if pdl_weights is not None and config.pdl_alpha == 0:
            raise ValueError(
                "pdl_weights were given but pdl_alpha is 0: set pdl_alpha to the table's alpha, "
                "or drop pdl_weights"
            )
        self.config = config
        self.numbers = numbers
        self.pdl_weights = pdl_weights
        self.vocab_size, self.real_vocab_size = stated_vocab(numbers, pdl_weights, vocab_size,
                                                             real_vocab_size)
        # The real size as given: a table states its own, which the layout checks it against.
        self._layout = {"vocab_size": self.vocab_size, "real_vocab_size": real_vocab_size}
        self.tables = DeviceTables()

    @classmethod
    def build(cls, config: ObjectiveConfig, *, tokenizer: TokenizerLike | None = None,
              frequencies: str | os.PathLike | None = None, vocab_size: int | None = None,
              real_vocab_size: int | None = None, number_tokens: str = "auto",
              numbers: NumberTable | None = None) -> Objective:
        """The objective with the tables `config` asks for, made here.

        tokenizer: a local path or tokenizer object, for the number tokens (needed with NTL or
            the Gaussian target) and the identity the frequency file must have been counted
            with. frequencies: a `token-objectives count-frequencies` file (needed with
            pdl_alpha > 0). vocab_size: the model's padded V (default: the tokenizer's size).
        number_tokens: tables.numbers.NUMBER_TOKEN_MODES. numbers: a NumberTable made already
        (then the tokenizer only names the frequency file's identity). Missing tables fail here.
        """
        numbers, weights = objective_tables(config, tokenizer, frequencies, vocab_size,
                                            number_tokens, numbers)
        return cls(config, numbers, weights, vocab_size=vocab_size,
                   real_vocab_size=real_vocab_size)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, *,
                 tp_group: dist.ProcessGroup | None = None,
                 loss_mask: torch.Tensor | None = None, seq_dim: int = -1,
                 vocab_start: int | None = None, rows_per_chunk: int | None = None,
                 kernel: str | None = None, grad_in_place: bool = True) -> ObjectiveOutput:
        """Per-token objectives of this rank's logits shard.

        logits: [..., w], columns [vocab_start, vocab_start + w) of the global vocab, any float
            dtype; Megatron passes [s, b, V/tp]. labels: global target ids [...] (logits'
            leading shape), or config.ignore_index. tp_group: None when logits hold the whole
            vocab. loss_mask: float [...] multiplies every per-token output. seq_dim: labels'
            sequence axis (ntl="number" reads digit runs along it). vocab_start: this rank's
            first global id (default tp_rank * w, even shards). rows_per_chunk: tokens per
            chunk of [rows, w] fp32 work (default ~4 MiB). kernel: "auto" | "torch" | "triton"
            (None: $TOKEN_OBJECTIVES_KERNEL). grad_in_place: backward writes the logit gradient
            over the logits when they are an intermediate (as Megatron's CE does).
        Returns ObjectiveOutput of labels' shape; reduce with ObjectiveOutput.totals().
        """
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                f"logits must be labels' shape plus the vocab shard (transpose Megatron's "
                f"[b, s] labels to [s, b] for [s, b, V/tp] logits)"
            )
        if not logits.dtype.is_floating_point:
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        width = logits.shape[-1]
        tp_group = _real_group(tp_group)
        prep = self._prepare(labels, tp_group, width, logits.device, loss_mask, vocab_start)
        stats = vocab_parallel_statistics(
            logits.reshape(-1, width), prep.targets.flatten(), prep.target_values.flatten(),
            prep.shard, prep.columns, prep.distance, prep.real_vocab, tp_group, rows_per_chunk,
            kernel, prep.label_check, grad_in_place, prep.flat_target_groups(),
        )
        return self._compose(stats, prep, labels, loss_mask, seq_dim)

    def fused(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
              tp_group: dist.ProcessGroup | None = None,
              loss_mask: torch.Tensor | None = None, seq_dim: int = -1,
              vocab_start: int | None = None, rows_per_chunk: int | None = None,
              kernel: str | None = None, sequence_parallel: bool = False) -> ObjectiveOutput:
        """`self(hidden @ weight.T, labels, ...)` without materialising the logits.

        hidden: [..., h], labels' shape plus h (the same on every TP rank), or under sequence
            parallelism this rank's slice of labels' first dimension ([s/tp, b, h] against
            labels [s, b]; the head gathers the slices itself). weight: this rank's output-layer
            shard [w, h] (with tied embeddings, the word-embedding shard). rows_per_chunk:
            tokens per chunk; a chunk holds [rows, w] logits and their gradient (default 64 MiB
            of fp32). Other arguments as `__call__`. Gradients flow to hidden and weight.
        """
        tp_group = _real_group(tp_group)
        sequence_parallel = sequence_parallel and tp_group is not None
        expected = labels.shape
        if sequence_parallel:
            tp = dist.get_world_size(tp_group)
            if labels.dim() == 0 or labels.shape[0] % tp:
                raise ValueError(f"sequence parallelism splits labels' first dimension "
                                 f"{tuple(labels.shape)} over {tp} ranks, which does not "
                                 f"divide it")
            expected = torch.Size((labels.shape[0] // tp, *labels.shape[1:]))
        if hidden.shape[:-1] != expected:
            split = (f" with the first dimension split over the TP ranks ({tuple(expected)})"
                     if sequence_parallel else "")
            raise ValueError(f"hidden {tuple(hidden.shape)} must be labels' shape "
                             f"{tuple(labels.shape)}{split} plus the hidden size")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"weight {tuple(weight.shape)} must be this rank's output-layer shard "
                f"[V/tp, {hidden.shape[-1]}]"
            )
        prep = self._prepare(labels, tp_group, weight.shape[0], hidden.device, loss_mask,
                             vocab_start)
        stats = fused_linear_statistics(
            hidden.reshape(-1, hidden.shape[-1]), weight, prep.targets.flatten(),
            prep.target_values.flatten(), prep.shard, prep.columns, prep.distance,
            prep.real_vocab, tp_group, rows_per_chunk, kernel, prep.label_check,
            sequence_parallel, prep.flat_target_groups(),
        )
        return self._compose(stats, prep, labels, loss_mask, seq_dim)

    def _prepare(self, labels, tp_group, width, device, loss_mask, vocab_start):
        return prepare_targets(labels, self.config, self.numbers, self.pdl_weights, tp_group,
                               width, device, loss_mask, self.tables, vocab_start=vocab_start,
                               **self._layout)

    def _compose(self, stats, prep, labels, loss_mask, seq_dim) -> ObjectiveOutput:
        return compose(stats, prep, labels, self.config, self.numbers, self.pdl_weights,
                       loss_mask, seq_dim)


class ObjectiveDoor:
    """Base of the doors that hold one `Objective` and show its settings and tables: the
    Megatron `Objectives`, `AutoTPObjectives` and the HF `ObjectiveLoss` (self.objective)."""

    objective: Objective

    @property
    def config(self) -> ObjectiveConfig:
        return self.objective.config

    @property
    def numbers(self) -> NumberTable | None:
        return self.objective.numbers

    @property
    def pdl_weights(self) -> torch.Tensor | None:
        return self.objective.pdl_weights

    @property
    def vocab_size(self) -> int | None:
        return self.objective.vocab_size

    @property
    def real_vocab_size(self) -> int | None:
        return self.objective.real_vocab_size


def _real_group(tp_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """tp_group, or None for a group of one rank (nothing to reduce)."""
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        return None
    return tp_group


def objective_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    config: ObjectiveConfig,
    numbers: NumberTable | None,
    pdl_weights: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    *,
    vocab_size: int | None = None,
    real_vocab_size: int | None = None,
    **call_options,
) -> ObjectiveOutput:
    """`Objective(config, numbers, pdl_weights, vocab_size=, real_vocab_size=)(logits, labels,
    tp_group=tp_group, **call_options)`: the functional form, for code that calls it once.
    A run that calls it per micro-batch should build the Objective once (its device copies of
    the tables are kept between calls)."""
    objective = Objective(config, numbers, pdl_weights, vocab_size=vocab_size,
                          real_vocab_size=real_vocab_size)
    return objective(logits, labels, tp_group=tp_group, **call_options)


def fused_linear_objective_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    config: ObjectiveConfig,
    numbers: NumberTable | None,
    pdl_weights: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    *,
    vocab_size: int | None = None,
    real_vocab_size: int | None = None,
    **call_options,
) -> ObjectiveOutput:
    """`Objective(...).fused(hidden, weight, labels, tp_group=tp_group, **call_options)`: the
    functional form of the fused LM head + objectives (see `Objective.fused`)."""
    objective = Objective(config, numbers, pdl_weights, vocab_size=vocab_size,
                          real_vocab_size=real_vocab_size)
    return objective.fused(hidden, weight, labels, tp_group=tp_group, **call_options)
