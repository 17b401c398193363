"""A memory plan before a run starts: the bytes one rank will need for weights, gradients,
optimizer state and activations, from the architecture and the training shape alone (no model
is built), and the largest micro-batch that fits a budget.

What is counted, and why (GPT-2 as model.py builds it, trained as train_sft.Trainer does):

- Weights: every parameter once (the head is tied to wte), in the weight dtype, plus the LoRA
  A and B matrices. Gradients and optimizer state exist only for trainable parameters and have
  the parameter's dtype; AdamW keeps two buffers, momentum/Nesterov one, SGD none (optim.OPTIMIZERS).
  FSDP divides these three by the world size, and adds the full weights it gathers in the compute
  dtype while forward and backward run: the root unit's (embeddings and final LayerNorm; FSDP2
  keeps the root gathered from forward to backward) and two blocks' (the one running and the
  next, prefetched). DDP adds one gradient-sized bucket buffer (its default
  gradient_as_bucket_view=False copies the gradients into buckets). Neither is measured on a GPU.
- Activations: the tensors autograd saves in the forward, counted from model.py's ops (audited
  against torch's saved-tensor hooks in bench/bench_memplan.py). Per block, when gradients flow
  through it: the LayerNorm inputs and their mean/rstd, each linear's input where its weight (or
  its LoRA A) trains, the fused attention's q/k/v, output and logsumexp (no T x T matrix), the
  GELU input; with LoRA the rank-r `xa` per adapted linear (LoRALinear adds its update in place,
  so no full-width temporary is saved). Under autocast a linear saves its input in the compute
  dtype and a compute-dtype copy of its weight. Frozen linears save no input, and with LoRA
  nothing below the first adapter needs gradients, so nothing there is saved. With dropout the
  masks are saved too, and attention takes the unfused path, which saves the T x T
  probabilities (CPU's fused kernel has no dropout; on CUDA this overestimates). Activation
  checkpointing keeps only each block's input and recomputes one block at a time in backward.
- The head on the target rows (model.chunked_head_loss): ce_chunk rows of logits and their float32
  log-probabilities at a time (ce_chunk 0: all rows), with the gradients with respect to the rows
  and the tied weight computed in forward and saved; nothing of the vocabulary width is held.
  On all positions (head_on_targets_only off): the logits, which the caller holds, their float32
  log-softmax, and in backward two float32 gradients of the same size.

The peak is the largest of three moments: the loss (all activations alive, plus the head's
logits and gradients), the end of backward in full fine-tuning (every gradient plus the
embedding's dense gradient before it is added into the tied wte gradient), and the optimizer
step (gradients + state + the foreach temporaries: AdamW and Nesterov build one gradient-sized
list). Optimizer state is counted as already there (every step after the first); with
grad_accum > 1 the gradients of earlier micro-batches are there too.

The tensors alive at the peak are `live`; `total` adds `allocator_slack` (10%) on all but the
weights, for memory the allocator holds beyond live tensors: on CPU, glibc keeps freed
mid-sized blocks in its heap, typically 5-15% above the live tensors in bench/bench_memplan.py's
runs, but up to three times the live activations with activation checkpointing, whose
recomputation churns the heap (see bench/RESULTS.md); on CUDA the caching allocator's
reserved-over-allocated bytes play the same part. The process itself (the framework's code, the
CUDA context) is not included.

Sizes are decimal: GB = 10**9 bytes, MB = 10**6 (format_plan prints GB from 0.1 GB up, MB or KB below);
parse_size also accepts GiB.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

import devices
from errors import UserError
from lora import LORA_TARGETS, TARGET_WIDTHS
from optim import OPTIMIZERS

GB = 10**9
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class PlanInputs:
    """Everything the memory of one training step depends on."""
    # architecture (GPTConfig)
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int
    dropout: float = 0.0
    grad_checkpointing: bool = False
    # training shape
    batch_size: int = 8  # micro-batch rows per rank
    seq_len: int = 1024
    grad_accum: int = 1
    weight_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32  # autocast dtype; float32 = no autocast
    lora: bool = False
    rank: int = 16
    dora: bool = False  # DoRA: a magnitude vector per adapted linear, and its saved tensors
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_layers: Optional[tuple[int, ...]] = None  # None = every block
    optimizer: str = "adamw"
    head_on_targets_only: bool = True
    target_fraction: float = 0.5  # share of positions that carry a target (the rest: prompt, padding)
    ce_chunk: int = 0  # rows of logits at a time; 0 = the whole head at once
    world_size: int = 1
    fsdp: bool = False  # shard weights, gradients and optimizer state over the ranks
    allocator_slack: float = 0.10  # share added to all but the weights for the allocator's fragmentation

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"memory plan: unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown:
            raise UserError(f"memory plan: unknown LoRA targets {unknown}; valid: {', '.join(LORA_TARGETS)}")
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "batch_size", "seq_len", "grad_accum",
                     "rank", "world_size"):
            if getattr(self, name) < 1:
                raise UserError(f"memory plan: {name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len > self.block_size:
            raise UserError(f"memory plan: sequence length {self.seq_len} exceeds the context of "
                            f"{self.block_size}; lower --max-seq-len")
        if not 0.0 < self.target_fraction <= 1.0 or self.ce_chunk < 0 or self.allocator_slack < 0:
            raise UserError(f"memory plan: need 0 < target_fraction <= 1, ce_chunk >= 0 and allocator_slack "
                            f">= 0, got {self.target_fraction}, {self.ce_chunk} and {self.allocator_slack}")

    @classmethod
    def from_configs(cls, model_cfg, train_cfg, world_size: int = 1, fsdp: bool = False,
                     seq_len: Optional[int] = None, **overrides) -> "PlanInputs":
        """From a GPTConfig and a TrainConfig; seq_len defaults to max_seq_len (0: block_size).
        --dtype is read as on CPU ("auto" = float32): on a GPU pass the resolved autocast dtype,
        compute_dtype=setup.compute_dtype or torch.float32. Other keywords replace fields too."""
        seq = seq_len or min(train_cfg.max_seq_len or model_cfg.block_size, model_cfg.block_size)
        compute = devices.compute_dtype(train_cfg.dtype, torch.device("cpu"), devices.Facts()) or torch.float32
        fields = dict(
            n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, n_embd=model_cfg.n_embd,
            vocab_size=model_cfg.vocab_size, block_size=model_cfg.block_size, dropout=model_cfg.dropout,
            grad_checkpointing=model_cfg.grad_checkpointing, batch_size=train_cfg.batch_size,
            seq_len=seq, grad_accum=train_cfg.grad_accum, compute_dtype=compute,
            lora=train_cfg.lora, rank=train_cfg.rank, dora=train_cfg.lora and train_cfg.dora,
            lora_targets=tuple(train_cfg.lora_targets),
            lora_layers=None if train_cfg.lora_layers is None else tuple(train_cfg.lora_layers),
            optimizer=train_cfg.optimizer, head_on_targets_only=train_cfg.head_on_targets_only,
            ce_chunk=getattr(train_cfg, "ce_chunk", 0), world_size=world_size, fsdp=fsdp)
        return cls(**{**fields, **overrides})

    def lora_blocks(self) -> tuple[int, ...]:
        if not self.lora:
            return ()
        if self.lora_layers is None:
            return tuple(range(self.n_layer))
        return tuple(sorted({i % self.n_layer for i in self.lora_layers}))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank. `live` is the tensors alive at the predicted peak of a training step, the
    largest of the three moments `at_loss`, `at_backward_end` and `at_optimizer_step`
    (tensors only); `total` adds the allocator's slack. `activations` is the most
    that activations and the head's logits take at once (at the loss). The parts can add up
    to more than the total: in full fine-tuning without grad_accum the gradients are allocated while
    backward frees the activations, so the two never peak together."""
    inputs: PlanInputs
    params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    live: int
    total: int
    at_loss: int
    at_backward_end: int
    at_optimizer_step: int
    peak_moment: str
    fsdp_gathered: int = 0  # full weights FSDP holds gathered during forward and backward (0 without FSDP)

    def to_dict(self) -> dict:
        """For hyperparams.json: the inputs (dtypes by name) and every figure in bytes."""
        inputs = {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
                  for k, v in dataclasses.asdict(self.inputs).items()}
        figures = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "inputs"}
        return {"inputs": inputs, **figures}


