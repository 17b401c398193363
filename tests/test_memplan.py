"""memplan: exact parameter/gradient/state arithmetic against real models, sharding, budgets, sizes.
(How well the activation estimate matches real peaks is measured by bench/bench_memplan.py.)"""
import dataclasses
import json

import pytest
import torch

import lora
import memplan
import optim
from configs import GPTConfig, TrainConfig, preset
from conftest import ROOT
from errors import UserError
from model import GPT

TINY = GPTConfig(block_size=32, vocab_size=97, n_layer=3, n_head=2, n_embd=16)


def tiny_inputs(**overrides) -> memplan.PlanInputs:
    fields = dict(n_layer=TINY.n_layer, n_head=TINY.n_head, n_embd=TINY.n_embd, vocab_size=TINY.vocab_size,
                  block_size=TINY.block_size, batch_size=2, seq_len=16, rank=4)
    return memplan.PlanInputs(**{**fields, **overrides})


def built(p: memplan.PlanInputs) -> GPT:
    model = GPT(TINY)
    if p.lora:
        lora.apply_lora(model, p.rank, 8.0, targets=p.lora_targets, layers=p.lora_layers, dora=p.dora)
    return model


@pytest.mark.parametrize("lora_kw", [
    {}, dict(lora=True), dict(lora=True, lora_targets=("mlp.c_fc", "attn.c_proj")),
    dict(lora=True, lora_targets=("attn.c_attn",), lora_layers=(0, -1)), dict(lora=True, rank=1),
    dict(lora=True, dora=True), dict(lora=True, dora=True, lora_targets=("mlp.c_proj",), lora_layers=(1,))])
@pytest.mark.parametrize("optimizer", list(optim.OPTIMIZERS))
def test_weights_gradients_and_state_are_exact(lora_kw, optimizer):
    p = tiny_inputs(optimizer=optimizer, **lora_kw)
    model = built(p)
    params = sum(t.numel() for t in model.parameters())
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    mp = memplan.plan(p)
    assert (mp.params, mp.trainable_params) == (params, trainable)
    assert mp.weights == 4 * params
    assert mp.gradients == 4 * trainable
    assert mp.optimizer_state == 4 * trainable * optim.OPTIMIZERS[optimizer]
    report = optim.param_report(model, optimizer)  # the project's other count agrees
    assert (report["total"], report["trainable"]) == (params, trainable)
    if p.lora:
        assert report["lora"] == mp.trainable_params


