"""configs.py: presets, command-line overrides, refusals, and the JSON round trip of a resolved config."""
import json
from dataclasses import asdict

import pytest

from lora import LORA_TARGETS
from configs import PRESETS, GPTConfig, TrainConfig, config_from_dict, config_to_dict, load_config, \
    parse_args, preset, save_config
from errors import UserError

GPT2_SHAPES = {  # name -> (n_layer, n_head, n_embd), as published by OpenAI
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_resolves(name):
    model, train = preset(name)
    assert isinstance(model, GPTConfig) and isinstance(train, TrainConfig)
    assert model.n_embd % model.n_head == 0
    base, _, variant = name.partition("/")
    assert train.lora == (variant == "lora")
    assert model.dropout == (0.1 if variant == "dropout" else 0.0)
    assert parse_args(["--config", name])[1:] == (model, train)  # the CLI resolves it the same way


@pytest.mark.parametrize("name", GPT2_SHAPES)
def test_gpt2_presets_have_the_published_shapes(name):
    model, train = preset(name)
    assert (model.n_layer, model.n_head, model.n_embd) == GPT2_SHAPES[name]
    assert (model.vocab_size, model.block_size, model.layer_norm_epsilon) == (50257, 1024, 1e-5)
    assert train.init_from == name
    assert {f"{name}/lora", f"{name}/dropout"} <= set(PRESETS)


def test_lora_and_dropout_variants():
    _, lora = preset("gpt2-medium/lora")
    assert (lora.lora, lora.rank, lora.alpha) == (True, 16, 32.0)
    assert lora.lora_targets == LORA_TARGETS
    dropout_model, dropout_train = preset("gpt2/dropout")
    assert dropout_model.dropout == 0.1 and not dropout_train.lora
    # a variant changes only what it names
    plain_model, plain_train = preset("gpt2-medium")
    assert asdict(plain_train) == {**asdict(lora), "lora": False, "lr": 5e-5}
    # the recipes' rates (configs.py cites them); the tiny demo keeps its own under LoRA too
    assert (plain_train.lr, plain_train.weight_decay, lora.lr, lora.weight_decay) == (5e-5, 0.1, 2e-4, 0.1)
    assert preset("tiny/lora")[1].lr == preset("tiny")[1].lr == 2e-3
    assert preset("gpt2")[1] == dropout_train


def test_flags_override_the_preset():
    name, model, train = parse_args(["--config", "gpt2-medium/lora", "--rank", "8", "--lr", "1e-4", "--no-lora",
                                     "--lora-targets", "attn.c_attn", "--lora-layers", "0", "3", "--dropout", "0.2"])
    assert name == "gpt2-medium/lora"
    assert (train.rank, train.lr, train.lora, train.alpha) == (8, 1e-4, False, 32.0)
    assert train.lora_targets == ("attn.c_attn",) and train.lora_layers == (0, 3)  # tuples, like the defaults
    assert (model.n_layer, model.dropout) == (24, 0.2)
    assert parse_args(["--config", "tiny", "--lora"])[2].lora is True


def test_default_preset_is_tiny():
    name, model, train = parse_args([])
    assert name == "tiny" and (model, train) == preset("tiny")


@pytest.mark.parametrize("argv,words", [
    (["--config", "gpt3"], ["unknown preset 'gpt3'", "gpt2-medium/lora", "tiny"]),
    (["--config", "gpt2/qlora"], ["unknown preset 'gpt2/qlora'", "gpt2/dropout"]),
    (["--bogus", "3"], ["unknown option(s) --bogus 3", "--rank", "--lora-targets", "--config"]),
    (["--config", "gpt2", "stray"], ["unknown option(s) stray"]),
    (["--optimizer", "adam"], ["--optimizer must be one of", "adamw", "'adam'"]),
    (["--schedule", "step"], ["--schedule must be one of", "cosine"]),
    (["--dtype", "float64"], ["--dtype must be one of", "bfloat16"]),
    (["--overlong", "wrap"], ["--overlong must be one of", "truncate"]),
    (["--dataset", "web"], ["--dataset must be one of", "synthetic"]),
    (["--lora-targets", "attn.q_proj"], ["unknown ['attn.q_proj']", "attn.c_attn"]),
    (["--rank", "0"], ["--rank must be at least 1"]),
    (["--rank", "eight"], ["--rank: invalid int value", "--help"]),
    (["--n-head", "5", "--n-embd", "128"], ["must be divisible"]),
    (["--lr", "0"], ["--lr > 0"]),
    (["--dropout", "1.0"], ["dropout probabilities"]),
])
def test_bad_command_lines_are_refused_in_one_line(argv, words):
    with pytest.raises(UserError) as caught:
        parse_args(argv)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("argv", [
    ["--config", "gpt2-xl/lora"],
    ["--config", "tiny/dropout", "--lora-layers", "0", "2", "--lora-targets", "mlp.c_fc", "attn.c_proj",
     "--lr", "3e-5", "--min-lr", "1e-6", "--warmup", "7", "--run-name", "x", "--grad-checkpointing"],
])
def test_resolved_config_round_trips_through_json(argv, tmp_path):
    _, model, train = parse_args(argv)
    text = json.dumps(config_to_dict(model, train))
    assert config_from_dict(json.loads(text)) == (model, train)
    save_config(tmp_path / "config.json", model, train)
    assert load_config(tmp_path / "config.json") == (model, train)


def test_unknown_field_in_saved_config_is_refused():
    values = config_to_dict(*preset("tiny"))
    values["train"]["learning_rate"] = 1.0
    with pytest.raises(UserError, match="learning_rate"):
        config_from_dict(values)
