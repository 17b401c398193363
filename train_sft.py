"""Supervised fine-tuning of GPT-2, full or with LoRA, in a plain training loop.

    python train_sft.py --config gpt2-medium/lora --rank 16
    torchrun --nproc_per_node=2 train_sft.py --config gpt2/lora

Everything a run produces lands in runs/<run-name>/ (see runs.py). One optimizer step sums the
token losses of its micro-batches (and of all DDP ranks) and divides by the number of target
tokens in the whole step, so every target token weighs the same however the step is split.

Reading order: `setup` builds everything a run needs (model, tokenizer, data, optimizer) before
the run folder exists; `Trainer.train_step` is one optimizer step; `Trainer.run` is the loop;
`main` ties them to the command line and the run folder.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

import devices
import lora
import memplan
import optim
import runs
import sharding
import trackers
from configs import (MODEL_PRESETS, RESUME_OPTIONS, GPTConfig, TrainConfig, config_from_dict, config_to_dict,
                     implied_by, parse_command_line, validate)
from data import LengthGroupedBatchSampler, SFTDataset, collate, count_target_tokens, load_sft_split
from errors import UserError, one_line, run_cli
from generation import GenerationSettings, generate_responses
from model import GPT, config_from_hf, config_to_hf, is_hub_id, read_hf_state_dict
from synthetic import exact_match, run_split
from tokenizer import Tokenizer, tokenizer_for
from validation import evaluate_loss

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


def setup_distributed(device: torch.device) -> Dist:
    """torchrun sets RANK/WORLD_SIZE; NCCL on GPUs, gloo on CPU."""
    if not dist.is_torchelastic_launched():
        return Dist()
    dist.init_process_group(devices.dist_backend(device))
    return Dist(dist.get_rank(), dist.get_world_size(), devices.local_rank() or 0)


def barrier(ddp: Dist) -> None:
    if ddp.world > 1:
        dist.barrier()


def build_model(model_cfg: GPTConfig, cfg: TrainConfig) -> tuple[GPT, Optional[lora.LoRASettings]]:
    """Pretrained weights (whose config.json fixes the architecture) or a fresh init; then LoRA
    (everything else frozen) or the freezing rules of full fine-tuning."""
    if cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from, dropout=model_cfg.dropout, neftune_alpha=model_cfg.neftune_alpha,
                                    grad_checkpointing=model_cfg.grad_checkpointing)
    else:
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg)
    settings = None
    if cfg.lora:
        settings = lora.apply_lora(model, cfg.rank, cfg.alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                                   layers=cfg.lora_layers, rslora=cfg.rslora, dora=cfg.dora)
    elif cfg.freeze_layers:
        optim.freeze_first_blocks(model, cfg.freeze_layers)
    return model, settings


@dataclass
class Datasets:
    train: SFTDataset
    test: SFTDataset
    test_records: list  # the test records, for exact match and the fixed samples


def load_datasets(cfg: TrainConfig, tokenizer: Tokenizer, max_len: int) -> Datasets:
    options = dict(tokenizer=tokenizer, template=cfg.template, max_len=max_len,
                   train_on_prompt=cfg.train_on_prompt, overlong=cfg.overlong)
    if cfg.dataset == "synthetic":
        train_records, test_records = run_split(cfg.seed)
        return Datasets(SFTDataset.from_records(train_records, **options),
                        SFTDataset.from_records(test_records, **options), test_records)
    test = load_sft_split(cfg.data_dir, "test", **options)
    return Datasets(load_sft_split(cfg.data_dir, "train", **options), test, test.records)


@dataclass
class Setup:
    """Everything a run needs, built before its folder exists."""
    model_cfg: GPTConfig
    cfg: TrainConfig
    ddp: Dist
    device: torch.device
    tokenizer: Tokenizer
    raw_model: GPT  # the GPT itself; `model` may be it compiled and/or DDP-wrapped
    model: torch.nn.Module
    lora_settings: Optional[lora.LoRASettings]
    data: Datasets
    sampler: LengthGroupedBatchSampler
    steps_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    compute_dtype: Optional[torch.dtype]  # autocast dtype; None = float32
    memory_plan: memplan.MemoryPlan  # the predicted bytes per rank, before the run

    def precision(self):
        """Autocast in the run's compute dtype (a no-op in float32)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


