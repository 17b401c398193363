"""End-to-end LoRA fine-tuning throughput on real Alpaca records: useful (target) tokens per second
of train_sft.py's loop vs a plain loop over transformers' GPT2LMHeadModel + peft.

Both sides train the same random-weight GPT-2 (saved by transformers, then read by
`--init-from` as train_sft.py does) with LoRA r=16 on all four linears of every block, AdamW,
batches of 8, for one pass over the same records, tokenised once with the same template:

  ours       `train_sft.Trainer` with the `<model>/lora` preset: length-grouped batches, the
             vocabulary head only on target positions, its own collate and train_step.
  reference  GPT2LMHeadModel + peft, random batches padded to their longest row (attention
             mask, labels -100 on prompt and padding), `model(..., labels=...).loss` - the plain
             loop such a user writes.

A useful token is a target token (response + EOS; not prompt, not padding): both sides train
on exactly the same ones, so the ratio of useful tokens/s is the ratio of the times the two loops
take for the same work. The two loops alternate step by step in one process (both have the same
number of steps), so machine load hits both alike; each step's time includes making its batch.
`--records N` takes a seeded random sample (a full pass over all 4,998 records of gpt2 takes
about 2 CPU-hours; 256 records are enough for a ratio on CPU).

    python bench/bench_alpaca.py --records 256                 # CPU, about 20 minutes on 2 cores
    python bench/bench_alpaca.py --device cuda                 # every record, on a GPU

Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import devices  # noqa: E402
from configs import preset  # noqa: E402
from data import IGNORE_INDEX, SFTDataset, parse_records  # noqa: E402
from errors import run_cli  # noqa: E402
from model import HUB_MODELS, config_to_hf  # noqa: E402
from templates import TEMPLATES  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ASSETS = ROOT.parent / "shared" / "assets"
DEFAULT_DATA = ASSETS / "alpaca" / "alpaca_5000_subset.json"
DEFAULT_TOKENIZER = ASSETS / "gpt2_bpe"


def save_random_gpt2(name: str, folder: Path, seed: int) -> None:
    """A random-weight GPT2LMHeadModel of the preset's shape, saved in Hugging Face format."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**config_to_hf(preset(name)[0]))).save_pretrained(folder)


class Ours:
    """train_sft.py's Trainer, one optimizer step per call."""

    def __init__(self, args, dataset: SFTDataset, model_dir: Path, run_dir: Path):
        from train_sft import Datasets, standalone_trainer

        model_cfg, train = preset(f"{args.model}/lora")
        train = replace(train, init_from=str(model_dir), tokenizer=args.tokenizer, batch_size=args.batch_size,
                        lr=args.lr, device=args.device, dtype=args.dtype, seed=args.seed, grad_accum=1)
        self.trainer = standalone_trainer(model_cfg, train, str(args.device), run_dir, Datasets(dataset, dataset, []))
        self.batches = self.trainer.micro_batches()
        self.steps = self.trainer.s.steps_per_epoch

    def step(self) -> tuple[float, int, int]:
        """(loss, target tokens, computed positions) of one optimizer step."""
        batch = next(self.batches)
        loss, _, targets, *_ = self.trainer.train_step([batch])
        return loss, targets, batch.x.numel()


class Reference:
    """GPT2LMHeadModel + peft in the plain loop: random batches, dynamic padding, HF's loss."""

    def __init__(self, args, dataset: SFTDataset, model_dir: Path, pad_id: int):
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2LMHeadModel

        train = preset(f"{args.model}/lora")[1]
        model = GPT2LMHeadModel.from_pretrained(model_dir, local_files_only=True).to(args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = get_peft_model(model, LoraConfig(
                r=train.rank, lora_alpha=train.alpha, lora_dropout=train.lora_dropout,
                target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))  # c_proj: attn and mlp
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(train.beta1, train.beta2),
                                           weight_decay=train.weight_decay)
        self.dataset, self.pad_id, self.device, self.dtype = dataset, pad_id, args.device, args.dtype
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
        self.batches = iter([order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)])

    def collate(self, indices: list[int]):
        """Each row is the whole example (prompt, response, EOS); labels mask prompt and padding."""
        ds = self.dataset
        rows = [(ds.ids[ds.offsets[i]:ds.offsets[i + 1]].astype(np.int64), ds[i][1]) for i in indices]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, y) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.from_numpy(ids)
            labels[r, 1:len(ids)] = torch.from_numpy(y)  # HF shifts: labels[j] is predicted at position j - 1
            mask[r, :len(ids)] = 1
        return input_ids, mask, labels

    def step(self) -> tuple[float, int, int]:
        input_ids, mask, labels = (t.to(self.device) for t in self.collate(next(self.batches)))
        autocast = torch.autocast(self.device.type, dtype=getattr(torch, self.dtype),
                                  enabled=self.dtype != "float32")
        with autocast:
            loss = self.model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), int((labels[:, 1:] != IGNORE_INDEX).sum()), input_ids.numel()


