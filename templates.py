"""Prompt templates: how an Alpaca-style record {instruction, input, output} becomes the text the
model reads. Training and evaluation both build prompts here, by the template's name (which goes
into hyperparams.json), so a model is always prompted the way it was trained.

`build_prompt` returns the prompt up to and including the response header; the response text
follows it directly and the example ends with <|endoftext|> (added by data.py as a token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

from errors import UserError


@dataclass(frozen=True)
class Template:
    with_input: str  # used when the record has a non-empty "input"; fields {instruction}, {input}
    no_input: str  # field {instruction}
    source: str  # where the wording comes from


_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

TEMPLATES: dict[str, Template] = {
    # Stanford Alpaca's PROMPT_DICT, verbatim (tatsu-lab/stanford_alpaca, train.py).
    "alpaca": Template(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        no_input=_ALPACA_NO_INPUT,
        source="Stanford Alpaca",
    ),
    # rasbt/LLMs-from-scratch ch07 `format_input` + "\n\n### Response:\n": the no-input preamble
    # is used for both variants; without input it is identical to Stanford's.
    "llms-from-scratch": Template(
        with_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        no_input=_ALPACA_NO_INPUT,
        source="LLMs-from-scratch (rasbt)",
    ),
    # Anthropic HH-RLHF turn markers; the input joins the instruction in the human turn.
    "dialog": Template(
        with_input="Human: {instruction}\n\n{input}\n\nAssistant: ",
        no_input="Human: {instruction}\n\nAssistant: ",
        source="HH-RLHF style",
    ),
}

DEFAULT_TEMPLATE = "alpaca"


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; valid templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def build_prompt(record_or_instruction: Union[Mapping, str], template_name: str = DEFAULT_TEMPLATE) -> str:
    """The prompt for a record (a mapping with "instruction" and optional "input") or a bare
    instruction string. A non-empty input selects the template's with-input variant, as in
    Stanford's `example.get("input", "") != ""`."""
    template = get_template(template_name)
    if isinstance(record_or_instruction, str):
        record_or_instruction = {"instruction": record_or_instruction}
    instruction = record_or_instruction["instruction"]
    text_input = record_or_instruction.get("input") or ""
    if text_input:
        return template.with_input.format(instruction=instruction, input=text_input)
    return template.no_input.format(instruction=instruction)
