"""GPT-2 in one file: the module, Hugging Face checkpoint import/export, and KV-cached generation.

Module names follow Hugging Face's GPT2LMHeadModel (transformer.h.0.attn.c_attn, ...) so a
checkpoint maps onto this model name for name. HF stores its linears as Conv1D with weights of
shape (in, out); here they are plain nn.Linear (out, in), transposed on the way in and out.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import IGNORE_INDEX
from errors import UserError, check_range, one_line
from files import write_atomic, write_text_atomic
from tokenizer import tokenizer_files



@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum context length (HF: n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # one knob for embedding, attention and residual dropout
    neftune_alpha: float = 0.0  # NEFTune: noise on the token embeddings while training (0 = off); see embed
    layer_norm_epsilon: float = 1e-5
    grad_checkpointing: bool = False  # recompute each block in backward to save activation memory

    def check(self) -> None:
        for flag, value in (("--block-size", self.block_size), ("--vocab-size", self.vocab_size),
                            ("--n-layer", self.n_layer), ("--n-head", self.n_head), ("--n-embd", self.n_embd)):
            check_range(flag, value, 1)
        check_range("--layer-norm-epsilon", self.layer_norm_epsilon, 0, low_open=True)
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout: dropout probabilities must be in [0, 1), got {self.dropout}")
        check_range("--neftune-alpha", self.neftune_alpha, 0)


class KVCache:
    """Keys and values of every layer for the positions processed so far, preallocated."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled; GPT.hidden_states advances it after the last layer

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values of one layer; return all of them so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.layer_idx = layer_idx  # which slot of a KVCache is ours

    def forward(self, x, attn_mask=None, cache: KVCache | None = None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)
        # Without an explicit mask this is plain causal attention (training, scoring); generation
        # passes a mask because of left padding and cached positions.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream by depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once

    # ------------------------------------------------------------------ forward

    def hidden_states(self, idx, position_ids=None, attn_mask=None, cache: KVCache | None = None, lengths=None):
        """Final-LayerNorm output [B, T, C]. With a cache, pass position_ids and attn_mask too.
        lengths [B]: each row's real tokens (the rest is right padding), for NEFTune only."""
        T = idx.size(1)
        if position_ids is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} exceeds the context of {self.config.block_size}")
            position_ids = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.embed(idx, lengths) + self.transformer.wpe(position_ids))
        for block in self.transformer.h:
            if self.config.grad_checkpointing and self.training:
                x = checkpoint(block, x, attn_mask, cache, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def embed(self, idx, lengths=None):
        """Token embeddings; while training with neftune_alpha > 0, plus NEFTune's noise (Jain et
        al. 2023): uniform in [-1, 1] times alpha / sqrt(L d), d = n_embd and L the row's real
        tokens (lengths; None: every position is real), zero on padding. This is the paper's own
        code (its train.py scales by the attention mask's length and masks the padding);
        transformers' NEFTune hook instead takes L as the padded width and noises the padding."""
        emb = self.transformer.wte(idx)
        if not (self.training and self.config.neftune_alpha > 0):
            return emb
        B, T, d = emb.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=idx.device)
        lengths = torch.as_tensor(lengths, device=idx.device)
        real = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]  # [B, T]
        scale = (self.config.neftune_alpha / torch.sqrt(lengths.clamp(min=1).float() * d)).to(emb.dtype)
        noise = torch.empty_like(emb).uniform_(-1, 1)
        return emb + noise * (real[:, :, None] * scale[:, None, None])

    def forward(self, idx, targets=None, *, reduction: str = "mean", targets_only: bool = False,
                n_targets: int | None = None, ce_chunk: int = 0, lengths=None):
        """Returns (logits, loss). Targets are already shifted (targets[:, t] follows idx[:, t]);
        IGNORE_INDEX marks positions without one. reduction "sum" lets a training step divide by
        the target tokens of all its micro-batches.

        targets_only runs the vocabulary head and the loss only where a target exists, ce_chunk
        rows at a time (0: all at once), and returns no logits: in SFT most positions are the
        masked prompt or padding, and the head is the largest matmul. n_targets, the number of
        targets, fixes the shapes; the training loop counts it on the host for free. Left None,
        it is read from the device (a sync, and a graph break under torch.compile)."""
        h = self.hidden_states(idx, lengths=lengths)  # lengths: real tokens per row, for NEFTune
        if targets is None:
            return self.lm_head(h), None
        if targets_only:
            return None, self.target_loss(h, targets, reduction, n_targets, ce_chunk)
        if n_targets is not None or ce_chunk:
            raise ValueError("n_targets and ce_chunk apply to targets_only=True (this path returns every logit)")
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)
        return logits, loss

    def target_loss(self, h, targets, reduction: str, n_targets: int | None, ce_chunk: int):
        """Cross-entropy of the head on the target rows of h [B, T, C]. The rows are gathered by
        index with a static shape, not by a boolean mask, whose shape only the device knows."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum' with targets_only, got {reduction!r}")
        if ce_chunk < 0:
            raise ValueError(f"ce_chunk must be >= 0 (0: one chunk), got {ce_chunk}")
        flat = targets.reshape(-1)
        if n_targets is None:
            n_targets = int((flat != IGNORE_INDEX).sum())
        rows = target_rows(flat, n_targets)
        total = chunked_head_loss(h.reshape(-1, h.size(-1)).index_select(0, rows), self.lm_head.weight,
                                  flat.index_select(0, rows), ce_chunk or max(n_targets, 1))
        return total if reduction == "sum" else total / n_targets

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eot_id: int | None = None,
                 seed: int | None = None, use_cache: bool = True) -> list[list[int]]:
        """Continue each prompt; returns the new tokens of each, without the EOT that ended it.

        Prompts of different lengths share a batch by left padding: padded positions are masked
        out of attention and do not advance the position ids, so each row computes what it
        would compute alone. temperature 0 is greedy decoding. Prompts longer than
        block_size - max_new_tokens keep their last tokens.
        """
        budget = self.config.block_size - max_new_tokens
        if budget < 1 or not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("need non-empty prompts and max_new_tokens < block_size")
        prompts = [list(p)[-budget:] for p in prompts]
        was_training = self.training
        self.eval()  # no dropout while generating
        try:
            return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, eot_id, seed, use_cache)
        finally:
            self.train(was_training)

    def _generate(self, prompts, max_new_tokens, temperature, top_k, top_p, eot_id, seed, use_cache):
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros((B, P), dtype=torch.long, device=device)
        valid = torch.zeros((B, P), dtype=torch.bool, device=device)  # False on left padding
        for row, p in enumerate(prompts):
            tokens[row, P - len(p):] = torch.tensor(p, device=device)
            valid[row, P - len(p):] = True
        cache = KVCache(self.config, B, P + max_new_tokens, device, self.lm_head.weight.dtype) if use_cache else None
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            start = cache.length if cache is not None else 0  # positions already in the cache
            mask = _attention_mask(valid, start)
            positions = (valid.cumsum(-1) - 1).clamp(min=0)[:, start:]
            h = self.hidden_states(tokens[:, start:], positions, mask, cache)
            logits = self.lm_head(h[:, -1]).float()
            next_token = _sample(logits, temperature, top_k, top_p, generator)
            if eot_id is not None:
                next_token = torch.where(finished, eot_id, next_token)
                finished |= next_token == eot_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
            if finished.all():
                break
        return [_strip_after_eot(row[P:].tolist(), eot_id) for row in tokens]

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **overrides) -> "GPT":
        """Load a HF GPT-2 checkpoint: a local folder or a hub name such as "gpt2-medium".
        `overrides` replace GPTConfig fields that do not change the weights (dropout, ...)."""
        folder = resolve_checkpoint(source)
        config = dataclasses.replace(config_from_hf(folder), **overrides)  # a misspelt field is a TypeError
        model = cls(config)
        model.load_hf_state_dict(read_hf_state_dict(folder), origin=str(folder))
        return model

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], origin: str = "checkpoint") -> None:
        """Copy HF-named GPT-2 weights into this model; any mismatch is an error that lists it."""
        own = self.hf_state_dict()
        state = _normalize_hf_keys(state, origin)
        problems = state_mismatches({k: tuple(v.shape) for k, v in own.items()}, state)
        if problems:
            raise UserError(f"{origin}: weights do not fit a GPT-2 of this config; " + "; ".join(problems))
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state[name])

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under HF names and HF (Conv1D) orientation, as transposed views."""
        params = dict(self.named_parameters())
        state = {}
        for name in _hf_weight_names(self.config.n_layer):
            tensor = params[name]
            state[name] = tensor.t() if _is_conv1d(name) else tensor
        return state

    def save_pretrained(self, folder: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> None:
        """Write config.json + model.safetensors (+ vocab.json/merges.txt when the tokenizer is
        known) that transformers.GPT2LMHeadModel.from_pretrained loads."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.hf_state_dict().items()}
        write_atomic(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        config = json.dumps(config_to_hf(self.config), indent=2)
        write_text_atomic(folder / "config.json", config)
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), folder)


# ---------------------------------------------------------------------- generation helpers

def _attention_mask(valid: torch.Tensor, start: int) -> torch.Tensor:
    """Boolean mask [B, 1, T - start, T] for queries at positions start..T-1: causal, no padded
    keys. Each query may always see itself, so rows of pure padding never become all -inf."""
    T = valid.size(1)
    q = torch.arange(start, T, device=valid.device)[:, None]
    k = torch.arange(T, device=valid.device)[None, :]
    return (((k <= q) & valid[:, None, :]) | (k == q))[:, None]


def _sample(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass (keeps at least one)
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _strip_after_eot(tokens: list[int], eot_id: int | None) -> list[int]:
    return tokens[:tokens.index(eot_id)] if eot_id is not None and eot_id in tokens else tokens


# ---------------------------------------------------------------------- HF checkpoint format

# ---------------------------------------------------------------------------- chunked head + loss

def target_rows(targets: torch.Tensor, n_targets: int) -> torch.Tensor:
    """Indices of the first n_targets positions of flat targets that have a target, in order.
    A stable sort of the ignore flags puts those positions first: the shape is known in advance,
    unlike nonzero's. n_targets must be the true count (a larger one selects ignored positions,
    and the gather of their -100 target then fails; a smaller one drops targets)."""
    return torch.argsort((targets == IGNORE_INDEX).to(torch.uint8), stable=True)[:n_targets]


def chunked_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of the vocabulary head (logits = h @ weight.T) over the rows h [n, C]
    against targets [n], at most `chunk` rows of logits alive at a time, in forward and backward.

    Under autocast the matmuls run in its dtype and the softmax and loss in float32, as autocast
    runs linear and cross_entropy. Gradients flow into h and, when it requires grad (full
    fine-tuning; not LoRA), into weight (the embedding, tied to the head)."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    grads = torch.is_grad_enabled()
    return _ChunkedHeadLoss.apply(h, weight, targets, chunk, dtype,
                                  grads and h.requires_grad, grads and weight.requires_grad)


class _ChunkedHeadLoss(torch.autograd.Function):
    """A loop of chunks under plain autograd would keep every chunk's softmax for backward, all the
    logits again. Here forward computes each chunk's loss and its gradients with respect to the
    chunk's rows and to the weight, then drops the chunk; backward only scales those gradients
    by the incoming one. What lives from forward to backward is the size of h (and of weight)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype, grad_h: bool, grad_w: bool):
        w = weight.to(dtype)  # once, not once per chunk; no copy without autocast
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if grad_h else None
        dw = torch.zeros_like(weight) if grad_w else None  # summed over chunks in the weight's dtype
        for start in range(0, h.size(0), chunk):
            hc, tc = h[start:start + chunk].to(dtype), targets[start:start + chunk]
            # log_softmax, as cross_entropy takes it: x - logsumexp(x) rounds differently, by
            # ~eps * |max logit| in every exponent, ~1e-6 relative in the gradients
            logp = F.linear(hc, w).float().log_softmax(dim=-1)
            picked = logp.gather(1, tc[:, None])
            total = total - picked.sum()
            if not (grad_h or grad_w):
                continue
            # d(loss)/d(logits) = softmax - one_hot(target), made in place in log_softmax's buffer
            probs = logp.exp_().scatter_add_(1, tc[:, None], torch.full_like(picked, -1.0))
            dlogits = probs.to(dtype)
            if grad_h:
                dh[start:start + chunk] = dlogits @ w
            if grad_w and dw.dtype == dtype:
                dw.addmm_(dlogits.t(), hc)  # no [vocab, C] temporary
            elif grad_w:
                dw += dlogits.t() @ hc  # the autocast dtype's product, summed in the weight's
        ctx.grad_h, ctx.grad_w = grad_h, grad_w
        ctx.save_for_backward(dh, dw)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        return (dh * grad_total if ctx.grad_h else None, dw * grad_total if ctx.grad_w else None,
                None, None, None, None, None)


HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "openai-community/gpt2"; not "./x", "a/b/c"
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BLOCK_TENSORS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                  "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias")


def _hf_weight_names(n_layer: int) -> list[str]:
    return (["transformer.wte.weight", "transformer.wpe.weight"]
            + [f"transformer.h.{i}.{t}" for i in range(n_layer) for t in _BLOCK_TENSORS]
            + ["transformer.ln_f.weight", "transformer.ln_f.bias"])


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether a source that is not a local folder can be a hub repository id ("gpt2",
    "owner/name") rather than a mistyped path ("./x", "/x", "a/b/c")."""
    return _HUB_ID.match(str(source)) is not None


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D)


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def state_mismatches(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> list[str]:
    """Why `state` does not fit `expected` (key -> shape): its missing, unexpected and wrong-shape
    keys, each a short list (wrong shapes in `expected`'s order); empty when it fits."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {shape}"
                   for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    return [f"{what}: {_short_list(keys)}" for what, keys in
            (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]


def _normalize_hf_keys(state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Accept the hub's bare keys (h.0...) and save_pretrained's (transformer.h.0...); drop the
    attention-mask buffers old checkpoints carry; check that a stored lm_head is the tied wte."""
    out = {}
    for key, tensor in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints (the weights' biases end in c_attn.bias etc.)
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = tensor
    head = out.pop("lm_head.weight", None)
    wte = out.get("transformer.wte.weight")
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise UserError(f"{origin}: lm_head.weight differs from wte; only tied GPT-2 heads are supported")
    return out


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local checkpoint folder as is; a hub name downloaded (with a progress bar) to HF's cache."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or not is_hub_id(source):
        raise UserError(f"checkpoint folder {source} does not exist (or is not a folder)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id=str(source), allow_patterns=[
            "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
            "vocab.json", "merges.txt"]))
    except Exception as err:  # offline: a connection error or a missing-cache error, both the same to us
        raise UserError(
            f"cannot download {source!r} from the Hugging Face hub ({type(err).__name__}); pass a local "
            "folder with config.json and model.safetensors (or pytorch_model.bin) instead"
        ) from None


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # preferred first


def read_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face checkpoint folder: one file, or the shards its index lists
    (transformers shards what exceeds 5 GB when saving, gpt2-xl in float32 for one)."""
    for name in WEIGHT_FILES:
        single, index = folder / name, folder / f"{name}.index.json"
        if single.is_file():
            return read_weights_file(single)
        if index.is_file():
            return _read_shards(index)
    raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin (nor a sharded *.index.json)")


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors file, or of a torch pickle read with weights_only."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)  # never plain pickle
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise UserError(f"{path}: cannot read the weights ({one_line(err)}); the file is damaged or "
                            "incomplete, download or save it again") from None
        # A pickle holding more than tensors could run code when loaded: refused, and converted once.
        raise UserError(f"{path} is a PyTorch pickle holding more than tensors, which is not loaded because "
                        "unpickling it could run code; convert it once with transformers: "
                        "GPT2LMHeadModel.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER, "
                        "safe_serialization=True), then use NEW_FOLDER") from None
    except Exception as err:
        raise UserError(f"{path}: cannot read the weights ({one_line(err)}); "
                        "the file is damaged or incomplete, download or save it again") from None


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{index}: not a readable checkpoint index ({type(err).__name__}: {err})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = index.parent / str(shard)
        if Path(str(shard)).name != shard or not path.is_file():
            raise UserError(f"{index}: shard {shard!r} is missing from {index.parent}; download or save "
                            "the checkpoint again")
        state.update(read_weights_file(path))
    return state


def config_from_hf(folder: Path) -> GPTConfig:
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the model config ({err})") from None
    if not isinstance(hf, dict) or hf.get("model_type", "gpt2") != "gpt2":
        model_type = hf.get("model_type") if isinstance(hf, dict) else None
        raise UserError(f"{path}: not a GPT-2 config (model_type {model_type!r})")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if not isinstance(hf.get(k), int)]
    if missing:
        raise UserError(f"{path}: missing or non-integer {', '.join(missing)}")
    activation = hf.get("activation_function", "gelu_new")
    unsupported = {"activation_function": activation not in ("gelu_new", "gelu_pytorch_tanh"),
                   "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx")),
                   "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
                   "add_cross_attention": bool(hf.get("add_cross_attention"))}
    if any(unsupported.values()):
        names = [k for k, bad in unsupported.items() if bad]
        raise UserError(f"{path}: unsupported GPT-2 variant ({', '.join(f'{k}={hf.get(k)!r}' for k in names)})")
    if hf["n_embd"] % hf["n_head"]:
        raise UserError(f"{path}: n_embd {hf['n_embd']} is not divisible by n_head {hf['n_head']}")
    return GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))


def config_to_hf(config: GPTConfig) -> dict:
    eot = config.vocab_size - 1  # <|endoftext|> is GPT-2's last token
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "n_positions": config.block_size, "n_ctx": config.block_size, "vocab_size": config.vocab_size,
            "layer_norm_epsilon": config.layer_norm_epsilon, "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "bos_token_id": eot,
            "eos_token_id": eot, "initializer_range": 0.02, "tie_word_embeddings": True}


def copy_tokenizer_files(source: Path, folder: Path) -> None:
    """vocab.json + merges.txt under HF's names (OpenAI's encoder.json + vocab.bpe are the same data)."""
    files = tokenizer_files(source)
    for src, hf_name in zip(files or (), ("vocab.json", "merges.txt")):
        if src.resolve() != (folder / hf_name).resolve():
            data = src.read_bytes()
            write_atomic(folder / hf_name, lambda tmp: tmp.write_bytes(data))
