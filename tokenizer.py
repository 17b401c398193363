"""GPT-2's byte-level BPE through tiktoken, from a checkpoint folder's vocab.json + merges.txt or
from tiktoken's own "gpt2" encoding.

HF's vocab.json is OpenAI's encoder.json: token strings written in GPT-2's printable stand-ins for
bytes, mapped to ids. For GPT-2 the id of a token is also its merge rank, which is exactly what
tiktoken wants, so we only undo the byte encoding and check the ranks against merges.txt.
"""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import tiktoken

from errors import UserError

ENDOFTEXT = "<|endoftext|>"
# Hub names whose tokenizer is the standard GPT-2 vocabulary (tiktoken's "gpt2").
_STANDARD_VOCAB_NAME = re.compile(r"^(openai-community/)?(distil)?gpt2(-medium|-large|-xl)?$")
# GPT-2's pre-tokenisation pattern, in tiktoken's spelling for its "gpt2" encoding (possessive
# quantifiers, the same splits as OpenAI's original), so that a tokenizer built from vocab.json +
# merges.txt is identical to tiktoken's and shares its data caches (data.tokenizer_fingerprint).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, and the id of <|endoftext|>."""

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.eot_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Like HF's GPT2TokenizerFast: a literal "<|endoftext|>" in the text becomes the EOT id."""
        return self.encoding.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode user text in which "<|endoftext|>" is just characters, never the EOT token."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))


def _encoding_from_files(vocab_path: Path, merges_path: Path) -> tiktoken.Encoding:
    byte_of = {char: b for b, char in bytes_to_unicode().items()}
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        merges = [line.split() for line in merges_path.read_text(encoding="utf-8").splitlines()[1:] if line]
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read tokenizer files in {vocab_path.parent}: {err}") from None
    if ENDOFTEXT not in vocab:
        raise UserError(f"{vocab_path}: no {ENDOFTEXT} token; is this a GPT-2 vocab.json?")
    try:
        ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token != ENDOFTEXT}
    except KeyError:
        raise UserError(f"{vocab_path}: not a GPT-2 byte-level vocabulary") from None
    # tiktoken merges by rank, HF by merges.txt order; both agree only if the merged tokens'
    # ids follow that order, as they do in every GPT-2 checkpoint.
    ids = [vocab.get("".join(pair), -1) for pair in merges]
    if any(len(p) != 2 for p in merges) or ids != sorted(ids) or -1 in ids:
        raise UserError(f"{merges_path} does not match {vocab_path}: merge order and token ids disagree")
    return tiktoken.Encoding(
        name=f"gpt2-bpe:{vocab_path.parent}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: vocab[ENDOFTEXT]},
        explicit_n_vocab=len(vocab),
    )


def _merge_parts(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens that BPE merged last to make `token`: replay the merges of lower rank."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        rank, i = min((ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1))
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not a merge of two tokens")
    return parts[0], parts[1]


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """Write vocab.json + merges.txt (Hugging Face's names) of this tokenizer into `folder`: the
    files it was read from, or, for tiktoken's gpt2, the same data recovered from its ranks (a
    token's rank is its id, and its merge is the pair that replaying lower-ranked merges leaves)."""
    from files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    ranks = tokenizer.encoding._mergeable_ranks  # tiktoken keeps no public accessor for them
    to_char = bytes_to_unicode()
    text = lambda b: "".join(to_char[x] for x in b)  # noqa: E731 - GPT-2's printable spelling
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[ENDOFTEXT] = tokenizer.eot_id
    merges = ["#version: 0.2"] + [" ".join(text(p) for p in _merge_parts(token, ranks))
                                  for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    vocab_json, merges_txt = json.dumps(vocab, ensure_ascii=False), "\n".join(merges) + "\n"
    write_atomic(folder / "vocab.json", lambda tmp: tmp.write_text(vocab_json, encoding="utf-8"))
    write_atomic(folder / "merges.txt", lambda tmp: tmp.write_text(merges_txt, encoding="utf-8"))


def tokenizer_files(folder: Path) -> tuple[Path, Path] | None:
    """(vocab, merges) in a folder, under HF's names or OpenAI's (encoder.json, vocab.bpe)."""
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return folder / vocab, folder / merges
    return None


def tokenizer_folder(*candidates: str | os.PathLike | None) -> Path | None:
    """The first candidate that is a folder holding GPT-2 tokenizer files (a checkpoint usually
    does); None if none is, which load_tokenizer reads as the standard GPT-2 vocabulary."""
    return next((Path(c) for c in candidates if c and Path(c).is_dir() and tokenizer_files(Path(c))), None)


def tokenizer_for(weights: str | os.PathLike | None, override: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer that goes with a checkpoint (a folder or hub name): `override` (--tokenizer) if
    given, else the files beside the weights, else GPT-2's standard vocabulary. A run folder's
    tokenizer is its own copy instead (runs.run_tokenizer)."""
    return load_tokenizer(override or tokenizer_folder(weights))


def load_tokenizer(source: str | os.PathLike | None = None) -> Tokenizer:
    """A folder with vocab.json + merges.txt (any HF GPT-2 checkpoint), or tiktoken's "gpt2".

    None or the hub name of a GPT-2 size (e.g. "gpt2-medium") means the standard GPT-2
    vocabulary, which every size shares. Anything else must be a folder: a mistyped path is an
    error, never a silent switch to the standard vocabulary.
    """
    if source is not None and Path(source).is_dir():
        files = tokenizer_files(Path(source))
        if files is None:
            raise UserError(f"{source} has no vocab.json + merges.txt (or encoder.json + vocab.bpe)")
        return Tokenizer(_encoding_from_files(*files))
    if source is not None and not _STANDARD_VOCAB_NAME.match(str(source)):
        raise UserError(f"tokenizer folder {source} does not exist (or is not a folder); pass a folder with "
                        "vocab.json + merges.txt, or leave the tokenizer out for tiktoken's gpt2")
    try:
        return Tokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as err:  # tiktoken raises requests/OSError/... when it cannot download
        raise UserError(
            "cannot load tiktoken's 'gpt2' vocabulary (offline?): pass --tokenizer DIR with vocab.json + "
            f"merges.txt, or set TIKTOKEN_CACHE_DIR to a tiktoken cache ({type(err).__name__})"
        ) from None
