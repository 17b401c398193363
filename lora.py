"""LoRA for the GPT of model.py: wrap linears, freeze the rest, merge, report, save in PEFT's format.

A wrapped linear computes y = W x + b + s * B(A(dropout(x))) with A [r, in] Kaiming-uniform,
B [out, r] zero (so a fresh adapter changes nothing) and s = alpha / r (alpha / sqrt(r) with
rsLoRA); DoRA (`DoRALinear`) also rescales each output feature by a learned magnitude.
`LoRALinear` subclasses nn.Linear and keeps the base `weight`/`bias` under their own names, so
model.hf_state_dict() and save_pretrained() see the same base weights as before, and the adapter
tensors are `...c_attn.lora_A.weight` / `...c_attn.lora_B.weight`, PEFT's names.

On disk an adapter is what PEFT writes for GPT2LMHeadModel: adapter_config.json and
adapter_model.safetensors with keys `base_model.model.transformer.h.{i}.{target}.lora_{A,B}.weight`
(and `...{target}.lora_magnitude_vector` with DoRA).
A and B have nn.Linear orientation there even though GPT-2's HF layers are Conv1D.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError, check_range
from files import write_atomic, write_text_atomic
from model import read_weights_file, state_mismatches

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> GPT2LMHeadModel
# the linears LoRA can adapt in each block, with their (in, out) widths in units of n_embd
TARGET_WIDTHS = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}
LORA_TARGETS = tuple(TARGET_WIDTHS)


@dataclass
class LoRAConfig:
    """The LoRA options of a training run (flags --lora, --rank, ...); `settings` turns them into the
    LoRASettings that apply_lora uses and returns."""
    lora: bool = False
    rank: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_layers: Optional[tuple[int, ...]] = None  # None = every block
    rslora: bool = False
    dora: bool = False  # DoRA: a learned magnitude per output feature times the normalised W + s B A
    lora_plus_ratio: float = 1.0  # LoRA+: B (and DoRA's magnitudes) at lr * ratio (optim.param_groups); 1 = off

    def check(self) -> None:
        """Refuse impossible options before any weights load (the layers need the model's depth)."""
        check_lora_options(self.rank, self.alpha, self.lora_dropout, self.lora_targets)
        check_range("--lora-plus-ratio", self.lora_plus_ratio, 0, low_open=True)
        given = [flag for flag, on in (("--dora", self.dora), ("--lora-plus-ratio", self.lora_plus_ratio != 1.0)) if on]
        if given and not self.lora:
            raise UserError(f"{' and '.join(given)}: LoRA variants, but LoRA is off; "
                            "add --lora (or use a NAME/lora preset)")


class LoRALinear(nn.Linear):
    """An nn.Linear that adopts a base linear's parameters and adds a low-rank trainable update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        # The nn.Linear shell is built on the meta device (no memory, no init), then takes over the
        # base's own Parameter objects: same names, same storage, nothing copied.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **like)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **like)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.dropout_p, self.rslora = rank, alpha, dropout, rslora
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.merged = False  # True while B A is folded into weight: the branch must not run twice
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's init: A like nn.Linear's default, B zero, so the model starts exactly at the base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        xa = self.lora_A(self.lora_dropout(x))
        # Add s * (xa B^T) into y in place: one addmm and no full-width [.., out] temporaries, which
        # would raise peak memory (linear's backward needs its input and weight, never its output,
        # so y may be overwritten). In-place ops skip autocast: B is cast to y's dtype by hand.
        b_t = self.lora_B.weight.t().to(y.dtype)
        y.view(-1, y.size(-1)).addmm_(xa.reshape(-1, xa.size(-1)).to(y.dtype), b_t, alpha=self.scaling)
        return y

    def delta_weight(self) -> torch.Tensor:
        """s * B A in float32, the update that merging adds to weight."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self.weight.float() - self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}, "
                f"merged={self.merged}")

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters under their names in this module (and in PEFT's files)."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"), as PEFT computes it:
    y = m / ||W + s B A|| * (W + s B A) x + b, the norm per output feature (over the inputs: a row
    of W here, a column of HF's Conv1D weight, which PEFT transposes with fan_in_fan_out) and m a
    trainable vector that starts at ||W||, so a fresh adapter changes nothing. The norm is a
    constant in backward (the paper's section 4.3; PEFT detaches it): no [out, in] gradient.
    Its costs over LoRA: one [out, in] temporary per forward for the norm, and two [tokens, out]
    tensors kept for the magnitude's gradient (bench/RESULTS.md)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, rslora)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(self.weight.dtype))
        self.merged_norm: torch.Tensor | None = None  # the norm merge divided by, for unmerge

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output feature, in float32, outside the autograd graph."""
        return torch.linalg.vector_norm(self.weight.float() + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        factor = (self.lora_magnitude_vector.float() / self.weight_norm()).to(y.dtype)
        dropped = self.lora_dropout(x)
        update = self.scaling * self.lora_B(self.lora_A(dropped)).to(y.dtype)
        if not (self.training and self.dropout_p > 0):  # m/n (W x + s B A x) + b, reusing W x + b
            base = y if self.bias is None else y - self.bias.to(y.dtype)
            return y + (factor - 1) * base + factor * update
        # PEFT's training path with dropout: the undropped W x + b, corrected on the dropped input
        return y + (factor - 1) * F.linear(dropped, self.weight).to(y.dtype) + factor * update

    @torch.no_grad()
    def merge(self) -> None:
        """weight <- m / ||W + s B A|| * (W + s B A); the norm is kept for unmerge, as PEFT does."""
        if not self.merged:
            self.merged_norm = self.weight_norm()
            factor = (self.lora_magnitude_vector.float() / self.merged_norm)[:, None]
            self.weight.copy_(factor * (self.weight.float() + self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            factor = (self.lora_magnitude_vector.float() / self.merged_norm)[:, None]
            self.weight.copy_(self.weight.float() / factor - self.delta_weight())
            self.merged, self.merged_norm = False, None

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


@dataclass(frozen=True)
class LoRASettings:
    """What apply_lora did (its arguments, normalised); stored with runs and adapters."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    layers: tuple[int, ...] | None = None  # block indices; None = every block
    rslora: bool = False
    dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def blocks(self, n_layer: int) -> tuple[int, ...]:
        return tuple(range(n_layer)) if self.layers is None else self.layers

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets),
                "layers": None if self.layers is None else list(self.layers)}


# ---------------------------------------------------------------------------- applying LoRA

def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: tuple[str, ...] | list[str] = LORA_TARGETS, layers: list[int] | tuple[int, ...] | None = None,
               rslora: bool = False, dora: bool = False) -> LoRASettings:
    """Wrap `targets` of the blocks `layers` (None = all; negative indices count from the end) in
    LoRALinear (DoRALinear with dora), in place, and freeze everything else: afterwards the
    trainable parameters are exactly the LoRA parameters. Returns the normalised settings."""
    gpt = unwrap(model)
    settings = _make_settings(gpt.config.n_layer, rank, alpha, dropout, targets, layers, rslora, dora)
    if lora_modules(gpt):
        raise UserError("the model already has LoRA adapters; apply_lora once, on a model without them")
    gpt.requires_grad_(False)
    wrapper = DoRALinear if settings.dora else LoRALinear
    for i in settings.blocks(gpt.config.n_layer):
        for target in settings.targets:
            parent_name, child_name = target.split(".")
            parent = getattr(gpt.transformer.h[i], parent_name)
            setattr(parent, child_name, wrapper(getattr(parent, child_name), settings.rank, settings.alpha,
                                                settings.dropout, settings.rslora))
    return settings


