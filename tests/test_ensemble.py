"""GaC ensembling: union vocabulary, re-tokenisation, KV caches, the key-token gate, the CLI.

Real cases use two tiny Llamas trained on the same corpus with different tokenizers (a
sentencepiece unigram and a byte-level BPE); hand-computed cases use fixed-probability bigram
models over hand-made vocabularies.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from doc_blocks import doc_block, substituted
from ensemble_fixtures import (
    BigramLM,
    byte_level_tokenizer,
    corpus_text,
    plain_tokenizer,
    sentencepiece_tokenizer,
    train_tiny_llama,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from token_objectives.cli import main
from token_objectives.ensemble.generate import EnsembleConfig, GaCEnsemble, ModelRunner, UnionVocab
from token_objectives.ensemble.tokens import TokenTrack
from token_objectives.ensemble.vocab import byte_level_char_to_byte

PROMPTS = ["The train to", "Alice bought 3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: threads only add contention on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("ensemble_spm"))


@pytest.fixture(scope="module")
def bpe_tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def sp_model(sp_tok):
    return train_tiny_llama(sp_tok, corpus_text(), seed=0)


@pytest.fixture(scope="module")
def bpe_model(bpe_tok):
    return train_tiny_llama(bpe_tok, corpus_text(), seed=1)


def ensemble(models, tokenizers, **config) -> GaCEnsemble:
    config.setdefault("weights", tuple(1.0 for _ in models))
    return GaCEnsemble(models, tokenizers, EnsembleConfig(**config))


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' own greedy ids (prompt included), special tokens other than EOS suppressed."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    suppressed = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            suppress_tokens=suppressed,
            pad_token_id=tokenizer.eos_token_id,
        )
    return out[0].tolist()


# --- reference: the test's own keys, an uncached full forward per step, dict arithmetic --------

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-F]{2})>")


def reference_token_bytes(tokenizer, style: str) -> tuple[bytes | None, ...]:
    """id -> bytes, derived here from transformers' GPT-2 table and the fixtures' known styles."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    specials = set(tokenizer.all_special_ids)
    table: list[bytes | None] = [None] * len(tokenizer)
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id in specials:
            continue
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if style == "sentencepiece":
            table[token_id] = (
                bytes([int(fallback.group(1), 16)])
                if fallback
                else piece.replace("▁", " ").encode()
            )
        else:
            table[token_id] = bytes(byte_of[char] for char in piece)
    return tuple(table)


def reference_ensemble(models, tokenizers, styles, weights, prompt, threshold, max_new_tokens):
    """GaC without caches, sparse maps or tensors: dicts keyed by the test's own bytes.

    Gates on model 0 like the code under test and reuses TokenTrack (tested on its own below) so
    that both feed the models the same ids.
    """
    tables = [reference_token_bytes(t, style) for t, style in zip(tokenizers, styles, strict=True)]
    way_back = []  # bytes -> id; the tokenizer's own piece wins over a "<0xNN>" duplicate
    for tok, table in zip(tokenizers, tables, strict=True):
        back: dict[bytes, tuple[int, bool]] = {}
        for token_id, text in enumerate(table):
            if text is None:
                continue
            fallback = bool(_BYTE_FALLBACK.fullmatch(tok.convert_ids_to_tokens(token_id)))
            if text not in back or (back[text][1] and not fallback):
                back[text] = (token_id, fallback)
        way_back.append({text: token_id for text, (token_id, _) in back.items()})
    tracks = [TokenTrack(tok, table, prompt) for tok, table in zip(tokenizers, tables, strict=True)]
    generated = b""
    for _ in range(max_new_tokens):
        dists = []
        for m, (model, track) in enumerate(zip(models, tracks, strict=True)):
            if m > 0 and dists and max(dists[0].values()) > threshold:
                break
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([track.ids])).logits[0, -1]
            probs = torch.softmax(logits.double(), dim=-1).tolist()
            dist: dict[object, float] = {}
            for token_id, p in enumerate(probs[: len(tables[m])]):
                key = "EOS" if token_id == tokenizers[m].eos_token_id else tables[m][token_id]
                if key is not None:
                    dist[key] = dist.get(key, 0.0) + p
            total = sum(dist.values())
            dists.append({key: p / total for key, p in dist.items()})
        if len(dists) == 1:
            mixed = dists[0]
        else:
            mixed = {}
            for dist, weight in zip(dists, weights, strict=True):
                for key, p in dist.items():
                    mixed[key] = mixed.get(key, 0.0) + weight / sum(weights) * p
        choice = max(mixed, key=mixed.get)
        if choice == "EOS":
            break
        generated += choice
        for track, back in zip(tracks, way_back, strict=True):
            track.extend(prompt.encode() + generated, back.get(choice))
    return generated