def setup(model_cfg: GPTConfig, cfg: TrainConfig, ddp: Dist, device: torch.device, facts: devices.Facts,
          datasets: Optional[Datasets] = None, weights_from: Optional[Path] = None) -> Setup:
    """Build the model (with a checkpoint's weights when resuming), tokenizer, data, sampler and
    optimizer. `datasets` replaces the configured data: the benchmarks feed their own examples.
    With --fsdp the model is sharded in place (sharding.py): `model` is `raw_model`, or it compiled."""
    compute_dtype = devices.compute_dtype(cfg.dtype, device, facts)
    if cfg.fsdp:
        sharding.check_options(cfg, dist.is_initialized(), compute_dtype)
    tokenizer = tokenizer_for(cfg.init_from, cfg.tokenizer)
    raw_model, settings = build_model(model_cfg, cfg)
    memory_plan, advice = predict_memory(raw_model.config, cfg, ddp.world, compute_dtype)
    if advice is not None:
        raise UserError(f"--max-memory {cfg.max_memory}: this run is predicted not to fit; {advice} "
                        "(python train_sft.py ... --dry-run prints the whole plan)")
    if weights_from is not None:
        restore_weights(raw_model, weights_from)
    raw_model.to(device)
    if tokenizer.vocab_size > raw_model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{raw_model.config.vocab_size}; use the model's own tokenizer")
    max_len = min(cfg.max_seq_len or 10**9, raw_model.config.block_size)
    data = datasets or load_datasets(cfg, tokenizer, max_len)
    if len(data.train) == 0:
        raise UserError("no training examples left after tokenisation (all dropped as too long?)")
    sampler = LengthGroupedBatchSampler(data.train.lengths, cfg.batch_size, seed=cfg.seed,
                                        group_by_length=cfg.group_by_length, num_replicas=ddp.world, rank=ddp.rank)
    steps_per_epoch = sampler.batches_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"{len(data.train)} examples make less than one step of "
                        f"{cfg.batch_size} x {cfg.grad_accum} x {ddp.world}; lower --batch-size or --grad-accum")
    if cfg.fsdp:  # in place: the parameters become shards
        sharding.shard(raw_model, device, compute_dtype)
    model = torch.compile(raw_model) if cfg.compile else raw_model  # after sharding, as FSDP2 expects
    if ddp.world > 1 and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=devices.ddp_device_ids(device))
    optimizer = optim.build_optimizer(raw_model, cfg, device)  # after sharding: it holds the shards
    if cfg.fsdp:
        sharding.report_local_bytes(raw_model, optimizer)
    return Setup(model_cfg=model_cfg, cfg=cfg, ddp=ddp, device=device, tokenizer=tokenizer, raw_model=raw_model,
                 model=model, lora_settings=settings, data=data, sampler=sampler, steps_per_epoch=steps_per_epoch,
                 total_steps=cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch),
                 optimizer=optimizer,
                 scaler=torch.amp.GradScaler(device.type, enabled=devices.needs_grad_scaler(compute_dtype)),
                 compute_dtype=compute_dtype, memory_plan=memory_plan)


def predict_memory(model_cfg: GPTConfig, cfg: TrainConfig, world: int,
                   compute_dtype: Optional[torch.dtype]) -> tuple[memplan.MemoryPlan, Optional[str]]:
    """The memory plan per rank (memplan.py); with --max-memory, and only when the run is
    predicted not to fit, what would fit and the options that give it."""
    inputs = memplan.PlanInputs.from_configs(model_cfg, cfg, world, cfg.fsdp,
                                             compute_dtype=compute_dtype or torch.float32)
    predicted = memplan.plan(inputs)
    if cfg.max_memory is None or predicted.total <= memplan.parse_size(cfg.max_memory):
        return predicted, None
    fitting, how = memplan.propose(inputs, memplan.parse_size(cfg.max_memory))  # UserError when nothing fits
    flags = [f"--batch-size {fitting.batch_size}", f"--grad-accum {fitting.grad_accum}"]
    flags += ["--grad-checkpointing"] if fitting.grad_checkpointing else []
    return predicted, f"{how}: pass {' '.join(flags)}"


