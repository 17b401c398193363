"""Reward-model scoring and the statistics of a tuned-versus-base comparison.

The reward model is any Hugging Face sequence-classification model with a single output (by
default OpenAssistant's DeBERTa-v3 reward model). It reads (prompt, response) as a text pair, as
its model card shows (`tokenizer(question, answer)`: [CLS] prompt [SEP] response [SEP] for
DeBERTa), and returns one scalar per pair: higher is better. An empty response is still a pair
([CLS] prompt [SEP] [SEP]), whatever the batch.

Truncation: a pair longer than the model's max_length tokens (special tokens included; 512 for
DeBERTa-v3) loses tokens from the end of its longer part ("longest_first"). With B the tokens left
after the special ones, the shorter part is kept whole if it has at most B // 2 tokens and the
longer one keeps the rest; otherwise each keeps B // 2 (the longer one, or on a tie the response,
gets the odd token). So a prompt of up to B // 2 tokens (254 for DeBERTa-v3) is kept whole and a
long response loses its tail. score_pairs counts the truncated pairs: a reward computed on
clipped text is never silent.

Comparison: with K samples per prompt, each model's K rewards on a prompt are averaged and the
two means compared, so every prompt is one win, tie or loss and the bootstrap resamples prompts,
the unit that was sampled. A tie is a difference within `tie_tol`, or identical responses (the
reward model would score them the same up to batching noise). Ties are counted separately:
win_rate + tie_rate + loss_rate = 1.

transformers is imported only when a reward model is loaded: it is an optional dependency.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from errors import UserError
from model import is_hub_id

DEFAULT_REWARD_MODEL = "OpenAssistant/reward-model-deberta-v3-large-v2"
TIE_TOL = 1e-6
INSTALL_HINT = "pip install -r requirements-eval.txt (or pip install transformers), or pass --no-reward"


@dataclass
class RewardModel:
    model: torch.nn.Module  # a transformers *ForSequenceClassification with num_labels == 1
    tokenizer: object  # its transformers tokenizer
    max_length: int  # longest (prompt, response) encoding the model can read
    name: str  # what --reward-model said, recorded in reward.json


# ----------------------------------------------------------------------------- loading

def load_reward_model(source: str, device: str | torch.device = "cpu") -> RewardModel:
    """A reward model from a local folder (never touches the network) or a hub name (the local
    HF cache first; the hub only if it answers, so an offline machine fails in a second rather
    than after a minute of retries)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(f"reward scoring needs transformers, which is not installed: {INSTALL_HINT}") from None
    path = Path(source)
    if path.is_dir():
        model, tokenizer = _load_local(source)
    elif path.exists() or not is_hub_id(source):
        raise UserError(f"--reward-model {source}: no such folder; pass a folder saved by save_pretrained "
                        "or a hub name")
    else:
        model, tokenizer = _load_from_hub(source)
    if model.config.num_labels != 1:
        raise UserError(f"--reward-model {source}: has {model.config.num_labels} output labels; a reward model "
                        "has exactly one (a scalar score)")
    _ensure_padding(model, tokenizer)
    model.to(device).eval()
    return RewardModel(model, tokenizer, _max_length(model, tokenizer), str(source))


