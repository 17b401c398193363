"""Supervised fine-tuning of GPT-2, full or with LoRA, in a plain training loop.

    python train_sft.py --config gpt2-medium/lora --rank 16
    torchrun --nproc_per_node=2 train_sft.py --config gpt2/lora

Everything a run produces lands in runs/<run-name>/ (see README). One optimizer step sums the
token losses of its micro-batches (and of all DDP ranks) and divides by the number of target
tokens in the whole step, so every target token weighs the same however the step is split.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import resource
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import lora
import optim
from checkpoints import latest_checkpoint, load_state, read_hyperparams, save_checkpoint
from configs import GPTConfig, TrainConfig, config_from_dict, config_to_dict, parse_args
from data import LengthGroupedBatchSampler, SFTDataset, collate, count_target_tokens, load_sft_split, sorted_batches
from errors import UserError, run_cli
from files import write_json_atomic
from model import GPT, read_hf_state_dict
from plotting import RunFolderError, plot_run
from synthetic import SYNTHETIC_SIZES, exact_match, make_synthetic_split
from templates import build_prompt
from tokenizer import Tokenizer, load_tokenizer, tokenizer_folder

EXACT_MATCH_LIMIT = 200  # held-out synthetic prompts answered greedily at each evaluation


# ----------------------------------------------------------------------------- setup

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE; NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str, ddp: Dist) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return f"cuda:{ddp.local_rank}" if ddp.world > 1 else "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return name


def build_model(model_cfg: GPTConfig, train: TrainConfig) -> GPT:
    """Pretrained weights (whose config.json fixes the architecture) or a fresh init, then LoRA
    or the freezing rules of full fine-tuning."""
    if train.init_from:
        model = GPT.from_pretrained(train.init_from, dropout=model_cfg.dropout,
                                    grad_checkpointing=model_cfg.grad_checkpointing)
    else:
        torch.manual_seed(train.seed)
        model = GPT(model_cfg)
    if train.lora:
        lora.apply_lora(model, train.rank, train.alpha, dropout=train.lora_dropout, targets=train.lora_targets,
                        layers=train.lora_layers, rslora=train.rslora)
    elif train.freeze_layers:
        optim.freeze_first_blocks(model, train.freeze_layers)
    return model


def load_datasets(train: TrainConfig, tokenizer: Tokenizer, max_len: int) -> tuple[SFTDataset, SFTDataset, list]:
    """(train set, test set, test records) for the run's dataset."""
    options = dict(tokenizer=tokenizer, template=train.template, max_len=max_len,
                   train_on_prompt=train.train_on_prompt, overlong=train.overlong)
    if train.dataset == "synthetic":
        train_records, test_records = make_synthetic_split(*SYNTHETIC_SIZES, seed=train.seed)
        return (SFTDataset.from_records(train_records, **options),
                SFTDataset.from_records(test_records, **options), test_records)
    train_set = load_sft_split(train.data_dir, "train", **options)
    test_set = load_sft_split(train.data_dir, "test", **options)
    return train_set, test_set, test_set.records


# ----------------------------------------------------------------------------- run folder

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def run_folder(train: TrainConfig, preset_name: str) -> Path:
    """A new run folder: the given name (refused if unsafe or taken) or a readable unique one."""
    root = Path(train.out_dir)
    if train.run_name is not None:
        if not _SAFE_NAME.match(train.run_name) or ".." in train.run_name:
            raise UserError(f"--run-name {train.run_name!r}: use letters, digits, '.', '_', '-' (no path separators or '..')")
        if (root / train.run_name).exists():
            raise UserError(f"{root / train.run_name} already exists; pass --resume {root / train.run_name} or another --run-name")
        return root / train.run_name
    method = f"lora-r{train.rank}" if train.lora else "full"
    base = f"{preset_name.split('/')[0]}-{method}-{train.optimizer}-lr{train.lr:g}-{datetime.now():%Y%m%d-%H%M%S}"
    name, n = base, 1
    while (root / name).exists():
        n += 1
        name = f"{base}-{n}"
    return root / name