def restore_weights(model: GPT, checkpoint: Path) -> None:
    kind, folder = runs.checkpoint_weights(checkpoint)
    if kind == "adapter":
        lora.load_adapter_state_dict(model, lora.read_adapter_weights(folder))
    else:
        model.load_hf_state_dict(read_hf_state_dict(folder), origin=str(checkpoint))


# ----------------------------------------------------------------------------- the trainer

class MicroBatch(NamedTuple):
    x: torch.Tensor  # [B, T] token ids, on the device
    y: torch.Tensor  # [B, T] targets (IGNORE_INDEX where none), on the device
    n_targets: int  # counted on the host before the copy: no device read needed
    n_tokens: int  # real (non-padding) tokens
    lengths: Optional[torch.Tensor] = None  # [B] real tokens per row, on the device (NEFTune's L)


class StepResult(NamedTuple):
    loss: float  # mean over the step's target tokens
    grad_norm: float  # before clipping
    targets: int
    tokens: int
    stop: bool = False  # some rank received SIGINT/SIGTERM: every rank stops after this step


class Stop(Exception):
    """Raised inside the loop when SIGINT/SIGTERM arrived: save, then leave."""


class Trainer:
    """The training loop over a Setup, with the progress that a checkpoint saves."""

    def __init__(self, s: Setup, run_dir: Path, metrics: runs.Metrics,
                 after_eval: Callable[[Path], None] = lambda run_dir: None):
        self.s, self.cfg, self.run_dir, self.metrics, self.after_eval = s, s.cfg, run_dir, metrics, after_eval
        self.trainable = [p for p in s.raw_model.parameters() if p.requires_grad]
        self.base_model_name = s.cfg.init_from or str(run_dir / runs.BASE_MODEL)
        # progress: where in the data and in the run we are
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.tokens_seen, self.elapsed_before, self.train_time = 0, 0.0, 0.0
        self.started = time.perf_counter()
        self.interval = {"loss": 0.0, "targets": 0, "tokens": 0, "time": 0.0}
        self.best_val_loss = math.inf
        self.stop_signal: Optional[int] = None

    # ------------------------------------------------------------------ data

    def micro_batches(self):
        """Endless micro-batches for this rank, epoch after epoch, resumable mid-epoch."""
        pin = devices.pin_memory(self.s.device)
        while True:
            self.s.sampler.set_epoch(self.epoch, skip_batches=self.batches_done)
            for indices in self.s.sampler:
                self.batches_done += 1
                examples = [self.s.data.train[i] for i in indices]
                x, y = collate(examples, self.s.tokenizer.eot_id)
                lengths = torch.tensor([len(e[0]) for e in examples])
                n_targets, n_tokens = count_target_tokens(y), int(lengths.sum())
                if pin:
                    x, y, lengths = x.pin_memory(), y.pin_memory(), lengths.pin_memory()
                x, y, lengths = (t.to(self.s.device, non_blocking=pin) for t in (x, y, lengths))
                yield MicroBatch(x, y, n_targets, n_tokens, lengths)
            self.epoch, self.batches_done = self.epoch + 1, 0

    # ------------------------------------------------------------------ one step

    def head_options(self, b: MicroBatch) -> dict:
        """The head on target rows only, ce_chunk at a time, with the target count known on the host."""
        if not self.cfg.head_on_targets_only:
            return {}
        return dict(targets_only=True, n_targets=b.n_targets, ce_chunk=self.cfg.ce_chunk)

    def train_step(self, batches: list[MicroBatch]) -> StepResult:
        """One optimizer step: the mean loss over the target tokens of all micro-batches and ranks.

        No rank knows the step's target count N before backward without asking the others, so
        each backpropagates its summed loss times 1/capacity (capacity: the most targets a step can
        have, the same on every rank; DDP's average over ranks is undone by the world size), and
        the gradients are multiplied by capacity/N afterwards, on the device. Loss, counts and
        grad norm are read back together once, before the weights change, so a non-finite value
        never reaches them; nothing is read inside the micro-batches."""
        s, world = self.s, self.s.ddp.world
        capacity = world * len(batches) * self.cfg.batch_size * s.raw_model.config.block_size
        # loss sum, targets, tokens, and whether a stop signal arrived (summed over ranks with the
        # rest, so that all ranks stop at the same step and meet in the same collective save)
        totals = torch.zeros(4, dtype=torch.float64, device=s.device)
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            # FSDP reduce-scatters every micro-batch: its gradients stay sharded (it has no no_sync)
            sync = contextlib.nullcontext() if last or world == 1 or self.cfg.fsdp else s.model.no_sync()
            with sync, s.precision():
                _, loss = s.model(b.x, b.y, reduction="sum", lengths=b.lengths, **self.head_options(b))
                s.scaler.scale(loss * (world / capacity)).backward()
            totals[0] += loss.detach().double()
            totals[1] += b.n_targets  # host numbers added on the device: no copy, no read
            totals[2] += b.n_tokens
        totals[3] += float(self.stop_signal is not None)
        if world > 1:
            dist.all_reduce(totals)
        s.scaler.unscale_(s.optimizer)
        torch._foreach_mul_([p.grad for p in self.trainable if p.grad is not None], (capacity / totals[1]).float())
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = sharding.full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, clip))  # FSDP: over all shards
        loss_sum, targets, tokens, stops, norm = torch.cat([totals, grad_norm.double().view(1)]).tolist()  # the one read
        mean_loss = loss_sum / targets
        if not math.isfinite(mean_loss):
            raise UserError(f"non-finite loss ({mean_loss}) at step {self.step + 1}; lower --lr, "
                            "enable --grad-clip, or use --dtype bfloat16/float32")
        if not math.isfinite(norm) and not s.scaler.is_enabled():
            raise UserError(f"non-finite gradient norm at step {self.step + 1}; lower --lr or enable --grad-clip")
        # with float16, skips steps whose gradients overflowed (reading its found-inf flag: float16
        # runs, T4/P100, pay that one extra host read per step; bfloat16 and float32 need no scaler)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)
        return StepResult(mean_loss, norm, int(targets), int(tokens), stops > 0)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        """Mean loss per target token on the test split (+ exact match on the synthetic tasks)."""
        s = self.s
        result = evaluate_loss(s.raw_model, s.data.test, self.cfg.batch_size, s.tokenizer.eot_id,
                               self.cfg.eval_batches or None, s.precision, self.cfg.ce_chunk)  # eval_batches 0: all
        if self.cfg.dataset == "synthetic":
            records = s.data.test_records[:EXACT_MATCH_LIMIT]
            answers = self.answer(records, max_new_tokens=24, batch_size=50)
            result["exact_match"] = sum(exact_match(a, r["output"]) for a, r in zip(answers, records)) / len(records)
        return result

    def answer(self, records: list, max_new_tokens: int, batch_size: int) -> list[str]:
        responses = generate_responses(self.s.raw_model, self.s.tokenizer, records, self.cfg.template,
                                       GenerationSettings(max_new_tokens=max_new_tokens), batch_size,
                                       progress=False, precision=self.s.precision)
        return [r for (r,) in responses]

    def write_samples(self) -> None:
        """A few fixed test prompts answered at every evaluation, so a person can read the change."""
        records = self.s.data.test_records[:self.cfg.sample_prompts]
        if records:
            max_new = min(128, self.s.raw_model.config.block_size // 2)
            answers = self.answer(records, max_new, len(records))
            if self.s.ddp.is_main:
                runs.add_samples(self.run_dir, self.step, records, answers)

    def log_eval(self) -> None:
        # Under FSDP each forward gathers weights from every rank, so all ranks evaluate and
        # generate the same batches in lockstep (greedy decoding stops at the same step on all).
        if self.s.ddp.is_main or self.cfg.fsdp:
            result = self.evaluate()
            self.write_samples()  # written by rank 0
        if self.s.ddp.is_main:
            self.best_val_loss = min(self.best_val_loss, result["val_loss"])
            self.metrics.add({"step": self.step, "epoch": self.epoch_float(), "tokens": self.tokens_seen,
                              "elapsed_s": self.elapsed(), **result})
            tqdm.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            self.after_eval(self.run_dir)
        barrier(self.s.ddp)

    # ------------------------------------------------------------------ logging, saving

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.started)

    def epoch_float(self) -> float:
        return self.epoch + self.batches_done / self.s.sampler.batches_per_epoch

    def log_train(self, lr: float, grad_norm: float) -> dict:
        iv = self.interval
        record = {"step": self.step, "epoch": self.epoch_float(), "tokens": self.tokens_seen, "lr": lr,
                  "train_loss": iv["loss"] / iv["targets"], "grad_norm": grad_norm,
                  "tokens_per_s": iv["tokens"] / iv["time"] if iv["time"] > 0 else None,
                  "train_time_s": self.train_time, "elapsed_s": self.elapsed(), **devices.memory_now(self.s.device)}
        if self.s.ddp.is_main:
            self.metrics.add(record)
        self.interval = {"loss": 0.0, "targets": 0, "tokens": 0, "time": 0.0}
        return record

    def state(self, optimizer_state: dict) -> dict:
        s = self.s
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed(), "train_time_s": self.train_time,
                "interval": dict(self.interval), "best_val_loss": self.best_val_loss,
                "optimizer": optimizer_state, "scaler": s.scaler.state_dict(),
                "rng": devices.rng_state(s.device)}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state (the weights were loaded by setup)."""
        if self.cfg.fsdp:  # the full state, keyed by parameter name: each rank takes its shard
            sharding.load_optimizer_state(self.s.raw_model, self.s.optimizer, state["optimizer"])
        else:
            self.s.optimizer.load_state_dict(state["optimizer"])
        self.s.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.tokens_seen, self.elapsed_before = state["tokens_seen"], state["elapsed_s"]
        self.interval, self.best_val_loss = state["interval"], state["best_val_loss"]
        self.train_time = state["train_time_s"]
        # Records and samples made after the checkpoint are lost progress: they will be made again.
        self.metrics.truncate(self.step)
        runs.keep_samples(self.run_dir, lambda step: step <= self.step)

    def save(self) -> None:
        """Rank 0 writes; a model with a non-finite weight is never saved. Under FSDP all ranks
        first gather the full weights and optimizer state to rank 0, so that the checkpoint has
        the same formats as a single process's."""
        s = self.s
        model, optimizer_state = s.raw_model, s.optimizer.state_dict()
        if self.cfg.fsdp:
            model = sharding.gather_model(s.raw_model)
            optimizer_state = sharding.gather_optimizer_state(s.raw_model, s.optimizer)
        if s.ddp.is_main:
            if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
                raise UserError(f"non-finite weights at step {self.step}; not saving a checkpoint")
            runs.save_checkpoint(self.run_dir, self.step, model, self.state(optimizer_state), self.base_model_name,
                                 tokenizer_dir=self.run_dir / runs.TOKENIZER)
            runs.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        barrier(self.s.ddp)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        cfg, total = self.cfg, self.s.total_steps
        self.started = time.perf_counter()
        batches = self.micro_batches()
        bar = tqdm(total=total, initial=self.step, disable=not self.s.ddp.is_main, desc="train", dynamic_ncols=True)
        if self.step == 0:
            self.log_eval()  # the starting point of every curve
        while self.step < total:
            lr = optim.lr_at(self.step, cfg, total)
            optim.set_lr(self.s.optimizer, lr)
            t0 = time.perf_counter()
            result = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
            seconds = time.perf_counter() - t0
            self.step += 1
            self.tokens_seen += result.tokens
            self.train_time += seconds
            iv = self.interval
            iv["loss"] += result.loss * result.targets
            iv["targets"] += result.targets
            iv["tokens"] += result.tokens
            iv["time"] += seconds
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == total:
                record = self.log_train(lr, result.grad_norm)
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{record['tokens_per_s'] or 0:.0f}")
            if self.step % cfg.eval_interval == 0 or self.step == total:
                self.log_eval()
            if self.step % cfg.save_interval == 0 or self.step == total:
                self.save()
            if result.stop:
                self.stop_signal = self.stop_signal or signal.SIGTERM  # a rank told by another one
                if self.step % cfg.save_interval:
                    self.save()
                raise Stop()
        bar.close()


