"""LoRA training-step speed and memory: this project's GPT + lora.py vs transformers' GPT2LMHeadModel + peft.

Same shapes, same random weights (ours loads the HF model's), rank 16 on all four linears of every
block (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), AdamW over the LoRA parameters, float32 on
CPU. The loss is the same cross-entropy over the full [B, T, vocab] logits on both sides
(`model(x, y, targets_only=False)`); `targets_only=True` (vocabulary head and loss only where a
target exists, `--ce-chunk` rows at a time, as train_sft runs them; `--prompt-frac` of each row is
masked like an SFT prompt) is reported beside it.

Speed: one process holds all models and runs their steps interleaved (order rotating every step),
so load from other processes and clock changes hit every contender alike; tokens/s = B*T / median
step time after warm-up ("ratio" = ours / peft on those). The "*_best" ratios use each contender's
fastest step instead, the least disturbed one, the steadier figure on a shared machine. A fourth
contender, peft's LoRA layers on our GPT, isolates the LoRA layer itself ("ratio_lora_layer"); a
fifth, ours_dora, is lora.py's DoRA on the same targets ("ratio_dora": its tokens/s over plain LoRA's).

Memory: each contender runs alone in a fresh subprocess that imports the same modules, builds
only its own model and trains `--memory-steps` steps; we report the kernel's high-water mark of
the process RSS (VmHWM in /proc/self/status: exact, no sampling gaps, and it sees every allocator
torch uses, which tracemalloc does not; getrusage's ru_maxrss would not do, Linux carries the
parent's peak into it across fork + exec) and that peak minus the RSS measured just before the
model was built (so the import footprint, equal on both sides, cancels).

    python bench/bench_lora.py                  # gpt2 + gpt2-medium, batch 2 x 128, 5 timed steps
    python bench/bench_lora.py --models gpt2    # the quick look
    python bench/bench_lora.py --batch 8 --seq 256 --steps 3   # the issue's shape (8x the tokens)

The defaults used 10.6 CPU-minutes (22 minutes of wall time on a 2-core machine shared with other
jobs, load ~8); gpt2 alone is about a third of that. Load slows every contender alike (interleaving),
but widens the spread of step times: prefer more --steps, or --threads 1, on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import TrainConfig, preset  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import GPT, HUB_MODELS, config_to_hf  # noqa: E402

TARGETS_PEFT = ["c_attn", "c_proj", "c_fc"]  # "c_proj" catches attn.c_proj and mlp.c_proj: all four
# ours: GPT + lora.py; peft: GPT2LMHeadModel + peft (what the replaced system ran); peft_on_our_gpt:
# peft's LoRA layers on our GPT, which isolates lora.py's layer from the rest of the model;
# ours_dora: GPT + lora.py's DoRA (--dora), same rank and targets, its cost over LoRA in "ratio_dora".
CONTENDERS = ("ours", "ours_targets_only", "peft", "peft_on_our_gpt", "ours_dora")
RATIOS = {"ratio": ("ours", "peft"), "ratio_targets_only": ("ours_targets_only", "peft"),
          "ratio_lora_layer": ("ours", "peft_on_our_gpt"), "ratio_dora": ("ours_dora", "ours")}
VOCAB_SIZE = 50257  # GPT-2's, the same for every size


def hf_config(name: str):
    from transformers import GPT2Config

    # the preset's dropout (none), not HF's default 0.1, which would add work on its side only
    return GPT2Config(**config_to_hf(preset(name)[0]))


def with_peft_lora(model, rank: int, fan_in_fan_out: bool):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS_PEFT,
                                                fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0))


def build(contender: str, name: str, rank: int, hf_model=None, ce_chunk: int = 0):
    """(model, step function, trainable count) of one contender; every model starts from
    hf_model's weights when given (get_peft_model wraps hf_model in place: build "peft" last)."""
    if contender == "peft":
        from transformers import GPT2LMHeadModel

        model = with_peft_lora(hf_model if hf_model is not None else GPT2LMHeadModel(hf_config(name)), rank, True)

        def loss_fn(x, y):  # the same cross-entropy as GPT.forward's, on HF's logits
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)
    else:
        model = GPT(preset(name)[0])
        if hf_model is not None:
            model.load_hf_state_dict(hf_model.state_dict())
        if contender == "peft_on_our_gpt":
            model = with_peft_lora(model, rank, False)  # our linears are nn.Linear
        else:
            apply_lora(model, rank=rank, alpha=2 * rank, dora=contender == "ours_dora")
        head = dict(targets_only=True, ce_chunk=ce_chunk) if contender == "ours_targets_only" else {}

        def loss_fn(x, y):  # the target count is the host's, as train_sft has it
            n = dict(n_targets=int((y != -100).sum())) if head else {}
            return model(x, y, **head, **n)[1]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(x, y) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        return loss.item()
    return model, step, sum(p.numel() for p in params)


