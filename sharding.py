"""FSDP2 (`--fsdp` under torchrun): the model sharded over the ranks, and its full weights and
optimizer state gathered back to rank 0 for checkpoints in today's formats.

Each Block is one FSDP unit and the root (embeddings, final LayerNorm, and the head, which is
the wte tensor itself) another, as PyTorch's FSDP2 guide recommends: a rank keeps 1/world of
every parameter, gradient and optimizer state, and gathers one unit's full weights at a time for
its forward and backward. Frozen and trainable parameters may share a unit (LoRA's base and its
adapters): FSDP2 reduce-scatters only the gradients that exist. With a bfloat16 compute dtype the
gathered weights are bfloat16 and gradients are reduced in float32; the shards, and so the
optimizer's master weights and state, stay float32.

Every function here that gathers is a collective: all ranks call it, in the same order.
"""
from __future__ import annotations

import json
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import lora
from errors import UserError
from model import GPT

# full tensors, gathered one at a time onto rank 0's CPU (the other ranks get nothing)
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_launch(launched: bool) -> None:
    if not launched:
        raise UserError("--fsdp shards the model over torchrun's processes; launch it with "
                        "`torchrun --nproc_per_node=N train_sft.py ... --fsdp` (one process per GPU)")


def check_options(cfg, launched: bool, compute_dtype: Optional[torch.dtype]) -> None:
    """Refuse what --fsdp cannot run, before anything is built."""
    check_launch(launched)
    if compute_dtype == torch.float16:  # would need a gradient scaler that knows the shards
        raise UserError("--fsdp trains in float32 or bfloat16, not float16; pass --dtype bfloat16 "
                        "(or --dtype float32 on GPUs without bfloat16)")


def shard(model: GPT, device: torch.device, compute_dtype: Optional[torch.dtype]) -> GPT:
    """Shard the model in place over all ranks (its parameters become DTensors); returns it."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if compute_dtype == torch.bfloat16 else MixedPrecisionPolicy())
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest; wte and lm_head are one tensor in one unit
    # generate() runs the blocks and the head without forward(): gather the root's weights for it too
    register_fsdp_forward_method(model, "generate")
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded result (e.g. clip_grad_norm_'s norm over DTensor gradients) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_model(model: GPT, frozen: bool = False) -> Optional[GPT]:
    """Collective. Rank 0 gets an unsharded GPT on its CPU to save (full weights; for LoRA only
    the adapters, the frozen base stays on the meta device, which saving never reads, unless
    `frozen` asks for it too: the random base a LoRA run saves once); other ranks get None."""
    settings = lora.lora_settings(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                               ignore_frozen_params=settings is not None and not frozen)
    state = get_model_state_dict(model, options=options)
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):  # no memory: load_state_dict(assign=True) puts the gathered tensors in
        copy = GPT(model.config)
        if settings is not None:
            lora.apply_lora(copy, settings.rank, settings.alpha, dropout=settings.dropout,
                            targets=settings.targets, layers=settings.layers, rslora=settings.rslora,
                            dora=settings.dora)
    state.pop("lm_head.weight", None)  # the same tensor as wte
    result = copy.load_state_dict(state, strict=False, assign=True)
    copy.lm_head.weight = copy.transformer.wte.weight  # assign replaced wte: tie the head again
    missing = {k for k in result.missing_keys if k != "lm_head.weight"}
    if result.unexpected_keys or any(dict(copy.named_parameters())[k].requires_grad for k in missing):
        raise RuntimeError(f"gathered state does not match the model: missing {sorted(missing)}, "
                           f"unexpected {result.unexpected_keys}")
    return copy


def gather_optimizer_state(model: GPT, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: the full optimizer state keyed by parameter name, on rank 0 ({} elsewhere)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL_ON_RANK0)


def load_optimizer_state(model: GPT, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Each rank takes its shard of a full optimizer state (every rank passes the whole state)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _bytes(tensors) -> tuple[int, int]:
    """(bytes of the shards this rank holds, bytes of the full tensors) over the sharded tensors."""
    sharded = [t for t in tensors if isinstance(t, DTensor)]
    return (sum(t.to_local().numel() * t.element_size() for t in sharded),
            sum(t.numel() * t.element_size() for t in sharded))  # a DTensor's numel is the full tensor's


def report_local_bytes(model: GPT, optimizer: torch.optim.Optimizer) -> None:
    """After the first optimizer step (gradients and optimizer state both exist), each rank prints
    one line `fsdp shard bytes: {...}` with the parameter, gradient and optimizer-state bytes it
    holds and those of the full tensors: what sharding saves, measured. The optimizer's unsharded
    tensors (AdamW's scalar step counts, on every rank) are counted apart."""
    def measure(opt, args, kwargs):
        handle.remove()
        params = list(model.parameters())
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        figures = {"rank": dist.get_rank(), "params": _bytes(params),
                   "grads": _bytes(p.grad for p in params if p.grad is not None), "optimizer": _bytes(state),
                   "optimizer_unsharded": sum(t.numel() * t.element_size() for t in state
                                              if not isinstance(t, DTensor))}
        tqdm.write("fsdp shard bytes: " + json.dumps(figures))
    handle = optimizer.register_step_post_hook(measure)
