"""The run folder. One module owns its layout, creating it, writing its metrics, samples and
checkpoints, and reading it back (for --resume, eval.py, export.py, sample.py and plot.py).

    runs/NAME/hyperparams.json      resolved config, parameter report, data statistics
              metrics.json          status, one record per log or evaluation, summary
              samples.json          the fixed test prompts answered at each evaluation
              tokenizer/            vocab.json + merges.txt: the run's own tokenizer
              template.json         the prompt template the run trained with, as text
              base_config.json      the base model's Hugging Face config (LoRA runs)
              base_model/           LoRA on a randomly initialised base: that base
              checkpoints/step_0000500/adapter/   LoRA runs: PEFT adapter files
                                       model/     full fine-tuning: a Hugging Face folder
                                       state.pt   optimizer, schedule, RNG and data-order state
              checkpoints/latest    the name of the newest complete step folder
              eval/                 eval.py's responses.json and reward.json
              train.png, test.png   drawn by plotting.plot_run

A run copies in, when it starts, everything needed to use it later without guessing: so "which
tokenizer goes with this run" has one answer, its tokenizer/ folder. The folder appears only
once everything in it is written (built under a temporary name, then renamed).

A step folder is written under a temporary name and renamed when complete, and `latest` is
replaced after that, so a crash at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Callable, Optional

import numpy as np
import torch

import lora
from configs import TrainConfig, config_from_dict
from data import SFTDataset, tokenizer_fingerprint
from errors import UserError, one_line
from files import write_json_atomic, write_text_atomic
from model import GPT, GPTConfig
from templates import get_template
from tokenizer import Tokenizer, load_tokenizer, save_tokenizer, tokenizer_folder

HYPERPARAMS, METRICS, SAMPLES, TEMPLATE = "hyperparams.json", "metrics.json", "samples.json", "template.json"
TOKENIZER, BASE_MODEL, BASE_CONFIG, CHECKPOINTS, EVAL = "tokenizer", "base_model", "base_config.json", "checkpoints", "eval"
STATUSES = ("running", "finished", "interrupted", "failed")


# ----------------------------------------------------------------------------- naming and creating

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
MAX_NAME = 200  # bytes; file systems allow 255 per name, and the folder is built under a longer temporary one


def new_run_dir(train: TrainConfig, preset_name: str) -> Path:
    """A new run folder's path: --run-name (refused if unsafe or taken) or a readable unique name."""
    root = Path(train.out_dir)
    if train.run_name is not None:
        if not _SAFE_NAME.match(train.run_name) or ".." in train.run_name:
            raise UserError(f"--run-name {train.run_name!r}: use letters, digits, '.', '_', '-' (no path separators or '..')")
        if len(train.run_name) > MAX_NAME:
            raise UserError(f"--run-name is {len(train.run_name)} characters long; use at most {MAX_NAME}")
        if (root / train.run_name).exists():
            raise UserError(f"{root / train.run_name} already exists; pass --resume {root / train.run_name} or another --run-name")
        return root / train.run_name
    method = f"{'dora' if train.dora else 'lora'}-r{train.rank}" if train.lora else "full"
    base = f"{preset_name.split('/')[0]}-{method}-{train.optimizer}-lr{train.lr:g}-{datetime.now():%Y%m%d-%H%M%S}"
    name, n = base, 1
    while (root / name).exists():
        n += 1
        name = f"{base}-{n}"
    return root / name


@dataclass
class RunStart:
    """What a new run folder starts with."""
    hyperparams: dict
    tokenizer: Tokenizer
    template: str
    base_config: Optional[dict] = None  # the base model's HF config.json (LoRA runs)
    base_model: Optional[GPT] = None  # a randomly initialised base that LoRA trains on: saved whole