# --- union vocabulary --------------------------------------------------------------------------


def test_byte_level_table_is_gpt2s():
    expected = {char: byte for byte, char in bytes_to_unicode().items()}
    assert byte_level_char_to_byte() == expected
    assert byte_level_char_to_byte()["Ġ"] == ord(" ") and byte_level_char_to_byte()["Ċ"] == 10


def test_union_keys_match_the_decoded_text_both_ways(sp_tok, bpe_tok):
    union = UnionVocab.from_tokenizers([sp_tok, bpe_tok])
    expected_keys = set()
    for m, (tok, style) in enumerate([(sp_tok, "sentencepiece"), (bpe_tok, "byte_level")]):
        reference = reference_token_bytes(tok, style)
        expected_keys |= {text for text in reference if text}
        context = tok("Alice bought", add_special_tokens=False)["input_ids"]
        for token_id, text in enumerate(reference):
            union_id = union.union_id(m, token_id)
            if text is None:
                assert union_id in (-1, union.eos_id)
                continue
            assert union.token_bytes[union_id] == text
            back = union.model_id(m, union_id)
            assert back == token_id or reference[back] == text  # duplicates spell the same bytes
            if _decodes(text):
                decoded = _decode(tok, context + [token_id])[len(_decode(tok, context)) :]
                assert decoded == text.decode(), (token_id, tok.convert_ids_to_tokens(token_id))
        assert union.union_id(m, tok.eos_token_id) == union.eos_id
    assert set(union.token_bytes[1:]) == expected_keys
    # One space, one partial UTF-8 byte: the same union token from both conventions.
    assert union.union_id(0, sp_tok.convert_tokens_to_ids("▁")) == union.union_id(
        1, bpe_tok.convert_tokens_to_ids("Ġ")
    )
    assert union.union_id(0, sp_tok.convert_tokens_to_ids("<0xC3>")) == union.union_id(
        1, bpe_tok.convert_tokens_to_ids("Ã")
    )
    assert union.token_bytes[union.union_id(1, bpe_tok.convert_tokens_to_ids("Ã"))] == b"\xc3"
    # BOS, UNK and PAD stand for no text: left out.
    for special in ("<s>", "<unk>"):
        assert union.union_id(0, sp_tok.convert_tokens_to_ids(special)) == -1
    assert union.union_id(1, bpe_tok.convert_tokens_to_ids("<pad>")) == -1


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _decodes(text: bytes) -> bool:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_sparse_mapping_renormalises_over_the_union(sp_tok):
    union = UnionVocab.from_tokenizers([sp_tok])
    logits = torch.randn(3, len(sp_tok) + 6, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits.double(), dim=-1)
    mapped = union.to_union(0, probs)
    assert mapped.shape == (3, union.size)
    matrix = union.mapping(0, len(sp_tok) + 6, dtype=torch.float64)
    assert matrix.is_sparse and matrix.shape == (len(sp_tok) + 6, union.size)
    assert union.mapping(0, len(sp_tok) + 6, dtype=torch.float64) is matrix  # built once
    unnormalised = probs @ matrix.to_dense()
    torch.testing.assert_close(mapped, unnormalised / unnormalised.sum(-1, keepdim=True))
    torch.testing.assert_close(mapped.sum(-1), torch.ones(3, dtype=torch.float64))
    kept = [i for i in range(len(sp_tok)) if union.union_id(0, i) >= 0]
    space = sp_tok.convert_tokens_to_ids("▁")
    fallback_space = sp_tok.convert_tokens_to_ids("<0x20>")
    expected_space = (probs[:, space] + probs[:, fallback_space]) / probs[:, kept].sum(-1)
    torch.testing.assert_close(mapped[:, union.union_id(0, space)], expected_space)


# --- re-tokenisation ---------------------------------------------------------------------------