# ------------------------------------------------------------------------------ parameters

def _unit_params(p: PlanInputs) -> tuple[int, int, int]:
    """Parameters of the model's parts as FSDP shards them: (the root: wte, which is also the
    head, wpe and ln_f; one block; one adapted block's adapters, 0 without LoRA)."""
    d = p.n_embd
    root = p.vocab_size * d + p.block_size * d + 2 * d
    block = 12 * d * d + 13 * d  # 4 linears (12 d^2 weights, 9 d biases) + 2 LayerNorms (4 d)
    if not p.lora:
        return root, block, 0
    magnitude = 1 if p.dora else 0  # DoRA's vector: one entry per output feature
    adapters = sum((p.rank * (i + o) + magnitude * o) * d for t, (i, o) in TARGET_WIDTHS.items()
                   if t in p.lora_targets)
    return root, block, adapters


def count_params(p: PlanInputs) -> tuple[int, int]:
    """(all parameters including LoRA, trainable parameters), as model.GPT + lora.apply_lora build them."""
    root, block, per_block = _unit_params(p)
    base = root + p.n_layer * block
    if not p.lora:
        return base, base
    adapters = len(p.lora_blocks()) * per_block
    return base + adapters, adapters


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------ activations

def saved_activation_bytes(p: PlanInputs) -> int:
    """Bytes autograd saves in one micro-batch's forward (blocks, embedding, final LayerNorm and the
    head); not the logits the caller holds. bench/bench_memplan.py --audit compares this with the
    tensors torch actually saves."""
    full = not p.lora
    flowing = full  # does the gradient flow at this point of the forward?
    lora_blocks = set(p.lora_blocks())
    n, res = p.batch_size * p.seq_len, _nbytes(p.weight_dtype)
    total = 0
    if full:
        total += (n + p.seq_len) * 8  # token and position ids, kept by the embedding backward
    if p.dropout > 0 and flowing:
        total += n * p.n_embd * res  # the embedding dropout's mask
    for i in range(p.n_layer):
        saved, flowing_after = _block_saved(p, flowing, full, p.lora_targets if i in lora_blocks else ())
        if p.grad_checkpointing:
            saved = n * p.n_embd * res if flowing_after else 0  # only the block's input is kept
        total += saved
        flowing = flowing_after
    total += n * p.n_embd * res + 2 * n * 4  # ln_f: input and mean/rstd (LayerNorm runs in float32)
    return total + _head_saved(p)


