"""How much compute goes to padding on real Alpaca data, and how much of it the vocabulary head
needs. Prints JSON.

    TIKTOKEN_CACHE_DIR=../shared/assets/tiktoken_cache python bench/bench_padding.py
    python bench/bench_padding.py ../shared/assets/alpaca/alpaca_5000_subset.json --tokenizer ../shared/assets/gpt2_bpe

Padding fractions are shares of the [B, T] positions the model computes on (the cost of the
linear layers, most of a GPT-2's compute); the attention_* figures weigh each row by T^2 instead.
Samplers are averaged over several epochs.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import LengthGroupedBatchSampler, SFTDataset, padding_fraction, parse_records  # noqa: E402
from errors import run_cli  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "assets" / "alpaca" / "alpaca_5000_subset.json"


def attention_padding_fraction(lengths: np.ndarray, batches) -> float:
    real = sum(int((lengths[b] ** 2).sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) ** 2 for b in batches)
    return 1.0 - real / padded


def sampler_figures(lengths: np.ndarray, batch_size: int, group_by_length: bool, epochs: int, seed: int) -> dict:
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=seed, group_by_length=group_by_length)
    tokens, attention, seconds = [], [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        batches = list(sampler)
        seconds.append(time.perf_counter() - start)
        tokens.append(padding_fraction(lengths, batches))
        attention.append(attention_padding_fraction(lengths, batches))
    return {"pad_fraction": round(float(np.mean(tokens)), 4),
            "pad_fraction_epoch_range": [round(min(tokens), 4), round(max(tokens), 4)],
            "attention_pad_fraction": round(float(np.mean(attention)), 4),
            "ms_per_epoch_of_batches": round(1000 * float(np.mean(seconds)), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help="Alpaca-style JSON/JSONL")
    p.add_argument("--tokenizer", default=None, help="folder with vocab.json + merges.txt; default tiktoken gpt2")
    p.add_argument("--template", default="alpaca")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    records = parse_records(Path(args.data).read_bytes(), args.data, allow_empty_output=True)
    records = [r for r in records if r["output"].strip()]  # as prepare_sft_dataset.py --drop-empty
    start = time.perf_counter()
    dataset = SFTDataset.from_records(records, tokenizer, args.template, args.max_len)
    tokenise_s = time.perf_counter() - start
    lengths = dataset.lengths
    stats = dataset.stats
    full = 1.0 - lengths.sum() / (len(lengths) * args.max_len)
    full_attention = 1.0 - (lengths ** 2).sum() / (len(lengths) * args.max_len ** 2)
    print(json.dumps({
        "data": args.data, "tokenizer": args.tokenizer or "tiktoken gpt2", "template": args.template,
        "batch_size": args.batch_size, "max_len": args.max_len, "epochs_averaged": args.epochs,
        "n_examples": stats["n_examples"], "n_truncated": stats["n_truncated"], "n_dropped": stats["n_dropped"],
        "lengths": {k: v for k, v in stats.items() if k.startswith("length_")},
        "mean_length": round(float(lengths.mean()), 1),
        "a_pad_to_max_len": {"pad_fraction": round(float(full), 4),
                             "attention_pad_fraction": round(float(full_attention), 4)},
        "b_random_dynamic": sampler_figures(lengths, args.batch_size, False, args.epochs, args.seed),
        "c_length_grouped": sampler_figures(lengths, args.batch_size, True, args.epochs, args.seed),
        "target_fraction_of_tokens": round(stats["n_target_tokens"] / stats["n_tokens"], 4),
        "tokenise_s": round(tokenise_s, 2),
    }, indent=2))


if __name__ == "__main__":
    run_cli(main)