def test_whole_tokens_are_appended_and_the_rest_reencoded_from_the_first_difference():
    tok = plain_tokenizer(["a", "b", "bc", "x"])
    ids = {piece: tok.convert_tokens_to_ids(piece) for piece in ("a", "b", "bc", "x")}
    union = UnionVocab.from_tokenizers([tok])
    track = TokenTrack(tok, union.models[0].token_bytes, "a")
    assert track.ids == [ids["a"]]
    assert track.extend(b"ab", ids["b"]) == 1  # a whole token: appended as is
    assert track.ids == [ids["a"], ids["b"]]
    # "c" is no token here: "abc" is re-encoded as a + bc, which differs from position 1 on.
    assert track.extend(b"abc", None) == 1
    assert track.ids == [ids["a"], ids["bc"]]
    assert track.extend(b"abcx", ids["x"]) == 2
    assert track.ids == [ids["a"], ids["bc"], ids["x"]]


def test_a_partial_character_waits_until_it_is_complete():
    tok = plain_tokenizer(["a", "é"])
    union = UnionVocab.from_tokenizers([tok])
    track = TokenTrack(tok, union.models[0].token_bytes, "a")
    first, second = "é".encode()
    assert track.extend(b"a" + bytes([first]), None) == 1  # nothing to encode yet
    assert not track.up_to_date and track.ids == [tok.convert_tokens_to_ids("a")]
    assert track.extend(b"a" + bytes([first, second]), None) == 1
    assert track.up_to_date and track.ids == tok.convert_tokens_to_ids(["a", "é"])


@pytest.mark.parametrize("which", ["sp", "bpe"])
def test_only_the_last_word_is_reencoded(which, sp_tok, bpe_tok):
    tok = sp_tok if which == "sp" else bpe_tok
    union = UnionVocab.from_tokenizers([tok])
    prompt = "We counted 12 apples and"
    track = TokenTrack(tok, union.models[0].token_bytes, prompt)
    prompt_ids = list(track.ids)
    text = prompt.encode()
    for chunk in (b" bo", b"ttl", b"es", b" in", b" Lima"):  # arbitrary cuts, not tokens
        old = list(track.ids)
        text += chunk
        first_changed = track.extend(text, None)
        assert track.ids[:first_changed] == old[:first_changed]
        assert _decode(tok, track.ids) == text.decode()
        assert track.ids[: len(prompt_ids)] == prompt_ids
    expected = prompt_ids + tok(" bottles in Lima", add_special_tokens=False)["input_ids"]
    assert track.ids == expected


@pytest.mark.parametrize("which", ["sp", "bpe"])
def test_reencoding_leaves_earlier_words_as_the_model_spelled_them(which, sp_tok, bpe_tok):
    tok = sp_tok if which == "sp" else bpe_tok
    union = UnionVocab.from_tokenizers([tok])
    track = TokenTrack(tok, union.models[0].token_bytes, "We counted")
    text = b"We counted"
    for byte in b" apples":  # one whole token per byte: not how the tokenizer would spell it
        text += bytes([byte])
        track.extend(text, union.model_id(0, union.index[bytes([byte])]))
    spelled = list(track.ids)
    assert spelled != tok("We counted apples")["input_ids"]
    text += b" bo"  # no token of this model: re-encoded from the word start, not from scratch
    assert track.extend(text, None) == len(spelled)
    assert track.ids[: len(spelled)] == spelled
    assert _decode(tok, track.ids) == text.decode()


def test_cropped_cache_gives_the_uncached_logits(bpe_model):
    runner = ModelRunner(bpe_model)
    ids = list(range(5, 25))
    runner.next_token_logits(ids)
    rewritten = ids[:12] + [40, 41, 42]
    runner.invalidate_from(12)
    assert runner.cached_len == 12
    logits = runner.next_token_logits(rewritten)
    with torch.no_grad():
        expected = bpe_model(input_ids=torch.tensor([rewritten])).logits[0, -1]
    torch.testing.assert_close(logits, expected)
    assert runner.forward_passes == 2
    assert runner.next_token_logits(rewritten) is logits and runner.forward_passes == 2


# --- generation on tiny trained models ---------------------------------------------------------


