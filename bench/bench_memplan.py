"""memplan.py's predictions against what training really takes, on CPU in float32.

Two checks:

1. Peak memory (default). Each case runs alone in a fresh child process: random GPT-2 weights of
   the preset's shape (model.GPT), LoRA (lora.apply_lora) or full fine-tuning, the optimizer of
   optim.build_optimizer, and `--steps` training steps as train_sft.Trainer takes them (forward
   with reduction="sum" and the head on the target rows, ce_chunk rows at a time as the training
   config's default says, backward, gradient clipping, optimizer step, gradients set to None), on B rows of T random
   tokens whose first half is masked as the prompt (bench_train.random_dataset). Measured: the
   kernel's high-water mark of the child's RSS (VmHWM) above the RSS once model and optimizer are
   built, against memplan's peak less the weights (which that baseline already holds); and the
   peak above the RSS before the model is built, against memplan's whole peak. `--allocator mmap`
   runs the children with MALLOC_MMAP_THRESHOLD_=65536, so that glibc serves every block of 64 KiB
   or more by mmap and returns it when freed: the RSS then follows the live tensors, and is
   compared with memplan's live bytes (its peak without the allocator slack).
2. `--audit`: the bytes of the tensors autograd saves in one forward (torch's saved-tensor hooks,
   each storage once, parameters excluded), against memplan.saved_activation_bytes, on a small
   model in variants that exercise every branch of the count (LoRA targets and layers, dropout,
   bfloat16 autocast, the head on all positions). Activation checkpointing hides its saved tensors
   from these hooks, so the peak-memory cases cover it instead.

    python bench/bench_memplan.py                  # the peak-memory cases (about 6 minutes on 2 cores)
    python bench/bench_memplan.py --cases gpt2-4x256-lora gpt2-4x256-full
    python bench/bench_memplan.py --audit          # seconds

JSON goes to stdout, a Markdown table to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import memplan  # noqa: E402
from bench_train import random_dataset  # noqa: E402
from configs import GPTConfig, preset  # noqa: E402
from errors import run_cli  # noqa: E402

MIB = 2**20


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    seq: int
    method: str  # "full" or "lora"
    optimizer: str = "adamw"
    checkpointing: bool = False

    @property
    def name(self) -> str:
        extra = ("-" + self.optimizer if self.optimizer != "adamw" else "") + ("-ckpt" if self.checkpointing else "")
        return f"{self.model}-{self.batch}x{self.seq}-{self.method}{extra}"


RANK = 16
CASES = [Case(m, b, t, method) for m, shapes in (("gpt2", ((4, 256), (8, 512))), ("gpt2-medium", ((4, 256), (4, 512))))
         for b, t in shapes for method in ("lora", "full")]
EXTRA_CASES = [Case("gpt2", 8, 512, "full", checkpointing=True), Case("gpt2", 8, 512, "lora", checkpointing=True),
               Case("gpt2", 4, 256, "full", optimizer="sgd")]


def plan_inputs(case: Case) -> memplan.PlanInputs:
    model_cfg, train = preset(case.model)
    model_cfg = replace(model_cfg, grad_checkpointing=case.checkpointing)
    train = replace(train, lora=case.method == "lora", rank=RANK, optimizer=case.optimizer, batch_size=case.batch,
                    dtype="float32")
    return memplan.PlanInputs.from_configs(model_cfg, train, seq_len=case.seq)


# ---------------------------------------------------------------------------- peak memory (child)

def train_step(model, optimizer, trainable, x, y, ce_chunk: int) -> None:
    """One step as train_sft.Trainer.train_step takes it (the head on the target rows)."""
    n_targets = int((y != -100).sum())
    _, loss = model(x, y, reduction="sum", targets_only=True, n_targets=n_targets, ce_chunk=ce_chunk)
    (loss / n_targets).backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_child(case: Case, steps: int) -> dict:
    import lora
    import optim
    from data import collate
    from devices import process_memory_mb
    from model import GPT

    model_cfg, _ = preset(case.model)
    model_cfg = replace(model_cfg, grad_checkpointing=case.checkpointing)
    examples = random_dataset(case.batch, case.seq, 0.5, model_cfg.vocab_size)
    x, y = collate([examples[i] for i in range(case.batch)], pad_id=0)
    before_build = process_memory_mb()["rss_mb"]
    torch.manual_seed(0)
    model = GPT(model_cfg)
    if case.method == "lora":
        lora.apply_lora(model, RANK, 2.0 * RANK)
    model.train()
    optimizer = optim.build_optimizer(model, optim.OptimConfig(optimizer=case.optimizer, lr=1e-4), "cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    after_build = process_memory_mb()["rss_mb"]
    for _ in range(steps):
        train_step(model, optimizer, trainable, x, y, plan_inputs(case).ce_chunk)
    peak = process_memory_mb()["peak_rss_mb"]
    return {"rss_before_build_mb": round(before_build, 1), "rss_after_build_mb": round(after_build, 1),
            "peak_rss_mb": round(peak, 1), "targets": int((y != -100).sum()),
            "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in trainable)}


def spawn(case: Case, steps: int, allocator: str) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(case.__dict__), "--steps", str(steps)]
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if allocator == "mmap" else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"error: case {case.name} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(case: Case, measured: dict, allocator: str) -> dict:
    """Prediction against measurement; with the mmap allocator, memplan's live bytes (no slack)."""
    mp = memplan.plan(plan_inputs(case))
    total = mp.total if allocator == "glibc" else mp.live
    if (measured["params"], measured["trainable"]) != (mp.params, mp.trainable_params):
        sys.exit(f"error: {case.name}: memplan counts {mp.params}/{mp.trainable_params} parameters, the model "
                 f"{measured['params']}/{measured['trainable']}")
    above_build = measured["peak_rss_mb"] - measured["rss_after_build_mb"]
    above_start = measured["peak_rss_mb"] - measured["rss_before_build_mb"]
    predicted_above_build = (total - mp.weights) / MIB
    return {"case": case.name, **case.__dict__, "targets": measured["targets"], "peak_moment": mp.peak_moment,
            "predicted_total_mb": round(total / MIB, 1), "predicted_weights_mb": round(mp.weights / MIB, 1),
            "predicted_above_build_mb": round(predicted_above_build, 1),
            "measured_above_build_mb": round(above_build, 1),
            "error_above_build_pct": round(100 * (predicted_above_build / above_build - 1), 1),
            "measured_above_start_mb": round(above_start, 1),
            "error_total_pct": round(100 * (total / MIB / above_start - 1), 1), "measured": measured}


