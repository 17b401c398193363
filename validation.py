"""The test loss of a model on an SFT dataset: the one loop behind training's evaluations and
eval.py's response loss. Mean cross-entropy per target (response) token over the whole set, and
its perplexity."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Optional

import torch

from data import SFTDataset, count_target_tokens, sorted_batches


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's perplexity is not a useful overflow


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, dataset: SFTDataset, batch_size: int, pad_id: int,
                  max_batches: Optional[int] = None,
                  precision: Callable[[], ContextManager] = contextlib.nullcontext, ce_chunk: int = 0) -> dict:
    """{"val_loss", "val_ppl"} over the dataset's length-sorted batches (the first `max_batches`
    of them, or all), the head run ce_chunk target rows at a time (0: all at once). The sum stays
    on the device and is read once at the end."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    targets = 0
    try:
        for x, y in sorted_batches(dataset, batch_size, pad_id, max_batches):
            n_targets = count_target_tokens(y)  # on the host, before the copy
            with precision():
                _, loss = model(x.to(device), y.to(device), reduction="sum", targets_only=True,
                                n_targets=n_targets, ce_chunk=ce_chunk)
            total += loss.double()
            targets += n_targets
    finally:
        model.train(was_training)
    loss = total.item() / targets
    return {"val_loss": loss, "val_ppl": perplexity(loss)}