@pytest.mark.parametrize("which", ["sp", "bpe"])
def test_a_model_ensembled_with_itself_is_its_greedy_output(
    which, sp_tok, bpe_tok, sp_model, bpe_model
):
    tok, model = (sp_tok, sp_model) if which == "sp" else (bpe_tok, bpe_model)
    for prompt in PROMPTS:
        result = ensemble([model, model], [tok, tok]).generate(prompt)
        expected = hf_greedy(model, tok, prompt, 64)
        assert result.model_ids[0] == result.model_ids[1] == expected
        assert result.text == _decode(tok, expected)[len(prompt) :]
        assert result.forward_passes == [64, 64]


def test_threshold_zero_is_the_primary_model_alone(sp_tok, bpe_tok, sp_model, bpe_model):
    for prompt in PROMPTS:
        gated = ensemble([sp_model, bpe_model], [sp_tok, bpe_tok], threshold=0.0).generate(prompt)
        expected = hf_greedy(sp_model, sp_tok, prompt, 64)
        assert gated.model_ids[0] == expected
        assert gated.gated_fraction == 1.0
        assert gated.forward_passes == [64, 0]


def test_threshold_one_and_the_gate_match_a_reference_ensemble(
    sp_tok, bpe_tok, sp_model, bpe_model
):
    models, toks, styles = [sp_model, bpe_model], [sp_tok, bpe_tok], ["sentencepiece", "bpe"]
    for threshold in (1.0, 0.5):
        for prompt in PROMPTS:
            config = dict(weights=(0.6, 0.4), threshold=threshold, max_new_tokens=24)
            result = ensemble(models, toks, **config).generate(prompt)
            reference = reference_ensemble(models, toks, styles, (0.6, 0.4), prompt, threshold, 24)
            assert result.text_bytes == reference
            assert (result.gated_steps == 0) == (threshold == 1.0)


def test_two_models_differ_from_each_alone(sp_tok, bpe_tok, sp_model, bpe_model):
    texts = {}
    for name, models, toks in (
        ("sp", [sp_model], [sp_tok]),
        ("bpe", [bpe_model], [bpe_tok]),
        ("both", [sp_model, bpe_model], [sp_tok, bpe_tok]),
    ):
        texts[name] = [ensemble(models, toks).generate(p).text for p in PROMPTS]
    assert texts["both"] != texts["sp"] and texts["both"] != texts["bpe"]


def test_the_gate_needs_fewer_forward_passes(sp_tok, bpe_tok, sp_model, bpe_model):
    models, toks = [sp_model, bpe_model], [sp_tok, bpe_tok]
    full = ensemble(models, toks, threshold=1.0).generate(PROMPTS[0])
    gated = ensemble(models, toks, threshold=0.5).generate(PROMPTS[0])
    print(
        f"\n64 tokens: full ensemble forward passes {full.forward_passes} "
        f"(total {sum(full.forward_passes)}); gate 0.5 {gated.forward_passes} "
        f"(total {sum(gated.forward_passes)}), gated fraction {gated.gated_fraction:.2f}"
    )
    assert full.steps == gated.steps == 64
    assert full.forward_passes == [64, 64]
    assert 0 < gated.gated_steps < 64
    # The primary runs every step; the other catches up in one forward per ensembled step.
    assert gated.forward_passes == [64, 64 - gated.gated_steps]
    assert sum(gated.forward_passes) < sum(full.forward_passes)


def test_sampling_is_seeded_and_the_gate_keeps_the_primary_stream(
    sp_tok, bpe_tok, sp_model, bpe_model
):
    models, toks = [sp_model, bpe_model], [sp_tok, bpe_tok]
    config = dict(sample=True, temperature=1.3, max_new_tokens=32)
    first = ensemble(models, toks, seed=5, **config).generate(PROMPTS[0])
    again = ensemble(models, toks, seed=5, **config).generate(PROMPTS[0])
    other = ensemble(models, toks, seed=6, **config).generate(PROMPTS[0])
    assert first.text == again.text and first.text != other.text
    alone = ensemble([sp_model], [sp_tok], seed=5, **config).generate(PROMPTS[0])
    never = ensemble(models, toks, seed=5, threshold=0.0, **config).generate(PROMPTS[0])
    assert never.text == alone.text


# --- hand-computed step --------------------------------------------------------------------------