def create_run_folder(run_dir: Path, start: RunStart) -> None:
    """Write the run folder under a temporary name and rename it into place: it exists only once
    complete, so a start that fails leaves nothing behind and the same command can run again."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_dir.with_name(f".{run_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.mkdir()
        write_json_atomic(tmp / HYPERPARAMS, start.hyperparams)
        save_tokenizer(start.tokenizer, tmp / TOKENIZER)
        template = get_template(start.template)
        write_json_atomic(tmp / TEMPLATE, {"name": start.template, "no_input": template.no_input,
                                           "with_input": template.with_input})
        if start.base_config is not None:
            write_json_atomic(tmp / BASE_CONFIG, start.base_config)
        if start.base_model is not None:
            start.base_model.save_pretrained(tmp / BASE_MODEL, tokenizer_dir=tmp / TOKENIZER)
        os.rename(tmp, run_dir)  # fails if the folder appeared meanwhile: never merge two runs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- one process per run

LOCK = ".lock"


def lock_run(run_dir: Path) -> IO:
    """An exclusive lock on the run folder, held while the returned file stays open (the operating
    system releases it when the process ends, even on kill -9): a second process is refused."""
    handle = open(Path(run_dir) / LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{run_dir} is in use by another training process (it holds {Path(run_dir) / LOCK}); "
                        "wait for it to end, or stop it, before resuming") from None
    return handle


# ----------------------------------------------------------------------------- what the run trained on

def data_fingerprint(train: SFTDataset, test: SFTDataset, tokenizer: Tokenizer, template: str) -> dict:
    """Content hashes of what a run learns from: the tokenised splits (so any change of the records
    shows), the tokenizer and the template text. Kept in hyperparams.json, compared on --resume."""
    text = get_template(template)
    return {"train split": _examples_hash(train), "test split": _examples_hash(test),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "template": hashlib.sha256(f"{text.no_input}\0{text.with_input}".encode()).hexdigest()}


def _examples_hash(dataset: SFTDataset) -> str:
    h = hashlib.sha256()
    for array, dtype in ((dataset.ids, np.int32), (dataset.offsets, np.int64), (dataset.n_masked, np.int64)):
        h.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return h.hexdigest()


def fingerprint_changes(saved: Optional[dict], now: dict) -> list[str]:
    """The parts (train split, test split, tokenizer, template) that differ; none for a run that
    predates fingerprints."""
    return [name for name in now if saved and name in saved and saved[name] != now[name]]


# ----------------------------------------------------------------------------- metrics and samples

def summarize(records: list[dict]) -> dict:
    """The run's summary from its records: total and training time, peak memory, best and final
    test loss, and training tokens/s = tokens over the time spent in training steps (evaluation
    and checkpointing excluded). metrics.json's summary and plot.py's table both come from here."""
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    # CUDA runs log the peak allocated memory; CPU runs the peak RSS (or, off Linux, only the RSS)
    peak_key = next((k for k in ("peak_alloc_mb", "peak_rss_mb") if any(k in r for r in train)), "rss_mb")
    peaks = [r[peak_key] for r in train if r.get(peak_key) is not None]
    elapsed = [r["elapsed_s"] for r in records if r.get("elapsed_s") is not None]
    last = train[-1] if train else {}
    train_time = last.get("train_time_s")
    return {
        "total_time_s": round(max(elapsed), 2) if elapsed else None,
        "steps": max((r["step"] for r in records), default=0),
        "peak_mem_mb": max(peaks, default=None),
        "peak_mem_of": peak_key if peaks else None,  # which figure that is: CUDA's allocated bytes, or RSS
        "best_val_loss": min((r["val_loss"] for r in evals if math.isfinite(r["val_loss"])), default=None),
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "train_time_s": round(train_time, 2) if train_time is not None else None,
        "tokens_per_s": (round(last["tokens"] / train_time, 1) if train_time else _mean_rate(train)),
    }


def _mean_rate(train_records: list[dict]) -> Optional[float]:
    """Records written before train_time_s was logged (and old-format ones) have only each
    interval's tokens/s: their mean is the best estimate there is."""
    rates = [r["tokens_per_s"] for r in train_records if r.get("tokens_per_s") is not None]
    return float(np.mean(rates)) if rates else None


