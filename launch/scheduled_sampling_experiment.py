"""CE vs CE + batch-scheduled sampling on the quickstart's arithmetic corpus, at an equal step
budget, scored by greedy-decoding exact match on held-out problems. One process, TP = 1, CPU:

    python launch/scheduled_sampling_experiment.py --steps 1000

Both runs start from the same weights and see the same batches (same seed). The held-out problems
are drawn like the corpus's worksheet lines ("Q: 37 + 45 = ? A: 82") but none of their
(a, operator, b) occurs in the training split; "seen" problems are taken from the training split
for reference. The prompt is EOD + a worksheet title + the question; the answer is what the model
writes, greedily, up to the newline.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
warnings.filterwarnings("ignore", category=UserWarning, module="megatron")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from token_objectives.quickstart.problems import (  # noqa: E402
    OPERATORS,
    Problem,
    held_out_problems,
    training_problems,
)

# ------------------------------------------------------------------------------ train and eval


def _single_process_group() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")


def train(name: str, overrides: list[str], out: Path, steps: int, printer=print):
    """A Trainer after `steps` steps, and the mean training CE of its last 10% of steps (on the
    inputs it trained on: mixed ones with scheduled sampling)."""
    from token_objectives.training.config import load_config
    from token_objectives.training.megatron import Trainer

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"output.dir={out}", *overrides])
    trainer = Trainer(cfg)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        log = trainer.train_step()
        losses.append(log.values["ce"])
        if log.step % 50 == 0 or log.step == steps:
            p = log.sampling.get("sampling/p")
            extra = "" if p is None else (
                f" | p {p:.3f} | replaced {log.sampling['sampling/replaced_of_all']:.3f}")
            printer(f"[{name}] step {log.step:>4}/{steps} | ce {log.values['ce']:.4f}{extra} | "
                    f"{time.perf_counter() - start:.0f} s")
    tail = losses[-max(1, steps // 10):]
    return trainer, sum(tail) / len(tail), time.perf_counter() - start


def greedy_answers(trainer, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """What the model writes after each prompt, greedily, up to its newline or EOD."""
    from token_objectives.evaluation.generate import MegatronGenerator

    generator = MegatronGenerator(trainer.model.module, trainer.tokenizer._tokenizer,
                                  trainer.tokenizer.eod, trainer.tokenizer.vocab_size,
                                  trainer.cfg.model.seq_length)
    return [text.strip() for text in generator.generate(prompts, max_new_tokens, batch_size=64)]


def exact_match(trainer, problems: list[Problem], seed: int) -> dict[str, float]:
    """Greedy exact match, overall ("all") and per operator (NaN where there is none)."""
    rng = random.Random(seed)
    answers = greedy_answers(trainer, [problem.prompt(rng) for problem in problems])
    hits: dict[str, list[bool]] = {op: [] for op in OPERATORS}
    for problem, answer in zip(problems, answers, strict=True):
        hits[problem.operator].append(answer == str(problem.answer))
    scores = {op: sum(h) / len(h) if h else float("nan") for op, h in hits.items()}
    scores["all"] = sum(sum(h) for h in hits.values()) / len(problems)
    return scores


@torch.no_grad()
def teacher_forced_ce(trainer, sequences: list[list[int]], scored: list[list[bool]]) -> float:
    """Mean CE over the `scored` labels of each token sequence, ground-truth inputs."""
    model = trainer.model.module
    model.eval()
    total, count = 0.0, 0
    for ids, mask in zip(sequences, scored, strict=True):
        tokens = torch.tensor(ids[:-1])[None]
        positions = torch.arange(tokens.shape[1])[None]
        logits = model(tokens, positions, None)[0, :, :trainer.tokenizer.vocab_size].float()
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]),
                                                   reduction="none")
        keep = torch.tensor(mask[1:])
        total += losses[keep].sum().item()
        count += int(keep.sum())
    model.train()
    return total / max(count, 1)


def validation_sequences(trainer, documents: list[str], length: int):
    """The validation documents as the data pipeline lays them out (each followed by EOD),
    cut into windows of length + 1 tokens; every label is scored."""
    from token_objectives.tables.tokenizers import encode_batch

    stream = []
    for ids in encode_batch(trainer.tokenizer._tokenizer, documents):
        stream += [*ids, trainer.tokenizer.eod]
    windows = [stream[i:i + length + 1] for i in range(0, len(stream) - length, length)]
    return windows, [[True] * len(w) for w in windows]


def answer_sequences(trainer, problems: list[Problem], seed: int):
    """EOD + prompt + " answer\n" per problem; only the answer's tokens (and the newline)
    are scored."""
    from token_objectives.tables.tokenizers import encode_batch

    rng, tokenizer = random.Random(seed), trainer.tokenizer._tokenizer
    prompts = [problem.prompt(rng) for problem in problems]
    full = [f"{prompt} {problem.answer}\n" for prompt, problem in zip(prompts, problems,
                                                                      strict=True)]
    sequences, scored = [], []
    for prompt_ids, ids in zip(encode_batch(tokenizer, prompts), encode_batch(tokenizer, full),
                               strict=True):
        if ids[:len(prompt_ids)] != prompt_ids:
            continue  # the answer merged with the prompt's last token: not scoreable alike
        sequences.append([trainer.tokenizer.eod, *ids])
        scored.append([False] * (len(prompt_ids) + 1) + [True] * (len(ids) - len(prompt_ids)))
    return sequences, scored


# ------------------------------------------------------------------------------------- main


def print_table(rows: list[dict], steps: int, held_out: list[Problem]) -> None:
    counts = {op: sum(p.operator == op for p in held_out) for op in OPERATORS}
    print(f"\n{steps} steps per run. EM: greedy exact match on {len(held_out)} held-out problems "
          f"({', '.join(f'{n} x {op}' for op, n in counts.items())}); answer CE: teacher-forced "
          f"CE of their answer tokens; valid CE: teacher-forced CE on the validation split;\n"
          f"train CE: the last 10% of steps, on the inputs trained on (mixed with sampling).")
    present = [op for op in OPERATORS if counts[op]]  # * and / are few: all may be seen
    ops = " | ".join(f"EM {op:<3}" for op in present)
    header = (f"| {'run':<29} | train CE | valid CE | answer CE | EM held-out | {ops} | "
              f"EM seen | train s |")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        held = row["held-out"]
        ops = " | ".join(f"{held[op]:>6.1%}" for op in present)
        print(f"| {row['name']:<29} | {row['train CE']:8.4f} | {row['valid CE']:8.4f} | "
              f"{row['answer CE']:9.4f} | {held['all']:>11.1%} | {ops} | {row['seen']:>7.1%} | "
              f"{row['seconds']:7.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "ss_experiment")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    parser.add_argument("--documents", type=int, default=4000, help="corpus size (quickstart)")
    parser.add_argument("--problems", type=int, default=400, help="held-out problems scored")
    parser.add_argument("--max-p", type=float, default=0.25)
    parser.add_argument("--mode", choices=("argmax", "sample"), default="argmax")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from token_objectives.quickstart.build_data import build_quickstart_data

    data = build_quickstart_data(args.output_dir / "data", num_documents=args.documents)
    seen = training_problems(args.documents, seed=0)
    held_out = held_out_problems(args.problems, seen, seed=4242)
    familiar = sorted(seen, key=lambda p: (p.a, p.operator, p.b))
    familiar = random.Random(7).sample(familiar, min(args.problems, len(familiar)))
    print(f"{len(seen)} distinct problems in the training split; scoring {len(held_out)} "
          f"held-out and {len(familiar)} seen ones")

    warmup = args.steps // 4  # teacher forcing first, then p grows linearly to max_p by steps/2
    common = [
        f"data.tokenizer={data.tokenizer_path}", f"data.train_prefix={data.train_prefix}",
        "data.frequencies=null", "objectives.ntl=null", "objectives.pdl_alpha=0",
        "parallel.tensor=1", "parallel.pipeline=1", f"train.steps={args.steps}",
        f"train.warmup_steps={max(1, args.steps // 20)}", "train.save_interval=0",
        "output.tensorboard=false",
    ]
    sampling = [
        "scheduled_sampling.enabled=true", "scheduled_sampling.schedule=linear",
        f"scheduled_sampling.max_p={args.max_p}", f"scheduled_sampling.warmup_steps={warmup}",
        f"scheduled_sampling.c={args.max_p / max(1, args.steps // 4)}",
        f"scheduled_sampling.mode={args.mode}",
    ]
    variants = {"CE": common, "CE + batch-scheduled sampling": [*common, *sampling]}
    _single_process_group()
    from token_objectives.quickstart.build_data import split_train_valid
    from token_objectives.quickstart.corpus import generate_corpus

    _, valid_documents = split_train_valid(generate_corpus(args.documents, seed=0))
    rows = []
    for name, overrides in variants.items():
        out = args.output_dir / ("ce" if name == "CE" else "ce_bss")
        trainer, train_ce, seconds = train(name, overrides, out, args.steps)
        rows.append({
            "name": name, "train CE": train_ce, "seconds": seconds,
            "valid CE": teacher_forced_ce(trainer, *validation_sequences(
                trainer, valid_documents, trainer.cfg.model.seq_length)),
            "answer CE": teacher_forced_ce(trainer, *answer_sequences(trainer, held_out, 1)),
            "held-out": exact_match(trainer, held_out, seed=1),
            "seen": exact_match(trainer, familiar, seed=2)["all"],
        })
        trainer.close()
    print_table(rows, args.steps, held_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