def process_memory_mb() -> dict:
    """This process's resident memory now and its high-water mark, in MB (2**20 bytes). On Linux
    both come from /proc/self/status: VmHWM is this process's own peak, whereas getrusage's
    ru_maxrss carries a larger parent's peak across fork + exec (torchrun, pytest). Elsewhere
    (macOS) only the peak is known, from ru_maxrss, which macOS counts in bytes."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss_mb": peak / 2**20 if sys.platform == "darwin" else peak / 1024}
    kb = {name: int(value.split()[0]) for name, value in
          (line.split(":", 1) for line in status.splitlines()) if name in ("VmRSS", "VmHWM")}
    return {"rss_mb": kb["VmRSS"] / 1024, "peak_rss_mb": kb["VmHWM"] / 1024}


def memory_now(device: str) -> dict:
    """Peak CUDA memory since the last call, or the process RSS on CPU (current and peak)."""
    if device.startswith("cuda"):
        stats = {"peak_alloc_mb": torch.cuda.max_memory_allocated() / 2**20,
                 "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
        torch.cuda.reset_peak_memory_stats()
        return stats
    return process_memory_mb()


@dataclass
class Metrics:
    """metrics.json: rewritten atomically at every record, so it is always valid JSON."""
    path: Path
    run_name: str
    records: list = field(default_factory=list)
    status: str = "running"
    summary: dict = field(default_factory=dict)

    def add(self, record: dict) -> None:
        self.records.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, {"run_name": self.run_name, "status": self.status,
                                      "records": self.records, "summary": self.summary})

    def finish(self, status: str, elapsed: float, train_time: float, device: str) -> None:
        train = [r for r in self.records if "train_loss" in r]
        evals = [r for r in self.records if "val_loss" in r]
        peak_key = "peak_alloc_mb" if device.startswith("cuda") else "peak_rss_mb"
        self.status = status
        self.summary = {
            "total_time_s": round(elapsed, 2),
            "steps": train[-1]["step"] if train else 0,
            "peak_mem_mb": max((r.get(peak_key, 0.0) for r in train), default=None),
            "best_val_loss": min((r["val_loss"] for r in evals), default=None),
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "train_time_s": round(train_time, 2),
            # training steps only: evaluation and checkpointing time is not in the denominator
            "tokens_per_s": round(train[-1]["tokens"] / train_time, 1) if train and train_time > 0 else None,
        }
        self.write()


# ----------------------------------------------------------------------------- the trainer

class Stop(Exception):
    """Raised inside the loop when SIGINT/SIGTERM arrived: save, then leave."""


class Trainer:

    def __init__(self, model_cfg: GPTConfig, train: TrainConfig, run_dir: Path,
                 resume_state: dict | None, ddp: Dist, device: str, datasets: tuple | None = None):
        """`datasets` (train set, test set, test records) replaces the configured dataset: the
        benchmarks in bench/ feed their own examples through the real training step."""
        self.cfg, self.ddp, self.device, self.run_dir = train, ddp, device, run_dir
        self.device_type = device.split(":")[0]
        # --tokenizer, else the files beside init_from's weights, else GPT-2's
        self.tokenizer = load_tokenizer(train.tokenizer or tokenizer_folder(train.init_from))
        self.raw_model = build_model(model_cfg, train)
        if resume_state is not None:
            self._restore_weights(resume_state["checkpoint"])
        self.raw_model.to(device)
        if self.tokenizer.vocab_size > self.raw_model.config.vocab_size:
            raise UserError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                            f"{self.raw_model.config.vocab_size}; use the model's own tokenizer")
        max_len = min(train.max_seq_len or 10**9, self.raw_model.config.block_size)
        self.train_set, self.test_set, self.test_records = datasets or load_datasets(train, self.tokenizer, max_len)
        if len(self.train_set) == 0:
            raise UserError("no training examples left after tokenisation (all dropped as too long?)")
        self.sampler = LengthGroupedBatchSampler(self.train_set.lengths, train.batch_size, seed=train.seed,
                                                 group_by_length=train.group_by_length,
                                                 num_replicas=ddp.world, rank=ddp.rank)
        self.steps_per_epoch = self.sampler.batches_per_epoch // train.grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(self.train_set)} examples make less than one step of "
                            f"{train.batch_size} x {train.grad_accum} x {ddp.world}; lower --batch-size or --grad-accum")
        self.total_steps = train.max_steps or math.ceil(train.epochs * self.steps_per_epoch)
        self.model = torch.compile(self.raw_model) if train.compile else self.raw_model
        if ddp.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ddp.local_rank] if self.device_type == "cuda" else None)
        self.optimizer = optim.build_optimizer(self.raw_model, train, self.device_type)
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[train.dtype]
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=train.dtype == "float16")
        self.trainable = [p for p in self.raw_model.parameters() if p.requires_grad]
        # progress: where in the data and in the run we are
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.tokens_seen, self.elapsed_before, self.train_time = 0, 0.0, 0.0
        self.started = time.perf_counter()
        self.interval = {"loss": 0.0, "targets": 0, "tokens": 0, "time": 0.0}
        self.best_val_loss = math.inf
        self.stop_signal: int | None = None
        self.metrics = Metrics(run_dir / "metrics.json", run_dir.name)
        if resume_state is not None:
            self._restore_progress(resume_state)
        self.base_model_name = train.init_from or str(run_dir / "base_model")

    # ------------------------------------------------------------------ resume

    def _restore_weights(self, checkpoint: Path) -> None:
        if (checkpoint / "adapter").is_dir():
            lora.load_adapter_state_dict(self.raw_model, lora.read_adapter_weights(checkpoint / "adapter"))
        else:
            self.raw_model.load_hf_state_dict(read_hf_state_dict(checkpoint / "model"), origin=str(checkpoint))

    def _restore_progress(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.tokens_seen, self.elapsed_before = state["tokens_seen"], state["elapsed_s"]
        self.interval, self.best_val_loss = state["interval"], state["best_val_loss"]
        self.train_time = state["train_time_s"]
        # Records and samples made after the checkpoint are lost progress: they will be made again.
        old = json.loads((self.run_dir / "metrics.json").read_text())
        self.metrics.records = [r for r in old["records"] if r["step"] <= self.step]
        self._keep_samples(lambda step: step <= self.step)

    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed(), "train_time_s": self.train_time,
                "interval": dict(self.interval), "best_val_loss": self.best_val_loss,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def save(self) -> None:
        """Rank 0 writes; a model with a non-finite weight is never saved."""
        if self.ddp.is_main:
            if not all(torch.isfinite(p).all() for p in self.trainable):
                raise UserError(f"non-finite weights at step {self.step}; not saving a checkpoint")
            save_checkpoint(self.run_dir, self.step, self.raw_model, self._state(), self.base_model_name)
        self._barrier()

    # ------------------------------------------------------------------ data

    def micro_batches(self):
        """Endless (x, y, n_tokens) micro-batches for this rank, epoch after epoch, resumable."""
        while True:
            self.sampler.set_epoch(self.epoch, skip_batches=self.batches_done)
            for indices in self.sampler:
                self.batches_done += 1
                examples = [self.train_set[i] for i in indices]
                x, y = collate(examples, self.tokenizer.eot_id)
                yield x.to(self.device), y.to(self.device), sum(len(e[0]) for e in examples)
            self.epoch, self.batches_done = self.epoch + 1, 0

    def _all_sum(self, value: float) -> float:
        if self.ddp.world == 1:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def _barrier(self) -> None:
        if self.ddp.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ one step

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def train_step(self, batches: list) -> tuple[float, float, int, int]:
        """One optimizer step over `batches`; returns (mean loss, pre-clip grad norm, targets, tokens)."""
        local_targets = sum(count_target_tokens(y) for _, y, _ in batches)
        step_targets = self._all_sum(local_targets)
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y, _) in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.ddp.world == 1 else self.model.no_sync()
            with sync, self.autocast():
                _, loss = self.model(x, y, reduction="sum", targets_only=self.cfg.head_on_targets_only)
                # DDP averages gradients over ranks; scaling by world turns that into the sum.
                self.scaler.scale(loss * (self.ddp.world / step_targets)).backward()
            loss_sum += loss.detach().float()
        mean_loss = self._all_sum(loss_sum.item()) / step_targets
        if not math.isfinite(mean_loss):
            raise UserError(f"non-finite loss ({mean_loss}) at step {self.step + 1}; lower --lr, "
                            "enable --grad-clip, or use --dtype bfloat16/float32")
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip).item()
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise UserError(f"non-finite gradient norm at step {self.step + 1}; lower --lr or enable --grad-clip")
        self.scaler.step(self.optimizer)  # with float16, skips steps whose gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(self._all_sum(sum(n for _, _, n in batches)))
        return mean_loss, grad_norm, int(step_targets), tokens

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss per target token on the test split (+ exact match on synthetic tasks)."""
        model = self.raw_model
        model.eval()
        total, targets = 0.0, 0
        for x, y in sorted_batches(self.test_set, self.cfg.batch_size, self.tokenizer.eot_id,
                                   self.cfg.eval_batches or None):  # eval_batches 0: the whole split
            with self.autocast():
                _, loss = model(x.to(self.device), y.to(self.device), reduction="sum", targets_only=True)
            total += loss.float().item()
            targets += count_target_tokens(y)
        result = {"val_loss": total / targets, "val_ppl": math.exp(min(total / targets, 50.0))}
        if self.cfg.dataset == "synthetic":
            result["exact_match"] = self.exact_match()
        self.write_samples()
        model.train()
        return result

    def answer(self, records: list, max_new_tokens: int) -> list[str]:
        prompts = [self.tokenizer.encode_ordinary(build_prompt(r, self.cfg.template)) for r in records]
        with self.autocast():
            outputs = self.raw_model.generate(prompts, max_new_tokens, eot_id=self.tokenizer.eot_id)
        return [self.tokenizer.decode(o) for o in outputs]

    def exact_match(self) -> float:
        records = self.test_records[:EXACT_MATCH_LIMIT]
        answers = []
        for start in range(0, len(records), 50):
            answers += self.answer(records[start:start + 50], max_new_tokens=24)
        return sum(exact_match(a, r["output"]) for a, r in zip(answers, records)) / len(records)

    def write_samples(self) -> None:
        """A few fixed test prompts answered at every evaluation, so a person can read the change."""
        records = self.test_records[:self.cfg.sample_prompts]
        if not records:
            return
        max_new = min(128, self.raw_model.config.block_size // 2)
        samples = self._keep_samples(lambda step: step < self.step)
        for record, answer in zip(records, self.answer(records, max_new)):
            samples.append({"step": self.step, "instruction": record["instruction"],
                            "input": record.get("input", ""), "response": answer, "reference": record["output"]})
        write_json_atomic(self.run_dir / "samples.json", samples)

    def _keep_samples(self, keep) -> list:
        path = self.run_dir / "samples.json"
        samples = [s for s in json.loads(path.read_text()) if keep(s["step"])] if path.exists() else []
        if path.exists():
            write_json_atomic(path, samples)
        return samples

    # ------------------------------------------------------------------ the loop

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.started)

    def log_eval(self) -> None:
        if self.ddp.is_main:
            result = self.evaluate()
            self.best_val_loss = min(self.best_val_loss, result["val_loss"])
            self.metrics.add({"step": self.step, "epoch": self._epoch_float(), "tokens": self.tokens_seen,
                              "elapsed_s": self.elapsed(), **result})
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
            tqdm.write(f"step {self.step}: {shown}")
            plot_run(self.run_dir)
        self._barrier()

    def _epoch_float(self) -> float:
        return self.epoch + self.batches_done / self.sampler.batches_per_epoch

    def log_train(self, lr: float, grad_norm: float) -> dict:
        iv = self.interval
        record = {"step": self.step, "epoch": self._epoch_float(), "tokens": self.tokens_seen, "lr": lr,
                  "train_loss": iv["loss"] / iv["targets"], "grad_norm": grad_norm,
                  "tokens_per_s": iv["tokens"] / iv["time"] if iv["time"] > 0 else None,
                  "elapsed_s": self.elapsed(), **memory_now(self.device)}
        if self.ddp.is_main:
            self.metrics.add(record)
        self.interval = {"loss": 0.0, "targets": 0, "tokens": 0, "time": 0.0}
        return record

    def run(self) -> None:
        cfg = self.cfg
        self.started = time.perf_counter()
        batches = self.micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.ddp.is_main, desc="train",
                   dynamic_ncols=True)
        if self.step == 0:
            self.log_eval()  # the starting point of every curve
        while self.step < self.total_steps:
            lr = optim.lr_at(self.step, cfg, self.total_steps)
            optim.set_lr(self.optimizer, lr)
            t0 = time.perf_counter()
            loss, grad_norm, targets, tokens = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
            if self.device_type == "cuda":
                torch.cuda.synchronize()
            self.step += 1
            self.tokens_seen += tokens
            iv = self.interval
            iv["loss"] += loss * targets
            iv["targets"] += targets
            iv["tokens"] += tokens
            iv["time"] += time.perf_counter() - t0
            self.train_time += time.perf_counter() - t0
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                record = self.log_train(lr, grad_norm)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{record['tokens_per_s'] or 0:.0f}")
            if self.step % cfg.eval_interval == 0 or self.step == self.total_steps:
                self.log_eval()
            if self.step % cfg.save_interval == 0 or self.step == self.total_steps:
                self.save()
            if self.stop_signal is not None:
                if self.step % cfg.save_interval:
                    self.save()
                raise Stop()
        bar.close()


