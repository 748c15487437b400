"""Batch-scheduled sampling on a batch: which inputs may be replaced, which are, and the mix.

The training loops (Megatron and DeepSpeed) run a no-grad forward pass over the ground-truth
batch, turn its logits into one token per position (`ScheduledSampler.predict`), and train on
`ScheduledSampler.mix`'s inputs: input i (i >= 1) becomes the prediction made at position i - 1
with probability p. The labels stay the ground truth.

Never replaced (kept as the ground truth):
- position 0 of each sample (no prediction exists for it);
- document boundaries: an EOD input, and the input right after an EOD (the first token of a
  document is not conditioned on anything the model could have generated);
- inputs whose previous label is not trained on: input i holds label i - 1, so it is eligible
  only where loss_mask[i - 1] is 1 (padding, prompt tokens under a loss mask);
- padding ids;
- a prediction equal to EOD: inserting a document boundary the data does not have would cut the
  context, so the ground truth stays there (it counts as not replaced).

Randomness is counter-based (see sampling.counter_uniform): the Bernoulli draw of input i of the
sample with global index n at step t is a function of (run seed, t, n * seq_length + i) only,
so it does not depend on the DP / TP / PP layout or the micro-batch split, and a resumed run
draws the same. Nothing touches torch's RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from token_objectives.ops.sampling import (
    counter_uniform,
    stream_seed,
    vocab_parallel_argmax,
    vocab_parallel_sample,
)
from token_objectives.scheduled_sampling.schedule import ScheduledSamplingConfig

__all__ = ["LOG_NAMES", "ScheduledSampler", "eligible_inputs", "mix_inputs", "sample_indices",
           "select_inputs"]

# Logged per step (metrics.jsonl keys, TensorBoard tags).
LOG_NAMES = ("sampling/p", "sampling/replaced_of_eligible", "sampling/replaced_of_all",
             "sampling/changed_of_all")


def sample_indices(step: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                   num_micro: int) -> torch.Tensor:
    """Global sample indices [num_micro, mbs] of this DP rank's micro-batches at `step`.

    The order of gpt_data.micro_batches: step * global_batch + micro * (mbs * dp) + dp_rank * mbs
    + i (a test keeps the two in step).
    """
    mbs = micro_batch_size
    base = step * mbs * dp_size * num_micro
    micro = torch.arange(num_micro)[:, None] * (mbs * dp_size)
    return base + micro + dp_rank * mbs + torch.arange(mbs)[None, :]


def token_positions(sample_ids: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Global token counters [b, s]: sample index * seq_length + position."""
    return sample_ids[:, None].to(torch.int64) * seq_length + torch.arange(
        seq_length, device=sample_ids.device)


def eligible_inputs(tokens: torch.Tensor, eod: int | None, loss_mask: torch.Tensor | None = None,
                    pad_id: int | None = None) -> torch.Tensor:
    """Which inputs [b, s] may be replaced (bool): see the module docstring for the rules."""
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    eligible[:, 0] = False
    if eod is not None:
        at_eod = tokens == eod
        eligible &= ~at_eod
        eligible[:, 1:] &= ~at_eod[:, :-1]
    if pad_id is not None:
        eligible &= tokens != pad_id
    if loss_mask is not None:
        eligible[:, 1:] &= loss_mask[:, :-1].to(tokens.device) != 0
    return eligible


def select_inputs(p: float, seed: int, positions: torch.Tensor) -> torch.Tensor:
    """Bernoulli(p) draws [...] (bool), one per global token counter in `positions` [...]."""
    ids = torch.zeros(1, dtype=torch.int64, device=positions.device)
    uniform = counter_uniform(seed, positions.reshape(-1), ids)
    return (uniform[:, 0] < p).reshape(positions.shape)


