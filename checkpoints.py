"""Run-folder checkpoints: writing them atomically, finding the latest, and loading a run's model.

    runs/NAME/checkpoints/step_0000500/adapter/   LoRA runs: PEFT adapter files
                                       model/     full fine-tuning: a Hugging Face folder
                                       state.pt   optimizer, schedule, RNG and data-order state
    runs/NAME/checkpoints/latest                  the name of the newest complete step folder
    runs/NAME/base_model/                         LoRA on a randomly initialised base: that base

A step folder is written under a temporary name and renamed when complete, and `latest` is
replaced after that, so a crash at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import lora
from configs import config_from_dict
from errors import UserError
from files import write_text_atomic
from model import GPT
from tokenizer import Tokenizer, load_tokenizer, tokenizer_folder


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model: GPT, state: dict, base_model: str) -> Path:
    """Write checkpoints/step_N (adapter or full model, plus `state`) and point `latest` at it."""
    root = Path(run_dir) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora.lora_settings(model) is not None:
        lora.save_adapter(model, tmp / "adapter", base_model_name_or_path=base_model)
    else:
        model.save_pretrained(tmp / "model")
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)  # a re-run of the same step after a resume
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_state(checkpoint: Path) -> dict:
    # The state holds RNG states and optimizer tensors only: weights_only loading suffices.
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)


def read_hyperparams(run_dir: Path) -> dict:
    path = Path(run_dir) / "hyperparams.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the run's hyperparameters ({err}); is {run_dir} a run folder?") from None


def run_base_source(run_dir: Path, train_init_from: str | None) -> str | None:
    """Where a run's base weights come from: its init_from, or the base it saved itself."""
    saved = Path(run_dir) / "base_model"
    return str(saved) if saved.is_dir() else train_init_from


def load_run_model(run_dir: Path, checkpoint: Path | None = None) -> tuple[GPT, Tokenizer, dict]:
    """The model of a run at its latest (or the given) checkpoint, its tokenizer and hyperparams."""
    run_dir = Path(run_dir)
    hyperparams = read_hyperparams(run_dir)
    model_config, train = config_from_dict(hyperparams["config"])
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"{run_dir}: no checkpoint yet (checkpoints/latest is missing); train longer or pass --model")
    if (checkpoint / "model").is_dir():
        model = GPT.from_pretrained(checkpoint / "model")
    else:
        base = run_base_source(run_dir, train.init_from)
        if base is None:
            raise UserError(f"{run_dir}: LoRA run without a base model (no init_from, no base_model/)")
        model = GPT.from_pretrained(base)
        lora.load_adapter(model, checkpoint / "adapter")
    # A run's tokenizer: the one it was given, else the files beside its weights, else GPT-2's.
    tokenizer = load_tokenizer(train.tokenizer or tokenizer_folder(model.checkpoint_dir))
    return model, tokenizer, hyperparams

