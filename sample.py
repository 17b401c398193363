"""Answer prompts with a fine-tuned model, the way it was trained to be prompted.

    python sample.py --run runs/NAME --prompt "Name three primary colors."
    python sample.py --model DIR [--adapter DIR] --temperature 0.7 --top-p 0.9    # reads stdin

Each prompt is wrapped in the run's template, the model continues it until <|endoftext|> (or
--max-new-tokens) and the response is printed. Without --prompt, every line of stdin is a
prompt. Loading and generation live in generation.py; this is only the command line.
"""
from __future__ import annotations

import argparse
import sys

from devices import pick_device
from errors import run_cli
from generation import (add_generation_args, generate_responses, generation_settings, load_for_generation,
                        model_parser, prepare_for_generation)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    add_generation_args(parser)
    parser.add_argument("--prompt", action="append",
                        help="a prompt (repeat for several, answered as one batch); default: read stdin, one per line")
    return parser.parse_args(argv)


def read_stdin_prompts():
    """Prompts from stdin, one per line, yielded as they arrive (an interactive loop on a terminal)."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("prompt> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF (Ctrl-D)
            return
        if line.strip():
            yield line.strip()


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = generation_settings(args)
    loaded = load_for_generation(args)
    prepare_for_generation(loaded.model, pick_device(args.device), rows=len(args.prompt) if args.prompt else 1)

    def answer(prompts: list[str]) -> None:
        responses = generate_responses(loaded.model, loaded.tokenizer, prompts, loaded.template, settings,
                                       batch_size=len(prompts), progress=False)
        for prompt, (response,) in zip(prompts, responses):
            if len(prompts) > 1:
                print(f"### {prompt}")
            print(response.strip(), flush=True)

    if args.prompt:
        answer(args.prompt)
        return
    for prompt in read_stdin_prompts():
        answer([prompt])


if __name__ == "__main__":
    run_cli(main)
