"""LoRA: the math of one wrapped linear, freezing, merging, the parameter report, training
machinery (checkpointing, autocast, compile, DDP) and the PEFT adapter format both ways.

Tolerances: float32 throughout; two computations of the same function that differ only in the
order of float32 operations (merged vs branch, PEFT's Conv1D addmm vs our linear) agree to ~1e-6
on these tiny models, so 1e-5 (merge) and 1e-4 (PEFT interop, as the issue asks) cannot hide a
real error: with the random non-zero B used here LoRA moves the logits by ~1e-1.
"""
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_VOCAB_SIZE
from errors import UserError
from lora import (LORA_TARGETS, DoRALinear, LoRALinear, LoRASettings, adapter_state_dict, apply_lora,
                  load_adapter, load_adapter_state_dict, lora_modules, lora_settings, merge_lora, save_adapter,
                  settings_from_peft_config, unmerge_lora)
from model import GPT
from optim import format_param_report, param_report

N_EMBD, N_LAYER = 32, 2  # the hf_checkpoint fixture's shape


def tokens(seed=0, batch=2, length=16):
    return torch.randint(0, TINY_VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed=0):
    """Non-zero B (and a fresh A; DoRA's magnitudes off ||W||) so that the adapter really changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.2)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
            if isinstance(m, DoRALinear):
                m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(m.lora_magnitude_vector.shape, generator=g))


def lora_model(checkpoint, seed=0, **settings):
    model = GPT.from_pretrained(checkpoint)
    apply_lora(model, **{"rank": 4, "alpha": 8.0, **settings})
    randomize_lora(model, seed)
    return model.eval()


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


# ------------------------------------------------------------------------------- the wrapped linear

@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_computes_w_x_plus_scaled_b_a_x(rslora):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=3, alpha=6.0, rslora=rslora)
    assert layer.weight is base.weight and layer.bias is base.bias  # adopted, not copied
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(6)  # kaiming_uniform_(a=sqrt(5)) on fan_in 6
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 6)
    s = 6.0 / (math.sqrt(3) if rslora else 3)
    expected = x @ weight.T + bias + s * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert layer.scaling == pytest.approx(s)


def test_lora_dropout_applies_to_the_branch_only():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(8, 8), rank=2, alpha=2.0, dropout=0.5)
    x = torch.randn(64, 8)
    base = F.linear(x, layer.weight, layer.bias)
    layer.train()
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)  # B = 0: dropout cannot show
    torch.nn.init.normal_(layer.lora_B.weight)
    assert not torch.equal(layer(x), layer(x))  # different dropout masks
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------- applying and freezing

def test_fresh_lora_gives_exactly_the_base_logits(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint).eval()
    idx = tokens()
    before = logits(model, idx)
    apply_lora(model, rank=4, alpha=8.0)
    assert torch.equal(logits(model, idx), before)


@pytest.mark.parametrize("targets,layers", [(LORA_TARGETS, None), (("attn.c_attn",), [1]),
                                            (("mlp.c_proj", "attn.c_proj"), [-1])])
def test_trainable_parameters_are_exactly_the_lora_parameters(hf_checkpoint, targets, layers):
    model = GPT.from_pretrained(hf_checkpoint)
    settings = apply_lora(model, rank=4, alpha=8.0, targets=targets, layers=layers)
    blocks = range(N_LAYER) if layers is None else [i % N_LAYER for i in layers]
    io = {"attn.c_attn": (N_EMBD, 3 * N_EMBD), "attn.c_proj": (N_EMBD, N_EMBD),
          "mlp.c_fc": (N_EMBD, 4 * N_EMBD), "mlp.c_proj": (4 * N_EMBD, N_EMBD)}
    expected = {t: len(blocks) * 4 * sum(io[t]) for t in LORA_TARGETS if t in targets}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {(i, t) for i, t in lora_modules(model)} == {(i, t) for i in blocks for t in targets}
    report = param_report(model, "adamw")
    assert report["lora_by_target"] == expected
    assert report["trainable"] == report["lora"] == sum(expected.values())
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert settings == lora_settings(model)
    assert settings.layers == (None if layers is None else tuple(blocks))


def test_base_weights_keep_their_names_and_hf_round_trip(hf_checkpoint, tmp_path):
    from transformers import GPT2LMHeadModel

    plain = GPT.from_pretrained(hf_checkpoint)
    model = lora_model(hf_checkpoint)
    names = {n for n, _ in model.named_parameters()}
    assert {n for n, _ in plain.named_parameters()} <= names
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in names and "transformer.h.1.mlp.c_proj.lora_B.weight" in names
    assert model.hf_state_dict().keys() == plain.hf_state_dict().keys()
    model.load_hf_state_dict(plain.hf_state_dict())  # works on a LoRA model; base weights only
    merge_lora(model)
    model.save_pretrained(tmp_path / "merged")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, logits(model, idx), rtol=0, atol=1e-4)


def test_apply_lora_refuses_bad_settings(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint)
    for bad in (dict(rank=0), dict(alpha=0.0), dict(dropout=1.0), dict(targets=("attn.c_q",)), dict(targets=()),
                dict(layers=[2]), dict(layers=[])):
        with pytest.raises(UserError):
            apply_lora(model, **{"rank": 4, "alpha": 8.0, **bad})
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # untouched
    apply_lora(model, rank=4, alpha=8.0)
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, rank=4, alpha=8.0)


def test_all_layers_listed_means_every_block(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint)
    assert apply_lora(model, rank=2, alpha=2.0, layers=[1, 0, -1]).layers is None


# ------------------------------------------------------------------------------- merging

def test_merge_matches_branch_and_unmerge_restores(hf_checkpoint):
    model = lora_model(hf_checkpoint)
    base = GPT.from_pretrained(hf_checkpoint).eval()
    idx = tokens()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = logits(model, idx)
    assert (unmerged - logits(base, idx)).abs().max() > 1e-2  # the adapter matters
    assert_merge_round_trip(model, idx, weights, unmerged)


def assert_merge_round_trip(model, idx, weights, unmerged):
    """Merged: the weights change and the logits stay (the branch is not applied twice); a
    second merge is a no-op; unmerge restores every weight (float32 rounding of W + d - d)."""
    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, weights["transformer.h.0.attn.c_attn.weight"])
    torch.testing.assert_close(logits(model, idx), unmerged, rtol=0, atol=1e-5)
    merge_lora(model)
    torch.testing.assert_close(logits(model, idx), unmerged, rtol=0, atol=1e-5)
    unmerge_lora(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, idx), unmerged, rtol=0, atol=1e-5)


def test_merge_without_lora_is_a_user_error(hf_checkpoint):
    with pytest.raises(UserError, match="no LoRA"):
        merge_lora(GPT.from_pretrained(hf_checkpoint))


# ------------------------------------------------------------------------------- training machinery

def loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_only_lora_parameters_receive_gradients(hf_checkpoint):
    model = lora_model(hf_checkpoint, layers=[1]).train()
    idx = tokens()
    _, grads = loss_and_grads(model, idx, tokens(1))
    assert set(grads) == {k.removeprefix("base_model.model.") for k in adapter_state_dict(model)}
    assert len(grads) == 2 * len(LORA_TARGETS)  # A and B of each target in block 1
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_activation_checkpointing_gives_the_same_gradients(hf_checkpoint):
    model = lora_model(hf_checkpoint).train()
    idx, targets = tokens(), tokens(1)
    loss, grads = loss_and_grads(model, idx, targets)
    model.config.grad_checkpointing = True
    loss_ckpt, grads_ckpt = loss_and_grads(model, idx, targets)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(hf_checkpoint, dtype):
    model = lora_model(hf_checkpoint).train()
    idx, targets = tokens(), tokens(1)
    loss, grads = loss_and_grads(model, idx, targets)
    with torch.autocast("cpu", dtype=dtype):
        low_logits, low_loss = model(idx, targets)
    assert low_logits.dtype == dtype
    low_loss.backward()
    # bf16 keeps 8 bits of mantissa: the loss (~6) agrees to a few 1e-2; the gradients point the same way.
    assert abs(low_loss.item() - loss.item()) < 0.05
    for name, grad in grads.items():
        low = dict(model.named_parameters())[name].grad
        assert low.dtype == torch.float32
        assert F.cosine_similarity(low.flatten(), grad.flatten(), dim=0) > 0.95


def test_torch_compile_traces_one_graph_with_the_same_gradients(hf_checkpoint):
    model = lora_model(hf_checkpoint).train()
    idx, targets = tokens(), tokens(1)
    loss, grads = loss_and_grads(model, idx, targets)
    # aot_eager runs dynamo + AOTAutograd without C++ codegen (fast); fullgraph=True fails on any graph break.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled.zero_grad(set_to_none=True)
    compiled(idx, targets)[1].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)
    assert lora_settings(compiled) == lora_settings(model)  # the helpers see through the wrapper
    assert adapter_state_dict(compiled).keys() == adapter_state_dict(model).keys()


def test_ddp_single_process(hf_checkpoint, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = lora_model(hf_checkpoint).train()
    idx, targets = tokens(), tokens(1)
    _, grads = loss_and_grads(model, idx, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)  # DDP refuses a step if a trainable parameter gets no grad
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            ddp(idx, targets)[1].backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)
        assert lora_settings(ddp) == lora_settings(model)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- parameter report

def test_param_report_full_fine_tuning_and_optimizers(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint)
    total = sum(p.numel() for p in model.parameters())
    model.transformer.wpe.weight.requires_grad_(False)
    trainable = total - model.transformer.wpe.weight.numel()
    for optimizer, buffers in (("sgd", 0), ("momentum", 1), ("nesterov", 1), ("adamw", 2)):
        report = param_report(model, optimizer)
        assert (report["total"], report["trainable"], report["lora"]) == (total, trainable, 0)
        assert report["optimizer_buffers_per_param"] == buffers
        assert json.loads(json.dumps(report)) == report
    text = format_param_report(report)
    assert f"{total:,}" in text and "LoRA 0" in text and "WARNING" not in text
    with pytest.raises(UserError, match="optimizer"):
        param_report(model, "adam")


def test_format_param_report_flags_non_lora_trainable_parameters(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint)
    apply_lora(model, rank=1, alpha=1.0)
    assert "WARNING" not in format_param_report(param_report(model, "adamw"))
    model.transformer.wte.weight.requires_grad_(True)  # the "LoRA r=1 with the embedding training" bug
    report = param_report(model, "adamw")
    assert report["trainable"] == report["lora"] + model.transformer.wte.weight.numel()
    assert "WARNING" in format_param_report(report)


# ------------------------------------------------------------------------------- adapter state and files

def test_adapter_state_dict_round_trip(hf_checkpoint):
    model = lora_model(hf_checkpoint, seed=1)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert all(k.startswith("base_model.model.transformer.h.") for k in state)
    other = GPT.from_pretrained(hf_checkpoint)
    apply_lora(other, rank=4, alpha=8.0)
    load_adapter_state_dict(other, state)
    idx = tokens()
    assert torch.equal(logits(other.eval(), idx), logits(model, idx))
    broken = dict(state)
    del broken["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    broken["base_model.model.transformer.h.0.attn.c_attn.lora_C.weight"] = torch.zeros(1)
    broken["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"] = torch.zeros(128, 5)
    with pytest.raises(UserError, match=r"missing: .*h\.0\.attn\.c_attn\.lora_A.*unexpected: .*lora_C.*"
                                        r"wrong shape: .*h\.1\.mlp\.c_fc\.lora_B\.weight \(128, 5\) != \(128, 4\)"):
        load_adapter_state_dict(other, broken)


@pytest.mark.parametrize("settings", [dict(), dict(layers=[1], rslora=True, targets=("attn.c_attn", "mlp.c_proj"))])
def test_save_and_load_adapter_round_trip(hf_checkpoint, tmp_path, settings):
    model = lora_model(hf_checkpoint, **settings)
    save_adapter(model, tmp_path / "adapter", str(hf_checkpoint))
    written = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert written == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left behind
    other = GPT.from_pretrained(hf_checkpoint)
    loaded = load_adapter(other, tmp_path / "adapter")
    assert loaded == lora_settings(model)
    idx = tokens()
    assert torch.equal(logits(other.eval(), idx), logits(model, idx))
    assert all(".lora_" in n for n, p in other.named_parameters() if p.requires_grad)


def test_load_adapter_refuses_bad_files_without_changing_the_model(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    save_adapter(lora_model(hf_checkpoint), tmp_path / "good", None)
    model = GPT.from_pretrained(hf_checkpoint)
    with pytest.raises(UserError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")
    weights = load_file(tmp_path / "good" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    cases = {
        "missing": ({k: v for k, v in weights.items() if "h.1.mlp.c_fc.lora_B" not in k}, config),
        "wrong shape": ({**weights, "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(3, 32)},
                        config),
        "unexpected": ({**weights, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}, config),
        "unsupported PEFT LoRA options lora_bias": (weights, {**config, "lora_bias": True}),
        "missing: .*c_attn.lora_magnitude_vector": (weights, {**config, "use_dora": True}),  # DoRA without m
        "not a LoRA adapter": (weights, {**config, "peft_type": "IA3"}),
    }
    for i, (message, (w, c)) in enumerate(cases.items()):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        save_file(w, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(c))
        with pytest.raises(UserError, match=message):
            load_adapter(model, folder)
    assert lora_settings(model) is None  # nothing was applied by a failed load


def test_peft_target_modules_are_matched_like_peft():
    def settings(**config):
        return settings_from_peft_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **config}, n_layer=4)

    assert settings(target_modules=["c_attn"]).targets == ("attn.c_attn",)
    assert settings(target_modules=["c_proj"]).targets == ("attn.c_proj", "mlp.c_proj")  # both, as in PEFT
    assert settings(target_modules=["attn.c_proj", "c_fc"]).targets == ("attn.c_proj", "mlp.c_fc")
    assert settings(target_modules="all-linear").targets == LORA_TARGETS
    assert settings(target_modules=r".*\.mlp\..*").targets == ("mlp.c_fc", "mlp.c_proj")
    assert settings(target_modules=["c_attn"], layers_to_transform=3).layers == (3,)
    assert settings(target_modules=["c_attn"], layers_to_transform=[0, 2], layers_pattern="h").layers == (0, 2)
    assert settings(target_modules=["c_attn", "c_fc"], exclude_modules=["c_fc"]).targets == ("attn.c_attn",)
    assert settings(target_modules=["c_attn"], use_rslora=True).scaling == pytest.approx(16 / math.sqrt(8))
    with pytest.raises(UserError, match="select no linear"):
        settings(target_modules=["q_proj", "v_proj"])
    with pytest.raises(UserError, match="different modules in different blocks"):
        settings(target_modules=["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"])
    with pytest.raises(UserError, match="rank_pattern"):
        settings(target_modules=["c_attn"], rank_pattern={"c_attn": 4})
    with pytest.raises(UserError, match="cannot interpret"):
        settings(target_modules="c_attn(")  # a broken regex
    with pytest.raises(UserError, match="init_lora_weights='pissa'"):
        settings(target_modules=["c_attn"], init_lora_weights="pissa")
    assert settings(target_modules=["c_attn"], init_lora_weights="gaussian").rank == 8  # init only: fine


# ------------------------------------------------------------------------------- PEFT interop

INTEROP_CASES = {
    "all": dict(),
    "layers": dict(layers=[1], targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc")),
    "rslora": dict(rslora=True, targets=("mlp.c_proj", "attn.c_proj")),
    "dora": dict(dora=True),
    "dora-layers": dict(dora=True, rslora=True, layers=[1], targets=("attn.c_attn", "mlp.c_fc")),
}


def hf_model(checkpoint):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(checkpoint).eval()


@pytest.mark.parametrize("case", INTEROP_CASES)
def test_adapter_saved_here_loads_in_peft(hf_checkpoint, tmp_path, case):
    from peft import PeftModel

    model = lora_model(hf_checkpoint, **INTEROP_CASES[case])
    save_adapter(model, tmp_path / "adapter", str(hf_checkpoint))
    peft_model = PeftModel.from_pretrained(hf_model(hf_checkpoint), tmp_path / "adapter").eval()
    n_adapted = sum(1 for name, _ in peft_model.named_modules() if name.endswith(".lora_A"))
    assert n_adapted == len(lora_modules(model))
    idx = tokens()
    with torch.no_grad():
        theirs = peft_model(input_ids=idx).logits
    assert (theirs - hf_model(hf_checkpoint)(input_ids=idx).logits).abs().max() > 1e-2  # PEFT applied it
    torch.testing.assert_close(logits(model, idx), theirs, rtol=0, atol=1e-4)


PEFT_CASES = {
    "all": dict(target_modules=["c_attn", "c_proj", "c_fc"]),
    "layers": dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[0]),
    "rslora": dict(target_modules=["c_proj"], use_rslora=True, lora_dropout=0.1),
    "dora": dict(target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True),
    "dora-layers": dict(target_modules=["c_proj"], layers_to_transform=[0], use_dora=True, use_rslora=True),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_adapter_saved_by_peft_loads_here(hf_checkpoint, tmp_path, case):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, task_type="CAUSAL_LM", **PEFT_CASES[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(hf_model(hf_checkpoint), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
            elif "lora_magnitude_vector" in name:  # DoRA: magnitudes off ||W||, so that loading them matters
                p.mul_(torch.linspace(0.7, 1.3, p.numel()))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = GPT.from_pretrained(hf_checkpoint)
    settings = load_adapter(model, tmp_path / "adapter")
    assert isinstance(settings, LoRASettings) and settings.rslora == PEFT_CASES[case].get("use_rslora", False)
    assert settings.dora == PEFT_CASES[case].get("use_dora", False)
    assert settings.layers == (tuple(PEFT_CASES[case]["layers_to_transform"])
                               if "layers_to_transform" in PEFT_CASES[case] else None)
    idx = tokens()
    with torch.no_grad():
        theirs = peft_model(input_ids=idx).logits
    torch.testing.assert_close(logits(model.eval(), idx), theirs, rtol=0, atol=1e-4)
