"""NEFTune: the noise's scale and support on a fixed seed, nothing outside training, resume exact."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from errors import UserError
from model import GPT, GPTConfig
from test_train import run, run_args, train_losses  # noqa: F401 (run_args is a fixture)
from test_train import test_resume_is_bit_identical as resume_check  # aliased: not collected again here

CONFIG = GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=64)


def models(alpha):
    """(a model with NEFTune, the same weights without)."""
    torch.manual_seed(0)
    noisy = GPT(dataclasses.replace(CONFIG, neftune_alpha=alpha))
    plain = GPT(CONFIG)
    plain.load_state_dict(noisy.state_dict())
    return noisy, plain


def tokens(batch=3, length=48):
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def test_noise_is_uniform_with_the_papers_scale_on_real_tokens_only():
    alpha, lengths = 5.0, torch.tensor([48, 20, 1])
    model, _ = models(alpha)
    idx = tokens()
    torch.manual_seed(2)
    noise = (model.train().embed(idx, lengths) - model.transformer.wte(idx)).detach()
    for row, length in enumerate(lengths.tolist()):
        bound = alpha / math.sqrt(length * CONFIG.n_embd)
        real, pad = noise[row, :length].abs(), noise[row, length:]
        assert torch.equal(pad, torch.zeros_like(pad))  # padding gets none
        # U(-b, b): |noise| <= b, its largest draw close to b, its mean b/2 (over >= 64 draws per row,
        # the mean's standard error is at most 0.289 b / 8: 4 % of b/2; 15 % is past 3 of them)
        assert real.max() <= bound * (1 + 1e-6)
        assert real.max() >= bound * 0.95
        assert real.mean() == pytest.approx(bound / 2, rel=0.15)
        assert (noise[row, :length] > 0).float().mean() == pytest.approx(0.5, abs=0.15)  # centred
    first = noise[0, :48].abs()  # 3072 draws: a tighter check of the scale
    assert first.mean() == pytest.approx(alpha / math.sqrt(48 * 64) / 2, rel=0.03)


def test_without_lengths_every_position_counts():
    model, _ = models(5.0)
    idx = tokens(batch=2, length=32)
    noise = (model.train().embed(idx) - model.transformer.wte(idx)).detach()
    assert noise.abs().max() <= 5.0 / math.sqrt(32 * 64) * (1 + 1e-6)
    assert (noise != 0).all()


def test_noise_only_in_training_and_only_with_alpha():
    noisy, plain = models(10.0)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(noisy.eval()(idx)[0], plain.eval()(idx)[0])  # evaluation: unchanged
        # training mode without dropout: alpha 0 computes what evaluation does, alpha > 0 does not
        assert torch.equal(plain.train()(idx)[0], plain.eval()(idx)[0])
        assert not torch.allclose(noisy.train()(idx)[0], plain.eval()(idx)[0], atol=1e-3)
    prompts = [[5, 6, 7], [8, 9]]
    noisy.train()
    assert noisy.generate(prompts, 6) == plain.generate(prompts, 6)  # generate() evaluates
    assert noisy.training  # ...and leaves the mode as it found it


def test_forward_passes_lengths_to_the_noise():
    model, _ = models(5.0)
    idx, lengths = tokens(), torch.tensor([48, 20, 1])
    seen = []
    original = model.embed
    model.embed = lambda ids, rows=None: seen.append(rows) or original(ids, rows)
    model.train()(idx, idx, lengths=lengths)
    assert seen and torch.equal(seen[0], lengths)


def test_training_step_gives_the_model_each_rows_length(run_args, monkeypatch):  # noqa: F811
    seen = []
    original = GPT.embed

    def embed(self, idx, lengths=None):
        if self.training:
            seen.append((idx.clone(), lengths))
        return original(self, idx, lengths)
    monkeypatch.setattr(GPT, "embed", embed)
    _, code = run(run_args + ["--neftune-alpha", "5", "--max-steps", "3", "--no-group-by-length"], "lengths")
    assert code == 0 and seen
    for idx, lengths in seen:
        assert lengths is not None and int(lengths.max()) == idx.size(1)  # collate pads to the longest row
        for row, n in enumerate(lengths.tolist()):
            assert (idx[row, n:] == idx[row, -1]).all()  # only padding (the eot id) after each length
    assert any((lengths < idx.size(1)).any() for idx, lengths in seen)  # some rows were padded


@pytest.mark.parametrize("alpha", [-1.0, float("nan")])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(UserError, match="--neftune-alpha"):
        dataclasses.replace(CONFIG, neftune_alpha=alpha).check()


def test_resume_is_bit_identical_with_neftune(run_args, monkeypatch):  # noqa: F811
    """The noise draws come from the RNG state a checkpoint saves, so resuming repeats them."""
    resume_check(run_args, monkeypatch, ["--neftune-alpha", "5"])
    plain, _ = run(run_args + ["--save-interval", "5"], "plain")
    straight = Path(run_args[run_args.index("--out-dir") + 1]) / "straight"
    assert train_losses(plain)[2:] != train_losses(straight)[2:]  # the noise did change training


def test_training_step_passes_each_rows_real_length(run_args, monkeypatch):  # noqa: F811
    """The loop hands the model every row's real (unpadded) length, NEFTune's L."""
    import train_sft
    seen = []
    original = train_sft.Trainer.train_step

    def train_step(self, batches):
        for b in batches:
            real = (b.y != -100).sum(1)  # targets end at the last real token (its EOS)
            seen.append(bool((b.lengths >= real).all()) and int(b.lengths.sum()) == b.n_tokens)
        return original(self, batches)
    monkeypatch.setattr(train_sft.Trainer, "train_step", train_step)
    run(run_args + ["--neftune-alpha", "5", "--max-steps", "2"], "lengths")
    assert seen and all(seen)
