"""Shared fixtures. Everything here is built offline, inside the test session: a tiny byte-level
BPE vocabulary and random-weight GPT-2 checkpoints written by `transformers` itself. The real
assets in ../shared/assets are used only by tests that ask for `shared_assets` (skipped if absent).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizer import ENDOFTEXT, bytes_to_unicode  # noqa: E402

SHARED_ASSETS = ROOT.parent / "shared" / "assets"

# The tests' models are tiny: one thread is faster than two, and immune to other load on the machine.
torch.set_num_threads(1)

# A handful of merges, enough to exercise multi-byte tokens; ids follow merge order like GPT-2's.
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t", "e n", "Ġ w",
               "Ġ o", "i s", "Ġ i", "o u", "a n", "e s", "Ġ c", "Ġ b", "in g", "Ġ 1", "Ġ 2", "1 2"]


def write_tiny_tokenizer(folder: Path) -> int:
    """Write vocab.json + merges.txt of a small GPT-2-style vocabulary; returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for pair in TINY_MERGES:
        vocab["".join(pair.split())] = len(vocab)
    vocab[ENDOFTEXT] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n", encoding="utf-8")
    return len(vocab)


TINY_VOCAB_SIZE = 256 + len(TINY_MERGES) + 1


def save_hf_gpt2(folder: Path, n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=0,
                 safe_serialization=True, **config_overrides) -> Path:
    """A random-weight GPT-2 saved by transformers, with the tiny tokenizer beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=TINY_VOCAB_SIZE, bos_token_id=TINY_VOCAB_SIZE - 1,
                        eos_token_id=TINY_VOCAB_SIZE - 1, **config_overrides)
    model = GPT2LMHeadModel(config)
    # transformers initialises biases and LayerNorms to constants; randomise them so that a
    # mix-up of any two tensors cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=safe_serialization)
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 checkpoint folder (config.json, model.safetensors, tokenizer)."""
    return save_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2"))


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    if not SHARED_ASSETS.is_dir():
        pytest.skip("../shared/assets is not present")
    return SHARED_ASSETS
