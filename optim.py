"""Optimizers, parameter groups, learning-rate schedules, and the parameter/memory report.

Parameter groups carry an `lr_scale` (layer-wise lr decay, LoRA+) that the schedule multiplies in, so
the schedule is a plain function of the step: nothing to save but the step itself.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

import devices
import lora
from errors import UserError, check_range

# optimizer -> state tensors it keeps per parameter (momentum buffer; Adam's two moments)
OPTIMIZERS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adamw": 2}
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    """The optimisation options of a training run (flags --optimizer, --lr, ...)."""
    optimizer: str = "adamw"  # sgd | momentum | nesterov | adamw
    lr: float = 3e-4
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    llrd: float = 1.0  # layer-wise lr decay: block i gets lr * llrd ** (n_layer - i)
    freeze_layers: int = 0  # freeze the first N blocks (and the embeddings) in full fine-tuning
    schedule: str = "cosine"  # cosine | linear | constant
    warmup: float = 0.03  # < 1: fraction of the total steps; >= 1: number of steps
    min_lr: float = 0.0
    grad_clip: float = 1.0  # 0 = off

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise UserError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        for flag, value in (("--momentum", self.momentum), ("--beta1", self.beta1), ("--beta2", self.beta2)):
            check_range(flag, value, 0, 1, high_open=True)
        check_range("--eps", self.eps, 0, low_open=True)
        for flag, value in (("--weight-decay", self.weight_decay), ("--warmup", self.warmup),
                            ("--grad-clip", self.grad_clip), ("--freeze-layers", self.freeze_layers)):
            check_range(flag, value, 0)  # the upper bound of --freeze-layers needs the model: configs.validate
        check_range("--llrd", self.llrd, 0, 1, low_open=True)


_BLOCK_INDEX = re.compile(r"\.h\.(\d+)\.")


def layer_depth(name: str, n_layer: int) -> int:
    """0 for the embeddings, i + 1 for block i, n_layer + 1 for the final LayerNorm."""
    match = _BLOCK_INDEX.search("." + name)
    if match:
        return int(match.group(1)) + 1
    return 0 if ".wte." in "." + name or ".wpe." in "." + name else n_layer + 1


def freeze_first_blocks(model: nn.Module, n_blocks: int) -> None:
    """Freeze the embeddings (and with them the tied head) and the first n_blocks blocks."""
    n_layer = model.config.n_layer
    for name, p in model.named_parameters():
        if layer_depth(name, n_layer) <= n_blocks:
            p.requires_grad_(False)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay only on matrices (>= 2-D: linears, embeddings), never on biases and
    LayerNorms; one group per (depth, decay) when layer-wise lr decay is on.

    LoRA+ (cfg a LoRAConfig with lora_plus_ratio R != 1) multiplies the lr_scale of the LoRA B
    matrices and of every trainable 1-D parameter (DoRA's magnitudes) by R, as PEFT's
    create_loraplus_optimizer groups them ("lora_B" in the name or 1-D)."""
    n_layer = model.config.n_layer
    ratio = cfg.lora_plus_ratio if isinstance(cfg, lora.LoRAConfig) else 1.0
    groups: dict[tuple[float, bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = cfg.llrd ** (n_layer + 1 - layer_depth(name, n_layer)) if cfg.llrd != 1.0 else 1.0
        plus = ratio != 1.0 and (".lora_B." in name or p.dim() == 1)
        groups.setdefault((scale * ratio if plus else scale, p.dim() >= 2, plus), []).append(p)
    return [{"params": params, "lr_scale": scale, "weight_decay": cfg.weight_decay if decay else 0.0}
            for (scale, decay, _), params in groups.items()]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | str) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        # The fused kernel is CUDA-only; foreach (multi-tensor) is the fast path elsewhere.
        fast = dict(fused=True) if devices.fused_adamw(torch.device(device)) else dict(foreach=True)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fast)
    momentum = {"sgd": 0.0, "momentum": cfg.momentum, "nesterov": cfg.momentum}[cfg.optimizer]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=cfg.optimizer == "nesterov",
                           foreach=True)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return int(round(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr,
    then cosine or linear decay to min_lr at the last step, or constant."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total_steps - 1 - warmup)
    progress = min(progress, 1.0)
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


# ---------------------------------------------------------------------------- parameter report

def param_report(model: nn.Module, optimizer: str) -> dict:
    """Parameter counts of the built model: total, trainable, LoRA by target (works without LoRA,
    for full fine-tuning). The bytes they and the training will take are memplan's plan."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    gpt = lora.unwrap(model)
    params = list(gpt.parameters())  # a tied weight (wte = lm_head) is yielded once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    by_target: dict[str, int] = {}
    for (_, target), module in lora.lora_modules(gpt).items():
        by_target[target] = by_target.get(target, 0) + sum(t.numel() for t in module.adapter_tensors().values())
    n_lora = sum(by_target.values())
    settings = lora.lora_settings(gpt)
    return {
        "total": total, "trainable": trainable, "frozen": total - trainable, "lora": n_lora,
        "trainable_fraction": trainable / total if total else 0.0,
        "lora_by_target": by_target,
        "lora_settings": settings.to_dict() if settings else None,
        "optimizer": optimizer, "optimizer_buffers_per_param": OPTIMIZERS[optimizer],
    }


def format_param_report(report: dict) -> str:
    """A few lines for the start of training (memplan.format_plan follows them with the bytes)."""
    lines = [f"parameters: total {_count(report['total'])}, trainable {_count(report['trainable'])} "
             f"({100 * report['trainable_fraction']:.2f}%), LoRA {_count(report['lora'])}"]
    if report["lora_by_target"]:
        lines.append("  LoRA per target: " + ", ".join(f"{t} {_count(n)}" for t, n in report["lora_by_target"].items()))
        if report["trainable"] != report["lora"]:
            lines.append(f"  WARNING: {_count(report['trainable'] - report['lora'])} trainable parameters are not LoRA")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"