def _bigram(tok, rows: dict[str, dict[str, float]]) -> BigramLM:
    """Rows of next-token probabilities by piece; unlisted entries share what is left."""
    size = len(tok)
    table = torch.full((size, size), 0.0, dtype=torch.float64)
    for last, probs in rows.items():
        row = table[tok.convert_tokens_to_ids(last)]
        for piece, p in probs.items():
            row[tok.convert_tokens_to_ids(piece)] = p
    return BigramLM(table)


@pytest.fixture
def hand_models():
    tok_a = plain_tokenizer(["a", "b", "ab", "c"], eos="<eos>")
    tok_b = plain_tokenizer(["a", "b", "c", "bc"], eos="</s>")
    model_a = _bigram(
        tok_a,
        {
            "a": {"<eos>": 0.05, "a": 0.05, "b": 0.35, "ab": 0.40, "c": 0.15},
            "b": {"<eos>": 0.9, "a": 0.1},
            "ab": {"<eos>": 0.9, "a": 0.1},
            "c": {"<eos>": 0.9, "a": 0.1},
        },
    )
    model_b = _bigram(
        tok_b,
        {
            "a": {"</s>": 0.05, "a": 0.05, "b": 0.35, "c": 0.40, "bc": 0.15},
            "b": {"</s>": 0.8, "c": 0.2},
            "c": {"</s>": 0.8, "c": 0.2},
            "bc": {"</s>": 0.8, "c": 0.2},
        },
    )
    return (model_a, model_b), (tok_a, tok_b)


def test_hand_computed_union_step(hand_models):
    models, toks = hand_models
    union = UnionVocab.from_tokenizers(toks)
    order = [union.eos_id] + [union.index[t] for t in (b"a", b"b", b"ab", b"c", b"bc")]
    # After "a": A = (eos .05, a .05, b .35, ab .40, c .15), B = (eos .05, a .05, b .35, c .40,
    # bc .15); equal weights: eos .05, a .05, b .35, ab .20, c .275, bc .075.
    expected = torch.tensor([0.05, 0.05, 0.35, 0.20, 0.275, 0.075], dtype=torch.float64)
    gac = ensemble(list(models), list(toks))
    probs, gated = gac.next_distribution(gac.start("a"))
    assert not gated
    torch.testing.assert_close(probs[order], expected)
    # Weights 1:9: c = .1 * .15 + .9 * .40 = .375 now beats b (.35 in both models).
    mixed = ensemble(list(models), list(toks), weights=(1.0, 9.0))
    torch.testing.assert_close(
        mixed.next_distribution(mixed.start("a"))[0][union.index[b"c"]],
        torch.tensor(0.375, dtype=torch.float64),
    )
    # Whole runs: each model alone takes its own argmax, the pair agrees on "b", then EOS of
    # either tokenizer ends the text.
    assert ensemble([models[0]], [toks[0]]).generate("a").text == "ab"
    assert ensemble([models[1]], [toks[1]]).generate("a").text == "c"
    both = gac.generate("a")
    assert both.text == "b" and both.stop_reason == "eos" and both.steps == 2
    assert ensemble(list(models), list(toks), weights=(1.0, 9.0)).generate("a").text == "c"


def test_a_token_one_model_lacks_is_reencoded_for_it(hand_models):
    models, toks = hand_models
    # Weights 9:1 make A's "ab" win (.9 * .40 = .36 vs b .35); B has no "ab": it sees a, a, b.
    result = ensemble(list(models), list(toks), weights=(9.0, 1.0), max_new_tokens=1).generate("a")
    assert result.text == "ab"
    assert result.model_ids[0] == toks[0].convert_tokens_to_ids(["a", "ab"])
    assert result.model_ids[1] == toks[1].convert_tokens_to_ids(["a", "a", "b"])


# --- bad input -----------------------------------------------------------------------------------


def test_vocabularies_that_share_nothing_are_refused():
    with pytest.raises(ValueError, match="shares no token text.*same script"):
        UnionVocab.from_tokenizers([plain_tokenizer(["a", "b"]), plain_tokenizer(["x", "y"])])


def test_a_tokenizer_without_eos_is_refused():
    with pytest.raises(ValueError, match=r"model 1 has no EOS token.*set tokenizer\.eos_token"):
        UnionVocab.from_tokenizers([plain_tokenizer(["a"]), plain_tokenizer(["a"], eos=None)])