def check_lora_options(rank, alpha, dropout, targets) -> tuple[str, ...]:
    """The checks that do not need the model; returns the targets as a tuple."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"--rank must be at least 1 (the LoRA rank, an integer), got {rank!r}")
    if not alpha > 0:
        raise UserError(f"--alpha must be positive (the LoRA alpha), got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--lora-dropout: dropout probabilities must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str):
        targets = (targets,)
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise UserError(f"--lora-targets: {f'unknown {unknown}' if unknown else 'none given'}; "
                        f"valid: {', '.join(LORA_TARGETS)}")
    return tuple(targets)


def _make_settings(n_layer, rank, alpha, dropout, targets, layers, rslora, dora=False) -> LoRASettings:
    targets = check_lora_options(rank, alpha, dropout, targets)
    if layers is not None:
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not -n_layer <= i < n_layer]
        if bad or not layers:
            raise UserError(f"LoRA layers {list(layers)}: need block indices in [{-n_layer}, {n_layer}) "
                            f"for this {n_layer}-layer model")
        layers = tuple(sorted({i % n_layer for i in layers}))
        layers = None if len(layers) == n_layer else layers  # "all blocks" has one spelling
    return LoRASettings(rank=rank, alpha=float(alpha), dropout=float(dropout),
                        targets=tuple(t for t in LORA_TARGETS if t in targets), layers=layers, rslora=bool(rslora),
                        dora=bool(dora))


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside torch.compile's OptimizedModule and DDP's wrapper, so names have no prefix."""
    while hasattr(model, "_orig_mod") or isinstance(model, nn.parallel.DistributedDataParallel):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


