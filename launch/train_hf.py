"""Train a tiny Hugging Face Llama with `transformers.Trainer` and CE + NTL + PDL, on the CPU.

    python launch/train_hf.py --output-dir runs/hf_tiny --steps 20
    python launch/train_hf.py --output-dir runs/hf_tiny --steps 20 --fused   # no [b, s, V] logits
    torchrun --nproc-per-node 2 launch/train_hf.py --output-dir runs/hf_ddp --steps 20
    torchrun --nproc-per-node 2 launch/train_hf.py --output-dir runs/hf_z3 --fused \\
        --deepspeed configs/deepspeed/hf_zero3.json
    torchrun --nproc-per-node 2 launch/train_hf.py --output-dir runs/hf_tp \\
        --deepspeed configs/deepspeed/hf_autotp2.json        # logits stay [b, s, V/2]

The data is the quickstart's (token_objectives.quickstart: the generated number-rich corpus and
its sentencepiece tokenizer, digits split), built under --output-dir/data without megatron-core;
the PDL counts come from `count_text_files`, as `token-objectives count-frequencies --text`.
The model's vocab is the tokenizer's padded to a multiple of 64: the tables cover the padding.
Trainer writes the loss and its components (lm_loss, ce_part, ntl_part, ce, ntl,
counted_tokens, number_tokens: a count, number_token_share, pdl_weight; docs/metrics.md) to
--output-dir/runs/ (TensorBoard). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

PAD_MULTIPLE = 64


def build_data(data_dir: Path, documents: int, vocab: int) -> tuple[Path, Path, int]:
    """(tokenizer path, frequencies path, padded vocab) of the quickstart corpus."""
    from token_objectives.quickstart.build_data import train_tokenizer
    from token_objectives.quickstart.corpus import generate_corpus
    from token_objectives.tables.frequencies import count_text_files, save_frequencies
    from token_objectives.tables.tokenizers import list_vocab, load_tokenizer, tokenizer_identity

    corpus = data_dir / "corpus.jsonl"
    tokenizer_path = data_dir / "tokenizer.model"
    if not corpus.exists() or not tokenizer_path.exists():
        texts = generate_corpus(documents, seed=0)
        tokenizer_path = train_tokenizer(texts, data_dir, vocab)
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = load_tokenizer(tokenizer_path)
    padded = -(-list_vocab(tokenizer).size // PAD_MULTIPLE) * PAD_MULTIPLE
    frequencies = data_dir / "frequencies.safetensors"
    counts = count_text_files([str(corpus)], tokenizer, padded, progress=False)
    save_frequencies(frequencies, counts, tokenizer_identity=tokenizer_identity(tokenizer),
                     vocab_size=padded)
    return tokenizer_path, corpus, padded


class PackedTokens(torch.utils.data.Dataset):
    """The corpus tokenized (each document + its end-of-document id), cut into rows of
    seq_length; labels are the ids (Trainer's causal-LM loss shifts them)."""

    def __init__(self, corpus: Path, tokenizer_path: Path, seq_length: int) -> None:
        from token_objectives.tables.tokenizers import (
            encode_batch,
            end_of_document_id,
            load_tokenizer,
        )

        tokenizer = load_tokenizer(tokenizer_path)
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        eod = end_of_document_id(tokenizer)
        stream = [i for ids in encode_batch(tokenizer, texts) for i in (*ids, eod)]
        rows = len(stream) // seq_length
        self.ids = torch.tensor(stream[: rows * seq_length]).view(rows, seq_length)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--documents", type=int, default=400, help="quickstart documents")
    parser.add_argument("--vocab", type=int, default=512, help="tokenizer pieces")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--objectives", default='{"ntl": "was", "ntl_weight": 0.3, '
                        '"pdl_alpha": 0.2}', help="ObjectiveConfig options as JSON")
    parser.add_argument("--fused", action="store_true",
                        help="the loss from the hidden states and lm_head weight, no logits")
    parser.add_argument("--deepspeed", help="a ds_config JSON for Trainer's DeepSpeed")
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from token_objectives.integrations.hf import objective_loss_from_options

    if args.deepspeed and not torch.cuda.is_available():
        from token_objectives.integrations.deepspeed.cpu import disable_shm_comm_op

        disable_shm_comm_op()
    data_dir = args.output_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path, corpus, vocab_size = build_data(data_dir, args.documents, args.vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_length))
    objectives = objective_loss_from_options(json.loads(args.objectives), tokenizer_path,
                                             data_dir / "frequencies.safetensors", model=model,
                                             fused=args.fused)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    training = TrainingArguments(
        output_dir=str(args.output_dir), max_steps=args.steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation, logging_steps=1, save_strategy="no",
        report_to="tensorboard", use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        deepspeed=args.deepspeed,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=training,
                      train_dataset=PackedTokens(corpus, tokenizer_path, args.seq_length),
                      compute_loss_func=objectives)
    objectives.attach(trainer)  # the component logs; with --fused, the model's own loss
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
