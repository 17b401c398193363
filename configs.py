"""Model presets, the typed model and training configs, and the command line that fills them.

A preset name is `MODEL` or `MODEL/VARIANT`: the model part fixes the architecture (and, for the
GPT-2 sizes, which pretrained weights to start from); the variant changes training defaults:
`/lora` turns on LoRA (rank 16, alpha 32), `/dropout` sets dropout 0.1 everywhere. Every field of
the configs is also a command-line flag, so `--config gpt2-medium/lora --rank 8 --lr 1e-4`
reads as "the gpt2-medium LoRA preset, with rank 8 and learning rate 1e-4".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from data import DataConfig
from devices import DTYPES
from errors import ArgParser, UserError
from lora import LoRAConfig
from model import GPTConfig
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
    epochs: float = 1.0
    seed: int = 1337
    # speed and precision
    dtype: str = "auto"  # auto (bfloat16 or float16 on CUDA, float32 elsewhere) | float32 | bfloat16 | float16
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    head_on_targets_only: bool = True  # run the vocabulary head only where a target exists
    # bookkeeping
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 0  # 0 = the whole test split
    sample_prompts: int = 3  # fixed test prompts answered at each evaluation
    save_interval: int = 500
    out_dir: str = "runs"
    run_name: Optional[str] = None
    resume: Optional[str] = None


# The flag groups of --help, in order: each dataclass's own fields.
CONFIG_GROUPS = (GPTConfig, DataConfig, LoRAConfig, OptimConfig, TrainConfig)


_GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

# name -> (architecture, training defaults)
MODEL_PRESETS: dict[str, tuple[GPTConfig, dict]] = {
    **{name: (GPTConfig(**shape), dict(init_from=name)) for name, shape in _GPT2_SIZES.items()},
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

PRESETS = sorted(m if not v else f"{m}/{v}" for m in MODEL_PRESETS for v in VARIANTS)


def preset(name: str) -> tuple[GPTConfig, TrainConfig]:
    """The model and training configs of a preset, e.g. `gpt2-medium/lora`."""
    model_name, _, variant = name.partition("/")
    if model_name not in MODEL_PRESETS or variant not in VARIANTS:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    model, train_defaults = MODEL_PRESETS[model_name]
    model_overrides, train_overrides = VARIANTS[variant]
    return replace(model, **model_overrides), TrainConfig(**{**train_defaults, **train_overrides})


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
        parser.add_argument(_flag(f.name), type=base, default=None)


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


def parse_args(argv=None, description: str = "") -> tuple[str, GPTConfig, TrainConfig]:
    """Preset defaults overridden by the flags given. Returns (preset name, model config, train config)."""
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
    train = replace(train, **{k: v for k, v in given.items() if k not in model_names})
    validate(model, train)
    return args.config, model, train


def validate(model: GPTConfig, train: TrainConfig) -> None:
    """Refuse settings that cannot work, before any weights are loaded. Each group checks its own
    options in its own module; the rest are checked here."""
    model.check()
    for check in (DataConfig.check, LoRAConfig.check, OptimConfig.check):
        check(train)
    if train.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {train.dtype!r}")
    for name in ("batch_size", "grad_accum", "log_interval", "eval_interval", "save_interval"):
        if getattr(train, name) < 1:
            raise UserError(f"{_flag(name)} must be at least 1, got {getattr(train, name)}")