# ----------------------------------------------------------------------------- main

def describe_run(trainer: Trainer, train: TrainConfig, preset_name: str, ddp: Dist) -> dict:
    report = lora.param_report(trainer.raw_model, train.optimizer,
                               dtype_bytes=trainer.raw_model.lm_head.weight.element_size())
    return {"preset": preset_name, "config": config_to_dict(trainer.raw_model.config, train),
            "params": report, "data": {"train": trainer.train_set.stats, "test": trainer.test_set.stats},
            "steps": trainer.total_steps, "steps_per_epoch": trainer.steps_per_epoch,
            "global_batch": train.batch_size * train.grad_accum * ddp.world, "world_size": ddp.world,
            "torch_version": torch.__version__, "python": platform.python_version(), "device": trainer.device,
            "device_name": torch.cuda.get_device_name() if trainer.device_type == "cuda" else platform.processor(),
            "created": datetime.now().isoformat(timespec="seconds")}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def resolve_run(argv) -> tuple[str, GPTConfig, TrainConfig, Path, dict | None]:
    """The configs, the run folder, and (when resuming) the saved state."""
    argv = sys.argv[1:] if argv is None else argv
    preset_name, model_cfg, train = parse_args(argv, description=__doc__.split("\n")[0])
    if train.resume is not None and any(a.startswith("-") and a.split("=")[0] != "--resume" for a in argv):
        raise UserError("--resume takes no other options: a resumed run continues with its saved configuration")
    if train.resume is None:
        return preset_name, model_cfg, train, run_folder(train, preset_name), None
    run_dir = Path(train.resume)
    hyperparams = read_hyperparams(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"{run_dir}: no checkpoint to resume from (checkpoints/latest missing)")
    # The run's own configuration wins: a resumed run must continue the same run.
    model_cfg, saved_train = config_from_dict(hyperparams["config"])
    state = load_state(checkpoint)
    state["checkpoint"] = checkpoint
    return hyperparams["preset"], model_cfg, replace(saved_train, resume=str(run_dir)), run_dir, state


