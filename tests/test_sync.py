"""Host reads in a training step. On a GPU every read of a tensor's value on the host (item,
tolist, bool/int/float, numpy) waits for the device; Trainer.train_step makes exactly one per
optimizer step, however many micro-batches it has, and none inside them. On CPU the reads are
counted by wrapping those Tensor methods; on a GPU bench/gpu_check.py runs the step under
torch.cuda.set_sync_debug_mode("error"), which also sees reads torch makes in C++."""
import sys
from collections import Counter
from dataclasses import replace

import pytest
import torch

import train_sft
from configs import parse_args
from conftest import TINY_VOCAB_SIZE
from test_train import write_data

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "__array__")
GRAD_ACCUM = 4


def step_counters(optimizer) -> set[int]:
    """ids of the optimizer's step counters. Non-fused AdamW keeps them on the host (CPU tensors
    even on a GPU: reading them is no device sync) and reads them each step; fused AdamW on CUDA
    (devices.fused_adamw) keeps them on the device and reads none."""
    return {id(state["step"]) for state in optimizer.state.values() if torch.is_tensor(state.get("step"))}


@pytest.fixture
def count_reads(monkeypatch):
    """Wrap every host-read method of torch.Tensor; returns the log of (method, caller) per read."""
    log = []

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            caller = sys._getframe(1)
            log.append((name, f"{caller.f_code.co_filename}:{caller.f_lineno}", id(self)))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in READS:
        wrap(name)
    return log


def trainer_and_batches(tmp_path, tokenizer_dir, optimizer: str):
    data = write_data(tmp_path / "data")
    _, model_cfg, train = parse_args(
        ["--config", "tiny", "--dataset", "sft", "--data-dir", str(data), "--tokenizer", str(tokenizer_dir),
         "--template", "dialog", "--vocab-size", str(TINY_VOCAB_SIZE), "--block-size", "96", "--n-layer", "2",
         "--n-head", "2", "--n-embd", "32", "--batch-size", "2", "--grad-accum", str(GRAD_ACCUM),
         "--optimizer", optimizer, "--grad-clip", "1.0", "--device", "cpu", "--dtype", "float32"])
    trainer = train_sft.standalone_trainer(model_cfg, train, "cpu", tmp_path / "scratch")
    batches = trainer.micro_batches()  # counted on the host before the copy: made outside the counting
    return trainer, [[next(batches) for _ in range(GRAD_ACCUM)] for _ in range(2)]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_host_read_per_step_with_grad_accum_4(optimizer, tmp_path, tiny_tokenizer_dir, count_reads):
    trainer, steps = trainer_and_batches(tmp_path, tiny_tokenizer_dir, optimizer)
    for number, batches in enumerate(steps, 1):  # the first step creates the optimizer state; both count
        count_reads.clear()
        result = trainer.train_step(batches)
        counters = step_counters(trainer.s.optimizer)
        reads = [(name, where) for name, where, tensor in count_reads if tensor not in counters]
        assert len(reads) == 1, f"step {number}: {len(reads)} host reads, expected 1:\n" + "\n".join(
            f"  {name} at {where}" for name, where in reads) + (
            "\n(reads in model.py's target_loss: the step must pass n_targets=b.n_targets, counted on the host, "
            "to the model)" if any("model.py" in where for _, where in reads) else "")
        name, where = reads[0]
        assert name == "tolist" and where.startswith(train_sft.__file__), reads
        assert result.targets == sum(b.n_targets for b in batches) and result.loss > 0
        if optimizer == "adamw":  # the counters it skipped are the host-side ones, one per trainable tensor
            assert len(counters) == len(trainer.trainable)


def test_the_counter_sees_reads(count_reads):
    """The wrapping catches each kind of read (else the test above could pass by counting nothing)."""
    t = torch.tensor([1.5, 2.0])
    t.sum().item(), t.tolist(), bool(t[0]), int(t[0]), float(t[0]), t.numpy()
    assert [name for name, _, _ in count_reads] == ["item", "tolist", "__bool__", "__int__", "__float__", "numpy"]


def test_a_non_finite_loss_still_stops_before_the_weights_change(tmp_path, tiny_tokenizer_dir):
    """The one read comes before the optimizer step: a NaN never reaches the weights."""
    trainer, steps = trainer_and_batches(tmp_path, tiny_tokenizer_dir, "sgd")
    before = [p.detach().clone() for p in trainer.s.raw_model.parameters()]
    with torch.no_grad():
        trainer.s.raw_model.transformer.ln_f.weight.fill_(float("nan"))
    before = [p.detach().clone() for p in trainer.s.raw_model.parameters()]
    with pytest.raises(train_sft.UserError, match="non-finite loss .* at step 1"):
        trainer.train_step(steps[0])
    for a, b in zip(before, trainer.s.raw_model.parameters()):
        torch.testing.assert_close(a, b.detach(), equal_nan=True)
