"""GPT (model.py) against transformers' GPT2LMHeadModel as the reference: logits, losses,
gradients, dropout, gradient checkpointing and generation, all on small random models.

Tolerances: weights are random at unit scale (logits of ~30), where the two float32
implementations, with their different kernels and summation orders, differ by ~2e-5, and the
issue's 1e-4 bound on logits still catches the subtlest real mismatch tried (exact instead of tanh
GELU: ~3e-3); a wrong transpose, head split or epsilon is off by far more. Losses agree to
~1e-7 relative (bound 1e-5); exact rewrites of the same computation (gradient checkpointing;
the head on targets only, in test_chunked_head.py) to 1e-6 relative.
"""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import model as model_module
from configs import GPTConfig
from model import GPT, IGNORE_INDEX

VOCAB = 97  # small and prime: fast, and larger than n_embd so the head is a real projection
BLOCK = 32
# (n_head, n_embd): an odd head count, and gpt2-xl's 25 heads (head size 4 here, 64 there).
SHAPES = [pytest.param(5, 40, id="5-heads"), pytest.param(25, 100, id="25-heads")]


def hf_gpt2(n_head=5, n_embd=40, n_layer=2, dropout=0.0, attn="sdpa", gain=1.0, seed=0) -> GPT2LMHeadModel:
    """A random HF GPT-2 with every tensor random at unit scale: N(0, 1) embeddings, N(0, gain^2 /
    fan_in) linears, random biases and LayerNorms. At GPT-2's own init (std 0.02) logits are ~0.3
    and even an exact-vs-tanh GELU mix-up moves them by < 1e-6; at unit scale it moves them by
    ~3e-3 while a faithful implementation stays within ~2e-5."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=BLOCK, vocab_size=VOCAB,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, attn_implementation=attn)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".wte." in name or ".wpe." in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:  # Conv1D weight, (in, out)
                p.normal_(0.0, gain / p.shape[0] ** 0.5)
            else:  # biases, and LayerNorm weights around 1
                p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.1)
    return model


def gpt_like(hf: GPT2LMHeadModel, **overrides) -> GPT:
    """Our GPT with the same shape and the same weights as `hf`."""
    c = hf.config
    shape = dict(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                 n_embd=c.n_embd, dropout=c.resid_pdrop, layer_norm_epsilon=c.layer_norm_epsilon)
    model = GPT(GPTConfig(**{**shape, **overrides}))
    model.load_hf_state_dict(hf.state_dict())
    return model


def random_ids(batch=3, length=24, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def masked_labels(idx: torch.Tensor, fraction=0.4, seed=2) -> torch.Tensor:
    """idx with about `fraction` of the positions set to IGNORE_INDEX (each row keeps some)."""
    drop = torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed)) < fraction
    drop[:, -1] = False
    return idx.masked_fill(drop, IGNORE_INDEX)


def grads_of(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    _, loss = model(*args, **kwargs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(a: dict, b: dict, rel=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().clamp(min=1e-12)
        assert (a[name] - b[name]).abs().max() <= rel * scale, name


# ---------------------------------------------------------------------------- forward parity

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n_head,n_embd", SHAPES)
def test_logits_match_hf_in_eval_mode(n_head, n_embd, attn):
    hf = hf_gpt2(n_head, n_embd, attn=attn).eval()
    ours = gpt_like(hf).eval()
    idx = random_ids()
    with torch.no_grad():
        expected = hf(idx).logits
        logits, loss = ours(idx)
    assert loss is None and logits.shape == expected.shape == (3, 24, VOCAB)
    assert (logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("n_head,n_embd", SHAPES)
def test_logits_match_hf_in_train_mode_with_dropout_off(n_head, n_embd):
    hf = hf_gpt2(n_head, n_embd, dropout=0.0).train()
    ours = gpt_like(hf).train()
    idx = random_ids()
    assert (ours(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_train_mode_dropout_matches_hf_under_the_same_seed(attn):
    """Both models draw their dropout masks in the same order and shapes (embeddings, attention
    probabilities, attention output, MLP output), so under one seed they drop the same units:
    every dropout site is where HF has it, with the same p. (Should a later transformers draw its
    masks differently, this test is the one to revisit; the test below stands regardless.)"""
    hf = hf_gpt2(dropout=0.1, attn=attn).train()
    ours = gpt_like(hf).train()
    idx = random_ids()
    torch.manual_seed(7)
    expected = hf(idx).logits
    torch.manual_seed(7)
    assert (ours(idx)[0] - expected).abs().max() <= 1e-4


def test_dropout_is_random_in_train_mode_and_off_in_eval_mode():
    hf = hf_gpt2(dropout=0.1).eval()
    ours = gpt_like(hf)
    assert ours.config.dropout == 0.1
    idx = random_ids()
    ours.eval()
    with torch.no_grad():
        eval_a, eval_b = ours(idx)[0], ours(idx)[0]
        assert torch.equal(eval_a, eval_b)
        assert (eval_a - hf(idx).logits).abs().max() <= 1e-4
        ours.train()
        train_a, train_b = ours(idx)[0], ours(idx)[0]
    # dropout of 0.1 on every residual branch moves logits by ~1e-1; float noise is ~1e-6
    assert (train_a - train_b).abs().max() > 1e-2
    assert (train_a - eval_a).abs().max() > 1e-2


# ---------------------------------------------------------------------------- losses

@pytest.mark.parametrize("masked", [False, True], ids=["all-targets", "masked"])
@pytest.mark.parametrize("n_head,n_embd", SHAPES)
def test_loss_matches_hf_labels(n_head, n_embd, masked):
    """Our targets are pre-shifted: model(idx[:, :-1], labels[:, 1:]) is HF's model(idx, labels=labels)."""
    hf = hf_gpt2(n_head, n_embd).eval()
    ours = gpt_like(hf).eval()
    idx = random_ids()
    labels = masked_labels(idx) if masked else idx
    with torch.no_grad():
        expected = hf(idx, labels=labels).loss
        _, loss = ours(idx[:, :-1], labels[:, 1:])
    assert torch.isclose(loss, expected, rtol=1e-5, atol=0)