def _block_saved(p: PlanInputs, flowing: bool, full: bool, targets) -> tuple[int, bool]:
    """Bytes one block saves, walking its ops in order; and whether gradients flow out of it."""
    n, d, r = p.batch_size * p.seq_len, p.n_embd, p.rank
    res, c = _nbytes(p.weight_dtype), _nbytes(p.compute_dtype)
    autocast = p.compute_dtype != p.weight_dtype
    layer_norm = n * d * res + 2 * n * 4  # input + float32 mean and rstd

    def linear(name: str) -> int:
        nonlocal flowing
        d_in, d_out = (w * d for w in TARGET_WIDTHS[name])
        adapted = name in targets
        # the input, for the weight (or LoRA A) gradient; a flowing attention already saved its
        # output, which is c_proj's input (the same storage, unless autocast casts a float32 output)
        shared = name == "attn.c_proj" and flowing and not (autocast and p.dropout > 0)
        saved = n * d_in * c if (full or adapted) and not shared else 0
        if flowing and autocast:
            saved += d_in * d_out * c  # the compute-dtype copy of the weight, for the input gradient
        if adapted:
            saved += n * r * c  # xa, for lora_B's gradient
            if autocast:  # compute-dtype copies of B (for xa's gradient) and of A (for the input's)
                saved += r * d_out * c + (r * d_in * c if flowing else 0)
            if p.dora:
                saved += _dora_saved(p, d_out, flowing)
        flowing = flowing or full or adapted
        return saved

    total = layer_norm if flowing else 0
    total += linear("attn.c_attn")
    if flowing:
        if p.dropout > 0 and autocast:  # the unfused path runs in float32 under autocast: q, k, v copies,
            total += 3 * n * d * 4 + 3 * p.batch_size * p.n_head * p.seq_len ** 2 * 4  # probabilities, mask, dropped
        elif p.dropout > 0:  # unfused attention: q, k, v copies, output, probabilities, dropout mask, dropped
            total += 4 * n * d * c + 3 * p.batch_size * p.n_head * p.seq_len ** 2 * c
        else:  # fused attention: q/k/v (one storage), output, float32 logsumexp per head
            total += 4 * n * d * c + n * p.n_head * 4
    total += linear("attn.c_proj")
    if flowing:
        total += layer_norm + (n * d * c if p.dropout > 0 else 0)  # ln_2; attention's residual dropout mask
    total += linear("mlp.c_fc")
    if flowing:
        total += 4 * n * d * c  # GELU's input
    total += linear("mlp.c_proj")
    if flowing and p.dropout > 0:
        total += n * d * c  # the MLP's residual dropout mask
    return total, flowing