def standalone_trainer(model_cfg: GPTConfig, cfg: TrainConfig, device: str, scratch_dir: Path,
                       datasets: Optional[Datasets] = None) -> Trainer:
    """A Trainer outside a run folder, for the benchmarks and tests that drive train_step
    themselves (metrics go to scratch_dir)."""
    torch.manual_seed(cfg.seed)
    facts = devices.Facts.probe()
    s = setup(model_cfg, cfg, Dist(), devices.resolve_device(device, facts), facts, datasets)
    return Trainer(s, Path(scratch_dir), runs.Metrics(Path(scratch_dir) / runs.METRICS, Path(scratch_dir).name))


# ----------------------------------------------------------------------------- main

def describe_run(s: Setup, preset_name: str) -> dict:
    """hyperparams.json: the resolved configuration and what the run is made of."""
    cfg = s.cfg
    report = optim.param_report(s.raw_model, cfg.optimizer)
    return {"preset": preset_name, "config": config_to_dict(s.raw_model.config, cfg),
            "params": report, "lora": s.lora_settings.to_dict() if s.lora_settings else None,
            "data": {"train": s.data.train.stats, "test": s.data.test.stats},
            "fingerprint": runs.data_fingerprint(s.data.train, s.data.test, s.tokenizer, cfg.template),
            "steps": s.total_steps, "steps_per_epoch": s.steps_per_epoch,
            "global_batch": cfg.batch_size * cfg.grad_accum * s.ddp.world, "world_size": s.ddp.world,
            "compute_dtype": devices.dtype_name(s.compute_dtype),
            "memory_plan": s.memory_plan.to_dict(),  # predicted bytes per rank; metrics.json's summary has the peak
            "torch_version": torch.__version__, "python": platform.python_version(), "device": str(s.device),
            "device_name": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else platform.processor(),
            "created": datetime.now().isoformat(timespec="seconds")}