def load_examples(args, tokenizer) -> SFTDataset:
    records = parse_records(Path(args.data).read_bytes(), args.data, allow_empty_output=True)
    records = [r for r in records if r["output"].strip()]  # as prepare_sft_dataset.py --drop-empty
    if args.records and args.records < len(records):
        keep = np.random.default_rng(args.seed).choice(len(records), args.records, replace=False)
        records = [records[i] for i in sorted(keep)]
    # The reference feeds whole examples (x plus the last token): they must fit its context too.
    max_len = preset(args.model)[0].block_size - 1
    return SFTDataset.from_records(records, tokenizer, args.template, max_len=max_len)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Alpaca-style JSON/JSONL")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="GPT-2 BPE folder (vocab.json + merges.txt)")
    p.add_argument("--template", default="alpaca", choices=TEMPLATES)
    p.add_argument("--model", default="gpt2", choices=list(HUB_MODELS) + ["tiny"])
    p.add_argument("--records", type=int, default=0, help="random sample of this many records (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = devices.pick_device(args.device)  # one decision, for both contenders
    tokenizer = load_tokenizer(args.tokenizer)
    dataset = load_examples(args, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, run_dir = Path(tmp) / "model", Path(tmp) / "run"
        run_dir.mkdir()
        save_random_gpt2(args.model, model_dir, args.seed)
        contenders = {"ours": Ours(args, dataset, model_dir, run_dir),
                      "reference": Reference(args, dataset, model_dir, tokenizer.eot_id)}
        n_steps = contenders["ours"].steps
        totals = {name: {"time_s": 0.0, "targets": 0, "positions": 0, "loss_sum": 0.0} for name in contenders}
        for i in range(n_steps):
            for name in (list(contenders) if i % 2 == 0 else list(contenders)[::-1]):
                start = time.perf_counter()
                loss, targets, positions = contenders[name].step()
                devices.synchronize(args.device)
                t = totals[name]
                t["time_s"] += time.perf_counter() - start
                t["targets"] += targets
                t["positions"] += positions
                t["loss_sum"] += loss
            print(f"step {i + 1}/{n_steps}: " + ", ".join(f"{n} {t['time_s']:.0f} s" for n, t in totals.items()),
                  file=sys.stderr, flush=True)
    if totals["ours"]["targets"] != totals["reference"]["targets"]:
        sys.exit(f"error: the loops trained on different targets: {totals}")
    real_tokens = int(dataset.lengths.sum())
    results = {name: {"useful_tokens_per_s": round(t["targets"] / t["time_s"], 1),
                      "time_s": round(t["time_s"], 3), "target_tokens": t["targets"],
                      "computed_positions": t["positions"],
                      "pad_fraction": round(1 - real_tokens / t["positions"], 4) if name == "ours" else
                      round(1 - (real_tokens + len(dataset)) / t["positions"], 4),
                      "mean_train_loss": round(t["loss_sum"] / n_steps, 4)} for name, t in totals.items()}
    print(json.dumps({
        "model": args.model, "device": str(args.device), "dtype": args.dtype, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "data": args.data, "records": len(dataset), "steps": n_steps,
        "batch_size": args.batch_size, "lora_rank": preset(f"{args.model}/lora")[1].rank,
        "results": results,
        "ratio_useful_tokens_per_s": round(results["ours"]["useful_tokens_per_s"]
                                           / results["reference"]["useful_tokens_per_s"], 3),
    }, indent=2))


if __name__ == "__main__":
    run_cli(main)