_BLOCK_MODULE = re.compile(r"transformer\.h\.(\d+)\.(.+)")


def lora_modules(model: nn.Module) -> dict[tuple[int, str], LoRALinear]:
    """{(block index, target): module} of every LoRALinear, in module order."""
    found = {}
    for name, module in unwrap(model).named_modules():
        if isinstance(module, LoRALinear):
            layer, target = _BLOCK_MODULE.fullmatch(name).groups()
            found[int(layer), target] = module
    return found


def lora_settings(model: nn.Module) -> LoRASettings | None:
    """The LoRA applied to the model, read off its modules; None without LoRA."""
    modules = lora_modules(model)
    if not modules:
        return None
    kinds = {(m.rank, m.alpha, m.dropout_p, m.rslora, isinstance(m, DoRALinear)) for m in modules.values()}
    layers = sorted({layer for layer, _ in modules})
    targets = [t for t in LORA_TARGETS if any(target == t for _, target in modules)]
    if len(kinds) > 1 or len(modules) != len(layers) * len(targets):
        raise UserError("the model's LoRA modules differ in rank/alpha/kind or do not cover the same targets in "
                        "every adapted block; apply LoRA with apply_lora only")
    (rank, alpha, dropout, rslora, dora), = kinds
    return _make_settings(unwrap(model).config.n_layer, rank, alpha, dropout, targets, layers, rslora, dora)


def merge_lora(model: nn.Module) -> None:
    """Fold s * B A into each wrapped weight (inference/export); the branch is then skipped."""
    for module in _require_lora(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: subtract s * B A again and re-enable the branch."""
    for module in _require_lora(model).values():
        module.unmerge()


def _require_lora(model: nn.Module) -> dict[tuple[int, str], LoRALinear]:
    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA adapters; call apply_lora or load_adapter first")
    return modules


# ---------------------------------------------------------------------------- adapter state

def _key(layer: int, target: str, name: str) -> str:
    """PEFT's key of the adapter tensor `name` (LoRALinear.adapter_tensors) of one module. PEFT
    saves DoRA's magnitude as `lora_magnitude_vector`, without the `.weight` its module has."""
    return f"{PEFT_PREFIX}transformer.h.{layer}.{target}.{name}"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's keys; detached views of the live parameters (clone to keep a
    snapshot)."""
    return {_key(layer, target, name): tensor.detach()
            for (layer, target), module in lora_modules(model).items()
            for name, tensor in module.adapter_tensors().items()}


def _expected_shapes(gpt: nn.Module, settings: LoRASettings) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the adapter that `settings` would give this model (nothing is changed)."""
    shapes = {}
    for layer in settings.blocks(gpt.config.n_layer):
        for target in settings.targets:
            linear = gpt.transformer.h[layer].get_submodule(target)
            shapes[_key(layer, target, "lora_A.weight")] = (settings.rank, linear.in_features)
            shapes[_key(layer, target, "lora_B.weight")] = (linear.out_features, settings.rank)
            if settings.dora:
                shapes[_key(layer, target, "lora_magnitude_vector")] = (linear.out_features,)
    return shapes