def _dora_saved(p: PlanInputs, d_out: int, flowing: bool) -> int:
    """What lora.DoRALinear saves beyond LoRA: for the magnitude's gradient the base output W x
    and the update s B A x ([tokens, out] each); the float32 norm it is divided by, the factor
    m / norm (a compute-dtype copy under autocast) and, when gradients flow into x, factor - 1.
    (With dropout the base output is recomputed on the dropped input: the same sizes.)"""
    n, c = p.batch_size * p.seq_len, _nbytes(p.compute_dtype)
    return 2 * n * d_out * c + d_out * 4 + d_out * c + (d_out * c if flowing else 0)


def _head_rows(p: PlanInputs) -> int:
    n = p.batch_size * p.seq_len
    return max(1, round(p.target_fraction * n)) if p.head_on_targets_only else n


def _head_saved(p: PlanInputs) -> int:
    """The head's saved tensors. On the target rows (model.chunked_head_loss) the gradients are
    computed in forward and saved: dh [rows, C] in h's (the weights') dtype, dw [vocab, C] when the
    tied embedding trains, and the gathered rows' indices. On all positions (plain cross-entropy):
    the head's input, the float32 log-softmax and the targets."""
    rows, d, v = _head_rows(p), p.n_embd, p.vocab_size
    res, c = _nbytes(p.weight_dtype), _nbytes(p.compute_dtype)
    if p.head_on_targets_only:
        # the row indices are a slice of an argsort over all positions, whose storage is kept
        return p.batch_size * p.seq_len * 8 + rows * d * res + (0 if p.lora else v * d * res)
    saved = rows * 8 + 4 + rows * v * 4  # targets, the loss's total weight, the log-softmax
    if not p.lora:
        saved += rows * d * c
    if p.compute_dtype != p.weight_dtype:
        saved += v * d * c  # the compute-dtype copy of the tied head weight
    return saved


def _held_logits(p: PlanInputs) -> int:
    """The logits model.forward returns on all positions, which train_sft holds until its step
    returns (on the target rows it returns none)."""
    return 0 if p.head_on_targets_only else _head_rows(p) * p.vocab_size * _nbytes(p.compute_dtype)


def _head_transient(p: PlanInputs) -> int:
    """What the head adds to the saved tensors at its worst moment. On the target rows: in forward
    one chunk's logits and float32 log-probabilities (and under autocast the weight's copy), or in
    backward the scaled copies of dh and dw, whichever is larger. On all positions: the held logits
    and the float32 gradients of the log-softmax and of the logits."""
    rows, d, v = _head_rows(p), p.n_embd, p.vocab_size
    res, c = _nbytes(p.weight_dtype), _nbytes(p.compute_dtype)
    if not p.head_on_targets_only:
        return _held_logits(p) + rows * v * (4 + 4)
    chunk = min(p.ce_chunk or rows, rows)
    forward = chunk * v * (c + 4) + (v * d * c if p.compute_dtype != p.weight_dtype else 0)
    backward = rows * d * res + (0 if p.lora else v * d * res)
    return max(forward, backward)


def _block_backward_transient(p: PlanInputs) -> int:
    """Gradients alive inside one block's backward (the residual stream's and the MLP's two
    4d-wide ones), plus, with checkpointing, the recomputed block's saved tensors."""
    n, d = p.batch_size * p.seq_len, p.n_embd
    extra = n * d * (1 + 4 + 4) * 4
    if p.grad_checkpointing:
        extra += _block_saved(p, True, not p.lora, p.lora_targets if p.lora else ())[0]
    return extra


