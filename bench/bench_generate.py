"""Generation speed: this project's GPT.generate vs transformers' generate() on the same weights.

    python bench/bench_generate.py [--batch-sizes 1 8] [--repeats 3] [--no-cache-batch-sizes 1]

GPT-2 (124M) shape with random weights, float32, greedy, 64-token prompts and exactly
--new-tokens new tokens (no EOS stopping on either side), one process. Prints one JSON object:
tokens/s (new tokens of all rows / median wall time) per implementation and batch size, the ratio
ours / transformers, ours with the KV cache off, and whether the two produced the same tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import GPTConfig  # noqa: E402
from model import GPT  # noqa: E402


def build_models(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # 12 layers, 768 wide, 50257 tokens, 1024 context
    hf.generation_config.eos_token_id = None  # never stop early: both sides make exactly N tokens
    hf.generation_config.pad_token_id = hf.config.vocab_size - 1
    ours = GPT(GPTConfig()).eval()
    ours.load_hf_state_dict(hf.state_dict(), origin="transformers")
    return ours, hf


def timed(fns: dict, repeats: int) -> dict:
    """name -> (median wall time, last result). The functions take turns, so a slow spell of a
    shared machine hits all of them rather than whichever happened to run then."""
    times = {name: [] for name in fns}
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def bench_batch(ours: GPT, hf, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                no_cache: bool) -> dict:
    prompts = torch.randint(0, 50000, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(prompts)

    def run_ours(use_cache=True):
        return ours.generate(prompts.tolist(), new_tokens, eot_id=None, use_cache=use_cache)

    def run_hf():
        out = hf.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False)
        return out[:, prompt_len:].tolist()

    with torch.inference_mode():
        run_ours(), run_hf()  # warm-up: allocator, thread pool, first-call overheads
        (t_ours, out_ours), (t_hf, out_hf) = timed({"ours": run_ours, "hf": run_hf}, repeats).values()
    n = batch * new_tokens
    assert all(len(row) == new_tokens for row in out_ours + out_hf), "a side stopped early"
    same = sum(a == b for ra, rb in zip(out_ours, out_hf) for a, b in zip(ra, rb)) / n
    result = {
        "batch": batch,
        "ours_tokens_per_s": round(n / t_ours, 1),
        "hf_tokens_per_s": round(n / t_hf, 1),
        "ratio_ours_over_hf": round(t_hf / t_ours, 3),
        "tokens_equal_to_hf": round(same, 4),
        "median_s": {"ours": round(t_ours, 3), "hf": round(t_hf, 3)},
    }
    if no_cache:  # each step recomputes the whole sequence: slow, so timed once
        with torch.inference_mode():
            ((t_nocache, out_nocache),) = timed({"no_cache": lambda: run_ours(use_cache=False)}, 1).values()
        result.update(ours_no_cache_tokens_per_s=round(n / t_nocache, 1), kv_cache_speedup=round(t_nocache / t_ours, 2),
                      no_cache_equals_cache=out_nocache == out_ours)
        result["median_s"]["ours_no_cache"] = round(t_nocache, 3)
    print(json.dumps(result), file=sys.stderr, flush=True)  # partial results, in case of a long run
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cache-batch-sizes", type=int, nargs="*", default=[1],
                        help="batch sizes also timed without the KV cache (batch 8 takes ~30 min on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 gives steady numbers on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    ours, hf = build_models(args.seed)
    results = [bench_batch(ours, hf, b, args.prompt_len, args.new_tokens, args.repeats, b in args.no_cache_batch_sizes)
               for b in args.batch_sizes]
    print(json.dumps({
        "benchmark": "greedy generation, gpt2 124M shape, random weights, float32",
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
