"""tokenizer.py against transformers' GPT-2 tokenizer (HF's `tokenizers` BPE, an independent
implementation) on text that stresses the pre-tokeniser and the byte fallback, with the tiny
fixture vocabulary always and with the real GPT-2 vocabulary when ../shared is present."""
import shutil
import socket
import time

import pytest
import tiktoken.registry
from transformers import GPT2TokenizerFast

from conftest import TINY_MERGES, TINY_VOCAB_SIZE
from errors import UserError
from tokenizer import ENDOFTEXT, load_tokenizer

CORPUS = [
    "Hello world",
    "",
    " ",
    "   leading, trailing   ",
    "two  spaces,   three, and\n\n\nnewlines\n",
    "tabs\t\tand\t mixed \t\n \n\t whitespace",
    "windows\r\nline ends\r\n",
    "héllo wörld ünïcödé ÀÉÎÕÜ ß ø",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "中文字符 日本語のテキスト 한국어 텍스트",
    "math Ω≈ç√∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 zero\u200bwidth nbsp\u00a0em\u2003space",
    "digits 0 1 12 123 1234 12345 3.14159 1,000,000 2024-05-01",
    "I'm you're we've they'll he'd she's it's DON'T I'M don't'll 's",
    "code: def f(x):\n    return x ** 2  # square\n",
    "punctuation... !!! ??? --- *** ((())) <<>> \"quoted\" 'single'",
    "the then there is in an at on with 12 1 2",
    f"before{ENDOFTEXT}after {ENDOFTEXT} {ENDOFTEXT}{ENDOFTEXT}",
    "<|endoftext",
    "\x00\x01\x7f control bytes",
    "  a\n\n  b  ", "trailing spaces   ", " \n ", "a \n\n\n b",  # the whitespace rules at the end of a text
]


def hf_tokenizer(folder, vocab="vocab.json", merges="merges.txt"):
    return GPT2TokenizerFast.from_pretrained(str(folder), vocab_file=str(folder / vocab),
                                             merges_file=str(folder / merges))


def assert_same_as_hf(ours, hf):
    for text in CORPUS:
        assert ours.encode(text) == hf.encode(text), repr(text)
        assert ours.decode(ours.encode(text)) == text, repr(text)
        assert ours.decode(ours.encode_ordinary(text)) == text, repr(text)


def test_tiny_vocabulary_matches_transformers(tiny_tokenizer_dir):
    ours = load_tokenizer(tiny_tokenizer_dir)
    assert ours.vocab_size == TINY_VOCAB_SIZE and ours.eot_id == TINY_VOCAB_SIZE - 1
    assert_same_as_hf(ours, hf_tokenizer(tiny_tokenizer_dir))
    # the merges are really used: " the" is one token (the third merge)
    assert ours.encode(" the") == [256 + TINY_MERGES.index("Ġt he")]


def test_real_vocabulary_matches_transformers(shared_assets):
    folder = shared_assets / "gpt2_bpe"  # OpenAI's names: encoder.json + vocab.bpe
    ours = load_tokenizer(folder)
    assert ours.vocab_size == 50257 and ours.eot_id == 50256
    assert ours.encode("Hello world") == [15496, 995]
    assert_same_as_hf(ours, hf_tokenizer(folder, "encoder.json", "vocab.bpe"))


def test_endoftext_in_text(tiny_tokenizer_dir):
    """encode() turns a literal <|endoftext|> into the EOT id (as HF does); encode_ordinary keeps it text."""
    ours = load_tokenizer(tiny_tokenizer_dir)
    text = f"a{ENDOFTEXT}b"
    assert ours.encode(text) == [ord("a"), ours.eot_id, ord("b")]
    ordinary = ours.encode_ordinary(text)
    assert ours.eot_id not in ordinary and ours.decode(ordinary) == text


