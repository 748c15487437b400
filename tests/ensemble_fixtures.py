"""Local models for the ensemble tests: two tokenizers of different kinds, tiny trained Llamas, and
fixed-probability "bigram" models over hand-made vocabularies. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import sentencepiece
import torch
from tokenizer_fixtures import make_corpus, train_bpe_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "BigramLM",
    "byte_level_tokenizer",
    "corpus_text",
    "plain_tokenizer",
    "sentencepiece_tokenizer",
    "train_tiny_llama",
]


def corpus_text() -> str:
    """The shared training text: the numbers corpus, one sentence per line, no EOS."""
    return "\n".join(make_corpus(400, seed=7)) + "\n"


def sentencepiece_tokenizer(workdir: Path) -> PreTrainedTokenizerFast:
    """A sentencepiece unigram (byte fallback, Llama-style BOS and "▁" spaces) as an HF tokenizer.

    Trained by the sentencepiece library, then expressed as a `tokenizers` Unigram with a
    Metaspace pre-tokenizer, the way transformers converts such models.
    """
    prefix = workdir / "spm"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(make_corpus(400, seed=7)),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=500,
        split_digits=True,
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
    )
    processor = sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(len(processor))]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE ("Ġ" spaces), trained on the same corpus."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_tokenizer(make_corpus(400, seed=7), vocab_size=400),
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
    )


def plain_tokenizer(pieces: list[str], eos: str | None = "<eos>") -> PreTrainedTokenizerFast:
    """A Unigram over exactly `pieces` (ids: [eos], "<unk>", pieces...), no pre-tokenizer.

    Every piece scores the same, so the tokenizer prefers the segmentation with fewest pieces.
    """
    specials = ([eos] if eos else []) + ["<unk>"]
    vocab = [(token, 0.0) for token in specials] + [(piece, -1.0) for piece in pieces]
    backend = Tokenizer(models.Unigram(vocab, unk_id=len(specials) - 1))
    kwargs = {"eos_token": eos} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kwargs)


def train_tiny_llama(tokenizer, text: str, seed: int, steps: int = 60) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama trained briefly on `text`; returned in float64, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    window = 64
    chunks = ids[: len(ids) // window * window].view(-1, window)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = chunks[torch.randint(len(chunks), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.to(torch.float64).eval()


class BigramLM(torch.nn.Module):
    """A stand-in causal LM whose next-token probabilities depend on the last id only.

    table: [V, V] rows of probabilities; row i is the distribution after token i. Returns no KV
    cache, so the ensemble feeds it the whole sequence each time.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.log_table = torch.nn.Parameter(torch.log(table.double()), requires_grad=False)

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        return SimpleNamespace(logits=self.log_table[input_ids], past_key_values=None)