def fsdp_gathered_bytes(p: PlanInputs) -> int:
    """The unsharded weights FSDP2 holds at once in forward and backward: the root unit (wte, which
    is also the head, wpe and ln_f) and two blocks with their adapters, in the compute dtype (the
    MixedPrecisionPolicy's param_dtype; float32 without autocast)."""
    if not p.fsdp or p.world_size == 1:
        return 0
    root, block, adapters = _unit_params(p)
    return (root + 2 * (block + adapters)) * _nbytes(p.compute_dtype)


# ------------------------------------------------------------------------------ the plan

def plan(p: PlanInputs) -> MemoryPlan:
    params, trainable = count_params(p)
    wbytes = _nbytes(p.weight_dtype)
    shard = p.world_size if p.fsdp else 1
    weights = math.ceil(params / shard) * wbytes
    gradients = math.ceil(trainable / shard) * wbytes
    state = OPTIMIZERS[p.optimizer] * gradients
    ddp_buckets = gradients if p.world_size > 1 and not p.fsdp else 0
    grads_in_forward = gradients if p.grad_accum > 1 else 0  # earlier micro-batches' gradients
    # The loss: all saved activations alive, plus the head's logits and gradients; or, if
    # larger (chunked head, checkpointing), the last block's backward once the head's saved tensors
    # are freed (the held logits are not).
    activations = saved_activation_bytes(p)
    # the head's weight gradient, whole: FSDP reduce-scatters it only once backward has produced it
    wte_grad = p.vocab_size * p.n_embd * wbytes if not p.lora else 0
    activation_peak = max(activations + _head_transient(p),
                          activations - _head_saved(p) + _held_logits(p) + _block_backward_transient(p) + wte_grad)
    gathered = fsdp_gathered_bytes(p)
    at_loss = weights + state + grads_in_forward + ddp_buckets + activation_peak + gathered
    # End of backward (trainable embedding): every gradient, plus the dense embedding gradient
    # that is then added into wte's gradient (which the head already wrote).
    held = _held_logits(p)  # the last micro-batch's logits live until the step returns
    at_end = weights + state + gradients + ddp_buckets + held + wte_grad + gathered
    temporaries = gradients if p.optimizer in ("adamw", "nesterov") else 0
    at_step = weights + state + gradients + ddp_buckets + held + temporaries
    moments = {"loss": at_loss, "end of backward": at_end, "optimizer step": at_step}
    peak_moment = max(moments, key=moments.get)
    live = moments[peak_moment]
    total = live + round(p.allocator_slack * (live - weights))
    return MemoryPlan(inputs=p, params=params, trainable_params=trainable, weights=weights, gradients=gradients,
                      optimizer_state=state, activations=activation_peak, live=live, total=total,
                      at_loss=at_loss, at_backward_end=at_end, at_optimizer_step=at_step,
                      peak_moment=peak_moment, fsdp_gathered=gathered)


def format_plan(mp: MemoryPlan) -> str:
    """A few lines for --dry-run and the start of training."""
    p = mp.inputs
    method = f"{'DoRA' if p.dora else 'LoRA'} r={p.rank}" if p.lora else "full fine-tuning"
    ranks = f", {p.world_size} ranks{' (FSDP)' if p.fsdp else ' (DDP)'}" if p.world_size > 1 else ""
    return "\n".join([
        f"memory plan per rank: batch {p.batch_size} x {p.seq_len} tokens x grad_accum {p.grad_accum}, {method}, "
        f"{p.optimizer}, compute {str(p.compute_dtype).removeprefix('torch.')}"
        f"{', activation checkpointing' if p.grad_checkpointing else ''}{ranks}",
        f"  weights {_gb(mp.weights)}, gradients {_gb(mp.gradients)}, optimizer state {_gb(mp.optimizer_state)}, "
        f"activations {_gb(mp.activations)}" + (f", FSDP's gathered units {_gb(mp.fsdp_gathered)}"
                                                  if mp.fsdp_gathered else ""),
        f"  peak {_gb(mp.total)}: tensors {_gb(mp.live)} at the {mp.peak_moment}, plus "
        f"{100 * p.allocator_slack:.0f}% allocator slack on all but the weights"])