def saves_random_base(cfg: TrainConfig) -> bool:
    """LoRA on a random init: the run folder keeps that base whole (base_model/), since no hub or
    folder holds it."""
    return cfg.lora and not cfg.init_from


def run_start(s: Setup, hyperparams: dict, base: Optional[GPT]) -> runs.RunStart:
    """What the run folder starts with: hyperparams, the tokenizer, the template, and the base
    (its config for LoRA on pretrained weights; `base`, the whole model, for LoRA on a random init)."""
    return runs.RunStart(hyperparams, s.tokenizer, s.cfg.template,
                         base_config=config_to_hf(s.raw_model.config) if s.cfg.lora else None,
                         base_model=base if saves_random_base(s.cfg) else None)  # LoRA leaves the base weights' names as they were


class Resolved(NamedTuple):
    preset_name: str
    model_cfg: GPTConfig
    cfg: TrainConfig
    run_dir: Path
    saved: Optional[dict]  # when resuming: the run's hyperparams.json and metrics records


def _flags(names) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def resolve_run(argv) -> Resolved:
    """The configs and the run folder. A resumed run continues with its saved configuration,
    changed only by the options in RESUME_OPTIONS (how long it goes on, how it is paced)."""
    argv = sys.argv[1:] if argv is None else argv
    line = parse_command_line(argv, description=__doc__.split("\n")[0])
    if line.train.resume is None:
        return Resolved(line.preset, line.model, line.train, runs.new_run_dir(line.train, line.preset), None)
    changes = {k: v for k, v in line.given.items() if k != "resume"}
    refused = sorted(set(changes) - set(RESUME_OPTIONS)) + ["config"] * any(
        a.split("=")[0] == "--config" for a in argv)
    if refused:
        raise UserError(f"--resume cannot change {_flags(refused)} (they change what the run computes; start a "
                        f"new run for that); with --resume you may give {_flags(RESUME_OPTIONS)}")
    run_dir = Path(line.train.resume)
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    hyperparams = runs.read_hyperparams(run_dir)
    metrics = runs.read_metrics(run_dir) if (run_dir / runs.METRICS).exists() else {"records": []}  # killed early
    if not isinstance(hyperparams, dict) or not isinstance(hyperparams.get("config"), dict) or \
            not isinstance(metrics, dict) or not isinstance(metrics.get("records"), list):
        raise UserError(f"--resume {run_dir}: hyperparams.json or metrics.json is not in the trainer's format "
                        "(damaged?); start a new run")
    model_cfg, saved = config_from_dict(hyperparams["config"])
    cfg = replace(saved, resume=str(run_dir), **changes, **implied_by(changes))
    validate(model_cfg, cfg)
    return Resolved(hyperparams["preset"], model_cfg, cfg, run_dir,
                    {"hyperparams": hyperparams, "records": metrics["records"]})