# ---------------------------------------------------------------------------- saved-tensor audit

AUDIT_MODEL = GPTConfig(block_size=64, vocab_size=1000, n_layer=3, n_head=4, n_embd=64)
AUDIT_VARIANTS = {  # name -> (GPTConfig overrides, PlanInputs overrides)
    "full": ({}, {}),
    "full-dropout": (dict(dropout=0.1), {}),
    "full-all-positions": ({}, dict(head_on_targets_only=False)),
    "full-bf16-autocast": ({}, dict(compute_dtype=torch.bfloat16)),
    "lora": ({}, dict(lora=True)),
    "lora-mlp.c_fc-only": ({}, dict(lora=True, lora_targets=("mlp.c_fc",))),
    "lora-attn.c_proj-layers-1,2": ({}, dict(lora=True, lora_targets=("attn.c_proj",), lora_layers=(1, 2))),
    "lora-dropout": (dict(dropout=0.1), dict(lora=True)),
    "lora-bf16-autocast": ({}, dict(lora=True, compute_dtype=torch.bfloat16)),
    "full-dropout-bf16-autocast": (dict(dropout=0.1), dict(compute_dtype=torch.bfloat16)),
    "lora-dropout-bf16-autocast": (dict(dropout=0.1), dict(lora=True, compute_dtype=torch.bfloat16)),
    "dora": ({}, dict(lora=True, dora=True)),
    "dora-attn.c_proj-layers-1,2": ({}, dict(lora=True, dora=True, lora_targets=("attn.c_proj",), lora_layers=(1, 2))),
    "dora-dropout": (dict(dropout=0.1), dict(lora=True, dora=True)),
    "dora-bf16-autocast": ({}, dict(lora=True, dora=True, compute_dtype=torch.bfloat16)),
    "dora-dropout-bf16-autocast": (dict(dropout=0.1), dict(lora=True, dora=True, compute_dtype=torch.bfloat16)),
}