@dataclass
class Metrics:
    """metrics.json: rewritten atomically at every record, so it is always valid JSON."""
    path: Path
    run_name: str
    records: list = field(default_factory=list)
    status: str = "running"
    summary: dict = field(default_factory=dict)
    error: Optional[str] = None  # the one-line cause of a failed run
    on_record: Optional[Callable[[dict], None]] = None  # e.g. an experiment tracker's log

    def add(self, record: dict) -> None:
        self.records.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})
        self.write()
        if self.on_record is not None:
            self.on_record(self.records[-1])

    def write(self) -> None:
        payload = {"run_name": self.run_name, "status": self.status, "records": self.records,
                   "summary": self.summary}
        if self.error is not None:
            payload["error"] = self.error
        write_json_atomic(self.path, payload)

    def finish(self, status: str, extra: Optional[dict] = None, error: Optional[str] = None) -> None:
        """The final status; a failed run's one-line error goes in the file and in its summary."""
        assert status in STATUSES, status
        self.status, self.error = status, error
        self.summary = {**summarize(self.records), **(extra or {}), **({"error": error} if error else {})}
        self.write()

    def truncate(self, step: int) -> None:
        """Drop the records made after `step`: on resume they are lost progress, made again."""
        self.records = [r for r in self.records if r["step"] <= step]


def discard_progress(run_dir: Path) -> None:
    """Remove what a run recorded (metrics, samples, evaluations, unfinished checkpoints), keeping
    what it started with: for a run restarted from step 0."""
    for name in (METRICS, SAMPLES):
        (Path(run_dir) / name).unlink(missing_ok=True)
    for name in (EVAL, CHECKPOINTS):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def write_hyperparams(run_dir: Path, hyperparams: dict) -> None:
    write_json_atomic(Path(run_dir) / HYPERPARAMS, hyperparams)


def read_metrics(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / METRICS)


def run_status(run_dir: Path) -> Optional[str]:
    """metrics.json's status, or None when it is missing or unreadable."""
    try:
        status = read_metrics(run_dir).get("status")
    except (UserError, AttributeError):
        return None
    return status if status in STATUSES else None


def keep_samples(run_dir: Path, keep: Callable[[int], bool]) -> list[dict]:
    """The samples whose step passes `keep`, the file rewritten without the others."""
    path = Path(run_dir) / SAMPLES
    if not path.exists():
        return []
    samples = [s for s in json.loads(path.read_text()) if keep(s["step"])]
    write_json_atomic(path, samples)
    return samples


def add_samples(run_dir: Path, step: int, records: list[dict], answers: list[str]) -> None:
    """Record the answers given at `step` (replacing any earlier answers of that same step)."""
    samples = keep_samples(run_dir, lambda s: s != step)
    for record, answer in zip(records, answers):
        samples.append({"step": step, "instruction": record["instruction"], "input": record.get("input", ""),
                        "response": answer, "reference": record["output"]})
    write_json_atomic(Path(run_dir) / SAMPLES, samples)


# ----------------------------------------------------------------------------- checkpoints

def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model: GPT, state: dict, base_model: str,
                    tokenizer_dir: Optional[Path] = None) -> Path:
    """Write checkpoints/step_N (adapter or full model, plus `state`) and point `latest` at it."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora.lora_settings(model) is not None:
        lora.save_adapter(model, tmp / "adapter", base_model_name_or_path=base_model)
    else:
        model.save_pretrained(tmp / "model", tokenizer_dir=tokenizer_dir)
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)  # a re-run of the same step after a resume
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name)
    return final


def step_dirs(run_dir: Path) -> list[Path]:
    """The complete step folders, newest first (a .tmp one is being written, or was abandoned)."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step folders (0 = keep all) up to the one `latest` names;
    never that one, never a .tmp one being written, and never a newer one (the remains of a
    timeline before a resume, replaced when the run reaches that step again). Returns the deleted."""
    latest = latest_checkpoint(run_dir)
    if keep <= 0 or latest is None:
        return []
    current = int(latest.name[5:])
    older = [p for p in step_dirs(run_dir) if int(p.name[5:]) <= current and p != latest]
    doomed = older[keep - 1:]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def weights_problem(step_dir: Path) -> Optional[str]:
    """Why a step folder's weights cannot be used (None: they look complete): present, and each
    safetensors file as long as its header says. Cheap: the tensors themselves are not read."""
    _, folder = checkpoint_weights(step_dir)
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        return f"no .safetensors weights in {folder}"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


def _safetensors_problem(path: Path) -> Optional[str]:
    """A cheap completeness check: the header parses and the data it describes fits the file."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n < 100_000_000:
            return "no safetensors header (damaged or truncated)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "unreadable safetensors header (damaged or truncated)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + n + end:
        return "shorter than its header says (truncated)"
    return None