def find_checkpoint(run_dir: Path, say: bool) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint to resume from and its state, falling back past damaged ones; (None, None)
    for a run stopped before its first checkpoint: it starts again from step 0."""
    checkpoint, state, skipped = runs.resumable_checkpoint(run_dir)
    if say:
        for problem in skipped:
            print(f"warning: {problem}; falling back to the one before", file=sys.stderr)
        if checkpoint is None:
            print(f"{run_dir} has no checkpoint (stopped before its first save): starting it again from step 0 "
                  "with its saved configuration; its old records and samples are discarded")
        elif skipped:
            print(f"resuming from {checkpoint}")
    return checkpoint, state


def check_continuation(run_dir: Path, s: Setup, step: int, saved: dict, now: dict) -> None:
    """A resumed run must go on with the data it trained on, and have steps left to take."""
    changed = runs.fingerprint_changes(saved.get("fingerprint"), now["fingerprint"])
    if changed:
        where = f" in {s.cfg.data_dir}" if s.cfg.dataset == "sft" else ""
        raise UserError(f"--resume {run_dir}: the {' and the '.join(changed)}{where} changed since the run "
                        "started; restore the data it trained on, or start a new run")
    if step > s.total_steps:
        raise UserError(f"--resume {run_dir}: the run is at step {step}, past the {s.total_steps} steps asked "
                        "for; give a larger --max-steps or --epochs")


def prepare_folder(run_dir: Path, s: Setup, hyperparams: dict, saved: Optional[dict], restart: bool,
                   base: Optional[GPT]):
    """Rank 0: create the run folder (a new run) or bring it up to date (a resumed one: its
    configuration may have been extended), and lock it for this process. Returns the lock."""
    if saved is None:
        runs.create_run_folder(run_dir, run_start(s, hyperparams, base))
        return runs.lock_run(run_dir)
    if restart:  # nothing of the old attempt survives a restart from step 0
        runs.discard_progress(run_dir)
        shutil.rmtree(run_dir / trackers.TENSORBOARD_DIR, ignore_errors=True)
    else:
        hyperparams["created"] = saved["hyperparams"].get("created", hyperparams["created"])
    runs.write_hyperparams(run_dir, hyperparams)
    return None


def draw_figures(run_dir: Path) -> None:
    """train.png and test.png; imported here so that the loop itself never needs matplotlib."""
    from plotting import plot_run
    try:
        plot_run(run_dir)
    except runs.RunFolderError as err:  # a figure must not hide the run's own outcome
        print(f"warning: could not plot {run_dir}: {err}", file=sys.stderr)


def planned_architecture(model_cfg: GPTConfig, cfg: TrainConfig) -> GPTConfig:
    """The architecture a run will have, without loading weights: --init-from's config.json (a
    local folder's, a GPT-2 size's known shape, or the hub's config.json alone)."""
    if not cfg.init_from:
        return model_cfg
    source = str(cfg.init_from)
    name = source.removeprefix("openai-community/")
    if Path(source).is_dir():
        folder = Path(source)
    elif name in MODEL_PRESETS and MODEL_PRESETS[name][1].get("init_from") == name:  # gpt2 ... gpt2-xl
        folder = None
        shape = MODEL_PRESETS[name][0]
    elif is_hub_id(source):
        try:
            from huggingface_hub import hf_hub_download
            folder = Path(hf_hub_download(source, "config.json")).parent
        except Exception as err:  # offline or unknown: the same to us
            raise UserError(f"--dry-run: cannot read config.json of {source!r} from the hub "
                            f"({type(err).__name__}); pass --init-from a local folder") from None
    else:
        raise UserError(f"--init-from {source}: no such folder")
    if folder is not None:
        shape = config_from_hf(folder)
    return replace(shape, dropout=model_cfg.dropout, grad_checkpointing=model_cfg.grad_checkpointing)


