"""One arm of the experiment at one seed: a tiny Llama (transformers' LlamaForCausalLM) trained
on the arithmetic task with the arm's objective through the Hugging Face door (ObjectiveLoss on
the logits), then scored on the held-out problems.

For a seed every arm starts from the same weights (torch.manual_seed(seed) before the model is
made) and sees the same batches (arithmetic.training_batches(seed)); the arms differ only in
the objective. One thread per run: the experiment runs two at a time on a 2-core machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from token_objectives.experiments.arithmetic import Problem, held_out, training_batches
from token_objectives.experiments.vocabularies import Vocabulary, vocabulary

# arm -> ObjectiveConfig options (the rest at their defaults: reweigh on, no smoothing).
ARMS: dict[str, dict] = {
    "CE": {"ntl": None},
    "CE + NTL-WAS": {"ntl": "was", "ntl_weight": 0.3},
    "CE + NTL-MSE": {"ntl": "mse", "ntl_weight": 0.3},
    "CE + Gaussian": {"ntl": None, "gaussian_sigma": 1.0},
    "CE + PDL": {"ntl": None, "pdl_alpha": 0.2},
}
BASELINE = "CE"
# The problems PDL's frequencies are counted over: a sample of the training distribution.
FREQUENCY_SAMPLE_SEED, FREQUENCY_SAMPLE_BATCHES = 0, 100


@dataclass(frozen=True)
class Settings:
    """The sizes of a run, fixed for every arm (chosen on the CE arm alone: README)."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 75
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    held_out_per_operator: int = 250
    log_every: int = 50

    @classmethod
    def quick(cls) -> Settings:
        return cls(steps=20, warmup_steps=2, held_out_per_operator=20, log_every=5, layers=1)


def build_model(vocab: Vocabulary, settings: Settings, seed: int):
    """The tiny Llama, its weights drawn from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab.size, hidden_size=settings.hidden_size,
        intermediate_size=3 * settings.hidden_size, num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
        max_position_embeddings=32, tie_word_embeddings=True, bos_token_id=vocab.eod,
        eos_token_id=vocab.eod, pad_token_id=vocab.eod)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode_batch(vocab: Vocabulary, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [b, s] (right-padded with eod) and HF labels [b, s]: the answer and its eod,
    -100 elsewhere (the prompt, the padding)."""
    encoded = [vocab.encode_problem(problem) for problem in problems]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(problems), width), vocab.eod)
    labels = torch.full((len(problems), width), -100)
    for row, (ids, answer_start) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, answer_start:len(ids)] = torch.tensor(ids[answer_start:])
    return input_ids, labels


def build_objective(arm: str, vocab: Vocabulary, excluded: set[Problem]):
    """The arm's ObjectiveLoss over the vocabulary (its NumberTable, its PDL weights)."""
    from token_objectives.integrations.hf.loss import ObjectiveLoss
    from token_objectives.objectives.config import ObjectiveConfig
    from token_objectives.objectives.objective import Objective
    from token_objectives.objectives.pdl import pdl_weights_for

    config = ObjectiveConfig(**ARMS[arm])
    numbers = vocab.numbers() if config.uses_numbers else None
    weights = pdl_weights_for(config, corpus_counts(vocab, excluded)) if config.pdl_alpha else None
    return ObjectiveLoss(Objective(config, numbers, weights, vocab_size=vocab.size))


def corpus_counts(vocab: Vocabulary, excluded: set[Problem]) -> torch.Tensor:
    """int64 [V]: token counts over FREQUENCY_SAMPLE_BATCHES batches of 64 training problems."""
    batches = training_batches(FREQUENCY_SAMPLE_SEED, 64, excluded)
    return vocab.counts([p for _ in range(FREQUENCY_SAMPLE_BATCHES) for p in next(batches)])


