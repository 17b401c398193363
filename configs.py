"""Model presets, the typed model and training configs, and the command line that fills them.

A preset name is `MODEL` or `MODEL/VARIANT`: the model part fixes the architecture (and, for the
GPT-2 sizes, which pretrained weights to start from); the variant changes training defaults:
`/lora` turns on LoRA (rank 16, alpha 32; lr 2e-4 on the GPT-2 sizes), `/dropout` sets dropout
0.1 everywhere. Every field of the configs is also a command-line flag, so `--config gpt2-medium/lora --rank 8 --lr 1e-4`
reads as "the gpt2-medium LoRA preset, with rank 8 and learning rate 1e-4".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

import trackers

from data import DataConfig
from devices import DTYPES
from errors import ArgParser, UserError, check_range
from lora import LoRAConfig
from memplan import parse_size
from model import GPTConfig, config_from_hf
from optim import OptimConfig


@dataclass
class TrainConfig(DataConfig, LoRAConfig, OptimConfig):
    """Everything a training run needs besides the architecture: the data (DataConfig, data.py),
    LoRA (LoRAConfig, lora.py) and optimisation (OptimConfig, optim.py) options, and these."""
    # where the weights come from
    init_from: Optional[str] = None  # hub name or local HF folder; None = random init from the preset
    tokenizer: Optional[str] = None  # folder with vocab.json + merges.txt; None = the checkpoint's, else tiktoken "gpt2"
    # steps and batches
    grad_accum: int = 1
    batch_size: int = 8
    max_steps: int = 0  # 0 = run for `epochs`
    epochs: float = 1.0  # given explicitly, wins over a preset's max_steps (unless --max-steps is given too)
    seed: int = 1337
    # speed and precision
    dtype: str = "auto"  # auto (bfloat16 or float16 on CUDA, float32 elsewhere) | float32 | bfloat16 | float16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    head_on_targets_only: bool = True  # run the vocabulary head only where a target exists
    ce_chunk: int = 256  # ...those target rows at a time through head + loss (0 = all at once): bench/RESULTS.md
    fsdp: bool = False  # under torchrun, shard weights, gradients and optimizer state over the ranks (sharding.py)
    dry_run: bool = False  # print each rank's predicted memory (memplan.py) and exit, building nothing
    max_memory: Optional[str] = None  # per-rank budget, e.g. 15GB: refuse a run predicted not to fit, say what fits
    # bookkeeping
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 0  # 0 = the whole test split
    sample_prompts: int = 3  # fixed test prompts answered at each evaluation
    save_interval: int = 500
    keep_checkpoints: int = 2  # keep the newest N step folders (0 = all); older ones are deleted after each save
    out_dir: str = "runs"
    run_name: Optional[str] = None
    resume: Optional[str] = None  # runs/NAME: continue it (see RESUME_OPTIONS for what may change)
    tracker: Optional[str] = None  # tensorboard | wandb, besides metrics.json


# The flag groups of --help, in order: each dataclass's own fields.
CONFIG_GROUPS = (GPTConfig, DataConfig, LoRAConfig, OptimConfig, TrainConfig)

# What --resume may change: how long the run goes on and how it is paced and watched, never what it
# computes. A new max_steps/epochs recomputes the learning-rate schedule for the new total (a
# constant schedule continues unchanged, a cosine or linear one stretches to the new end).
RESUME_OPTIONS = ("max_steps", "epochs", "eval_interval", "save_interval", "log_interval", "device",
                  "keep_checkpoints", "tracker")

# Rules between flags, stated in --help, so that no flag is silently ignored.
FLAG_HELP = {
    "data_dir": "folder with sft_train.json and sft_test.json; given without --dataset, it implies --dataset sft",
    "epochs": "given without --max-steps, it wins over the preset's max_steps",
    "max_steps": "0 = run for --epochs",
    "resume": "runs/NAME to continue; may be combined only with " + ", ".join(
        "--" + n.replace("_", "-") for n in RESUME_OPTIONS),
    "keep_checkpoints": "newest checkpoints kept after each save (0 = all); the one `latest` names is never deleted",
    "tracker": "also log to tensorboard or wandb, besides metrics.json",
}


_GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

# Full fine-tuning of the pretrained sizes, from published instruction-tuning recipes: AdamW at lr
# 5e-5 with weight decay 0.1 (LLMs-from-scratch ch. 7, gpt2-medium on Alpaca-style data; the Alpaca
# runs this toolkit replaces also used 5e-5); cosine decay after a 3 % linear warmup (OptimConfig's
# defaults: Stanford Alpaca's --lr_scheduler_type cosine --warmup_ratio 0.03). Until now: lr 3e-4, no decay.
_GPT2_FULL_DEFAULTS = dict(lr=5e-5, weight_decay=0.1)

# name -> (architecture, training defaults)
MODEL_PRESETS: dict[str, tuple[GPTConfig, dict]] = {
    **{name: (GPTConfig(**shape), dict(init_from=name, **_GPT2_FULL_DEFAULTS))
       for name, shape in _GPT2_SIZES.items()},
    # Small enough to train from scratch on 2 CPU cores in minutes, on the built-in synthetic tasks.
    "tiny": (
        GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128),
        # Random batches: on these tasks the length gives away the task, so length-grouped
        # batches would each hold one task, and the model learns markedly worse.
        dict(dataset="synthetic", lr=2e-3, warmup=50, batch_size=32, max_steps=1500,
             eval_interval=250, weight_decay=0.1, min_lr=1e-4, group_by_length=False),
    ),
}

VARIANTS: dict[str, tuple[dict, dict]] = {  # variant -> (model overrides, training overrides)
    "": ({}, {}),
    "lora": ({}, dict(lora=True, rank=16, alpha=32.0)),
    "dropout": (dict(dropout=0.1), {}),
}

# What a variant sets on one model beyond its own overrides. LoRA on the pretrained sizes: lr 2e-4
# (PEFT's and TRL's LoRA examples use 1e-4 to 2e-4; the MDS5210 course trains gpt2-medium LoRA at
# 2e-4), the same warmup, schedule and weight decay 0.1 as full fine-tuning (decay on A and B pulls
# the update towards zero, i.e. towards the base model). `tiny/lora` keeps tiny's lr.
MODEL_VARIANT_DEFAULTS: dict[tuple[str, str], dict] = {(name, "lora"): dict(lr=2e-4) for name in _GPT2_SIZES}

PRESETS = sorted(m if not v else f"{m}/{v}" for m in MODEL_PRESETS for v in VARIANTS)


def preset(name: str) -> tuple[GPTConfig, TrainConfig]:
    """The model and training configs of a preset, e.g. `gpt2-medium/lora`."""
    model_name, _, variant = name.partition("/")
    if model_name not in MODEL_PRESETS or variant not in VARIANTS:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    model, train_defaults = MODEL_PRESETS[model_name]
    model_overrides, train_overrides = VARIANTS[variant]
    train = {**train_defaults, **train_overrides, **MODEL_VARIANT_DEFAULTS.get((model_name, variant), {})}
    return replace(model, **model_overrides), TrainConfig(**train)


# ----------------------------------------------------------------------------- JSON round trip

def config_to_dict(model: GPTConfig, train: TrainConfig) -> dict:
    return {"model": asdict(model), "train": asdict(train)}


def _from_dict(cls, values: dict):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    # JSON has no tuples: turn lists back into the declared tuple fields.
    return cls(**{k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v
                  for k, v in values.items()})


def config_from_dict(values: dict) -> tuple[GPTConfig, TrainConfig]:
    return _from_dict(GPTConfig, values["model"]), _from_dict(TrainConfig, values["train"])


def save_config(path, model: GPTConfig, train: TrainConfig) -> None:
    with open(path, "w") as f:
        json.dump(config_to_dict(model, train), f, indent=2)


def load_config(path) -> tuple[GPTConfig, TrainConfig]:
    with open(path) as f:
        return config_from_dict(json.load(f))


# ----------------------------------------------------------------------------- command line

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint) -> None:
    """One flag for one dataclass field; the default is None so that we can tell what was given."""
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if typing.get_origin(hint) is typing.Union else hint
    if base is bool:
        parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None)
    elif typing.get_origin(base) is tuple:
        parser.add_argument(_flag(f.name), nargs="+", type=typing.get_args(base)[0], default=None)
    else:
        parser.add_argument(_flag(f.name), type=base, default=None, help=FLAG_HELP.get(f.name))


def own_fields(cls) -> list[dataclasses.Field]:
    """The fields a dataclass declares itself, not those it inherits."""
    inherited = {f.name for base in cls.__bases__ if dataclasses.is_dataclass(base) for f in fields(base)}
    return [f for f in fields(cls) if f.name not in inherited]


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = ArgParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="tiny", help=f"preset: {', '.join(PRESETS)}")
    for cls in CONFIG_GROUPS:
        group = parser.add_argument_group(cls.__name__)
        hints = typing.get_type_hints(cls)
        for f in own_fields(cls):
            _add_field(group, f, hints[f.name])
    return parser


class CommandLine(NamedTuple):
    preset: str
    model: GPTConfig
    train: TrainConfig
    given: dict  # the flags given (field name -> value): what --resume may change is checked on these


def parse_args(argv=None, description: str = "") -> tuple[str, GPTConfig, TrainConfig]:
    """Preset defaults overridden by the flags given. Returns (preset name, model config, train config)."""
    preset_name, model, train, _ = parse_command_line(argv, description)
    return preset_name, model, train


def implied_by(given: dict) -> dict:
    """Settings that flags given imply, so that a preset's default never silently wins over them:
    --data-dir means the user's SFT data, --epochs means "run for that many epochs"."""
    implied = {}
    if "data_dir" in given and "dataset" not in given:
        implied["dataset"] = "sft"
    if "epochs" in given and "max_steps" not in given:
        implied["max_steps"] = 0
    return implied