def _normalize_key(key: str) -> str:
    """PEFT's key, from PEFT's own (GPT2LMHeadModel or GPT2Model base) or from bare module names."""
    key = key.removeprefix(PEFT_PREFIX)
    return PEFT_PREFIX + ("transformer." + key if key.startswith("h.") else key)


def _check_state(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], origin: str) -> None:
    problems = state_mismatches(expected, state)
    if problems:
        raise UserError(f"{origin}: adapter does not fit this model and LoRA config; " + "; ".join(problems))


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], origin: str = "adapter state") -> None:
    """Copy LoRA tensors (PEFT keys) into a model that already has the same LoRA applied."""
    gpt = unwrap(model)
    modules = _require_lora(gpt)
    if any(m.merged for m in modules.values()):
        raise UserError(f"{origin}: the model's adapters are merged; unmerge_lora before loading new ones")
    state = {_normalize_key(k): v for k, v in state.items()}
    _check_state(_expected_shapes(gpt, lora_settings(gpt)), state, origin)
    with torch.no_grad():
        for key, tensor in adapter_state_dict(gpt).items():
            tensor.copy_(state[key])


# ---------------------------------------------------------------------------- PEFT files

def peft_config(settings: LoRASettings, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json as peft 0.21 reads it for GPT2LMHeadModel. Targets are written as full
    module suffixes ("attn.c_proj"), which PEFT matches by suffix: "c_proj" alone would also catch
    mlp.c_proj. fan_in_fan_out is true because GPT-2's HF layers are Conv1D."""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank,
        "lora_alpha": int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha,
        "lora_dropout": settings.dropout, "target_modules": list(settings.targets), "fan_in_fan_out": True,
        "bias": "none", "use_rslora": settings.rslora, "use_dora": settings.dora, "lora_bias": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path, "layers_to_transform": None, "layers_pattern": None,
    }
    if settings.layers is not None:
        config.update(layers_to_transform=list(settings.layers), layers_pattern="h")
    return config


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None) -> None:
    """Write adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained
    loads onto transformers' GPT2LMHeadModel. Each file is written atomically."""
    from safetensors.torch import save_file

    settings = lora_settings(model)
    if settings is None:
        raise UserError("the model has no LoRA adapters to save; apply_lora or load_adapter first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    write_atomic(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(peft_config(settings, base_model_name_or_path), indent=2, sort_keys=True)
    write_text_atomic(folder / ADAPTER_CONFIG, text)


def read_adapter_config(folder: str | Path) -> dict:
    """The adapter_config.json of an adapter folder, checked to be a LoRA one."""
    path = Path(folder) / ADAPTER_CONFIG
    if not Path(folder).is_dir():
        raise UserError(f"adapter folder {folder} does not exist; pass a folder with {ADAPTER_CONFIG} "
                        f"and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the adapter config ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UserError(f"{path}: not a LoRA adapter (peft_type "
                        f"{config.get('peft_type') if isinstance(config, dict) else None!r}, expected 'LORA')")
    return config


# PEFT options that change the computation in ways this model does not implement (set = in use).
_UNSUPPORTED = ("lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def settings_from_peft_config(config: dict, n_layer: int, origin: str = ADAPTER_CONFIG) -> LoRASettings:
    """LoRASettings from a PEFT LoRA config for an n_layer GPT-2, matching modules as PEFT does."""
    unsupported = [f"{k}={config[k]!r}" for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") not in (None, "none"):
        unsupported.append(f"bias={config['bias']!r}")
    if str(config.get("init_lora_weights")).lower().startswith(_BASE_CHANGING_INITS):
        # these inits also rewrite the base weights; PEFT can save them converted to plain LoRA
        unsupported.append(f"init_lora_weights={config['init_lora_weights']!r} (save it with PEFT's "
                           "path_initial_model_for_weight_conversion)")
    if unsupported:
        raise UserError(f"{origin}: unsupported PEFT LoRA options {', '.join(unsupported)}; "
                        "only plain LoRA (optionally rsLoRA, DoRA) on GPT-2's linears is supported")
    try:
        chosen = {(i, t) for i in range(n_layer) for t in LORA_TARGETS
                  if _peft_selects(config, f"transformer.h.{i}.{t}")}
    except (re.error, TypeError, ValueError) as err:
        raise UserError(f"{origin}: cannot interpret target_modules/exclude_modules/layers_to_transform "
                        f"({type(err).__name__}: {err})") from None
    layers = sorted({i for i, _ in chosen})
    targets = [t for t in LORA_TARGETS if any(t == target for _, target in chosen)]
    if not chosen:
        raise UserError(f"{origin}: target_modules {config.get('target_modules')!r} with layers_to_transform "
                        f"{config.get('layers_to_transform')!r} select no linear of this {n_layer}-layer GPT-2")
    if len(chosen) != len(layers) * len(targets):
        raise UserError(f"{origin}: the adapter targets different modules in different blocks; only the same "
                        "targets in every adapted block are supported")
    try:
        return _make_settings(n_layer, config.get("r", 8), config.get("lora_alpha", 8),
                              config.get("lora_dropout", 0.0), targets, layers, config.get("use_rslora", False),
                              config.get("use_dora", False))
    except (UserError, TypeError) as err:
        raise UserError(f"{origin}: {err}") from None


def _peft_selects(config: dict, key: str) -> bool:
    """Whether PEFT (tuners_utils.check_target_module_exists) would adapt the module `key` of
    GPT2LMHeadModel: target_modules as a full-match regex or as names/suffixes, minus
    exclude_modules, limited to layers_to_transform (the index after "h", GPT-2's layers_pattern)."""
    def matches(spec) -> bool:
        if not spec:
            return False
        if spec == "all-linear":  # PEFT's shorthand: every linear but the output head
            return True
        if isinstance(spec, str):
            return re.fullmatch(spec, key) is not None
        return key in spec or any(key.endswith("." + name) for name in spec)

    if matches(config.get("exclude_modules")) or not matches(config.get("target_modules")):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or isinstance(config.get("target_modules"), str) or layers == []:
        return True
    pattern = config.get("layers_pattern") or "h"
    if pattern not in ("h", ["h"]):
        return False  # no other layer list exists in GPT-2
    layer = int(key.split(".")[2])
    return layer == layers if isinstance(layers, int) else layer in layers


def read_adapter_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors (or PEFT's older adapter_model.bin) of an adapter folder."""
    folder = Path(folder)
    for path in (folder / ADAPTER_WEIGHTS, folder / "adapter_model.bin"):
        if path.is_file():
            return read_weights_file(path)
    raise UserError(f"{folder}: no {ADAPTER_WEIGHTS}; the adapter folder is incomplete")


def load_adapter(model: nn.Module, folder: str | Path) -> LoRASettings:
    """Apply the LoRA described by a PEFT adapter folder (unless the model already has exactly it)
    and load its weights. Everything is checked before the model is changed."""
    gpt = unwrap(model)
    config = read_adapter_config(folder)
    settings = settings_from_peft_config(config, gpt.config.n_layer, origin=str(Path(folder) / ADAPTER_CONFIG))
    state = {_normalize_key(k): v for k, v in read_adapter_weights(folder).items()}
    origin = str(Path(folder) / ADAPTER_WEIGHTS)
    _check_state(_expected_shapes(gpt, settings), state, origin)
    current = lora_settings(gpt)
    if current is None:
        apply_lora(gpt, **asdict(settings))
    elif current != settings:
        raise UserError(f"{folder}: the model already has a different LoRA ({current}); the adapter needs {settings}")
    load_adapter_state_dict(gpt, state, origin)
    return settings