def _from_pretrained(source: str, local_only: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _require_sentencepiece(source)  # files already here: before transformers warns and fails obscurely
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except Exception:
        _require_sentencepiece(source)  # files just downloaded
        raise
    model = AutoModelForSequenceClassification.from_pretrained(source, local_files_only=local_only)
    return model, tokenizer


def _require_sentencepiece(source: str) -> None:
    """A tokenizer shipped only as a SentencePiece model (spm.model and no tokenizer.json, like the
    DeBERTa reward models) is converted by transformers with sentencepiece and protobuf. Without
    them it falls back to another reader and fails on the .model file's bytes; say what is missing."""
    folder = Path(source) if Path(source).is_dir() else _hub_cache_folder(source)
    if folder is None or (folder / "tokenizer.json").exists() or not any(folder.glob("*.model")):
        return
    try:
        import sentencepiece.sentencepiece_model_pb2  # noqa: F401  (imports protobuf, checks its version)
    except Exception as err:
        raise UserError(f"--reward-model {source}: its tokenizer is a SentencePiece model, which needs the "
                        f"sentencepiece and protobuf packages ({_one_line(err)}): pip install -r "
                        "requirements-eval.txt, or pass --no-reward") from None


def _hub_cache_folder(name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "tokenizer_config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _load_local(folder: str):
    try:
        return _from_pretrained(folder, local_only=True)
    except UserError:
        raise
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a bad folder
        raise UserError(f"--reward-model {folder}: cannot load a sequence-classification model and its "
                        f"tokenizer from this folder ({_one_line(err)})") from None


def _load_from_hub(name: str):
    offline_hint = (f"cannot load reward model {name!r}: not in the local Hugging Face cache and the hub is "
                    "unreachable; download it where there is network and pass --reward-model DIR "
                    "(or --no-reward)")
    try:
        return _from_pretrained(name, local_only=True)  # already cached: no network needed
    except UserError:
        raise
    except Exception:
        pass
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise UserError(offline_hint + " (HF_HUB_OFFLINE is set)")
    try:
        HfApi().model_info(name, timeout=10)  # one quick request instead of the download's retry loop
    except Exception as err:
        raise UserError(f"{offline_hint} ({type(err).__name__})") from None
    try:
        return _from_pretrained(name, local_only=False)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot load reward model {name!r} from the hub ({_one_line(err)}); "
                        "pass --reward-model DIR with a local copy") from None


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _ensure_padding(model, tokenizer) -> None:
    """Batches need a pad token. GPT-2-style reward models have none; like most of their users
    we pad with EOS (the model finds the last real token through pad_token_id)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{model.name_or_path}: the reward model's tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _max_length(model, tokenizer) -> int:
    """The tokenizer's limit, capped by the model's position table (tokenizers without a
    recorded limit report a huge number)."""
    limits = [tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else 512


# ----------------------------------------------------------------------------- scoring

@dataclass
class RewardScores:
    scores: list[float]  # one reward per (prompt, response) pair, in input order
    truncated: list[bool]  # per pair: longer than max_length, so scored on clipped text

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)


@torch.no_grad()
def score_pairs(reward_model: RewardModel, prompts: Sequence[str], responses: Sequence[str],
                batch_size: int = 8, progress: bool = True, desc: str = "reward") -> RewardScores:
    """The reward of each (prompt, response) pair, in input order, and which pairs were truncated
    (the rule is in the module docstring). Pairs are batched by length (less padding)."""
    from tqdm import tqdm

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    device = next(reward_model.model.parameters()).device
    tokenizer, max_length = reward_model.tokenizer, reward_model.max_length
    scores, truncated = [0.0] * len(prompts), [False] * len(prompts)
    with tqdm(total=len(order), desc=desc, unit="pair", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            pair = ([prompts[i] for i in batch], [responses[i] for i in batch])
            # Full lengths first (verbose=False: the over-long warning is what we count instead).
            full_lengths = [len(ids) for ids in tokenizer(*pair, verbose=False)["input_ids"]]
            encoded = tokenizer(*pair, padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(device)
            logits = reward_model.model(**encoded).logits[:, 0].float().tolist()
            for i, value, length in zip(batch, logits, full_lengths):
                scores[i], truncated[i] = value, length > max_length
            bar.update(len(batch))
    return RewardScores(scores, truncated)


def score(reward_model: RewardModel, prompts: Sequence[str], responses: Sequence[str],
          batch_size: int = 8, progress: bool = True, desc: str = "reward") -> list[float]:
    """The rewards alone, for callers that do not report truncation (see score_pairs)."""
    return score_pairs(reward_model, prompts, responses, batch_size, progress, desc).scores


# ----------------------------------------------------------------------------- statistics

WIN, TIE, LOSS = 1, 0, -1


def prompt_outcomes(tuned: np.ndarray, base: np.ndarray, identical: Sequence[bool] | None = None,
                    tie_tol: float = TIE_TOL) -> np.ndarray:
    """WIN / TIE / LOSS per prompt from rewards of shape [n_prompts] or [n_prompts, K]: the
    per-prompt mean rewards compared, a tie within tie_tol or where `identical` is true."""
    tuned, base = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if tuned.shape != base.shape or tuned.size == 0:
        raise ValueError(f"need equal, non-empty reward arrays, got shapes {tuned.shape} and {base.shape}")
    if tuned.ndim == 2:
        tuned, base = tuned.mean(axis=1), base.mean(axis=1)
    diff = tuned - base
    outcomes = np.where(diff > 0, WIN, LOSS)
    tied = np.abs(diff) <= tie_tol
    if identical is not None:
        tied |= np.asarray(identical, dtype=bool)
    outcomes[tied] = TIE
    return outcomes


def bootstrap_win_rate_ci(outcomes: np.ndarray, n_resamples: int = 2000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate, resampling prompts with replacement.
    The win rate of a resample depends only on how many wins it drew, which is
    Binomial(n, observed win rate): drawing that count directly is the same bootstrap, exactly,
    at O(n_resamples) cost instead of O(n_resamples * n_prompts)."""
    outcomes = np.asarray(outcomes)
    n = len(outcomes)
    rng = np.random.default_rng(seed)
    rates = rng.binomial(n, np.mean(outcomes == WIN), size=n_resamples) / n
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(rates, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def win_statistics(outcomes: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> dict:
    """win_rate, tie_rate, loss_rate (summing to 1) and win_rate_ci95, as reward.json has them."""
    outcomes = np.asarray(outcomes)
    return {
        "win_rate": float(np.mean(outcomes == WIN)),
        "tie_rate": float(np.mean(outcomes == TIE)),
        "loss_rate": float(np.mean(outcomes == LOSS)),
        "win_rate_ci95": list(bootstrap_win_rate_ci(outcomes, n_resamples, seed)),
    }
