"""GaC token-level ensembling of causal LMs with different vocabularies (arXiv 2406.12585).

At each step every model gives its next-token distribution over its own vocabulary; the ensemble
maps them into the union vocabulary (`UnionVocab`, keyed by bytes), mixes them with per-model
weights, picks one union token (argmax, or a seeded sample), appends its bytes to the shared text,
and extends every model's own ids to match (`TokenTrack`). Each model keeps its own KV cache,
cropped where re-tokenisation changed its ids.

Probabilities: model m's softmax p_m over its vocabulary is summed into the union (ids spelling
the same bytes add up), its mass on dropped special tokens is removed and the rest renormalised
to q_m (a distribution over the union). The ensemble is the convex mix
    p(u) = sum_m w_m q_m(u) / sum_m w_m
over the models taking part in the step; a token only some models have gets mass only from them
(the others vote 0 for it), and p sums to 1 with no further renormalisation. Sampling applies the
temperature to p: p_T(u) is proportional to p(u) ** (1 / T).

Key-token gate: with `threshold` < 1 the primary model (model 0) decides alone whenever its top
union probability is above the threshold; the other models skip their forward pass, their ids
are still extended, and they catch up in one forward over the pending ids at the next ensembled
step. threshold=1.0 ensembles every step; threshold=0.0 never does (the primary alone).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from token_objectives.ensemble.tokens import TokenTrack
from token_objectives.ensemble.vocab import UnionVocab
from token_objectives.tables.errors import InputError

__all__ = [
    "EnsembleConfig",
    "EnsembleOutput",
    "GaCEnsemble",
    "ModelRunner",
    "UnionVocab",
    "check_weights",
    "mix_distributions",
]


def check_weights(weights, num_models: int) -> list[float]:
    """Validate per-model weights; returns them as floats (not normalised)."""
    weights = [float(w) for w in weights]
    if len(weights) != num_models:
        raise InputError(
            f"got {len(weights)} weights for {num_models} models: pass one weight per model, "
            "in the order of the models"
        )
    for i, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise InputError(
                f"weight {weight} of model {i} is not a finite number >= 0: weights are mixing "
                "proportions, use 0 to leave a model out of the mix"
            )
    if sum(weights) == 0:
        raise InputError("all weights are 0: give at least one model a positive weight")
    return weights


def mix_distributions(union_probs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_m w_m q_m / sum_m w_m for union distributions q_m [V_union] (weights not normalised)."""
    total = sum(weights)
    mixed = torch.zeros_like(union_probs[0])
    for probs, weight in zip(union_probs, weights, strict=True):
        mixed += (weight / total) * probs.to(mixed.device)
    return mixed


@dataclass(frozen=True)
class EnsembleConfig:
    """weights: one per model (any scale, >= 0); threshold: the key-token gate in [0, 1].

    sample=False picks the argmax; sample=True samples with `temperature` from a generator seeded
    with `seed` at the start of each `generate` call.
    """

    weights: tuple[float, ...]
    threshold: float = 1.0
    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(
                f"threshold {self.threshold} is outside [0, 1]: 1.0 ensembles every step, 0.0 "
                "never, e.g. 0.5 ensembles when the primary model's top probability is <= 0.5"
            )
        if self.sample and not self.temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class EnsembleOutput:
    """One prompt's result.

    text: the generated text (undecodable bytes replaced); text_bytes: the exact bytes.
    union_ids: the chosen union tokens, EOS excluded. stop_reason: "eos" | "length".
    steps: tokens chosen (the EOS step included); gated_steps: chosen by the primary alone.
    forward_passes: per model, the forward calls made for this prompt.
    model_ids: per model, its final ids (prompt included).
    """

    text: str
    text_bytes: bytes
    union_ids: list[int]
    stop_reason: str
    steps: int
    gated_steps: int
    forward_passes: list[int]
    model_ids: list[list[int]] = field(default_factory=list)

    @property
    def gated_fraction(self) -> float:
        return self.gated_steps / self.steps if self.steps else 0.0


