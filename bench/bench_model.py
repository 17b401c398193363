"""Training-step throughput of model.GPT against transformers' GPT2LMHeadModel, and what running the
vocabulary head only on target positions saves. Prints one JSON object.

Both models live in one process with the same random weights (GPT-2 small's shape by default),
float32 on CPU, dropout off, and are timed on the same batch: zero_grad + forward + loss +
backward. After one untimed step of each, the variants run interleaved, in alternating order
from round to round, so that drifting machine load hits them alike. Figures come from each
variant's fastest step (the least disturbed by other processes) and from its median step, and
the raw times are printed too. The full head's cost does not depend on how many targets are
masked (the softmax runs on every position either way), so the plain "gpt" step is the baseline
of targets_only. Not part of the tests:

    python bench/bench_model.py [--preset gpt2] [--batch 8] [--seq 256] [--rounds 3]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from configs import GPTConfig, preset  # noqa: E402
from bench_train import step_flops  # noqa: E402
from model import GPT, IGNORE_INDEX, config_to_hf  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2", help="model shape (random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="timed steps per variant")
    p.add_argument("--masked", type=float, default=0.5, help="fraction of positions without a target (a prompt)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_models(config: GPTConfig) -> tuple[GPT, GPT2LMHeadModel]:
    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(config), attn_implementation="sdpa")).train()
    assert hf.config._attn_implementation == "sdpa"
    ours = GPT(config).train()
    ours.load_hf_state_dict(hf.state_dict())
    return ours, hf


def batches(config: GPTConfig, batch: int, seq: int, masked: float, seed: int):
    """x, its shifted targets (the last position has none, as in HF's labels=x), and the same
    targets with the first `masked` of every row removed, like an SFT prompt."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=gen)
    x, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[:, -1] = IGNORE_INDEX
    prompt_targets = targets.clone()
    prompt_targets[:, : int(seq * masked)] = IGNORE_INDEX
    return x, targets, prompt_targets


def train_step(model, loss_fn) -> tuple[float, float, float]:
    """Wall-clock and process-CPU seconds of zero_grad + forward + loss + backward, and the loss.
    CPU time (all threads) is much less disturbed than wall time by other processes on the machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return time.perf_counter() - wall, time.process_time() - cpu, loss.item()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config, _ = preset(args.preset)
    config.dropout = 0.0
    ours, hf = build_models(config)
    x, targets, prompt_targets = batches(config, args.batch, args.seq, args.masked, args.seed)
    n_targets = int((prompt_targets != IGNORE_INDEX).sum())
    variants = {  # name -> (model, loss)
        "gpt": (ours, lambda: ours(x, targets)[1]),
        "hf": (hf, lambda: hf(x, labels=x).loss),  # HF shifts labels itself: same targets, same loss
        "gpt_targets_only": (ours, lambda: ours(x, prompt_targets, targets_only=True)[1]),
    }
    with torch.no_grad():  # same loss either way (checked on one row, cheaply)
        loss_full, loss_kept = (ours(x[:1], prompt_targets[:1], targets_only=flag)[1].item() for flag in (False, True))
    assert abs(loss_full - loss_kept) < 1e-4, (loss_full, loss_kept)

    for name in ("gpt", "hf"):  # untimed: thread pools, allocator, first-call set-up
        train_step(*variants[name])
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    losses = {}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            seconds, cpu_seconds, losses[name] = train_step(*variants[name])
            times[name].append(seconds)
            cpu_times[name].append(cpu_seconds)
    load_after = os.getloadavg()
    assert abs(losses["gpt"] - losses["hf"]) < 1e-4, losses

    tokens = args.batch * args.seq
    best = {name: min(t) for name, t in times.items()}
    # matmul FLOPs of a full fine-tuning step (bench_train.step_flops), with the head on every
    # position, on the targets only, and on none (what is left is the head's share)
    full, kept, no_head = (step_flops(config, args.batch, args.seq, rows, lora_rank=None)
                           for rows in (tokens, n_targets, 0))
    median = {name: statistics.median(t) for name, t in times.items()}
    cpu_median = {name: statistics.median(t) for name, t in cpu_times.items()}
    result = {
        "setup": {"preset": args.preset, "n_layer": config.n_layer, "n_head": config.n_head,
                  "n_embd": config.n_embd, "vocab_size": config.vocab_size, "batch": args.batch,
                  "seq": args.seq, "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
                  "rounds": args.rounds, "hf_attn_implementation": hf.config._attn_implementation,
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "cpu": platform.processor() or platform.machine(),
                  "load_avg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)]},
        "step_seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "step_cpu_seconds": {name: [round(t, 3) for t in ts] for name, ts in cpu_times.items()},
        "tokens_per_s_best": {name: round(tokens / t, 1) for name, t in best.items()},
        "tokens_per_s_median": {name: round(tokens / t, 1) for name, t in median.items()},
        "loss": {name: round(v, 6) for name, v in losses.items()},
        "ratio_gpt_over_hf_tokens_per_s": round(best["hf"] / best["gpt"], 3),
        "ratio_gpt_over_hf_median": round(median["hf"] / median["gpt"], 3),
        "ratio_gpt_over_hf_cpu_time_median": round(cpu_median["hf"] / cpu_median["gpt"], 3),
        "head_on_targets_only": {
            "positions": tokens, "targets": n_targets,
            "speedup_vs_full_head_best": round(best["gpt"] / best["gpt_targets_only"], 3),
            "speedup_vs_full_head_median": round(median["gpt"] / median["gpt_targets_only"], 3),
            "time_saving_median": round(1 - median["gpt_targets_only"] / median["gpt"], 3),
            "cpu_time_saving_median": round(1 - cpu_median["gpt_targets_only"] / cpu_median["gpt"], 3),
            "tflops_per_step_full_head": round(full / 1e12, 3),
            "tflops_per_step_targets_only": round(kept / 1e12, 3),
            "flops_saving": round(1 - kept / full, 3),
            "head_share_of_flops_full": round(1 - no_head / full, 3),
            "logits_mb_full_head": round(tokens * config.vocab_size * 4 / 2**20, 1),
            "logits_mb_targets_only": round(n_targets * config.vocab_size * 4 / 2**20, 1),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
