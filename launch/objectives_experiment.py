"""CE against CE + NTL-WAS, CE + NTL-MSE, CE + Gaussian targets and CE + PDL on the quickstart's
arithmetic corpus (digit-level sentencepiece tokenizer: every digit is its own token), in the
Megatron loop, one process, TP = 1, on the CPU:

    python launch/objectives_experiment.py                     # 5 arms x 3 seeds
    python launch/objectives_experiment.py --arms CE --seeds 1 --steps 30   # a smoke run

For each seed every arm starts from the same weights, sees the same batches (train.seed sets
both) and takes the same number of steps. Each trained model then answers held-out problems
(drawn like the corpus's "Q: 37 + 45 = ? A: 82" lines, none of whose (a, operator, b) is in the
training split) greedily, scored by `token-objectives evaluate`'s metrics; and the teacher-forced
CE on the validation split is measured per token-frequency decile of the target (what PDL is
meant to move): the token types seen in the training split, ranked by their count, are cut into
ten equal-sized groups (1: the rarest tenth of the types, 10: the most frequent tenth); a token
never seen in training counts as decile 1. Writes results.json (every run) and results.md
(mean ± std over seeds, sample std) under --output-dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
warnings.filterwarnings("ignore", category=UserWarning, module="megatron")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# name -> objectives overrides on configs/tiny.yaml (its other objective settings stay).
ARMS: dict[str, list[str]] = {
    "CE": ["objectives.ntl=null", "objectives.pdl_alpha=0"],
    "CE + NTL-WAS": ["objectives.ntl=was", "objectives.ntl_weight=0.3", "objectives.pdl_alpha=0"],
    "CE + NTL-MSE": ["objectives.ntl=mse", "objectives.ntl_weight=0.3", "objectives.pdl_alpha=0"],
    "CE + Gaussian": ["objectives.ntl=null", "objectives.pdl_alpha=0",
                      "objectives.gaussian_sigma=1.0"],
    "CE + PDL": ["objectives.ntl=null", "objectives.pdl_alpha=0.2"],
}
METRIC_COLUMNS = ("exact_accuracy", "mae", "median_ae", "r2", "digit_error", "no_number_rate")


def check_arms(names: list[str]) -> None:
    """Unknown arms, and the Gaussian arm without ObjectiveConfig.gaussian_sigma, stop here."""
    from token_objectives.objectives.config import ObjectiveConfig

    unknown = [name for name in names if name not in ARMS]
    if unknown:
        sys.exit(f"unknown arm(s) {unknown}; choose among {list(ARMS)}")
    fields = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    if "CE + Gaussian" in names and "gaussian_sigma" not in fields:
        sys.exit("the arm 'CE + Gaussian' needs ObjectiveConfig.gaussian_sigma (Gaussian "
                 "targets), which this checkout does not have: merge the branch that adds it, "
                 "or leave the arm out (--arms with the others)")


def frequency_deciles(counts: torch.Tensor) -> torch.Tensor:
    """Decile 1..10 per token id: the seen types ranked by count (ties by id), cut into ten
    equal groups; unseen ids are decile 1."""
    deciles = torch.ones(counts.numel(), dtype=torch.long)
    seen = torch.nonzero(counts > 0).flatten()
    order = seen[torch.argsort(counts[seen], stable=True)]
    deciles[order] = 1 + (torch.arange(order.numel()) * 10) // max(order.numel(), 1)
    return deciles


@torch.no_grad()
def ce_per_decile(trainer, documents: list[str], deciles: torch.Tensor) -> dict[str, float]:
    """Teacher-forced CE of the validation documents (each followed by EOD, cut into windows
    of seq_length + 1), averaged per target decile, and over all targets ("all")."""
    from token_objectives.tables.tokenizers import encode_batch

    model, length = trainer.model.module, trainer.cfg.model.seq_length
    stream = []
    for ids in encode_batch(trainer.tokenizer._tokenizer, documents):
        stream += [*ids, trainer.tokenizer.eod]
    windows = torch.tensor([stream[i:i + length + 1]
                            for i in range(0, len(stream) - length, length)])
    model.eval()
    losses, targets = [], []
    for batch in windows.split(16):
        tokens, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        logits = model(tokens, positions, None)[..., :trainer.tokenizer.vocab_size].float()
        losses.append(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), reduction="none"))
        targets.append(labels.flatten())
    model.train()
    loss, target = torch.cat(losses), torch.cat(targets)
    decile = deciles[target]
    result = {"all": loss.mean().item()}
    for d in range(1, 11):
        chosen = loss[decile == d]
        result[str(d)] = chosen.mean().item() if chosen.numel() else math.nan
    return result


def run_arm(name: str, seed: int, steps: int, data, eval_problems, valid_documents,
            deciles, out: Path, max_new_tokens: int) -> dict:
    """Train one arm at one seed, then evaluate it; returns its row of results.json."""
    from token_objectives.evaluation.generate import MegatronGenerator
    from token_objectives.evaluation.run import evaluate
    from token_objectives.training.config import load_config
    from token_objectives.training.megatron import Trainer

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.tokenizer={data.tokenizer_path}", f"data.train_prefix={data.train_prefix}",
        f"data.frequencies={data.frequencies_path}", "parallel.tensor=1",
        f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
        f"train.seed={seed}", "train.save_interval=0", f"output.dir={out}",
        "output.tensorboard=false", *ARMS[name]])
    start = time.perf_counter()
    trainer = Trainer(cfg)
    losses = []
    for _ in range(steps):
        record = trainer.train_step()
        trainer.metrics.write(record)
        losses.append(record.values["ce"])
    train_seconds = time.perf_counter() - start
    generator = MegatronGenerator(trainer.model.module, trainer.tokenizer._tokenizer,
                                  trainer.tokenizer.eod, trainer.tokenizer.vocab_size,
                                  cfg.model.seq_length)
    report = evaluate(generator, eval_problems, max_new_tokens=max_new_tokens, batch_size=64)
    deciles_ce = ce_per_decile(trainer, valid_documents, deciles)
    trainer.close()
    seconds = time.perf_counter() - start
    tail = losses[-max(1, steps // 10):]
    row = {"arm": name, "seed": seed, "steps": steps, "train_ce": sum(tail) / len(tail),
           "valid_ce": deciles_ce["all"], "valid_ce_per_decile": deciles_ce,
           "metrics": report["metrics"], "train_seconds": train_seconds, "seconds": seconds,
           "generations": report["generations"][:20]}
    print(f"[{name} | seed {seed}] {steps} steps in {train_seconds:.0f} s, all in {seconds:.0f} "
          f"s | train CE {row['train_ce']:.3f} | valid CE {row['valid_ce']:.3f} | exact "
          f"{report['metrics']['exact_accuracy']:.3f} | MAE {report['metrics']['mae']:.2f} | "
          f"no number {report['metrics']['no_number_rate']:.3f}", flush=True)
    return row


def mean_std(values: list[float]) -> str:
    if any(not math.isfinite(v) for v in values):
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(rows: list[dict]) -> str:
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    by_arm = {arm: [row for row in rows if row["arm"] == arm] for arm in arms}
    seeds = sorted({row["seed"] for row in rows})
    lines = [f"{rows[0]['steps']} steps per run, seeds {seeds}; mean ± std over seeds "
             f"({rows[0]['metrics']['examples']} held-out problems).", "",
             "| arm | " + " | ".join(METRIC_COLUMNS) + " | valid CE |",
             "| --- |" + " ---: |" * (len(METRIC_COLUMNS) + 1)]
    for arm, runs in by_arm.items():
        cells = [mean_std([r["metrics"][m] for r in runs]) for m in METRIC_COLUMNS]
        cells.append(mean_std([r["valid_ce"] for r in runs]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Validation CE per target-frequency decile (1 = rarest tenth of the token "
              "types):", "", "| arm | " + " | ".join(str(d) for d in range(1, 11)) + " |",
              "| --- |" + " ---: |" * 10]
    for arm, runs in by_arm.items():
        cells = [mean_std([r["valid_ce_per_decile"][str(d)] for r in runs])
                 for d in range(1, 11)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "objectives")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help=f"among {list(ARMS)}")
    parser.add_argument("--documents", type=int, default=4000, help="corpus size (quickstart)")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems scored")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    check_arms(args.arms)
    torch.set_num_threads(args.threads)

    from token_objectives.evaluation.problems import Problem as EvalProblem
    from token_objectives.quickstart.build_data import build_quickstart_data, split_train_valid
    from token_objectives.quickstart.corpus import generate_corpus
    from token_objectives.quickstart.problems import held_out_problems, training_problems
    from token_objectives.tables.frequencies import load_frequencies

    data = build_quickstart_data(args.output_dir / "data", num_documents=args.documents)
    held_out = held_out_problems(args.problems, training_problems(args.documents, seed=0),
                                 seed=4242)
    rng = random.Random(1)
    eval_problems = [EvalProblem(i + 1, p.prompt(rng), float(p.answer))
                     for i, p in enumerate(held_out)]
    with open(args.output_dir / "eval.jsonl", "w", encoding="utf-8") as handle:
        for problem in eval_problems:
            handle.write(json.dumps({"prompt": problem.prompt, "answer": problem.answer}) + "\n")
    _, valid_documents = split_train_valid(generate_corpus(args.documents, seed=0))
    deciles = frequency_deciles(load_frequencies(data.frequencies_path,
                                                 vocab_size=data.vocab_size).counts)
    from token_objectives.training.evaluation_checkpoint import single_process_group

    single_process_group()  # Trainer's init_distributed finds it
    rows, start = [], time.perf_counter()
    for seed in args.seeds:
        for name in args.arms:
            out = args.output_dir / "runs" / f"{name.replace(' ', '').replace('+', '_')}_{seed}"
            rows.append(run_arm(name, seed, args.steps, data, eval_problems, valid_documents,
                                deciles, out, args.max_new_tokens))
    text = tables(rows)
    (args.output_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.output_dir / "results.md").write_text(text + "\n")
    print(f"\n{text}\n\n{len(rows)} runs in {time.perf_counter() - start:.0f} s; "
          f"{args.output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
