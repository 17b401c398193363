"""Turn Alpaca-style data (a JSON list or JSONL of {"instruction", "input" (optional), "output"})
into OUTPUT_DIR/sft_train.json and sft_test.json, and print what the data looks like in tokens.

    python prepare_sft_dataset.py                     # Stanford Alpaca, downloaded (needs network)
    python prepare_sft_dataset.py --input alpaca_data.json --test-size 0.05 --seed 1337
    python prepare_sft_dataset.py --input my.jsonl --test-size 500 --tokenizer ckpt/ --max-len 512

Everything is validated before anything is written: a bad record ends the run with one line
naming the file and the record, and exit code 2. Exact duplicates (same instruction and input)
are dropped, keeping the first. The split is a seeded permutation: same seed, same split.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from data import SPLIT_MANIFEST, encode_record, file_sha256, length_percentiles, parse_records
from errors import ArgParser, UserError, run_cli
from files import write_json_atomic
from templates import DEFAULT_TEMPLATE, TEMPLATES, get_template
from tokenizer import load_tokenizer

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", default=ALPACA_URL, help="JSON/JSONL file or http(s) URL")
    p.add_argument("--output-dir", default="data", help="where sft_train.json and sft_test.json go")
    p.add_argument("--test-size", default="0.05", help="number of test records (integer) or a fraction in (0, 1)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/test split")
    p.add_argument("--drop-empty", action="store_true", help="drop (and count) records whose output is empty "
                   "instead of refusing the file; Stanford's alpaca_data.json has a few")
    p.add_argument("--tokenizer", default=None, help="folder with vocab.json + merges.txt for the length "
                   "summary; default tiktoken's gpt2")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"prompt template: {', '.join(TEMPLATES)}")
    p.add_argument("--max-len", type=int, default=1024, help="context length the summary compares against")
    return p.parse_args(argv)


def read_source(source: str) -> bytes:
    if re.match(r"https?://", source):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                return response.read()
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"cannot download {source} ({reason}); offline? pass --input FILE with a local "
                            "copy") from None
    try:
        return Path(source).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {source}: {err.strerror or err}; check --input") from None


def n_test_records(test_size: str, n_records: int) -> int:
    """--test-size as a number of records: an integer is a count, anything else a fraction."""
    if test_size.strip().isdigit():
        size = int(test_size)
    else:
        try:
            fraction = float(test_size)
        except ValueError:
            fraction = -1.0
        if not 0.0 < fraction < 1.0:
            raise UserError(f"--test-size must be a count or a fraction in (0, 1), got {test_size!r}")
        size = max(1, round(fraction * n_records))
    if not 1 <= size < n_records:
        raise UserError(f"--test-size {test_size} gives {size} test records out of {n_records}; "
                        "need at least 1 test and 1 training record")
    return size


def drop_duplicates(records: list[dict]) -> tuple[list[dict], int]:
    """Keep the first record of each (instruction, input); the same prompt with two answers would
    also leak between train and test."""
    seen, unique = set(), []
    for record in records:
        key = (record["instruction"], record["input"])
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique, len(records) - len(unique)


def split(records: list[dict], n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random test set; both parts keep the records' original order."""
    is_test = np.zeros(len(records), dtype=bool)
    is_test[np.random.default_rng(seed).permutation(len(records))[:n_test]] = True
    return ([r for r, t in zip(records, is_test) if not t], [r for r, t in zip(records, is_test) if t])


def token_summary(records: list[dict], tokenizer, template: str, max_len: int) -> dict:
    """Percentiles of len(x) = prompt + response tokens, and how many exceed the context."""
    lengths, prompt_lengths = [], []
    for record in records:
        ids, n_prompt = encode_record(record, tokenizer, template)
        lengths.append(len(ids) - 1)
        prompt_lengths.append(n_prompt)
    lengths, prompt_lengths = np.array(lengths), np.array(prompt_lengths)
    return {**length_percentiles(lengths), "n_over_context": int((lengths > max_len).sum()),
            "n_prompt_over_context": int((prompt_lengths > max_len).sum())}


def replace_splits(out: Path, splits: dict[str, list[dict]]) -> None:
    """Replace the train and test files as one unit. Both are written under temporary names; the
    manifest with both hashes is replaced next, then the two files are renamed into place. A crash
    at any point leaves either a pair that matches the manifest or one that data.check_split_pair
    refuses, never a new split silently beside an old one."""
    tmps = {name: out / f".{name}.{os.getpid()}.tmp" for name in splits}
    try:
        for name, records in splits.items():
            tmps[name].write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
        write_json_atomic(out / SPLIT_MANIFEST, {name: file_sha256(tmp) for name, tmp in tmps.items()})
        for name, tmp in tmps.items():
            os.replace(tmp, out / name)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    get_template(args.template)
    if args.max_len < 1:
        raise UserError(f"--max-len must be at least 1, got {args.max_len}")
    records = parse_records(read_source(args.input), args.input, allow_empty_output=args.drop_empty)
    n_in = len(records)
    records = [r for r in records if r["output"].strip()]
    n_empty = n_in - len(records)
    records, n_duplicates = drop_duplicates(records)
    train, test = split(records, n_test_records(args.test_size, len(records)), args.seed)
    try:
        tokenizer, tokenizer_note = load_tokenizer(args.tokenizer), args.tokenizer or "tiktoken gpt2"
    except UserError as err:
        if args.tokenizer:  # asked for explicitly: a mistake worth stopping for
            raise
        tokenizer, tokenizer_note = None, str(err)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    replace_splits(out, {"sft_train.json": train, "sft_test.json": test})
    for stale in out.glob("sft_*.*.npz"):  # token caches of the old files
        stale.unlink()

    summary = {"input": args.input, "n_in": n_in, "n_dropped_duplicates": n_duplicates, "n_dropped_empty": n_empty,
               "n_train": len(train), "n_test": len(test), "seed": args.seed}
    print(f"read {n_in} records from {args.input}")
    print(f"dropped {n_duplicates} exact duplicates (same instruction + input) and {n_empty} empty outputs")
    print(f"wrote {len(train)} train records to {out / 'sft_train.json'} and {len(test)} test records to "
          f"{out / 'sft_test.json'} (seed {args.seed})")
    if tokenizer is None:
        print(f"token lengths skipped: {tokenizer_note}", file=sys.stderr)
        return summary
    summary.update(token_summary(records, tokenizer, args.template, args.max_len))
    print(f"tokens per example (prompt + response, template {args.template!r}, {tokenizer_note}): "
          f"p50 {summary['length_p50']}, p90 {summary['length_p90']}, p99 {summary['length_p99']}, "
          f"max {summary['length_max']}")
    print(f"longer than the context of {args.max_len}: {summary['n_over_context']} (truncated at training time, or "
          f"dropped with --overlong drop); prompt alone longer (always dropped): {summary['n_prompt_over_context']}")
    return summary


if __name__ == "__main__":
    run_cli(main)
