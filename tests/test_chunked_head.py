"""The vocabulary head + cross-entropy over the target rows in chunks (GPT.forward with
targets_only, model.chunked_head_loss): the same loss and gradients as the full head, at most one
chunk of logits alive, bfloat16 autocast, and no graph break under torch.compile.

The reference is the full-logits path (targets_only=False), itself checked against transformers
in test_model.py. Weights are random at unit scale (test_model.hf_gpt2), where logits are ~30.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lora
from configs import GPTConfig
from model import GPT, IGNORE_INDEX, target_rows
from test_model import assert_same_grads, gpt_like, hf_gpt2, masked_labels, random_ids


def model_and_batch(method: str):
    """A unit-scale GPT (with random LoRA adapters for "lora"), inputs, targets and their count."""
    model = gpt_like(hf_gpt2()).train()
    if method == "lora":
        lora.apply_lora(model, rank=4, alpha=8.0)
        with torch.no_grad():  # B starts at zero, which would leave A's gradient zero
            for name, p in model.named_parameters():
                if "lora" in name:
                    p.normal_(0.0, 0.1)
    idx = random_ids()
    x, targets = idx[:, :-1], masked_labels(idx)[:, 1:]
    return model, x, targets, int((targets != IGNORE_INDEX).sum())


def loss_and_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    _, loss = model(*args, **kwargs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_target_rows_are_the_target_positions_in_order():
    targets = torch.tensor([[-100, 5, -100, 7], [8, -100, -100, 9]])
    assert target_rows(targets.reshape(-1), 4).tolist() == [1, 3, 4, 7]


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunked_head_gives_the_full_heads_loss_and_gradients(method, reduction):
    """Chunk sizes: one row, one that does not divide n, all rows at once (0), more than n. The
    float32 results differ only in rounding (other matmul shapes, the weight's gradient summed
    chunk by chunk, the softmax's exp): losses by <= 2e-7 relative, gradients by <= 7e-7 of each
    tensor's largest entry, as far as the full path itself is from a float64 run (7e-7); the
    bound is test_model's 1e-6 for exact rewrites."""
    model, x, targets, n = model_and_batch(method)
    assert n % 7 and n > 7
    loss_full, grads_full = loss_and_grads(model, x, targets, reduction=reduction)
    assert ("transformer.wte.weight" in grads_full) == (method == "full")  # the tied head trains in full FT only
    for chunk in (1, 7, 0, n + 5):
        loss, grads = loss_and_grads(model, x, targets, reduction=reduction, targets_only=True,
                                     n_targets=n, ce_chunk=chunk)
        assert torch.isclose(loss, loss_full, rtol=1e-6, atol=0), chunk
        assert_same_grads(grads_full, grads)


def test_n_targets_none_counts_them():
    model, x, targets, n = model_and_batch("full")
    with torch.no_grad():
        logits, counted = model(x, targets, targets_only=True, ce_chunk=5)
        _, given = model(x, targets, targets_only=True, n_targets=n, ce_chunk=5)
    assert logits is None
    assert counted == given


def test_chunked_head_under_bfloat16_autocast():
    """Under autocast, the chunked loss is computed like the full path's: bf16 matmuls, the
    softmax and loss in float32 on the upcast logits. Both make the same bf16 logits, so the
    losses agree to float32 rounding (measured 1e-7; bound 1e-5, where the bf16 logits
    themselves move the loss by 5e-4 from float32's, and a log_softmax taken in bf16 by ~1e-2).
    The gradients pass through bf16 matmuls summed in other orders (per chunk), so they agree
    to a couple of bf16 ulps (2^-8 = 0.4%) of each tensor's largest entry: measured 0.6%,
    bound 1%. (bf16 moves them by 0.9% from float32's, so this bound does not tell the dtypes
    apart; the loss bound does.)"""
    model, x, targets, n = model_and_batch("full")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_full, grads_full = loss_and_grads(model, x, targets)
        loss, grads = loss_and_grads(model, x, targets, targets_only=True, n_targets=n, ce_chunk=7)
    assert loss.dtype == torch.float32
    assert torch.isclose(loss, loss_full, rtol=1e-5, atol=0)
    assert_same_grads(grads_full, grads, rel=1e-2)
    loss_fp32, _ = loss_and_grads(model, x, targets)
    assert not torch.isclose(loss, loss_fp32, rtol=1e-5, atol=0)  # autocast did act on the head


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in elements) any operation creates while active, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", ["full", "lora"])
def test_at_most_one_chunk_of_logits_exists(method):
    """With a vocabulary of 1000 and n_embd 8, a chunk of 10 rows of logits (10,000 values) is
    larger than every other tensor of the step (the weight: 8,000; activations and attention
    scores: < 3,000), and all the targets' logits (n rows) larger still: no operation of forward
    or backward may create a tensor beyond one chunk's logits. Without chunks, one does."""
    cfg = GPTConfig(block_size=32, vocab_size=1000, n_layer=1, n_head=2, n_embd=8)
    torch.manual_seed(0)
    model = GPT(cfg)
    if method == "lora":
        lora.apply_lora(model, rank=2, alpha=4.0)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    targets = x.clone()
    targets[:, :8] = IGNORE_INDEX
    n = int((targets != IGNORE_INDEX).sum())
    for chunk, bound in ((10, 10 * cfg.vocab_size), (0, n * cfg.vocab_size)):
        with LargestTensor() as seen:
            _, loss = model(x, targets, reduction="sum", targets_only=True, n_targets=n, ce_chunk=chunk)
            loss.backward()
        assert seen.largest == bound, chunk


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_forward_compiles_without_graph_breaks(method):
    """torch._dynamo.explain traces forward + loss as torch.compile(fullgraph=True) would, and
    reports every graph break (nonzero or an .item() would be one each). Compiling with
    aot_eager and fullgraph=True then also traces the chunked loss's backward into the joint
    graph (aot_eager: the same graph capture and autograd as inductor, without its slow code
    generation), and its loss and gradients must match eager's."""
    model, x, targets, n = model_and_batch(method)
    kwargs = dict(reduction="sum", targets_only=True, n_targets=n, ce_chunk=7)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x, targets, **kwargs)
    assert (explained.graph_break_count, explained.graph_count) == (0, 1), explained.break_reasons
    loss_eager, grads_eager = loss_and_grads(model, x, targets, **kwargs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = loss_and_grads(compiled, x, targets, **kwargs)
    torch._dynamo.reset()
    assert torch.isclose(loss, loss_eager, rtol=1e-6, atol=0)
    assert_same_grads(grads_eager, {name.removeprefix("_orig_mod."): g for name, g in grads.items()})


def test_bad_arguments_are_refused():
    model, x, targets, n = model_and_batch("full")
    with pytest.raises(ValueError, match="targets_only"):
        model(x, targets, ce_chunk=4)
    with pytest.raises(ValueError, match="ce_chunk"):
        model(x, targets, targets_only=True, ce_chunk=-1)
    with pytest.raises(ValueError, match="reduction"):
        model(x, targets, targets_only=True, reduction="none")
