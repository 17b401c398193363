"""Generation speed: this project's GPT.generate vs transformers' generate() on the same weights.

    python bench/bench_generate.py [--batch-sizes 1 8] [--repeats 3] [--no-cache-batch-sizes 1] [--threads N]

GPT-2 (124M) shape with random weights, float32 on CPU, greedy, 64-token prompts and exactly
--new-tokens new tokens (no EOS stopping on either side), one process. Contenders:
  ours           GPT.generate on a model as loaded (nn.Linear weights, [out, in] in memory)
  ours_prepared  the same after generation.prepare_for_generation(rows=batch), as eval.py and
                 sample.py run it (for 1-2 rows it stores the block weights [in, out])
  hf             transformers' GPT2LMHeadModel.generate
Prints one JSON object: tokens/s (new tokens of all rows / median wall time), the ratios to
transformers, ours without the KV cache, and whether all produced the same tokens. Use
--threads 1 on a shared machine: with idle cores missing, multi-threaded small matmuls wait
for a descheduled worker and the timings measure the scheduler.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import GPTConfig  # noqa: E402
from model import GPT, config_to_hf  # noqa: E402
from generation import prepare_for_generation  # noqa: E402


def build_models(seed: int, shape: GPTConfig = GPTConfig()):
    """Random weights of `shape` (default GPT-2 124M: 12 layers, 768 wide, 50257 tokens, 1024
    context) in transformers' GPT2LMHeadModel, and the same weights in ours."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(shape))).eval()
    hf.generation_config.eos_token_id = None  # never stop early: both sides make exactly N tokens
    hf.generation_config.pad_token_id = hf.config.vocab_size - 1
    ours = GPT(shape).eval()
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


def bench_batch(ours_model: GPT, hf, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                no_cache: bool) -> dict:
    prompts = torch.randint(0, 50000, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(prompts)

    def ours(model, use_cache=True):
        return lambda: model.generate(prompts.tolist(), new_tokens, eot_id=None, use_cache=use_cache)

    def run_hf():
        out = hf.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False)
        return out[:, prompt_len:].tolist()

    models = {"ours": ours_model,
              "ours_prepared": prepare_for_generation(copy.deepcopy(ours_model), torch.device("cpu"), rows=batch)}
    fns = {**{name: ours(model) for name, model in models.items()}, "hf": run_hf}
    if no_cache:  # each step recomputes the whole sequence: slow, so timed once
        fns_no_cache = {"ours_no_cache": ours(models["ours"], use_cache=False)}
    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm-up: allocator, thread pool, first-call overheads
        timings = timed(fns, repeats)
        if no_cache:
            timings.update(timed(fns_no_cache, 1))
    n = batch * new_tokens
    outputs = {name: out for name, (_, out) in timings.items()}
    assert all(len(row) == new_tokens for out in outputs.values() for row in out), "a run stopped early"
    t_hf = timings["hf"][0]
    result = {"batch": batch,
              **{f"{name}_tokens_per_s": round(n / t, 1) for name, (t, _) in timings.items()},
              **{f"ratio_{name}_over_hf": round(t_hf / timings[name][0], 3) for name in models},
              "all_outputs_equal": all(out == outputs["hf"] for out in outputs.values()),
              "median_s": {name: round(t, 3) for name, (t, _) in timings.items()}}
    if no_cache:
        result["kv_cache_speedup"] = round(timings["ours_no_cache"][0] / timings["ours"][0], 2)
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
    results = [bench_batch(ours, hf, batch, args.prompt_len, args.new_tokens, args.repeats,
                           no_cache=batch in args.no_cache_batch_sizes) for batch in args.batch_sizes]
    print(json.dumps({
        "benchmark": "greedy generation, gpt2 124M shape, random weights, float32, CPU",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
