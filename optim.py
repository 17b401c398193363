"""Optimizers and learning-rate schedules for fine-tuning.

Parameter groups carry an `lr_scale` (layer-wise lr decay) that the schedule multiplies in, so
the schedule is a plain function of the step: nothing to save but the step itself.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from configs import TrainConfig

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


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Weight decay only on matrices (>= 2-D: linears, embeddings), never on biases and
    LayerNorms; one group per (depth, decay) when layer-wise lr decay is on."""
    n_layer = model.config.n_layer
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = cfg.llrd ** (n_layer + 1 - layer_depth(name, n_layer)) if cfg.llrd != 1.0 else 1.0
        groups.setdefault((scale, p.dim() >= 2), []).append(p)
    return [{"params": params, "lr_scale": scale, "weight_decay": cfg.weight_decay if decay else 0.0}
            for (scale, decay), params in groups.items()]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        # The fused kernel is CUDA-only; foreach (multi-tensor) is the fast path elsewhere.
        fast = dict(fused=True) if device_type == "cuda" else dict(foreach=True)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fast)
    momentum = {"sgd": 0.0, "momentum": cfg.momentum, "nesterov": cfg.momentum}[cfg.optimizer]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=cfg.optimizer == "nesterov",
                           foreach=True)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return int(round(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
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