def batch(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB_SIZE, (args.batch, args.seq), generator=g)
    y = torch.randint(0, VOCAB_SIZE, (args.batch, args.seq), generator=g)
    y[:, : int(args.prompt_frac * args.seq)] = -100  # the SFT prompt: no targets
    return x, y


def time_model(args, name: str) -> dict:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config(name))
    steps, trainable = {}, {}
    for contender in sorted(CONTENDERS, key=lambda c: c == "peft"):  # "peft" last: it changes hf in place
        _, steps[contender], trainable[contender] = build(contender, name, args.rank, hf, args.ce_chunk)
    x, y = batch(args)
    first = {c: steps[c](x, y) for c in CONTENDERS}  # warm-up 1, and equal losses prove equal models
    times = {c: [] for c in CONTENDERS}
    for i in range(args.warmup - 1 + args.steps):
        order = CONTENDERS[i % len(CONTENDERS):] + CONTENDERS[:i % len(CONTENDERS)]
        for c in order:
            start = time.perf_counter()
            steps[c](x, y)
            if i >= args.warmup - 1:
                times[c].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    speed = {c: tokens / statistics.median(t) for c, t in times.items()}
    best = {c: tokens / min(t) for c, t in times.items()}
    return {
        "tokens_per_s": {c: round(v, 1) for c, v in speed.items()},
        **{key: round(speed[a] / speed[b], 3) for key, (a, b) in RATIOS.items()},
        **{key + "_best": round(best[a] / best[b], 3) for key, (a, b) in RATIOS.items()},
        "step_s_median": {c: round(statistics.median(t), 3) for c, t in times.items()},
        "step_s_min": {c: round(min(t), 3) for c, t in times.items()},
        "first_loss": {c: round(v, 5) for c, v in first.items()},
        "trainable_params": trainable,
    }


def memory_child(args) -> None:
    """Runs in its own process: one contender, --memory-steps steps, RSS numbers as JSON."""
    import peft  # noqa: F401  (the same imports on every side, so the baselines match)
    import psutil
    import transformers  # noqa: F401

    x, y = batch(args)
    before = psutil.Process().memory_info().rss
    _, step, _ = build(args.child, args.model, args.rank, ce_chunk=args.ce_chunk)
    for _ in range(args.memory_steps):
        step(x, y)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024  # kB
    mb = 2**20
    print(json.dumps({"peak_rss_mb": round(peak / mb, 1), "peak_above_baseline_mb": round((peak - before) / mb, 1)}))


def measure_memory(args, name: str) -> dict:
    out = {}
    for contender in CONTENDERS:
        cmd = [sys.executable, __file__, "--child", contender, "--model", name, "--batch", str(args.batch),
               "--seq", str(args.seq), "--rank", str(args.rank), "--prompt-frac", str(args.prompt_frac),
               "--memory-steps", str(args.memory_steps), "--threads", str(args.threads),
               "--ce-chunk", str(args.ce_chunk)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[contender] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "gpt2-medium"], choices=HUB_MODELS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per contender (at least 1)")
    parser.add_argument("--prompt-frac", type=float, default=0.5, help="fraction of each row masked as prompt")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--ce-chunk", type=int, default=TrainConfig.ce_chunk,
                        help="target rows per chunk of the head in ours_targets_only (0 = all at once)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-contender memory subprocesses")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return memory_child(args)
    report = {"device": "cpu", "dtype": "float32", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch": args.batch, "seq": args.seq, "rank": args.rank, "targets": "all four linears, every block",
              "optimizer": "adamw", "ce_chunk": args.ce_chunk, "steps": args.steps, "warmup": args.warmup, "prompt_frac": args.prompt_frac,
              "results": {}}
    for name in args.models:
        result = time_model(args, name)
        if not args.no_memory:
            result["memory"] = measure_memory(args, name)
        report["results"][name] = result
        print(json.dumps({name: result}), file=sys.stderr, flush=True)  # progress
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