def saved_bytes(model, x, y, targets_only: bool, autocast_dtype) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    amp = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype != torch.float32 else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(x, y, reduction="sum", targets_only=targets_only)
    return sum(seen.values())


def audit() -> list[dict]:
    import lora
    from data import collate
    from model import GPT

    rows = []
    batch, seq, rank = 2, 32, 4
    for name, (model_over, plan_over) in AUDIT_VARIANTS.items():
        cfg = replace(AUDIT_MODEL, **model_over)
        p = memplan.PlanInputs(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                               block_size=cfg.block_size, dropout=cfg.dropout, batch_size=batch, seq_len=seq,
                               rank=rank, **plan_over)
        torch.manual_seed(0)
        model = GPT(cfg).train()
        if p.lora:
            lora.apply_lora(model, rank, 2.0 * rank, targets=p.lora_targets, layers=p.lora_layers, dora=p.dora)
        examples = random_dataset(batch, seq, 0.5, cfg.vocab_size)
        x, y = collate([examples[i] for i in range(batch)], pad_id=0)
        measured = saved_bytes(model, x, y, p.head_on_targets_only, p.compute_dtype)
        predicted = memplan.saved_activation_bytes(p)
        rows.append({"variant": name, "predicted_bytes": predicted, "saved_bytes": measured,
                     "error_pct": round(100 * (predicted / measured - 1), 2)})
    return rows


# ---------------------------------------------------------------------------- main

def markdown(results: list[dict]) -> str:
    lines = ["| case | predicted peak | of which weights | predicted above build | measured above build | error "
             "| measured above start | error (total) | peak at |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['predicted_total_mb']:.0f} MB | {r['predicted_weights_mb']:.0f} MB | "
                     f"{r['predicted_above_build_mb']:.0f} MB | {r['measured_above_build_mb']:.0f} MB | "
                     f"{r['error_above_build_pct']:+.1f}% | {r['measured_above_start_mb']:.0f} MB | "
                     f"{r['error_total_pct']:+.1f}% | {r['peak_moment']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [c.name for c in CASES + EXTRA_CASES]
    p.add_argument("--cases", nargs="+", choices=names, default=[c.name for c in CASES],
                   help="peak-memory cases (default: the eight main ones)")
    p.add_argument("--steps", type=int, default=2, help="training steps per case (2: the optimizer state exists)")
    p.add_argument("--allocator", choices=["glibc", "mmap"], default="glibc",
                   help="mmap: every block of 64 KiB or more mmapped, so RSS follows the live tensors")
    p.add_argument("--audit", action="store_true", help="count saved tensors instead of measuring peaks")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(Case(**json.loads(args.child)), args.steps)))
        return
    env = {"torch": torch.__version__, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads()}
    if args.audit:
        rows = audit()
        print("\n".join(f"{r['variant']}: predicted {r['predicted_bytes']}, saved {r['saved_bytes']} "
                        f"({r['error_pct']:+.2f}%)" for r in rows), file=sys.stderr)
        print(json.dumps({**env, "audit": rows}, indent=2))
        return
    by_name = {c.name: c for c in CASES + EXTRA_CASES}
    results = []
    for name in args.cases:
        results.append(compare(by_name[name], spawn(by_name[name], args.steps, args.allocator), args.allocator))
        print(f"{name}: predicted {results[-1]['predicted_above_build_mb']} MB above build, measured "
              f"{results[-1]['measured_above_build_mb']} MB", file=sys.stderr, flush=True)
    print(markdown(results), file=sys.stderr)
    print(json.dumps({**env, "allocator": args.allocator, "steps": args.steps, "lora_rank": RANK,
                      "results": results}, indent=2))


if __name__ == "__main__":
    run_cli(main)