def mix_inputs(tokens: torch.Tensor, predictions: torch.Tensor, replace: torch.Tensor,
               eod: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed inputs [b, s], replaced [b, s] bool).

    tokens: ground-truth inputs [b, s]. predictions: [b, s], the token chosen from the logits
    at each position (predictions[:, i] is the guess for input i + 1). replace: [b, s] bool,
    eligible & selected. A predicted EOD is not inserted (the ground truth stays).
    """
    candidates = torch.empty_like(tokens)
    candidates[:, 0] = tokens[:, 0]
    candidates[:, 1:] = predictions[:, :-1].to(tokens.device, tokens.dtype)
    replaced = replace.clone()
    if eod is not None:
        replaced &= candidates != eod
    return torch.where(replaced, candidates, tokens), replaced


class ScheduledSampler:
    """What a training loop needs for batch-scheduled sampling.

    real_vocab: the tokenizer's vocab size (ids at and above it are padding, never chosen).
    run_seed: the run's seed; every draw is keyed by (run_seed, step, global token counter).
    """

    def __init__(self, config: ScheduledSamplingConfig, run_seed: int, eod: int | None,
                 real_vocab: int, pad_id: int | None = None) -> None:
        self.config = config
        self.run_seed = run_seed
        self.eod = eod
        self.real_vocab = real_vocab
        self.pad_id = pad_id if pad_id is not None and pad_id >= 0 else None

    def probability(self, step: int) -> float:
        """p for 0-based optimizer step `step`; 0 means: skip the prediction pass entirely."""
        return self.config.probability(step)

    def predict(self, logits: torch.Tensor, tp_group, step: int,
                sample_ids: torch.Tensor, vocab_start: int | None = None) -> torch.Tensor:
        """Token ids [b, s] from this rank's logits shard [b, s, V/tp] (no vocab gather).

        sample_ids: [b] global sample indices (they key the sampling noise).
        vocab_start: the global id of the shard's first column (default: the even layout).
        Collectives: one all-reduce over tp_group (none without one).
        """
        if self.config.mode == "argmax":
            return vocab_parallel_argmax(logits, tp_group, vocab_start=vocab_start,
                                         real_vocab=self.real_vocab)
        positions = token_positions(sample_ids.to(logits.device), logits.shape[1])
        return vocab_parallel_sample(logits, self.config.temperature,
                                     stream_seed(self.run_seed, step, "sample"), tp_group,
                                     positions=positions, vocab_start=vocab_start,
                                     real_vocab=self.real_vocab)

    def mix(self, batch: Mapping[str, torch.Tensor], predictions: torch.Tensor, step: int,
            sample_ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """(the batch with mixed "tokens", counts [eligible, replaced, changed, all] float64).

        batch: "tokens" [b, s] and, when present, "loss_mask" [b, s]; the rest is kept as is.
        predictions: [b, s] from `predict`. changed: replaced by a token other than the truth.
        """
        tokens = batch["tokens"]
        eligible = eligible_inputs(tokens, self.eod, batch.get("loss_mask"), self.pad_id)
        positions = token_positions(sample_ids.to(tokens.device), tokens.shape[1])
        selected = select_inputs(self.probability(step),
                                 stream_seed(self.run_seed, step, "select"), positions)
        mixed, replaced = mix_inputs(tokens, predictions, eligible & selected, self.eod)
        counts = torch.stack([eligible.sum(), replaced.sum(), (mixed != tokens).sum(),
                              torch.tensor(tokens.numel(), device=tokens.device)])
        return {**batch, "tokens": mixed}, counts.to(torch.float64)

    def mix_step(self, batches: list[dict], step: int, sample_ids: list[torch.Tensor],
                 predict: Callable[[list[dict], list[torch.Tensor]], list[torch.Tensor]],
                 dp_group=None) -> tuple[list[dict], dict[str, float]]:
        """A step's micro-batches with scheduled-sampling inputs, and the LOG_NAMES values.

        sample_ids: [b] global sample indices per micro-batch; predict(batches, sample_ids):
        the predicted ids [b, s] per micro-batch (the loop's no-grad pass), called only when
        p > 0. At p = 0 the batches come back untouched. Collectives when p > 0: predict's and
        one all-reduce of the counts over dp_group.
        """
        p = self.probability(step)
        if p == 0.0:
            return batches, self.log_values(p, None)
        mixed, total = [], None
        predictions = predict(batches, sample_ids)
        for batch, prediction, ids in zip(batches, predictions, sample_ids, strict=True):
            batch, counts = self.mix(batch, prediction, step, ids)
            mixed.append(batch)
            total = counts if total is None else total + counts
        dist.all_reduce(total, group=dp_group)
        return mixed, self.log_values(p, total)

    @staticmethod
    def log_values(p: float, counts: torch.Tensor | None) -> dict[str, float]:
        """The LOG_NAMES values from the counts summed over a global batch (None: nothing was
        replaced, e.g. p = 0)."""
        if counts is None:
            return dict(zip(LOG_NAMES, (p, 0.0, 0.0, 0.0), strict=True))
        eligible, replaced, changed, total = counts.tolist()
        return dict(zip(LOG_NAMES, (p, replaced / max(eligible, 1.0), replaced / max(total, 1.0),
                                    changed / max(total, 1.0)), strict=True))