def resumable_checkpoint(run_dir: Path) -> tuple[Optional[Path], Optional[dict], list[str]]:
    """The newest checkpoint that can be resumed from (`latest` first, then older step folders),
    its loaded state, and one line per damaged checkpoint skipped. (None, None, []) when the run
    has saved none yet; a UserError when it saved some and none is usable."""
    candidates = step_dirs(run_dir)
    latest = latest_checkpoint(run_dir)
    if latest is not None and latest in candidates:
        candidates.remove(latest)
        candidates.insert(0, latest)
    skipped = []
    for step_dir in candidates:
        try:
            problem = weights_problem(step_dir)
            state = None if problem else load_state(step_dir)
        except UserError as err:
            problem = str(err)
        except Exception as err:  # whatever torch.load raises on a damaged state.pt
            problem = f"state.pt: {one_line(err)}"
        if problem is None:
            return step_dir, state, skipped
        skipped.append(f"checkpoint {step_dir.name} is unusable ({problem})")
    if skipped:
        raise UserError(f"{run_dir}: no usable checkpoint; " + "; ".join(skipped))
    return None, None, []


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    pointer = Path(run_dir) / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def checkpoint_weights(step_dir: Path) -> tuple[str, Path]:
    """("adapter", folder) of a LoRA checkpoint or ("model", folder) of a full one."""
    for kind in ("adapter", "model"):
        if (step_dir / kind).is_dir():
            return kind, step_dir / kind
    raise UserError(f"{step_dir}: neither adapter/ nor model/ inside; the checkpoint is incomplete")


def load_state(checkpoint: Path) -> dict:
    # The state holds RNG states and optimizer tensors only: weights_only loading suffices.
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- reading a run back

class RunFolderError(UserError):
    """A run folder that cannot be read: empty, half-written or malformed. The message says why."""


class NoLossYet(RunFolderError):
    """A readable run that has not logged a loss: nothing to compare, but nothing wrong either."""


def read_json(path: Path):
    """One JSON file of a run folder; RunFolderError (a UserError) names the file and why not."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                             f"{err.colno}): half-written or corrupt") from None
    except (OSError, ValueError) as err:
        raise RunFolderError(f"cannot read {path} ({getattr(err, 'strerror', None) or err})") from None


def read_hyperparams(run_dir: Path) -> dict:
    return read_json(Path(run_dir) / HYPERPARAMS)


def run_configs(run_dir: Path) -> tuple[GPTConfig, TrainConfig]:
    return config_from_dict(read_hyperparams(run_dir)["config"])


def run_tokenizer(run_dir: Path, train: TrainConfig) -> Tokenizer:
    """The run's own tokenizer/ folder. Runs from before it was copied in fall back to what they
    were given (--tokenizer), else the files beside their weights, else GPT-2's vocabulary."""
    own = Path(run_dir) / TOKENIZER
    if own.is_dir():
        return load_tokenizer(own)
    latest = latest_checkpoint(run_dir)
    return load_tokenizer(train.tokenizer or tokenizer_folder(latest and latest / "model", train.init_from))


def run_tokenizer_dir(run_dir: Path) -> Optional[Path]:
    """The folder with the run's tokenizer files (None for an old run without one)."""
    own = Path(run_dir) / TOKENIZER
    return own if own.is_dir() else None


def run_base_source(run_dir: Path, train_init_from: Optional[str]) -> Optional[str]:
    """Where a run's base weights come from: its init_from, or the base it saved itself."""
    saved = Path(run_dir) / BASE_MODEL
    return str(saved) if saved.is_dir() else train_init_from


