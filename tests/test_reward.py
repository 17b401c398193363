"""reward.py: loading a reward model offline, batched scoring, and the win-rate statistics."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import reward
from conftest import TINY_VOCAB_SIZE, write_tiny_tokenizer
from errors import UserError
from reward import LOSS, TIE, WIN


def save_tiny_reward_model(folder: Path, seed: int = 0, num_labels: int = 1, n_positions: int = 64) -> Path:
    """A random GPT2ForSequenceClassification (one output) and its tokenizer, saved by transformers."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2TokenizerFast

    tokenizer_dir = folder / "tokenizer_files"
    write_tiny_tokenizer(tokenizer_dir)
    tokenizer = GPT2TokenizerFast(vocab=str(tokenizer_dir / "vocab.json"), merges=str(tokenizer_dir / "merges.txt"))
    tokenizer.pad_token = tokenizer.eos_token
    eot = TINY_VOCAB_SIZE - 1
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=n_positions, vocab_size=TINY_VOCAB_SIZE,
                        num_labels=num_labels, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot)
    model = GPT2ForSequenceClassification(config)
    with torch.no_grad():  # a random head of std 0.02 gives scores too close together to rank
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    return save_tiny_reward_model(tmp_path_factory.mktemp("reward_model"))


# ----------------------------------------------------------------------------- statistics

def test_outcomes_and_rates_on_fixed_scores():
    tuned = [1.0, 2.0, 3.0, 4.0, 5.0, 0.5]
    base = [0.0, 2.0, 4.0, 4.0 + 5e-7, 1.0, 0.7]  # win, exact tie, loss, tie within 1e-6, win, loss
    outcomes = reward.prompt_outcomes(tuned, base)
    assert outcomes.tolist() == [WIN, TIE, LOSS, TIE, WIN, LOSS]
    stats = reward.win_statistics(outcomes, n_resamples=500, seed=0)
    assert stats["win_rate"] == 2 / 6 and stats["tie_rate"] == 2 / 6 and stats["loss_rate"] == 2 / 6
    # A difference just over the tolerance is decided; identical responses are a tie whatever the scores.
    assert reward.prompt_outcomes([1.0], [1.0 - 2e-6]).tolist() == [WIN]
    identical = [False, False, True, False, False, False]
    assert reward.prompt_outcomes(tuned, base, identical).tolist() == [WIN, TIE, TIE, TIE, WIN, LOSS]


def test_several_samples_compare_per_prompt_means():
    tuned = [[1.0, 3.0], [0.0, 0.0], [5.0, -1.0]]  # means 2, 0, 2
    base = [[2.0, 2.5], [1.0, -1.0], [0.0, 0.0]]  # means 2.25, 0, 0
    assert reward.prompt_outcomes(tuned, base).tolist() == [LOSS, TIE, WIN]
    with pytest.raises(ValueError):
        reward.prompt_outcomes([[1.0, 2.0]], [[1.0]])


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    outcomes = rng.choice([WIN, TIE, LOSS], size=166, p=[0.55, 0.05, 0.40])
    win = np.mean(outcomes == WIN)
    lo, hi = reward.bootstrap_win_rate_ci(outcomes, 2000, seed=7)
    assert 0.0 <= lo < win < hi <= 1.0
    assert (lo, hi) == reward.bootstrap_win_rate_ci(outcomes, 2000, seed=7)
    # For n = 166 the interval is about +-1.96 * sqrt(p(1-p)/n) = +-0.076 wide around p.
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(win * (1 - win) / len(outcomes)), abs=0.02)
    assert reward.bootstrap_win_rate_ci(np.full(10, WIN), 100, seed=0) == (1.0, 1.0)


def test_bootstrap_matches_explicit_prompt_resampling():
    """The binomial shortcut is the prompt bootstrap: compare with resampling prompts directly."""
    rng = np.random.default_rng(0)
    outcomes = rng.choice([WIN, TIE, LOSS], size=80, p=[0.4, 0.2, 0.4])
    idx = np.random.default_rng(1).integers(0, len(outcomes), size=(20000, len(outcomes)))
    explicit = np.quantile((outcomes[idx] == WIN).mean(axis=1), [0.025, 0.975])
    shortcut = reward.bootstrap_win_rate_ci(outcomes, 20000, seed=2)
    # Both are quantiles of the same discrete distribution (steps of 1/80) from 20000 draws.
    assert shortcut == pytest.approx(tuple(explicit), abs=1.5 / len(outcomes))


# ----------------------------------------------------------------------------- loading and scoring

def test_score_matches_transformers_one_pair_at_a_time(reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = reward.load_reward_model(str(reward_dir))
    assert rm.max_length == 64  # n_positions caps the tokenizer's unset limit
    prompts = ["Say hello.", "What is 12 plus 1?", "the cat", "Name a color please, in one word."]
    responses = ["hello", "13", "a very long answer that goes on " * 8, ""]
    scores = reward.score(rm, prompts, responses, batch_size=3, progress=False)

    tokenizer = AutoTokenizer.from_pretrained(reward_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir, local_files_only=True).eval()
    with torch.no_grad():
        expected = [model(**tokenizer(p, r, truncation=True, max_length=64, return_tensors="pt")).logits[0, 0].item()
                    for p, r in zip(prompts, responses)]
    # Padding and batching change float summation order only.
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(np.round(scores, 4))) == len(scores)  # distinct pairs really got their own scores


def test_local_folder_never_uses_the_network(reward_dir, monkeypatch):
    from huggingface_hub import HfApi

    def no_network(*args, **kwargs):
        raise AssertionError("network used for a local folder")

    monkeypatch.setattr(HfApi, "model_info", no_network)
    assert reward.load_reward_model(str(reward_dir)).name == str(reward_dir)


def test_missing_reward_model_fails_fast_naming_the_option(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(UserError, match="--reward-model") as err:
        reward.load_reward_model(str(tmp_path / "no_such_folder"))
    assert "\n" not in str(err.value)
    for offline in (True, False):  # offline by flag, or a hub that cannot be reached (or lacks the name)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        start = time.perf_counter()
        with pytest.raises(UserError, match="--reward-model DIR") as err:
            reward.load_reward_model("nobody-here/no-such-reward-model-xyz")
        assert "\n" not in str(err.value)
        assert time.perf_counter() - start < 20  # the download's retry loop alone takes ~50 s


def test_bad_folder_and_wrong_head(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--reward-model .*empty"):
        reward.load_reward_model(str(tmp_path / "empty"))
    two_labels = save_tiny_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(UserError, match="2 output labels"):
        reward.load_reward_model(str(two_labels))


def test_without_transformers_one_line_says_how_to_install(reward_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(UserError, match=r"pip install -r requirements-eval.txt \(or pip install transformers\)"):
        reward.load_reward_model(str(reward_dir))