def test_tiktoken_gpt2_equals_the_folder_vocabulary(shared_assets, monkeypatch):
    cache = shared_assets / "tiktoken_cache"
    if not cache.is_dir():
        pytest.skip("no tiktoken cache in ../shared/assets")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # tiktoken memoises encodings per process
    from_tiktoken, from_folder = load_tokenizer(), load_tokenizer(shared_assets / "gpt2_bpe")
    assert (from_tiktoken.vocab_size, from_tiktoken.eot_id) == (from_folder.vocab_size, from_folder.eot_id)
    for text in CORPUS:
        assert from_tiktoken.encode(text) == from_folder.encode(text), repr(text)
    assert load_tokenizer("gpt2-medium").encode("Hello world") == [15496, 995]  # a hub name: the shared vocabulary


def unreachable_proxy() -> str:
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_tiktoken_offline_without_cache_names_the_tokenizer_option(monkeypatch, tmp_path):
    """Empty cache and no network (all traffic sent to a refused proxy, so this is fast and
    never downloads even where there is internet): a UserError pointing at --tokenizer."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, unreachable_proxy())
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    start = time.monotonic()
    with pytest.raises(UserError, match="--tokenizer") as caught:
        load_tokenizer()
    assert time.monotonic() - start < 10
    assert "TIKTOKEN_CACHE_DIR" in str(caught.value) and "\n" not in str(caught.value)


def test_openai_file_names_are_accepted(tiny_tokenizer_dir, tmp_path):
    shutil.copy(tiny_tokenizer_dir / "vocab.json", tmp_path / "encoder.json")
    shutil.copy(tiny_tokenizer_dir / "merges.txt", tmp_path / "vocab.bpe")
    openai, hf_named = load_tokenizer(tmp_path), load_tokenizer(tiny_tokenizer_dir)
    for text in CORPUS:
        assert openai.encode(text) == hf_named.encode(text)


def write_variant(tiny_tokenizer_dir, tmp_path, merges=None, vocab_text=None):
    shutil.copy(tiny_tokenizer_dir / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(tiny_tokenizer_dir / "merges.txt", tmp_path / "merges.txt")
    if merges is not None:
        (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    if vocab_text is not None:
        (tmp_path / "vocab.json").write_text(vocab_text)
    return tmp_path


@pytest.mark.parametrize("merges", [
    pytest.param([TINY_MERGES[1], TINY_MERGES[0], *TINY_MERGES[2:]], id="swapped-order"),
    pytest.param([*TINY_MERGES, "x y"], id="merge-not-in-vocab"),
    pytest.param([*TINY_MERGES[:-1], "1 2 3"], id="three-part-line"),
])
def test_merges_that_do_not_match_the_vocabulary_are_refused(merges, tiny_tokenizer_dir, tmp_path):
    folder = write_variant(tiny_tokenizer_dir, tmp_path, merges=merges)
    with pytest.raises(UserError, match="does not match") as caught:
        load_tokenizer(folder)
    assert str(folder / "merges.txt") in str(caught.value)


@pytest.mark.parametrize("vocab_text,words", [
    ('{"a": 0', "cannot read tokenizer files"),
    ('{"a": 0, "b": 1}', "no <|endoftext|> token"),
])
def test_bad_vocab_files_are_refused(vocab_text, words, tiny_tokenizer_dir, tmp_path):
    folder = write_variant(tiny_tokenizer_dir, tmp_path, vocab_text=vocab_text)
    with pytest.raises(UserError, match=words):
        load_tokenizer(folder)


def test_folder_without_tokenizer_files_is_refused(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(UserError, match="no vocab.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("source", ["no_such_folder", "../shared/assets/gpt2_bpe_typo", "vocab.json", "gpt3"])
def test_a_mistyped_folder_is_an_error_not_the_standard_vocabulary(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")  # an existing file is not a folder either
    with pytest.raises(UserError, match="does not exist") as caught:
        load_tokenizer(source)
    assert source in str(caught.value) and "\n" not in str(caught.value)