@dataclass
class RunWeights:
    """Where the weights of a run's checkpoint are: a base plus a LoRA adapter, or a full model."""
    base: Optional[str] = None  # hub name or HF folder the adapter applies to
    adapter_dir: Optional[Path] = None  # PEFT adapter folder (LoRA runs)
    model_dir: Optional[Path] = None  # HF checkpoint folder (full fine-tuning runs)
    tokenizer_dir: Optional[Path] = None  # the run's tokenizer files


def run_weights(run_dir: Path, checkpoint: Optional[Path] = None, base_override: Optional[str] = None) -> RunWeights:
    """The weights of a run at its latest (or the given) checkpoint, and its tokenizer files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass runs/NAME of a training run")
    _, train = run_configs(run_dir)
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"{run_dir}: no checkpoint yet (checkpoints/latest is missing or names no folder); "
                        "train past save_interval steps first")
    kind, folder = checkpoint_weights(checkpoint)
    tokenizer_dir = run_tokenizer_dir(run_dir) or tokenizer_folder(train.tokenizer, checkpoint / "model", train.init_from)
    if kind == "model":
        return RunWeights(model_dir=folder, tokenizer_dir=tokenizer_dir)
    base = base_override or run_base_source(run_dir, train.init_from)
    if base is None:
        raise UserError(f"{run_dir}: LoRA run from random weights without a saved base_model/; "
                        "pass --base with the base checkpoint folder")
    return RunWeights(base=base, adapter_dir=folder, tokenizer_dir=tokenizer_dir)


def load_weights(weights: RunWeights) -> GPT:
    """The model: the full checkpoint, or the base with the adapter applied."""
    if weights.model_dir is not None:
        return GPT.from_pretrained(weights.model_dir)
    lora.read_adapter_config(weights.adapter_dir)  # fail on a bad adapter before loading the base
    try:
        model = GPT.from_pretrained(weights.base)
    except UserError as err:
        raise UserError(f"base model {weights.base!r}: {err} (set the base with --base)") from None
    lora.load_adapter(model, weights.adapter_dir)
    return model


def load_run_model(run_dir: Path, checkpoint: Optional[Path] = None) -> tuple[GPT, Tokenizer, dict]:
    """The model of a run at its latest (or the given) checkpoint, its tokenizer and hyperparams."""
    model = load_weights(run_weights(run_dir, checkpoint))
    _, train = run_configs(run_dir)
    return model, run_tokenizer(run_dir, train), read_hyperparams(run_dir)


# ----------------------------------------------------------------------------- reading a run for display

# load_run reads the current format and the old system's (metrics.json = a list of {"iter",
# "train loss", "test loss"} records, hyperparams.json = a flat dict of strings) and normalises both
# to the current names, so that plot.py and the report know one format.

# Numeric fields of metrics.json records and summary (the current names). Other keys are ignored,
# so that a newer trainer can add fields without breaking the plots.
RECORD_NUMBERS = ("step", "epoch", "tokens", "lr", "train_loss", "grad_norm", "tokens_per_s", "train_time_s",
                  "elapsed_s", "peak_alloc_mb", "peak_reserved_mb", "rss_mb", "peak_rss_mb", "val_loss",
                  "val_ppl", "exact_match")
SUMMARY_NUMBERS = ("total_time_s", "peak_mem_mb", "best_val_loss", "final_val_loss", "tokens_per_s", "train_time_s",
                   "steps")
# The old system's record keys (lower case, "_" read as " ") -> the current names.
OLD_RECORD_KEYS = {"iter": "step", "step": "step", "train loss": "train_loss", "test loss": "val_loss",
                   "val loss": "val_loss", "lr": "lr", "learning rate": "lr"}

_NUMBER, _TEXT, _FLAG = "a number", "text", "true or false"
# The hyperparameters the comparison table shows: name -> (kind, the old system's spellings).
HPARAMS = {
    "model": (_TEXT, ("model", "model_name", "init_from", "base_model", "preset")),
    "trainable": (_NUMBER, ("trainable", "trainable_params", "n_trainable", "num_trainable_params")),
    "optimizer": (_TEXT, ("optimizer", "optim", "opt")),
    "lr": (_NUMBER, ("lr", "learning_rate", "max_lr")),
    "min_lr": (_NUMBER, ("min_lr", "lr_min", "min_learning_rate")),
    "warmup": (_NUMBER, ("warmup", "warmup_steps", "warmup_iters", "warmup_ratio")),
    "weight_decay": (_NUMBER, ("weight_decay", "wd")),
    "lora": (_FLAG, ("lora", "use_lora")),
    "rank": (_NUMBER, ("rank", "lora_rank", "lora_r", "r")),
    "alpha": (_NUMBER, ("alpha", "lora_alpha")),
    "batch_size": (_NUMBER, ("batch_size", "bs", "batch", "micro_batch_size")),
    "grad_accum": (_NUMBER, ("grad_accum", "gradient_accumulation_steps", "grad_accum_steps")),
    "epochs": (_NUMBER, ("epochs", "num_epochs", "n_epochs", "num_train_epochs")),
    "max_steps": (_NUMBER, ("max_steps", "max_iters", "iters")),
    "device": (_TEXT, ("device",)),
}


@dataclass
class Run:
    path: Path
    name: str
    legacy: bool  # written by the old system
    records: list[dict]  # current names, numbers only; a metric a record lacks is absent from its dict
    summary: dict  # SUMMARY_NUMBERS that the trainer wrote
    hparams: dict  # HPARAMS names -> value or None; empty when hyperparams.json is missing
    status: Optional[str] = None
    reward: dict = field(default_factory=dict)  # "win_rate", "mean_reward" from eval/reward.json
    notes: list[str] = field(default_factory=list)  # things worth telling, not worth skipping the run

    @property
    def label(self) -> str:
        return f"{self.name} (old format)" if self.legacy else self.name

    def series(self, y: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the records that have both."""
        points = [(r[x], r[y]) for r in self.records if x in r and y in r]
        return np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)

    def has(self, y: str, x: str = "step") -> bool:
        return any(x in r and y in r for r in self.records)

    def stat(self, key: str) -> Optional[float]:
        """A summary number; for a run still going (or an old one), worked out from the records."""
        if key in self.summary:
            return self.summary[key]
        return summarize(self.records).get(key)


