"""Ablation of LoRA variants on the built-in synthetic tasks: baseline LoRA vs NEFTune vs LoRA+ vs
DoRA vs rsLoRA, held-out exact match, several seeds each (run by hand; JSON on stdout and --out).

1. A base: the `tiny` preset trained from scratch, fully, for --base-steps steps (fewer than the
   preset's 1500, so that it is decent but not saturated and LoRA has something to add).
2. For every variant and seed: LoRA on that base (--rank, --alpha, --lr, tiny's schedule over
   --lora-steps steps), then the same evaluation train_sft runs: greedy answers to the first 200
   held-out task instances (exact match) and the mean test loss per answer token.

The data are those of the base (the synthetic split of tiny's seed) for every run; a seed changes
A's init, the batch order and the noise. Everything goes through train_sft's Trainer (train_step,
evaluate), so the runs are those `train_sft.py --init-from BASE --lora ...` would make.

    python bench/ablation.py --tokenizer ../shared/assets/gpt2_bpe --out bench/results/ablation.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optim  # noqa: E402
import train_sft  # noqa: E402
from configs import preset  # noqa: E402
from files import write_json_atomic  # noqa: E402

# variant -> (GPTConfig overrides, TrainConfig overrides), on top of plain LoRA. The values are the
# papers' and PEFT's usual ones: NEFTune alpha 5 (its paper's default for 7B models), LoRA+ ratio 16
# (PEFT's docs), DoRA and rsLoRA have no knob.
VARIANTS = {
    "lora": ({}, {}),
    "neftune": ({"neftune_alpha": 5.0}, {}),
    "lora+": ({}, {"lora_plus_ratio": 16.0}),
    "dora": ({}, {"dora": True}),
    "rslora": ({}, {"rslora": True}),
}


# ---------------------------------------------------------------------------- runs

def train(trainer: train_sft.Trainer) -> dict:
    """The Trainer's loop without its folder: lr schedule, steps, then one evaluation."""
    cfg, total = trainer.cfg, trainer.s.total_steps
    batches = trainer.micro_batches()
    started, cpu = time.perf_counter(), time.process_time()
    for step in range(total):
        optim.set_lr(trainer.s.optimizer, optim.lr_at(step, cfg, total))
        trainer.train_step([next(batches) for _ in range(cfg.grad_accum)])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    result = trainer.evaluate()
    return {"exact_match": result["exact_match"], "val_loss": result["val_loss"], "train_s": round(seconds, 1),
            "train_cpu_s": round(cpu, 1)}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="folder with GPT-2's BPE files")
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--lora-steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=2e-3, help="LoRA lr (tiny's; LoRA+ multiplies B's)")
    parser.add_argument("--lora-batch", type=int, default=16)
    parser.add_argument("--lora-warmup", type=float, default=0.1, help="as --warmup: < 1 a fraction of the steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="1 is faster than 2 on a loaded 2-core machine")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_cfg, tiny = preset("tiny")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        base_cfg = dataclasses.replace(tiny, tokenizer=args.tokenizer, max_steps=args.base_steps)
        base_trainer = train_sft.standalone_trainer(model_cfg, base_cfg, "cpu", scratch)
        base = train(base_trainer)
        print(json.dumps({"base": base}), file=sys.stderr, flush=True)
        base_trainer.s.raw_model.save_pretrained(scratch / "base")
        data = base_trainer.s.data
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for variant, seed in tqdm([(v, s) for s in args.seeds for v in args.variants], desc="ablation"):
            model_over, train_over = VARIANTS[variant]
            cfg = dataclasses.replace(tiny, tokenizer=args.tokenizer, init_from=str(scratch / "base"), lora=True,
                                      rank=args.rank, alpha=args.alpha, lr=args.lr, max_steps=args.lora_steps,
                                      batch_size=args.lora_batch, warmup=args.lora_warmup, seed=seed, **train_over)
            trainer = train_sft.standalone_trainer(dataclasses.replace(model_cfg, **model_over), cfg, "cpu",
                                                   scratch, data)
            result = {"seed": seed, **train(trainer),
                      "trainable": optim.param_report(trainer.s.raw_model, cfg.optimizer)["trainable"]}
            runs[variant].append(result)
            tqdm.write(json.dumps({variant: result}))
            if args.out:  # what is done so far survives an interrupted ablation
                write_json_atomic(args.out, _report(args, tiny, base, runs))
    report = _report(args, tiny, base, runs)
    if args.out:
        write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))


def _report(args, tiny, base: dict, runs: dict[str, list[dict]]) -> dict:
    return {
        "conditions": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       "base_preset": "tiny", "base_lr": tiny.lr, "base_warmup": tiny.warmup,
                       "base_batch": tiny.batch_size,
                       "schedule": tiny.schedule, "min_lr": tiny.min_lr, "weight_decay": tiny.weight_decay,
                       "exact_match_prompts": train_sft.EXACT_MATCH_LIMIT, "torch": torch.__version__},
        "base": base,
        "variants": {v: {"exact_match": summary([r["exact_match"] for r in rs]),
                         "val_loss": summary([r["val_loss"] for r in rs]), "runs": rs} for v, rs in runs.items() if rs},
    }


if __name__ == "__main__":
    main()
