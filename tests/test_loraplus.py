"""LoRA+: B (and DoRA's magnitudes) in their own groups at lr * ratio under every schedule and with
layer-wise decay, refused without LoRA, kept across a resume."""
import dataclasses
from pathlib import Path

import pytest
import torch

import optim
from configs import parse_args, preset
from errors import UserError
from lora import apply_lora
from model import GPT
from test_train import run_args  # noqa: F401 (a fixture)
from test_train import test_resume_is_bit_identical as resume_check  # aliased: not collected again here

N_LAYER = 3


def lora_setup(ratio, dora=False, **optim_fields):
    model_cfg, train = preset("tiny/lora")
    model = GPT(dataclasses.replace(model_cfg, n_layer=N_LAYER, n_head=2, n_embd=16, vocab_size=50, block_size=16))
    apply_lora(model, rank=2, alpha=4.0, dora=dora)
    return model, dataclasses.replace(train, lora_plus_ratio=ratio, dora=dora, weight_decay=0.1, **optim_fields)


def scales_by_name(model, train):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in optim.param_groups(model, train)
            for p in g["params"]}


def test_b_matrices_get_the_ratio_in_their_own_groups():
    model, train = lora_setup(16.0)
    scales = scales_by_name(model, train)
    assert scales and all(v == ((16.0, 0.1) if ".lora_B." in n else (1.0, 0.1)) for n, v in scales.items())
    groups = optim.param_groups(model, train)
    assert len(groups) == 2 and sorted(g["lr_scale"] for g in groups) == [1.0, 16.0]


def test_ratio_one_changes_nothing():
    model, train = lora_setup(1.0)
    assert len(optim.param_groups(model, train)) == 1
    assert set(scales_by_name(model, train).values()) == {(1.0, 0.1)}


def test_dora_magnitudes_go_with_b_without_decay():
    """PEFT's create_loraplus_optimizer puts every 1-D trainable parameter with B (no decay)."""
    model, train = lora_setup(4.0, dora=True)
    scales = scales_by_name(model, train)
    assert {v for n, v in scales.items() if n.endswith("lora_magnitude_vector")} == {(4.0, 0.0)}
    assert {v for n, v in scales.items() if ".lora_B." in n} == {(4.0, 0.1)}
    assert {v for n, v in scales.items() if ".lora_A." in n} == {(1.0, 0.1)}


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rates_at_each_step_with_layerwise_decay(schedule):
    ratio, llrd, total = 8.0, 0.5, 20
    model, train = lora_setup(ratio, schedule=schedule, llrd=llrd, lr=1e-3, min_lr=1e-4, warmup=4)
    opt = optim.build_optimizer(model, train, "cpu")
    owner = {id(p): n for n, p in model.named_parameters()}
    for step in (0, 3, 4, 11, 19):
        lr = optim.lr_at(step, train, total)
        optim.set_lr(opt, lr)
        for group in opt.param_groups:
            for p in group["params"]:
                name = owner[id(p)]
                depth = int(name.split(".")[2]) + 1  # block i sits at depth i + 1
                expected = lr * llrd ** (N_LAYER + 1 - depth) * (ratio if ".lora_B." in name else 1.0)
                assert group["lr"] == pytest.approx(expected, rel=1e-12)


def test_flags_and_their_checks():
    _, _, train = parse_args(["--config", "tiny/lora", "--lora-plus-ratio", "16", "--dora"])
    assert train.lora_plus_ratio == 16.0 and train.dora
    for argv, message in ((["--lora-plus-ratio", "16"], "add --lora"), (["--dora"], "add --lora"),
                          (["--config", "tiny/lora", "--lora-plus-ratio", "0"], "--lora-plus-ratio"),
                          (["--config", "tiny/lora", "--lora-plus-ratio", "nan"], "--lora-plus-ratio")):
        with pytest.raises(UserError, match=message):
            parse_args(argv)


def test_optimizer_state_keeps_the_groups():
    model, train = lora_setup(16.0)
    opt = optim.build_optimizer(model, train, "cpu")
    fresh = optim.build_optimizer(model, dataclasses.replace(train, lora_plus_ratio=1.0), "cpu")
    with pytest.raises(ValueError):  # a different grouping cannot take the state: resume needs the same
        fresh.load_state_dict(opt.state_dict())
    again = optim.build_optimizer(model, train, "cpu")
    again.load_state_dict(opt.state_dict())
    assert [g["lr_scale"] for g in again.param_groups] == [g["lr_scale"] for g in opt.param_groups]


def test_resume_is_bit_identical_with_lora_plus(run_args, monkeypatch):  # noqa: F811
    resume_check(run_args, monkeypatch, ["--lora", "--rank", "2", "--lora-plus-ratio", "16"])
    stopped = Path(run_args[run_args.index("--out-dir") + 1]) / "stopped"
    state = torch.load(next((stopped / "checkpoints").glob("step_*")) / "state.pt", weights_only=False)
    assert sorted(g["lr_scale"] for g in state["optimizer"]["param_groups"]) == [1.0, 16.0]
