"""DoRA: the weight-decomposed update against its formula, gradients with the detached norm, PEFT's
training path with dropout, merge, the parameter report. Adapters round-tripping with peft
(use_dora=True) are test_lora.py's interop cases "dora" and "dora-layers"."""
import warnings

import pytest
import torch
import torch.nn as nn

from errors import UserError
from lora import (DoRALinear, LoRALinear, adapter_state_dict, apply_lora, load_adapter, lora_modules, lora_settings,
                  save_adapter)
from model import GPT
from optim import param_report
from test_lora import assert_merge_round_trip, logits, lora_model, randomize_lora, tokens


def dora_model(checkpoint):
    return lora_model(checkpoint, dora=True)


def reference(layer, x):
    """The paper's formula, written out: m / ||W + s B A||_row * (W + s B A) x + b."""
    w = layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    norm = w.norm(dim=1, keepdim=True).detach()
    return x @ (layer.lora_magnitude_vector[:, None] / norm * w).t() + layer.bias


def test_dora_linear_is_the_formula_and_starts_at_the_base():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    x = torch.randn(3, 5, 12)
    expected = base(x).detach()
    layer = DoRALinear(base, rank=4, alpha=8.0)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), base.weight.norm(dim=1).detach())
    assert layer.lora_magnitude_vector.shape == (20,)  # one per output feature
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)  # B = 0, m = ||W||: exactly the base
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.3)
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 20))
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=0, atol=1e-5)


def test_gradients_treat_the_norm_as_a_constant():
    """As in the paper (section 4.3) and PEFT: the gradients are those of the formula with the norm
    detached, for A, B and the magnitude; the base weight gets none."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(12, 20), rank=4, alpha=8.0)
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.3)
    x = torch.randn(3, 12)
    grads = torch.autograd.grad(layer(x).square().sum(), list(layer.adapter_tensors().values()))
    expected = torch.autograd.grad(reference(layer, x).square().sum(), list(layer.adapter_tensors().values()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_training_with_dropout_matches_peft(hf_checkpoint):
    """With dropout, PEFT corrects the undropped W x + b on the dropped input; same RNG, same result."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    config = LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, task_type="CAUSAL_LM", use_dora=True,
                        target_modules=["c_attn", "c_fc"], lora_dropout=0.3)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # only the adapters' dropout, as ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(hf_checkpoint, **no_dropout), config)
    model = GPT.from_pretrained(hf_checkpoint)
    apply_lora(model, rank=4, alpha=8.0, dropout=0.3, targets=("attn.c_attn", "mlp.c_fc"), dora=True)
    randomize_lora(model)
    load_adapter_into_peft(peft_model, model)
    idx = tokens()
    torch.manual_seed(3)
    ours = model.train()(idx)[0]
    torch.manual_seed(3)
    theirs = peft_model.train()(input_ids=idx).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def load_adapter_into_peft(peft_model, model):
    """Copy our adapter tensors into a PEFT model by name (PEFT keeps them under `.default`)."""
    theirs = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, tensor in adapter_state_dict(model).items():
            module, _, name = key.rpartition(".lora_")
            leaf = "lora_magnitude_vector.default.weight" if name == "magnitude_vector" else \
                f"lora_{name.split('.')[0]}.default.weight"
            theirs[f"{module}.{leaf}"].copy_(tensor)


def test_merge_matches_and_unmerge_restores(hf_checkpoint):
    model = dora_model(hf_checkpoint)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = tokens()
    unmerged = logits(model, idx)
    assert (unmerged - logits(GPT.from_pretrained(hf_checkpoint).eval(), idx)).abs().max() > 1e-2
    assert_merge_round_trip(model, idx, weights, unmerged)


def test_settings_report_and_trainable_parameters(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint)
    settings = apply_lora(model, rank=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_proj"), dora=True)
    assert settings.dora and lora_settings(model) == settings and settings.to_dict()["dora"] is True
    assert all(type(m) is DoRALinear for m in lora_modules(model).values())
    c_attn, c_proj = (3 * 32, 32), (32, 4 * 32)  # (out, in) at n_embd 32
    per_block = sum(4 * (o + i) + o for o, i in (c_attn, c_proj))  # A, B, and one magnitude per output
    report = param_report(model, "adamw")
    assert report["lora"] == report["trainable"] == 2 * per_block
    assert report["lora_by_target"] == {"attn.c_attn": 2 * (4 * 128 + 96), "mlp.c_proj": 2 * (4 * 160 + 32)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"weight", "lora_magnitude_vector"}
    assert sum(n.endswith("lora_magnitude_vector") for n in trainable) == 4


def test_a_dora_adapter_does_not_load_into_plain_lora(hf_checkpoint, tmp_path):
    save_adapter(dora_model(hf_checkpoint), tmp_path / "dora", str(hf_checkpoint))
    model = GPT.from_pretrained(hf_checkpoint)
    apply_lora(model, rank=4, alpha=8.0)
    assert type(lora_modules(model)[0, "attn.c_attn"]) is LoRALinear
    with pytest.raises(UserError, match="different LoRA"):
        load_adapter(model, tmp_path / "dora")