def test_sum_reduction_is_mean_times_target_count():
    ours = gpt_like(hf_gpt2()).eval()
    idx = random_ids()
    targets = masked_labels(idx)[:, 1:]
    n_targets = (targets != IGNORE_INDEX).sum()
    assert 0 < n_targets < targets.numel()
    with torch.no_grad():
        _, mean = ours(idx[:, :-1], targets)
        _, total = ours(idx[:, :-1], targets, reduction="sum")
    assert torch.isclose(total, mean * n_targets, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_same_loss_and_gradients(dropout, monkeypatch):
    """Recomputed blocks must match the stored ones, dropout masks included (the RNG state is
    replayed), so loss and gradients agree to float noise (in practice exactly)."""
    hf = hf_gpt2(dropout=dropout)
    plain = gpt_like(hf).train()
    checkpointed = gpt_like(hf, grad_checkpointing=True).train()
    calls = []
    real_checkpoint = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    idx = random_ids()
    x, targets = idx[:, :-1], masked_labels(idx)[:, 1:]
    torch.manual_seed(3)
    loss_plain, grads_plain = grads_of(plain, x, targets)
    assert not calls
    torch.manual_seed(3)
    loss_ckpt, grads_ckpt = grads_of(checkpointed, x, targets)
    assert len(calls) == plain.config.n_layer  # every block went through checkpoint()
    assert torch.isclose(loss_ckpt, loss_plain, rtol=1e-6, atol=0)
    assert_same_grads(grads_plain, grads_ckpt)


def test_sequence_longer_than_context_is_refused():
    ours = gpt_like(hf_gpt2())
    with pytest.raises(ValueError, match="exceeds the context"):
        ours(torch.zeros((1, BLOCK + 1), dtype=torch.long))


# ---------------------------------------------------------------------------- generation

PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12, 13], [40, 41]]
NEW = 16


@pytest.fixture(scope="module")
def lively():
    """(HF model, our GPT) with identical weights whose greedy continuations vary: at unit scale a
    tied head mostly repeats the last input token; linears with gain 3 make the argmax depend on
    the whole context."""
    hf = hf_gpt2(n_head=4, n_embd=32, gain=3.0, seed=5).eval()
    return hf, gpt_like(hf).eval()


@pytest.fixture(scope="module")
def greedy(lively):
    out = lively[1].generate(PROMPTS, NEW)
    assert [len(row) for row in out] == [NEW] * len(PROMPTS)
    assert len({t for row in out for t in row}) >= 10, "degenerate model: the tests below would prove little"
    return out


def test_batched_greedy_equals_one_prompt_at_a_time(lively, greedy):
    ours = lively[1]
    assert greedy == [ours.generate([p], NEW)[0] for p in PROMPTS]


def test_kv_cache_and_full_recompute_give_same_tokens(lively, greedy):
    assert lively[1].generate(PROMPTS, NEW, use_cache=False) == greedy


def spy_on_steps(model, monkeypatch) -> list[int]:
    """The number of positions each model step of generate() runs on, recorded as it goes."""
    seen = []
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda idx, *a, **k: seen.append(idx.size(1)) or real(idx, *a, **k))
    return seen