def test_saved_activations_are_counted_to_the_byte(monkeypatch):
    """bench_memplan's audit: the bytes autograd saves in one forward (saved-tensor hooks) equal
    memplan.saved_activation_bytes in every variant (full, LoRA, DoRA, targets, layers, dropout,
    bfloat16 autocast, the head on all positions)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import bench_memplan
    rows = bench_memplan.audit()
    assert len(rows) == len(bench_memplan.AUDIT_VARIANTS)
    assert [(r["variant"], r["predicted_bytes"]) for r in rows] == [(r["variant"], r["saved_bytes"]) for r in rows]


def test_a_cuda_peak_is_compared_with_the_planned_tensors():
    mp = memplan.plan(tiny_inputs())
    measured = 1.25 * mp.live / 2**20  # allocated MB (2**20 bytes): tensors, as `live` counts them
    line = memplan.versus_measured(mp, measured, "peak_alloc_mb")
    assert line.endswith(f"the plan said {mp.live / 1e6:.1f} MB of tensors (-20.0%)")  # decimal units
    assert memplan.versus_measured(mp, None, None) is None


def test_gpt2_sizes_match_the_known_counts():
    counts = {}
    for name in ("gpt2", "gpt2-medium"):
        model_cfg, train = preset(name)
        counts[name] = memplan.count_params(memplan.PlanInputs.from_configs(model_cfg, train))
    assert counts["gpt2"] == (124_439_808, 124_439_808)
    assert counts["gpt2-medium"] == (354_823_168, 354_823_168)


def test_sharding_divides_state_but_not_activations():
    base = memplan.plan(tiny_inputs())
    fsdp = memplan.plan(tiny_inputs(world_size=4, fsdp=True))
    assert fsdp.weights == -(-base.params // 4) * 4
    assert fsdp.gradients == -(-base.trainable_params // 4) * 4
    assert fsdp.optimizer_state == 2 * fsdp.gradients
    assert memplan.saved_activation_bytes(tiny_inputs(world_size=4, fsdp=True)) == \
        memplan.saved_activation_bytes(tiny_inputs())
    # the weights gathered while a unit runs: the root (wte, wpe, ln_f) and two blocks, in full
    d = TINY.n_embd
    gathered = 4 * (TINY.vocab_size * d + TINY.block_size * d + 2 * d + 2 * (12 * d * d + 13 * d))
    assert fsdp.fsdp_gathered == gathered and base.fsdp_gathered == 0
    assert fsdp.at_loss == base.at_loss - (base.weights + base.optimizer_state) + \
        (fsdp.weights + fsdp.optimizer_state) + gathered
    bf16 = memplan.plan(tiny_inputs(world_size=4, fsdp=True, compute_dtype=torch.bfloat16))
    assert bf16.fsdp_gathered == gathered // 2
    ddp = memplan.plan(tiny_inputs(world_size=4))
    assert (ddp.weights, ddp.gradients) == (base.weights, base.gradients)
    assert ddp.at_optimizer_step == base.at_optimizer_step + base.gradients  # DDP's gradient buckets


def test_the_estimate_moves_the_right_way():
    p = tiny_inputs(batch_size=4, seq_len=32)
    total = memplan.plan(p).total
    assert memplan.plan(dataclasses.replace(p, grad_checkpointing=True)).activations < memplan.plan(p).activations
    wide = dataclasses.replace(p, vocab_size=5000)  # where the head's logits dominate
    assert memplan.plan(dataclasses.replace(wide, ce_chunk=8)).activations < memplan.plan(wide).activations
    assert memplan.plan(dataclasses.replace(p, batch_size=8)).total > total
    assert memplan.plan(dataclasses.replace(p, optimizer="sgd")).total < total
    # with accumulation the earlier micro-batches' gradients are there during the next forward
    accum = memplan.plan(dataclasses.replace(p, grad_accum=2))
    assert accum.at_loss == memplan.plan(p).at_loss + accum.gradients
    # bfloat16 autocast halves most activations (LayerNorm inputs and the loss stay float32)
    assert memplan.plan(dataclasses.replace(p, compute_dtype=torch.bfloat16)).activations < memplan.plan(p).activations


def test_total_is_the_live_peak_plus_the_allocator_slack():
    mp = memplan.plan(tiny_inputs())
    assert mp.live == max(mp.at_loss, mp.at_backward_end, mp.at_optimizer_step)
    assert mp.total == mp.live + round(0.10 * (mp.live - mp.weights))
    assert memplan.plan(tiny_inputs(allocator_slack=0.0)).total == mp.live


def test_from_configs_reads_the_training_fields():
    model_cfg, train = preset("gpt2/lora")
    train = dataclasses.replace(train, batch_size=3, grad_accum=5, max_seq_len=200, dtype="bfloat16", rank=8,
                                lora_targets=("mlp.c_fc",), lora_layers=(1, 2), optimizer="momentum",
                                head_on_targets_only=False)
    p = memplan.PlanInputs.from_configs(model_cfg, train, world_size=2, fsdp=True)
    assert (p.batch_size, p.grad_accum, p.seq_len, p.rank, p.optimizer) == (3, 5, 200, 8, "momentum")
    assert (p.lora, p.lora_targets, p.lora_layers, p.head_on_targets_only) == (True, ("mlp.c_fc",), (1, 2), False)
    assert (p.compute_dtype, p.world_size, p.fsdp) == (torch.bfloat16, 2, True)
    assert p.ce_chunk == getattr(train, "ce_chunk", 0)
    assert memplan.PlanInputs.from_configs(model_cfg, TrainConfig()).seq_len == model_cfg.block_size  # 0 = context
    assert memplan.PlanInputs.from_configs(model_cfg, train, seq_len=64).seq_len == 64


def test_plan_to_dict_is_json():
    mp = memplan.plan(tiny_inputs(compute_dtype=torch.bfloat16, lora=True, lora_layers=(1,)))
    back = json.loads(json.dumps(mp.to_dict()))
    assert back["total"] == mp.total and back["inputs"]["compute_dtype"] == "bfloat16"
    assert back["inputs"]["lora_layers"] == [1]


def test_format_plan_prints_gigabytes():
    model_cfg, train = preset("gpt2")
    mp = memplan.plan(memplan.PlanInputs.from_configs(model_cfg, train, seq_len=256))
    text = memplan.format_plan(mp)
    assert f"weights {mp.weights / 1e9:.2f} GB" in text and f"peak {mp.total / 1e9:.2f} GB" in text
    assert "full fine-tuning" in text and "adamw" in text
    tiny = memplan.format_plan(memplan.plan(tiny_inputs()))  # a tiny model's plan is not all zeros
    assert f"weights {memplan.plan(tiny_inputs()).weights / 1e3:.1f} KB" in tiny and "0.00 GB" not in tiny


def test_propose_fits_the_budget_and_keeps_the_global_batch():
    model_cfg, train = preset("gpt2")
    p = memplan.PlanInputs.from_configs(model_cfg, dataclasses.replace(train, batch_size=16, grad_accum=2),
                                        seq_len=512)
    need = memplan.plan(p).total
    unchanged, why = memplan.propose(p, need)
    assert unchanged == p and "nothing changed" in why
    budget = memplan.plan(p).weights * 4 + (need - memplan.plan(p).weights * 4) // 3
    proposal, why = memplan.propose(p, budget)
    assert memplan.plan(proposal).total <= budget < need
    assert proposal.batch_size < p.batch_size or proposal.grad_checkpointing
    assert proposal.batch_size * proposal.grad_accum == 32
    if proposal.batch_size < p.batch_size:
        assert f"batch_size 16 -> {proposal.batch_size}" in why
    if proposal.grad_checkpointing:
        assert "activation checkpointing on" in why
    # a bigger budget never gets a smaller micro-batch
    roomier, _ = memplan.propose(p, budget + 10**9)
    assert roomier.batch_size >= proposal.batch_size


def test_propose_refuses_when_nothing_fits():
    model_cfg, train = preset("gpt2")
    p = memplan.PlanInputs.from_configs(model_cfg, train, seq_len=256)
    with pytest.raises(UserError, match="nothing fits") as err:
        memplan.propose(p, memplan.plan(p).weights)  # the weights alone fill it
    assert "\n" not in str(err.value)


def test_parse_size_units():
    assert memplan.parse_size("15GB") == 15 * 10**9
    assert memplan.parse_size("15GiB") == 15 * 2**30
    assert memplan.parse_size("1.5 gb") == 1_500_000_000
    assert memplan.parse_size("512MiB") == 512 * 2**20


@pytest.mark.parametrize("text", ["15", "GB", "15XB", "-1GB", "0GB", "15 G B", ""])
def test_parse_size_refuses_in_one_line(text):
    with pytest.raises(UserError, match="--max-memory") as err:
        memplan.parse_size(text)
    assert "\n" not in str(err.value)


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="optimizer"):
        tiny_inputs(optimizer="adam")
    with pytest.raises(UserError, match="exceeds the context"):
        tiny_inputs(seq_len=64)
    with pytest.raises(UserError, match="LoRA targets"):
        tiny_inputs(lora=True, lora_targets=("attn.q",))