def learning_rate(step: int, settings: Settings) -> float:
    """Linear warm-up, then linear decay to min_lr_ratio of the peak; a factor of lr."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    done = (step - settings.warmup_steps) / max(settings.steps - settings.warmup_steps, 1)
    return 1 - (1 - settings.min_lr_ratio) * done


def train(model, objective, vocab: Vocabulary, seed: int, settings: Settings,
          excluded: set[Problem]) -> dict[str, list[float]]:
    """settings.steps AdamW steps; returns the learning curve: per log_every steps, the mean of
    the objective's components (lm loss, ce, ntl) over them, by the step they end at."""
    from token_objectives.objectives.components import component_values

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98),
                                  weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(s, settings))
    curve: dict[str, list[float]] = {"step": [], "lm loss": [], "ce": [], "ntl": []}
    batches = training_batches(seed, settings.batch_size, excluded)
    model.train()
    for step in range(1, settings.steps + 1):
        input_ids, labels = encode_batch(vocab, next(batches))
        loss = objective(model(input_ids=input_ids), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
        optimizer.step()
        schedule.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss is {loss.item()} at step {step}")
        if step % settings.log_every == 0 or step == settings.steps:
            values = component_values(objective.take_totals(), objective.config)
            curve["step"].append(step)
            for name in ("lm loss", "ce", "ntl"):
                curve[name].append(values[name])
    return curve


@torch.no_grad()
def score(model, vocab: Vocabulary, problems: list[Problem], deciles: torch.Tensor) -> dict:
    """Greedy answers to `problems` scored by evaluation.metrics (exact accuracy, MAE, digit
    error, ...), per operator too, and the teacher-forced CE of their answers: overall and per
    target-frequency decile."""
    from token_objectives.evaluation.metrics import number_metrics
    from token_objectives.evaluation.numbers import last_number
    from token_objectives.generation.hf import greedy_answers

    model.eval()
    prompts = [vocab.encode(problem.prompt) for problem in problems]
    # One token more than the longest true answer: room to be wrong, none to ramble.
    longest = max(len(vocab.encode(str(problem.answer))) for problem in problems)
    answers = greedy_answers(model, prompts, longest + 1, [vocab.eod], 256)
    texts = [vocab.decode(ids) for ids in answers]
    predicted = [last_number(text) for text in texts]
    truth = [float(problem.answer) for problem in problems]
    result = {"metrics": number_metrics(predicted, truth), "by_operator": {}}
    for op in sorted({problem.op for problem in problems}):
        rows = [i for i, problem in enumerate(problems) if problem.op == op]
        result["by_operator"][op] = number_metrics([predicted[i] for i in rows],
                                                   [truth[i] for i in rows])
    input_ids, labels = encode_batch(vocab, problems)
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = labels[:, 1:]
    counted = targets != -100
    losses = F.cross_entropy(logits[counted].float(), targets[counted], reduction="none")
    per_decile = {}
    for decile in range(1, 11):
        chosen = losses[deciles[targets[counted]] == decile]
        per_decile[str(decile)] = chosen.mean().item() if chosen.numel() else math.nan
    result["valid_ce"] = losses.mean().item()
    result["valid_ce_per_decile"] = per_decile
    result["generations"] = [{"prompt": p.prompt, "answer": p.answer, "generated": t}
                             for p, t in zip(problems[:10], texts[:10], strict=True)]
    model.train()
    return result


def frequency_deciles(counts: torch.Tensor) -> torch.Tensor:
    """Decile 1..10 per id: the ids with a count, ranked by it (ties by id), cut into ten
    equal groups (1: the rarest tenth); ids never counted are decile 1."""
    deciles = torch.ones(counts.numel(), dtype=torch.long)
    seen = torch.nonzero(counts > 0).flatten()
    order = seen[torch.argsort(counts[seen], stable=True)]
    deciles[order] = 1 + (torch.arange(order.numel()) * 10) // max(order.numel(), 1)
    return deciles


def decile_members(vocabulary_name: str, settings: Settings) -> dict[str, list[str]]:
    """Decile -> the token strings in it (frequency_deciles of the corpus counts); for the
    report's header."""
    vocab = vocabulary(vocabulary_name)
    counts = corpus_counts(vocab, set(held_out(settings.held_out_per_operator)))
    deciles = frequency_deciles(counts)
    names = {i: ("<eod>" if i == vocab.eod else vocab.decode([i])) for i in range(vocab.size)}
    return {str(d): [names[i] for i in range(vocab.size) if deciles[i] == d and counts[i] > 0]
            for d in range(1, 11)}


def run_arm(arm: str, vocabulary_name: str, seed: int, settings: Settings) -> dict:
    """Train `arm` with `vocabulary_name` at `seed` and score it: one row of results.json."""
    torch.set_num_threads(1)
    vocab = vocabulary(vocabulary_name)
    test = held_out(settings.held_out_per_operator)
    excluded = set(test)
    objective = build_objective(arm, vocab, excluded)
    model = build_model(vocab, settings, seed)
    start = time.perf_counter()
    curve = train(model, objective, vocab, seed, settings, excluded)
    train_seconds = time.perf_counter() - start
    scored = score(model, vocab, test, frequency_deciles(corpus_counts(vocab, excluded)))
    return {"arm": arm, "vocabulary": vocabulary_name, "seed": seed, **scored,
            "curve": curve, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start, "settings": asdict(settings)}