def main(argv=None) -> int:
    preset_name, model_cfg, train, run_dir, resume_state = resolve_run(argv)
    probe = pick_device(train.device, Dist())
    ddp = setup_distributed(probe)
    device = pick_device(train.device, ddp)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if resume_state is None and ddp.is_main:
        run_dir.mkdir(parents=True)
    torch.manual_seed(train.seed)
    trainer = Trainer(model_cfg, train, run_dir, resume_state, ddp, device)
    torch.manual_seed(train.seed + ddp.rank)  # dropout differs per rank, and is the same on every run
    if resume_state is not None:
        restore_rng(resume_state["rng"])
    if ddp.is_main:
        if resume_state is None:
            write_json_atomic(run_dir / "hyperparams.json", describe_run(trainer, train, preset_name, ddp))
            if train.lora and not train.init_from:
                trainer.raw_model.save_pretrained(run_dir / "base_model", tokenizer_dir=train.tokenizer)
        print(lora.format_param_report(read_hyperparams(run_dir)["params"]))
        print(f"run folder: {run_dir}  ({trainer.total_steps} steps on {device})")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: setattr(trainer, "stop_signal", signum))
    status, code = "finished", 0
    try:
        trainer.run()
    except Stop:
        status, code = "interrupted", 128 + trainer.stop_signal
        if ddp.is_main:
            print(f"interrupted at step {trainer.step}; checkpoint saved; continue with --resume {run_dir}")
    except UserError:
        status = "failed"
        raise
    finally:
        if ddp.is_main:
            trainer.metrics.finish(status, trainer.elapsed(), trainer.train_time, device)
            try:
                plot_run(run_dir)
            except RunFolderError as err:  # a figure must not hide the run's own outcome
                print(f"warning: could not plot {run_dir}: {err}", file=sys.stderr)
        if ddp.world > 1:
            dist.destroy_process_group()
    if ddp.is_main and status == "finished":
        summary = trainer.metrics.summary
        print(f"done: best val loss {summary['best_val_loss']:.4f}, {summary['total_time_s']:.0f} s, "
              f"results in {run_dir}")
    return code


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
