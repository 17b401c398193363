"""Generation as a library: load a model to answer with (a run, or a checkpoint with an optional
adapter) together with its tokenizer and template, prepare it for inference, and answer prompts in
length-sorted batches. Used by the training loop's samples, eval.py and sample.py; the generation
and model options of those command lines are defined here once.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import torch

import lora
import runs
from configs import TrainConfig
from devices import DEVICE_HELP, Facts, generation_dtype
from errors import ArgParser, UserError
from model import GPT
from templates import DEFAULT_TEMPLATE, TEMPLATES, build_prompt
from tokenizer import Tokenizer, load_tokenizer, tokenizer_for


def model_parser(doc: str) -> ArgParser:
    """A parser described by the first paragraph of `doc`, with the model options."""
    parser = ArgParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    return parser


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0


@dataclass
class Loaded:
    """A model ready to answer, with what it needs to be prompted like in training."""
    model: Optional[GPT]  # None once eval.py has freed it
    tokenizer: Tokenizer
    template: str
    description: str  # where the weights came from, for reports
    train: Optional[TrainConfig] = None  # the run's training config (--run only)


# ----------------------------------------------------------------------------- command line

def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--run", help="run folder (runs/NAME): its latest checkpoint, template and tokenizer")
    group.add_argument("--model", help="HF GPT-2 folder or hub name (with --adapter: the adapter's base)")
    group.add_argument("--adapter", help="LoRA adapter folder (PEFT format) applied on --model; without "
                                         "--model, its adapter_config.json names the base")
    group.add_argument("--tokenizer", help="folder with vocab.json + merges.txt (default: the run's, or the "
                                           "model folder's, else GPT-2's)")
    group.add_argument("--template", choices=sorted(TEMPLATES),
                       help=f"prompt template (default: the run's, else {DEFAULT_TEMPLATE})")
    group.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    defaults = GenerationSettings()
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    group.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    group.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    group.add_argument("--seed", type=int, default=defaults.seed, help="same seed, same text")


def generation_settings(args) -> GenerationSettings:
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if settings.max_new_tokens < 1 or settings.temperature < 0:
        raise UserError("need --max-new-tokens >= 1 and --temperature >= 0")
    if settings.top_k is not None and settings.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {settings.top_k}")
    if settings.top_p is not None and not 0 < settings.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {settings.top_p}")
    return settings


# ----------------------------------------------------------------------------- loading

def adapter_base(adapter: str | Path) -> str:
    """The base model an adapter was trained on, from its PEFT adapter_config.json."""
    path = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: cannot read the adapter config ({err}); pass --model with the base") from None
    if not base:
        raise UserError(f"{path} names no base_model_name_or_path; pass --model with the base")
    return base


def load_weights(source: str, adapter: str | None = None) -> GPT:
    """A GPT-2 from a folder or hub name, with a LoRA adapter applied if given."""
    model = GPT.from_pretrained(source)
    if adapter is not None:
        if not Path(adapter).is_dir():
            raise UserError(f"--adapter {adapter}: no such folder")
        lora.load_adapter(model, adapter)
    return model


# Decoding at most this many sequences at once runs faster with weights laid out [in, out].
FEW_ROWS = 2


def prepare_for_generation(model: GPT, device: torch.device, rows: int, facts: Optional[Facts] = None) -> GPT:
    """Move to `device` and set up for inference only, decoding batches of `rows` sequences.

    Any LoRA update is folded into the weights, so a step costs what the base model's does; on
    CUDA the weights are then cast to half precision (devices.generation_dtype).
    On CPU, for one or two rows, the block linears' weights are also re-stored the way HF's
    Conv1D keeps them, [in, out] in memory, while staying [out, in] nn.Linear weights: each step
    then multiplies one or two rows by every weight, and MKL streams that layout ~25% faster
    (bench/bench_generate.py, batch 1: 5.8 s -> 5.1 s for 128 tokens). From 4 rows up the
    nn.Linear layout is the faster one (~10%), so batched evaluation keeps it."""
    model.eval()
    if lora.lora_settings(model) is not None:
        lora.merge_lora(model)  # in float32, before any cast
    model.to(device=device, dtype=generation_dtype(device, facts or Facts.probe()))
    if device.type == "cpu" and rows <= FEW_ROWS:
        for block in model.transformer.h:
            for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                linear.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous().t(), requires_grad=False)
    return model


def check_vocab(tokenizer: Tokenizer, model: GPT, what: str) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but {what} only "
                        f"{model.config.vocab_size}; pass the model's --tokenizer")


def load_for_generation(args) -> Loaded:
    """The model named by --run or --model/--adapter, its tokenizer and template."""
    if bool(args.run) == bool(args.model or args.adapter):
        raise UserError("pass either --run runs/NAME or --model DIR [--adapter DIR]")
    train = None
    if args.run:
        run_dir = Path(args.run)
        _, train = runs.run_configs(run_dir)
        model = runs.load_weights(runs.run_weights(run_dir))
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else runs.run_tokenizer(run_dir, train)
        description = f"run {args.run}"
    else:
        source = args.model or adapter_base(args.adapter)
        model = load_weights(source, args.adapter)
        tokenizer = tokenizer_for(source, args.tokenizer)
        description = source + (f" + adapter {args.adapter}" if args.adapter else "")
    check_vocab(tokenizer, model, description)
    template = args.template or (train.template if train else DEFAULT_TEMPLATE)
    return Loaded(model, tokenizer, template, description, train)


# ----------------------------------------------------------------------------- generation

def prompt_record(prompt: str | dict) -> dict:
    """A prompt as the {instruction, input} record that templates.build_prompt takes."""
    if isinstance(prompt, str):
        return {"instruction": prompt, "input": ""}
    return {"instruction": prompt["instruction"], "input": prompt.get("input") or ""}


def generate_responses(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str | dict], template: str,
                       settings: GenerationSettings, batch_size: int = 8, samples_per_prompt: int = 1,
                       progress: bool = True, desc: str = "generate",
                       precision: Callable[[], ContextManager] = contextlib.nullcontext) -> list[list[str]]:
    """samples_per_prompt responses to each prompt, in input order. `precision` is the training
    loop's autocast, when it answers prompts with the model it is training.

    Prompts are batched by token length (less left padding, so less wasted compute). Batch b
    samples with seed settings.seed + b, so a run is reproducible for the same prompts, settings
    and batch size; greedy output does not depend on batching at all.
    """
    from tqdm import tqdm

    budget = model.config.block_size - settings.max_new_tokens
    if budget < 1:
        raise UserError(f"--max-new-tokens {settings.max_new_tokens} leaves no room for the prompt in the "
                        f"model's context of {model.config.block_size} tokens; lower it")
    encoded = [tokenizer.encode_ordinary(build_prompt(prompt_record(p), template)) for p in prompts]
    jobs = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]  # prompt index per sequence
    order = sorted(range(len(jobs)), key=lambda j: len(encoded[jobs[j]]))  # stable: a prompt's samples stay together
    responses: list[list[str]] = [[] for _ in prompts]
    with tqdm(total=len(jobs), desc=desc, unit="seq", disable=not progress) as bar:
        for b, start in enumerate(range(0, len(order), batch_size)):
            batch = [jobs[j] for j in order[start:start + batch_size]]
            with precision():
                outputs = model.generate([encoded[i] for i in batch], settings.max_new_tokens,
                                         temperature=settings.temperature, top_k=settings.top_k,
                                         top_p=settings.top_p, eot_id=tokenizer.eot_id, seed=settings.seed + b)
            for i, tokens in zip(batch, outputs):
                responses[i].append(tokenizer.decode(tokens))
            bar.update(len(batch))
    return responses


def count_truncated_prompts(tokenizer: Tokenizer, prompts: Sequence[str | dict], template: str,
                            budget: int) -> int:
    """Prompts longer than the context leaves them; generate() keeps their last tokens."""
    return sum(len(tokenizer.encode_ordinary(build_prompt(prompt_record(p), template))) > budget for p in prompts)
