"""Training speed and peak memory of train_sft.py's own step: full fine-tuning vs LoRA, by optimizer.

Each configuration (method x optimizer x compile) runs alone in a fresh child process that
builds a `train_sft.Trainer` as train_sft.py does, on random weights of the preset's shape (same
model build, LoRA injection, optimizer, autocast, loss scaling, clipping and step code), and feeds
it B rows of T random tokens through `Trainer.micro_batches` and `Trainer.train_step`; the first
`--prompt-frac` of each row is masked like an SFT prompt. After `--warmup` untimed steps,
`--steps` steps are timed (CUDA synchronised). tokens/s = B*T / median step time. `--rounds`
repeats the whole cycle of children, so that a change of machine load spreads over every
configuration instead of hitting one.

Peak memory: on CUDA, torch's peak allocated and reserved bytes over the child's life; on CPU the
kernel's high-water mark of the child's RSS (VmHWM) and that peak minus the RSS just before the
Trainer was built (imports, equal for all, cancel); `rss_after_build_mb` is the RSS once model,
tokenizer and optimizer exist, before the first step. `state_mb` is the run's memory plan's share
for weights, gradients and optimizer state (memplan.py), which activations come on top of.

Model FLOPs utilisation (GPU, bfloat16/float16): the FLOPs the step must do (see `step_flops`)
per second over the device's dense peak (a table of known GPUs, or `--peak-tflops`).

    python bench/bench_train.py                        # gpt2, full vs LoRA r=16 x adamw/sgd/momentum, CPU fp32
    python bench/bench_train.py --memory-table         # gpt2-medium LoRA r=1: memory by optimizer
    python bench/bench_train.py --device cuda --dtype bfloat16 --compile both   # on a GPU, with MFU

JSON goes to stdout, a Markdown table to stderr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from configs import GPTConfig, preset  # noqa: E402
from data import SFTDataset  # noqa: E402
from errors import run_cli  # noqa: E402
from lora import TARGET_WIDTHS  # noqa: E402
from model import HUB_MODELS  # noqa: E402

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "assets" / "gpt2_bpe"
# Dense bfloat16/float16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of the device name.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10G": 125.0}


def step_flops(cfg: GPTConfig, batch: int, seq: int, head_rows: int, lora_rank: int | None) -> float:
    """FLOPs of one training step (forward + backward) on `batch` rows of `seq` tokens.

    A matmul of [m, k] x [k, n] costs 2mkn. Forward: the block linears (12 d^2 weights per layer)
    on every position, attention's two T x T products (4 T^2 d per row and layer, the causal mask
    not discounted, as usual), the vocabulary head on `head_rows` positions. Backward: gradients
    with respect to activations (the forward's cost again; attention's twice), plus weight
    gradients (the linear forward's cost again) only for trainable weights: every linear and the
    head in full fine-tuning, only the adapters with LoRA (whose own matmuls, 2r(in + out) per
    position and adapted linear, are counted three times) - and with LoRA, whose embeddings are
    frozen, nothing needs the gradient wrt block 0's input. Embedding lookups and elementwise
    work are not counted. tests/test_bench.py checks this against torch's FLOP counter."""
    d, n_layer, positions = cfg.n_embd, cfg.n_layer, batch * seq
    linear = 2 * 12 * d * d * n_layer * positions
    head = 2 * d * cfg.vocab_size * head_rows
    attention = 4 * seq * seq * d * n_layer * batch
    if lora_rank is None:
        return 3 * (linear + head) + 3 * attention
    adapters = sum(2 * lora_rank * (i + o) * d for i, o in TARGET_WIDTHS.values()) * n_layer * positions
    block0_input_grad = 2 * (3 * d + lora_rank) * d * positions  # c_attn's frozen weight and lora_A
    return 2 * (linear + head) + 3 * attention + 3 * adapters - block0_input_grad


def peak_tflops(device_name: str, dtype: str, given: float | None) -> float | None:
    if given:
        return given
    if dtype == "float32":
        return None  # fp32 peaks depend on TF32 settings: pass --peak-tflops
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def random_dataset(batch: int, seq: int, prompt_frac: float, vocab_size: int, seed: int = 0) -> SFTDataset:
    """`batch` examples of seq + 1 random tokens (x and y are seq long), the first part masked."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=batch * (seq + 1)).astype(np.int32)
    offsets = np.arange(batch + 1) * (seq + 1)
    n_masked = np.full(batch, int(prompt_frac * seq) + 1)  # + 1: the first label is ids[1]
    return SFTDataset(ids, offsets, n_masked, np.arange(batch), stats={})


def bench_trainer(args, method: str, optimizer: str, compiled: bool, run_dir: Path, shape: GPTConfig | None = None):
    """train_sft's Trainer for one configuration, on random weights of args.model's shape (or
    `shape`) and args.batch rows of args.seq random tokens (bench/gpu_check.py builds its steps here too)."""
    from train_sft import Datasets, standalone_trainer

    model_cfg, train = preset(args.model)
    model_cfg = shape or model_cfg
    train = replace(train, init_from=None, lora=method == "lora", rank=args.rank, alpha=2.0 * args.rank,
                    optimizer=optimizer, lr=1e-4, batch_size=args.batch, dtype=args.dtype, grad_accum=1,
                    compile=compiled, device=args.device, tokenizer=args.tokenizer,
                    max_steps=args.warmup + args.steps)
    model_cfg = replace(model_cfg, block_size=max(model_cfg.block_size, args.seq))
    dataset = random_dataset(args.batch, args.seq, args.prompt_frac, model_cfg.vocab_size)
    return standalone_trainer(model_cfg, train, args.device, run_dir, Datasets(dataset, dataset, []))


def run_child(args) -> dict:
    """One configuration in this (fresh) process: warm-up, timed steps, peak memory."""
    import devices
    import optim
    from devices import process_memory_mb

    method, optimizer, compiled = args.child.split(",")
    baseline = process_memory_mb()["rss_mb"]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = bench_trainer(args, method, optimizer, compiled == "on", Path(run_dir))
        after_build = process_memory_mb()["rss_mb"]
        device = trainer.s.device
        batches = trainer.micro_batches()
        times, loss = [], None
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            loss, _, targets, *_ = trainer.train_step([next(batches)])
            devices.synchronize(device)  # CUDA: wait for the step's kernels
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        report = optim.param_report(trainer.s.raw_model, optimizer)
        plan = trainer.s.memory_plan
    state = {k: getattr(plan, k) for k in ("weights", "gradients", "optimizer_state")}
    state["total"] = sum(state.values())
    result = {"step_s": [round(t, 4) for t in times], "last_loss": round(loss, 4), "targets_per_step": targets,
              "trainable_params": report["trainable"],
              "state_mb": {k: round(v / 2**20, 2) for k, v in state.items()}}  # MB = 2**20 bytes
    result["device_name"] = devices.device_name(device)
    if devices.needs_synchronize(device):  # a GPU: its allocator's peaks over the child's life
        result.update({k: round(v, 1) for k, v in devices.memory_now(device).items()})
    else:
        peak = process_memory_mb()["peak_rss_mb"]
        result["peak_rss_mb"] = round(peak, 1)
        result["rss_after_build_mb"] = round(after_build, 1)
        result["peak_above_baseline_mb"] = round(peak - baseline, 1)
    return result


def spawn(args, config: str) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--rank", str(args.rank), "--prompt-frac", str(args.prompt_frac),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--tokenizer", args.tokenizer]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: configuration {config} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(args, config: str, runs: list[dict]) -> dict:
    method, optimizer, compiled = config.split(",")
    times = [t for run in runs for t in run["step_s"]]
    first = runs[0]
    tokens = args.batch * args.seq
    out = {"method": method if method == "full" else f"lora-r{args.rank}", "optimizer": optimizer,
           "compile": compiled == "on", "tokens_per_s": round(tokens / statistics.median(times), 1),
           "step_s_median": round(statistics.median(times), 4), "step_s_min": round(min(times), 4),
           "trainable_params": first["trainable_params"], "state_mb": first["state_mb"],
           "last_loss": first["last_loss"]}
    for key in ("peak_alloc_mb", "peak_reserved_mb", "peak_rss_mb", "rss_after_build_mb", "peak_above_baseline_mb"):
        if key in first:
            out[key] = max(run[key] for run in runs)
    model_cfg = preset(args.model)[0]
    flops = step_flops(model_cfg, args.batch, args.seq, first["targets_per_step"],
                       None if method == "full" else args.rank)
    out["model_tflop_per_step"] = round(flops / 1e12, 4)
    out["achieved_tflops"] = round(flops / statistics.median(times) / 1e12, 3)
    peak = peak_tflops(first.get("device_name", ""), args.dtype, args.peak_tflops)
    out["mfu"] = round(out["achieved_tflops"] / peak, 4) if peak else None
    return out


def markdown(results: list[dict], cuda: bool) -> str:
    mem_key, mem_name = (("peak_alloc_mb", "peak allocated MB") if cuda
                         else ("peak_above_baseline_mb", "peak RSS above baseline MB"))
    lines = [f"| method | optimizer | compile | tokens/s | {mem_name} | weights+grads+state MB | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {r['method']} | {r['optimizer']} | {'on' if r['compile'] else 'off'} | {r['tokens_per_s']} | "
                     f"{r[mem_key]} | {r['state_mb']['total']} | {mfu} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", choices=list(HUB_MODELS) + ["tiny"])
    p.add_argument("--methods", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--optimizers", nargs="+", default=["adamw", "sgd", "momentum"],
                   choices=["adamw", "sgd", "momentum", "nesterov"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt-frac", type=float, default=0.5, help="share of each row masked as the prompt")
    p.add_argument("--steps", type=int, default=3, help="timed steps per child")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (use 3+ with --compile)")
    p.add_argument("--rounds", type=int, default=1, help="cycles over all configurations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", default="off", choices=["off", "on", "both"])
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="GPT-2 BPE folder (vocab.json + merges.txt)")
    p.add_argument("--memory-table", action="store_true",
                   help="the optimizer memory table: gpt2-medium, LoRA r=1, sgd/momentum/adamw "
                        "(other flags still apply)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_table:
        args.model, args.methods, args.rank, args.optimizers = "gpt2-medium", ["lora"], 1, ["sgd", "momentum", "adamw"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    compiles = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.compile]
    configs = [f"{m},{o},{c}" for m in args.methods for o in args.optimizers for c in compiles]
    runs: dict[str, list] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            runs[config].append(spawn(args, config))
            print(f"{config}: {runs[config][-1]['step_s']} s/step", file=sys.stderr, flush=True)
    results = [summarise(args, c, runs[c]) for c in configs]
    cuda = "peak_alloc_mb" in results[0]  # measured on a GPU (--device auto may have picked one)
    report = {"model": args.model, "device": args.device,
              "device_name": runs[configs[0]][0]["device_name"], "dtype": args.dtype,
              "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
              "batch": args.batch, "seq": args.seq, "prompt_frac": args.prompt_frac, "steps": args.steps,
              "warmup": args.warmup, "rounds": args.rounds, "results": results}
    print(markdown(results, cuda), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_cli(main)