class ModelRunner:
    """A causal LM with its own KV cache over a growing, sometimes rewritten, id sequence.

    Forwards only the ids past the cached prefix (one call however many are pending) and counts
    the calls in `forward_passes`.
    """

    def __init__(self, model):
        self.model = model
        self.device = getattr(model, "device", None) or next(model.parameters()).device
        # Only the last position's logits are needed: HF models can skip the others' LM head.
        parameters = inspect.signature(model.forward).parameters
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.forward_passes = 0
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.cached_len = 0
        self._logits = None
        self._logits_len = -1

    def invalidate_from(self, position: int) -> None:
        """Ids from `position` on changed: drop their cached keys and values."""
        if position < self.cached_len:
            self._crop(position)

    def next_token_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [V] for the token after `ids`."""
        if self._logits_len == self.cached_len == len(ids):
            return self._logits
        start = 0 if self.cache is None else min(self.cached_len, len(ids) - 1)
        if start < self.cached_len:
            self._crop(start)
        pending = torch.tensor([ids[start:]], dtype=torch.long, device=self.device)
        output = self.model(
            input_ids=pending, past_key_values=self.cache, use_cache=True, **self._extra
        )
        self.forward_passes += 1
        self.cache = getattr(output, "past_key_values", None)
        self.cached_len = self._logits_len = len(ids)
        self._logits = output.logits[0, -1].clone()  # not a view that keeps [T, V] alive
        return self._logits

    def _crop(self, length: int) -> None:
        self._logits_len = -1
        if self.cache is None or length == 0:
            self.cache, self.cached_len = None, 0
            return
        try:
            self.cache.crop(length - self.cache.get_seq_length())  # negative: tokens to remove
            kept = self.cache.get_seq_length()
        except (AttributeError, ValueError, NotImplementedError):
            kept = -1
        if kept != length:  # a cache that cannot be cut back exactly is recomputed instead
            self.cache, length = None, 0
        self.cached_len = length


class GaCEnsemble:
    """Generate with N causal LMs and their (different) tokenizers as one model.

    models, tokenizers: in the same order; model 0 is the primary (the gate's model).
    eos_ids: per model, extra EOS ids (e.g. from its generation_config).
    """

    def __init__(self, models, tokenizers, config: EnsembleConfig, eos_ids=None, names=None):
        if len(models) != len(tokenizers):
            raise ValueError(f"got {len(models)} models but {len(tokenizers)} tokenizers")
        self.names = names or [f"model {i}" for i in range(len(models))]
        self.weights = check_weights(config.weights, len(models))
        self.config = config
        self.tokenizers = list(tokenizers)
        self.union = UnionVocab.from_tokenizers(self.tokenizers, eos_ids, self.names)
        self.runners = [ModelRunner(model) for model in models]

    @torch.inference_mode()
    def generate(self, prompt: str) -> EnsembleOutput:
        """Generate up to max_new_tokens union tokens after `prompt`."""
        config = self.config
        tracks = self.start(prompt)
        passes_before = [runner.forward_passes for runner in self.runners]
        generator = torch.Generator().manual_seed(config.seed) if config.sample else None
        generated, union_ids = bytearray(), []
        steps = gated_steps = 0
        stop_reason = "length"
        while steps < config.max_new_tokens:
            probs, gated = self.next_distribution(tracks)
            steps += 1
            gated_steps += gated
            union_id = self._choose(probs, generator)
            if union_id == self.union.eos_id:
                stop_reason = "eos"
                break
            union_ids.append(union_id)
            generated += self.union.token_bytes[union_id]
            text = prompt.encode("utf-8") + bytes(generated)
            for m, (track, runner) in enumerate(zip(tracks, self.runners, strict=True)):
                runner.invalidate_from(track.extend(text, self.union.model_id(m, union_id)))
        return EnsembleOutput(
            text=bytes(generated).decode("utf-8", errors="replace"),
            text_bytes=bytes(generated),
            union_ids=union_ids,
            stop_reason=stop_reason,
            steps=steps,
            gated_steps=gated_steps,
            forward_passes=[
                r.forward_passes - before
                for r, before in zip(self.runners, passes_before, strict=True)
            ],
            model_ids=[list(track.ids) for track in tracks],
        )

    def start(self, prompt: str) -> list[TokenTrack]:
        """Each model's ids for `prompt`, with emptied KV caches: the state before step 1."""
        for runner in self.runners:
            runner.reset()
        return [
            TokenTrack(tok, model.token_bytes, prompt)
            for tok, model in zip(self.tokenizers, self.union.models, strict=True)
        ]

    def _union_probs(self, m: int, track: TokenTrack) -> torch.Tensor:
        logits = self.runners[m].next_token_logits(track.ids)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return self.union.to_union(m, torch.softmax(logits.to(dtype), dim=-1))

    def next_distribution(self, tracks: list[TokenTrack]) -> tuple[torch.Tensor, bool]:
        """The union distribution [V_union] to choose from, and whether the gate skipped the mix."""
        primary = None
        gate_on = self.config.threshold < 1.0
        if tracks[0].up_to_date and (gate_on or self.weights[0] > 0):
            primary = self._union_probs(0, tracks[0])
            if gate_on and primary.max() > self.config.threshold:
                return primary, True
        # Models still inside an unfinished UTF-8 character sit this step out: at least the one
        # whose token put the text there holds it as a whole token and is up to date.
        members = [m for m, track in enumerate(tracks) if track.up_to_date and self.weights[m] > 0]
        if not members:
            raise RuntimeError(
                "no model with a positive weight can continue the text (it ends inside a UTF-8 "
                "character none of them holds as a token); give the models positive weights"
            )
        union_probs = [
            primary if m == 0 and primary is not None else self._union_probs(m, tracks[m])
            for m in members
        ]
        return mix_distributions(union_probs, [self.weights[m] for m in members]), False

    def _choose(self, probs: torch.Tensor, generator) -> int:
        if not self.config.sample:
            return int(torch.argmax(probs))
        probs = probs.double().cpu()
        if self.config.temperature != 1.0:
            probs = torch.softmax(torch.log(probs) / self.config.temperature, dim=-1)
        # One uniform draw per step through the CDF (not torch.multinomial, whose draws depend on
        # the vector's length): the same seed picks the same token whatever the union's size.
        cdf = torch.cumsum(probs, dim=0)
        draw = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
        index = int(torch.searchsorted(cdf, draw, right=True))
        return min(index, int(torch.nonzero(probs).max()))