@pytest.mark.parametrize(
    "weights, message",
    [
        ((1.0,), r"got 1 weights for 2 models: pass one weight per model"),
        ((1.0, -0.5), r"weight -0.5 of model 1 .* use 0 to leave a model out"),
        ((0.0, 0.0), r"all weights are 0: give at least one model a positive weight"),
    ],
)
def test_bad_weights_are_refused(hand_models, weights, message):
    models, toks = hand_models
    with pytest.raises(ValueError, match=message):
        ensemble(list(models), list(toks), weights=weights)


def test_threshold_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"threshold 1.5 is outside \[0, 1\]: 1.0 ensembles"):
        EnsembleConfig(weights=(1.0,), threshold=1.5)


# --- CLI -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, sp_tok, bpe_tok, sp_model, bpe_model):
    dirs = []
    for name, tok, model in (("sp", sp_tok, sp_model), ("bpe", bpe_tok, bpe_model)):
        directory = tmp_path_factory.mktemp(f"ensemble_{name}")
        model.save_pretrained(directory)
        tok.save_pretrained(directory)
        dirs.append(str(directory))
    return dirs


def test_cli_writes_one_jsonl_line_per_prompt(tmp_path, saved_models, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(PROMPTS)) + "\n"
    )
    output = tmp_path / "out.jsonl"
    # docs/ensemble.md's command, on the test's models, prompts and lengths.
    command = doc_block("ensemble-cli").text.replace("\\\n", " ")
    substitutions = {"./llama-ish": saved_models[0], "./gpt2-ish": saved_models[1],
                     "--weights 0.6 0.4": "--weights 0.5 0.5", "prompts.txt": str(prompts),
                     "out.jsonl": str(output), "--max-new-tokens 64": "--max-new-tokens 16"}
    program, *argv = shlex.split(substituted(command, substitutions))
    assert program == "token-objectives"
    assert main(argv) == 0
    assert "forward passes per model" in capsys.readouterr().out
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == [0, 1]
    assert [line["prompt"] for line in lines] == PROMPTS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = [
        AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
        for d in saved_models
    ]
    toks = [AutoTokenizer.from_pretrained(d, local_files_only=True) for d in saved_models]
    for line in lines:
        expected = ensemble(models, toks, threshold=0.5, max_new_tokens=16).generate(line["prompt"])
        assert line["text"] == expected.text and line["new_tokens"] == 16
        assert line["gated_fraction"] == pytest.approx(line["gated_steps"] / line["steps"])
        assert line["forward_passes"] == [16, 16 - line["gated_steps"]]
        assert line["models"] == saved_models


def test_the_docs_python_example_is_the_ensemble(sp_tok, bpe_tok, sp_model, bpe_model):
    """docs/ensemble.md's Python block, run on the two tiny models."""
    names = {"tok_a": sp_tok, "tok_b": bpe_tok, "model_a": sp_model, "model_b": bpe_model}
    exec(doc_block("ensemble-python").text, names)
    expected = GaCEnsemble([sp_model, bpe_model], [sp_tok, bpe_tok], EnsembleConfig(
        weights=(0.6, 0.4), threshold=0.5, max_new_tokens=64)).generate("The train to")
    assert names["out"].text == expected.text
    assert names["out"].forward_passes == expected.forward_passes
    assert len(names["union"].token_bytes) > max(len(sp_tok), len(bpe_tok))


def test_cli_plain_prompts_and_errors_that_name_the_fix(tmp_path, saved_models, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The train to\n\nAlice bought 3\n")
    output = tmp_path / "out.jsonl"
    base = ["ensemble", "--model", saved_models[0], "--model", saved_models[1]]
    base += ["--prompts", str(prompts), "--output", str(output), "--max-new-tokens", "4"]
    assert main(base) == 0
    assert [json.loads(line)["prompt"] for line in output.read_text().splitlines()] == PROMPTS
    capsys.readouterr()
    assert main(base + ["--weights", "1"]) == 2
    assert "pass one weight per model" in capsys.readouterr().err
    missing = ["ensemble", "--model", str(tmp_path / "nowhere"), "--prompts", str(prompts)]
    assert main(missing + ["--output", str(output)]) == 2
    assert "never downloads" in capsys.readouterr().err