def versus_measured(mp: MemoryPlan, peak_mb: Optional[float], peak_of: Optional[str]) -> Optional[str]:
    """One line for the end of a run: its measured peak (runs.summarize's peak_mem_mb, MB of 2**20
    bytes) beside the plan, both in format_plan's decimal units. CUDA's peak allocated bytes are
    tensors, as `live` counts them, so the plan's error is printed; a CPU run's RSS holds the
    whole process (libtorch, the interpreter), which the plan leaves out, so the two are only set
    side by side."""
    if peak_mb is None:
        return None
    peak = round(peak_mb * 2**20)
    if peak_of == "peak_alloc_mb":
        return (f"memory: peak allocated {_gb(peak)} per rank; the plan said {_gb(mp.live)} of tensors "
                f"({100 * (mp.live / peak - 1):+.1f}%)")
    return (f"memory: peak RSS {_gb(peak)} (the whole process); the plan said {_gb(mp.total)} "
            f"of tensors and allocator slack per rank")


def _gb(n_bytes: int) -> str:
    """Decimal units: GB from 0.1 GB up (the sizes GPU budgets are given in), MB or KB below (tiny models)."""
    if n_bytes >= 10**8:
        return f"{n_bytes / GB:.2f} GB"
    return f"{n_bytes / 10**6:.1f} MB" if n_bytes >= 10**5 else f"{n_bytes / 10**3:.1f} KB"


# ------------------------------------------------------------------------------ budgets

def parse_size(text: str) -> int:
    """'15GB' -> 15 * 10**9 bytes, '15GiB' -> 15 * 2**30; B, KB, MB, GB, TB and KiB ... TiB,
    case-insensitive, a space allowed."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--max-memory {text!r}: give a positive size with a unit, e.g. 15GB (10**9 bytes) or "
                        f"14GiB (2**30 bytes); units: {', '.join(u.replace('I', 'i') for u in _UNITS)}")
    return int(float(match.group(1)) * _UNITS[unit])


def propose(p: PlanInputs, max_bytes: int) -> tuple[PlanInputs, str]:
    """A micro-batch / activation-checkpointing choice that fits max_bytes, with grad_accum raised
    so that the global batch (batch_size x grad_accum) stays exactly what it was (so micro-batches
    that divide it). The largest
    micro-batch without checkpointing, unless checkpointing fits more than twice as many rows:
    recomputing every block costs about a third more compute, more than halving the micro-batch
    usually does. Checkpointing already on stays on. Raises UserError when nothing fits."""
    if plan(p).total <= max_bytes:
        return p, f"fits: {_gb(plan(p).total)} <= {_gb(max_bytes)}, nothing changed"
    global_batch = p.batch_size * p.grad_accum

    def largest(checkpointing: bool) -> Optional[PlanInputs]:
        for batch in (b for b in range(p.batch_size, 0, -1) if global_batch % b == 0):
            candidate = dataclasses.replace(p, batch_size=batch, grad_accum=global_batch // batch,
                                            grad_checkpointing=checkpointing)
            if plan(candidate).total <= max_bytes:
                return candidate
        return None

    plain = None if p.grad_checkpointing else largest(False)
    recomputed = largest(True)
    if recomputed is not None and (plain is None or recomputed.batch_size > 2 * plain.batch_size):
        chosen = recomputed
    else:
        chosen = plain
    if chosen is not None:
        changes = [f"batch_size {p.batch_size} -> {chosen.batch_size}"] if chosen.batch_size != p.batch_size else []
        if chosen.grad_accum != p.grad_accum:
            changes.append(f"grad_accum {p.grad_accum} -> {chosen.grad_accum}")
        if chosen.grad_checkpointing != p.grad_checkpointing:
            changes.append("activation checkpointing on")
        return chosen, (f"{_gb(plan(p).total)} > {_gb(max_bytes)}: {', '.join(changes)} (global batch "
                        f"{chosen.batch_size * chosen.grad_accum}) needs {_gb(plan(chosen).total)}")
    smallest = plan(dataclasses.replace(p, batch_size=1, grad_accum=global_batch, grad_checkpointing=True))
    raise UserError(
        f"--max-memory {_gb(max_bytes)}: nothing fits; even batch 1 with activation checkpointing needs "
        f"{_gb(smallest.total)} (weights {_gb(smallest.weights)}, gradients {_gb(smallest.gradients)}, optimizer "
        f"state {_gb(smallest.optimizer_state)}); use LoRA, a lighter optimizer, shorter sequences, or more memory")