def load_run(run_dir) -> Run:
    """Read a run folder of either format. Raises RunFolderError saying why it cannot be used."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunFolderError("not a folder" if path.exists() else "no such folder")
    if not (path / "metrics.json").exists():
        raise RunFolderError("empty folder" if not any(path.iterdir()) else
                             "no metrics.json (not a run folder, or the run has not logged yet)")
    metrics = read_json(path / "metrics.json")
    if isinstance(metrics, list):
        run = Run(path, path.name, True, _records(metrics, legacy=True), {}, {})
    elif isinstance(metrics, dict):
        run = _new_run(path, metrics)
    else:
        raise RunFolderError(f"metrics.json holds a {_kind(metrics)}; expected an object "
                             f"with 'records' or (old format) a list of records")
    if not any("train_loss" in r or "val_loss" in r for r in run.records):
        raise NoLossYet("metrics.json has no loss records yet")
    run.hparams = _load_hparams(path / "hyperparams.json", run.notes)
    run.reward = _load_reward(path / "eval" / "reward.json", run.notes)
    return run


def _kind(value) -> str:
    return {dict: "JSON object", list: "JSON list", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _new_run(path: Path, metrics: dict) -> Run:
    records, summary, status = metrics.get("records"), metrics.get("summary") or {}, metrics.get("status")
    if not isinstance(records, list):
        raise RunFolderError("metrics.json has no 'records' list")
    if not isinstance(summary, dict):
        raise RunFolderError(f"metrics.json: 'summary' is a {_kind(summary)}, expected an object")
    for key in SUMMARY_NUMBERS:
        if summary.get(key) is not None and not _is_number(summary[key]):
            raise RunFolderError(f"metrics.json summary: {key!r} is {summary[key]!r}, expected a number")
    return Run(path, path.name, False, _records(records, legacy=False),
               {k: summary[k] for k in SUMMARY_NUMBERS if summary.get(k) is not None},
               {}, status if isinstance(status, str) else None)


def _records(raw_records: list, legacy: bool) -> list[dict]:
    """Validate the records and give them the current names; null values count as absent."""
    records = []
    for index, raw in enumerate(raw_records):
        where = f"metrics.json record {index}"
        if not isinstance(raw, dict):
            raise RunFolderError(f"{where} is a {_kind(raw)}, expected an object")
        record = {}
        for key, value in raw.items():
            name = OLD_RECORD_KEYS.get(key.strip().lower().replace("_", " ")) if legacy else key
            if name not in RECORD_NUMBERS or value is None:
                continue
            if not _is_number(value):
                raise RunFolderError(f"{where}: {key!r} is {value!r}, expected a number")
            record[name] = value
        step_key = "'iter'" if legacy else "'step'"
        if "step" not in record or record["step"] < 0 or not float(record["step"]).is_integer():
            raise RunFolderError(f"{where} has no {step_key} (a whole number >= 0)")
        record["step"] = int(record["step"])
        records.append(record)
    return records


def _load_hparams(path: Path, notes: list[str]) -> dict:
    if not path.exists():
        notes.append("no hyperparams.json; its table row has only the metrics")
        return {}
    hp = read_json(path)
    if not isinstance(hp, dict):
        raise RunFolderError(f"hyperparams.json holds a {_kind(hp)}, expected an object")
    values = _new_hparams(hp) if "config" in hp else _old_hparams(hp)
    for name, (kind, _) in HPARAMS.items():
        value = values.get(name)
        if value is None:
            continue
        if kind == _TEXT:
            values[name] = str(value)
        elif (kind == _NUMBER and not _is_number(value)) or (kind == _FLAG and not isinstance(value, bool)):
            raise RunFolderError(f"hyperparams.json: {name!r} is {value!r}, expected {kind}")
    return values


def _new_hparams(hp: dict) -> dict:
    config, params = hp.get("config"), hp.get("params") or {}
    train = config.get("train") if isinstance(config, dict) else None
    if not isinstance(train, dict) or not isinstance(params, dict):
        raise RunFolderError("hyperparams.json: expected 'config': {'model': {...}, 'train': {...}} "
                             "and 'params': {...}")
    values = {name: train.get(name) for name in HPARAMS}
    values.update(model=hp.get("preset") or train.get("init_from"), trainable=params.get("trainable"),
                  device=hp.get("device"))
    return values


def _old_hparams(hp: dict) -> dict:
    """The old system's flat dict of strings: any of the known spellings, strings read as numbers."""
    flat = {str(k).strip().lower().replace("-", "_").replace(" ", "_"): _from_string(v) for k, v in hp.items()}
    values = {name: next((flat[a] for a in spellings if flat.get(a) is not None), None)
              for name, (_, spellings) in HPARAMS.items()}
    if values["lora"] is None and _is_number(values["rank"]):
        values["lora"] = values["rank"] > 0
    return values


def _from_string(value):
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("", "none", "null", "n/a", "-"):
        return None
    if text.lower() in ("true", "false", "yes", "no"):
        return text.lower() in ("true", "yes")
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def _load_reward(path: Path, notes: list[str]) -> dict:
    """eval.py's verdict. Optional: a bad file blanks the reward cells instead of losing the run."""
    if not path.exists():
        return {}
    try:
        reward = read_json(path)
        values = {"win_rate": reward.get("win_rate"), "mean_reward": (reward.get("tuned") or {}).get("mean_reward")}
    except (RunFolderError, AttributeError) as err:
        notes.append(f"eval/reward.json unreadable ({err}); reward cells left blank")
        return {}
    if not all(_is_number(v) for v in values.values()):
        notes.append("eval/reward.json lacks numeric 'win_rate' and 'tuned.mean_reward'; reward cells left blank")
        return {}
    return values