def dry_run(model_cfg: GPTConfig, cfg: TrainConfig) -> int:
    """--dry-run: each rank's predicted memory for this configuration, and with --max-memory
    what fits; nothing is loaded or tokenised. Under torchrun the plan is for its WORLD_SIZE."""
    if cfg.fsdp:
        sharding.check_launch(dist.is_torchelastic_launched())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = devices.pick_device(cfg.device)
    facts = devices.Facts.probe()
    compute_dtype = devices.compute_dtype(cfg.dtype, device, facts)
    if cfg.fsdp:
        sharding.check_options(cfg, True, compute_dtype)
    predicted, advice = predict_memory(planned_architecture(model_cfg, cfg), cfg, world, compute_dtype)
    if int(os.environ.get("RANK", "0")) == 0:
        print(memplan.format_plan(predicted))
        if cfg.max_memory is not None:
            print(f"--max-memory {cfg.max_memory}: " + (advice or "fits, nothing to change"))
    return 0


def main(argv=None) -> int:
    preset_name, model_cfg, cfg, run_dir, saved = resolve_run(argv)
    if cfg.dry_run:
        return dry_run(model_cfg, cfg)
    device = devices.pick_device(cfg.device)
    ddp = setup_distributed(device)
    lock = runs.lock_run(run_dir) if saved is not None and ddp.is_main else None  # before reading its state
    checkpoint, state = find_checkpoint(run_dir, ddp.is_main) if saved is not None else (None, None)
    torch.manual_seed(cfg.seed)
    s = setup(model_cfg, cfg, ddp, device, devices.Facts.probe(), weights_from=checkpoint)
    hyperparams = describe_run(s, preset_name)
    if checkpoint is not None:
        check_continuation(run_dir, s, state["step"], saved["hyperparams"], hyperparams)
    base = s.raw_model
    if cfg.fsdp and saved is None and saves_random_base(cfg):
        base = sharding.gather_model(s.raw_model, frozen=True)  # collective: rank 0 gets the whole model
    if ddp.is_main:
        lock = prepare_folder(run_dir, s, hyperparams, saved, restart=checkpoint is None, base=base) or lock
    barrier(ddp)
    metrics = runs.Metrics(run_dir / runs.METRICS, run_dir.name)
    trainer = Trainer(s, run_dir, metrics, after_eval=draw_figures)
    torch.manual_seed(cfg.seed + ddp.rank)  # dropout differs per rank, and is the same on every run
    if checkpoint is not None:
        metrics.records = saved["records"]
        trainer.restore(state)
        devices.restore_rng_state(state["rng"], device)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: setattr(trainer, "stop_signal", signum))
    status, code, error, tracker = "finished", 0, None, None
    try:
        if ddp.is_main:
            metrics.write()  # "running" from now on
            tracker = trackers.open_tracker(cfg.tracker, run_dir, run_dir.name, config_to_dict(s.raw_model.config, cfg),
                                            resume_step=trainer.step if checkpoint is not None else None)
            metrics.on_record = tracker.log if tracker is not None else None
            print(optim.format_param_report(hyperparams["params"]))
            print(memplan.format_plan(s.memory_plan))  # metrics.json's summary gets the measured peak
            print(f"run folder: {run_dir}  ({s.total_steps} steps on {device}, "
                  f"{devices.dtype_name(s.compute_dtype)})")
        trainer.run()
    except Stop:
        status, code = "interrupted", 128 + trainer.stop_signal
        if ddp.is_main:
            print(f"interrupted at step {trainer.step}; checkpoint saved; continue with --resume {run_dir}")
    except Exception as err:  # recorded as failed, whatever it is (a CUDA out-of-memory error too)
        status, error = "failed", one_line(err)
        code = 2 if isinstance(err, (UserError, OSError)) else 1
        if code == 1:
            traceback.print_exc()  # not the user's input: the details matter
    finally:
        if ddp.is_main:
            latest = runs.latest_checkpoint(run_dir)
            metrics.finish(status, {"last_checkpoint": latest.name if latest else None}, error=error)
            if tracker is not None:
                tracker.close()
            draw_figures(run_dir)
        if ddp.world > 1:
            dist.destroy_process_group()
        if lock is not None:
            lock.close()
    if ddp.is_main and status == "failed":
        latest = metrics.summary["last_checkpoint"]
        print(f"error: {error}", file=sys.stderr)
        print(f"the run failed at step {trainer.step + 1}; last checkpoint: {latest or 'none yet'}; "
              f"continue with: python train_sft.py --resume {run_dir}", file=sys.stderr)
    if ddp.is_main and status == "finished":
        print(f"done: best val loss {metrics.summary['best_val_loss']:.4f}, "
              f"{metrics.summary['total_time_s']:.0f} s, results in {run_dir}")
        check = memplan.versus_measured(s.memory_plan, metrics.summary["peak_mem_mb"], metrics.summary["peak_mem_of"])
        if check:
            print(check)
    return code


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