def test_kv_cache_feeds_one_new_token_per_step(lively, monkeypatch):
    """With the cache, each step after the prompt runs the model on the newest token only."""
    ours = lively[1]
    seen = spy_on_steps(ours, monkeypatch)
    ours.generate(PROMPTS, 5)
    assert seen == [max(map(len, PROMPTS))] + [1] * 4
    seen.clear()
    ours.generate(PROMPTS, 5, use_cache=False)
    assert seen == [max(map(len, PROMPTS)) + i for i in range(5)]


def test_greedy_matches_transformers_generate(lively, greedy):
    hf, _ = lively
    common = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    prompt = torch.tensor([PROMPTS[2]])
    single = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **common)
    assert single[0, prompt.size(1):].tolist() == greedy[2]
    # and a left-padded batch, which HF handles through its attention mask
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    batched = hf.generate(ids, attention_mask=mask, **common)
    assert batched[:, width:].tolist() == greedy


def test_sampling_is_reproducible_per_seed(lively, greedy):
    ours = lively[1]
    first = ours.generate(PROMPTS, NEW, temperature=1.0, seed=1)
    assert ours.generate(PROMPTS, NEW, temperature=1.0, seed=1) == first
    # 64 draws, most from spread-out distributions: two seeds giving the same 64 tokens would
    # mean the seed is ignored (and the seeds are fixed, so this cannot flake)
    assert ours.generate(PROMPTS, NEW, temperature=1.0, seed=2) != first
    assert first != greedy


def test_top_k_1_and_tiny_top_p_are_greedy(lively, greedy):
    ours = lively[1]
    assert ours.generate(PROMPTS, NEW, temperature=0.8, top_k=1, seed=4) == greedy
    assert ours.generate(PROMPTS, NEW, temperature=0.8, top_p=1e-6, seed=4) == greedy


def test_top_k_and_top_p_sample_only_from_their_sets(lively):
    """Every first token drawn lies in the top k, or in the smallest set of tokens holding top_p of
    the probability, and the draws do vary within those sets."""
    ours = lively[1]
    with torch.no_grad():
        last = [ours(torch.tensor([p]))[0][0, -1] for p in PROMPTS]
    top_k = [set(logits.topk(5).indices.tolist()) for logits in last]
    nucleus = []
    for logits in last:
        probs, order = logits.softmax(-1).sort(descending=True)
        nucleus.append(set(order[: int((probs.cumsum(-1) < 0.6).sum()) + 1].tolist()))
    draws_k = [ours.generate(PROMPTS, 1, temperature=1.0, top_k=5, seed=s) for s in range(25)]
    draws_p = [ours.generate(PROMPTS, 1, temperature=1.0, top_p=0.6, seed=s) for s in range(25)]
    for allowed, draws in ((top_k, draws_k), (nucleus, draws_p)):
        drawn = [{d[row][0] for d in draws} for row in range(len(PROMPTS))]
        assert all(seen <= ok for seen, ok in zip(drawn, allowed))
        assert any(len(seen) > 1 for seen in drawn)


def test_generation_stops_at_eot_per_sequence(lively, greedy, monkeypatch):
    """With eot_id = a token the model emits, each row ends just before its own first EOT while
    the other rows go on; once every row has ended, generation stops."""
    def cut(row, eot):
        return row[:row.index(eot)] if eot in row else row

    # an emitted token whose first occurrence ends the rows at different lengths, one of them early
    eot = next(t for t in greedy[0][1:] if len({len(cut(r, t)) for r in greedy}) > 1)
    expected = [cut(row, eot) for row in greedy]
    assert min(map(len, expected)) < NEW and max(map(len, expected)) > min(map(len, expected))
    assert lively[1].generate(PROMPTS, NEW, eot_id=eot) == expected
    steps = spy_on_steps(lively[1], monkeypatch)
    assert lively[1].generate([PROMPTS[0]], NEW, eot_id=eot) == [expected[0]]
    assert len(steps) == len(expected[0]) + 1  # the step that produced the EOT was the last


def test_prompt_longer_than_the_context_keeps_its_last_tokens(lively):
    ours = lively[1]
    long_prompt = [i % VOCAB for i in range(3 * BLOCK)]
    kept = long_prompt[-(BLOCK - 4):]
    assert ours.generate([long_prompt], 4) == ours.generate([kept], 4)


def test_generate_refuses_impossible_requests(lively):
    ours = lively[1]
    with pytest.raises(ValueError):
        ours.generate([[1, 2]], BLOCK)  # no room left for the prompt
    with pytest.raises(ValueError):
        ours.generate([[1], []], 4)