def parse_command_line(argv=None, description: str = "") -> CommandLine:
    parser = build_parser(description)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = ", ".join(a for action in parser._actions for a in action.option_strings if a.startswith("--"))
        raise UserError(f"unknown option(s) {' '.join(unknown)}; valid options: {valid}")
    model, train = preset(args.config)
    # nargs="+" flags give lists; the dataclass fields are tuples (and must stay so to survive JSON)
    given = {k: tuple(v) if isinstance(v, list) else v
             for k, v in vars(args).items() if v is not None and k != "config"}
    model_names = {f.name for f in fields(GPTConfig)}
    model = replace(model, **{k: v for k, v in given.items() if k in model_names})
    train = replace(train, **{k: v for k, v in given.items() if k not in model_names}, **implied_by(given))
    validate(model, train)
    return CommandLine(args.config, model, train, given)


def model_depth(model: GPTConfig, train: TrainConfig) -> Optional[int]:
    """The number of blocks the run's model will have, when known before loading it."""
    if train.init_from in _GPT2_SIZES:
        return _GPT2_SIZES[train.init_from]["n_layer"]
    if train.init_from and (Path(train.init_from) / "config.json").is_file():
        return config_from_hf(Path(train.init_from)).n_layer
    return None if train.init_from else model.n_layer


def validate(model: GPTConfig, train: TrainConfig) -> None:
    """Refuse settings that cannot work, before any weights are loaded. Each group checks its own
    options in its own module; the rest are checked here."""
    model.check()
    for check in (DataConfig.check, LoRAConfig.check, OptimConfig.check):
        check(train)
    if train.max_memory is not None:
        parse_size(train.max_memory)  # a malformed size fails here, before anything is built
    if train.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {train.dtype!r}")
    for name in ("batch_size", "grad_accum", "log_interval", "eval_interval", "save_interval"):
        if not getattr(train, name) >= 1:
            raise UserError(f"{_flag(name)} must be at least 1, got {getattr(train, name)}")
    for name in ("max_steps", "eval_batches", "sample_prompts", "keep_checkpoints", "ce_chunk"):
        if hasattr(train, name):
            check_range(_flag(name), getattr(train, name), 0)
    check_range("--epochs", train.epochs, 0, low_open=True)
    n_layer = model_depth(model, train)
    if n_layer is not None:
        check_range("--freeze-layers", train.freeze_layers, 0, n_layer)
    trackers.check_kind(train.tracker)
