"""Reading run folders, and the figures drawn from them.

`load_run` is the one reader of a run folder. The per-run figures that train_sft.py refreshes at
each log and evaluation (`plot_run`: train.png, test.png) and the comparison across runs (plot.py)
both go through it. It reads the current format (metrics.json = {"records": [...], "summary": {...}},
hyperparams.json = {"preset", "config", "params", ...}) and the old system's (metrics.json = a list
of {"iter", "train loss", "test loss"} records, hyperparams.json = a flat dict of strings), and
normalises both to the current names, so that the figure and table code knows one format.

Figures use matplotlib's object API on the Agg canvas, not pyplot: no global figure state, nothing
to close, safe to call from inside a training loop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from errors import UserError
from files import write_atomic


class RunFolderError(UserError):
    """A run folder that cannot be read: empty, half-written or malformed. The message says why."""


class NoLossYet(RunFolderError):
    """A readable run that has not logged a loss: nothing to compare, but nothing wrong either."""


# ----------------------------------------------------------------------------- reading a run folder

# Numeric fields of metrics.json records and summary (the current names). Other keys are ignored,
# so that a newer trainer can add fields without breaking the plots.
RECORD_NUMBERS = ("step", "epoch", "tokens", "lr", "train_loss", "grad_norm", "tokens_per_s",
                  "elapsed_s", "peak_alloc_mb", "peak_reserved_mb", "rss_mb", "peak_rss_mb", "val_loss",
                  "val_ppl", "exact_match")
SUMMARY_NUMBERS = ("total_time_s", "peak_mem_mb", "best_val_loss", "final_val_loss", "tokens_per_s",
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
        if key == "steps":
            return max(r["step"] for r in self.records)
        if key == "peak_mem_mb":  # CUDA runs log peak_alloc_mb; CPU runs peak_rss_mb (or only rss_mb)
            key = next((k for k in ("peak_alloc_mb", "peak_rss_mb") if self.has(k)), "rss_mb")
        metric, reduce = {
            "best_val_loss": ("val_loss", np.fmin.reduce),  # fmin: a NaN evaluation is not the best
            "final_val_loss": ("val_loss", lambda v: v[-1]),
            "total_time_s": ("elapsed_s", lambda v: v[-1]),
            "tokens_per_s": ("tokens_per_s", np.mean),
            **{k: (k, np.max) for k in ("peak_alloc_mb", "peak_rss_mb", "rss_mb")},
        }[key]
        values = self.series(metric)[1]
        return float(reduce(values)) if len(values) else None


def load_run(run_dir) -> Run:
    """Read a run folder of either format. Raises RunFolderError saying why it cannot be used."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunFolderError("not a folder" if path.exists() else "no such folder")
    if not (path / "metrics.json").exists():
        raise RunFolderError("empty folder" if not any(path.iterdir()) else
                             "no metrics.json (not a run folder, or the run has not logged yet)")
    metrics = _read_json(path / "metrics.json")
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


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path.name} is not valid JSON ({err.msg} at line {err.lineno}, column "
                             f"{err.colno}): half-written or corrupt") from None
    except (OSError, ValueError) as err:
        raise RunFolderError(f"cannot read {path.name}: {err}") from None


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
    hp = _read_json(path)
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
        reward = _read_json(path)
        values = {"win_rate": reward.get("win_rate"), "mean_reward": (reward.get("tuned") or {}).get("mean_reward")}
    except (RunFolderError, AttributeError) as err:
        notes.append(f"eval/reward.json unreadable ({err}); reward cells left blank")
        return {}
    if not all(_is_number(v) for v in values.values()):
        notes.append("eval/reward.json lacks numeric 'win_rate' and 'tuned.mean_reward'; reward cells left blank")
        return {}
    return values


# ----------------------------------------------------------------------------- figures

LOSS_LABEL = "cross-entropy (nats/token)"
X_LABELS = {"step": "optimizer step", "tokens": "target tokens seen"}


@dataclass(frozen=True)
class Panel:
    """One axes of a curves figure: a metric of every run against step or tokens."""
    y: str
    title: str
    ylabel: str
    smooth: float = 0.0  # EMA factor; > 0 draws the raw curve faint and the smoothed one on top
    markers: bool = False  # sparse series (evaluations) read better with a dot per point


def run_style(index: int) -> dict:
    """The same run gets the same colour in every figure; past 10 runs the line style changes."""
    return dict(color=f"C{index % 10}", linestyle=("-", "--", ":", "-.")[index // 10 % 4])


def ema(values: np.ndarray, factor: float) -> np.ndarray:
    """Exponential moving average, debiased (as TensorBoard does) so the start is not pulled to 0."""
    out, acc = np.empty(len(values)), 0.0
    for i, value in enumerate(values):
        acc = factor * acc + (1 - factor) * value
        out[i] = acc / (1 - factor ** (i + 1))
    return out


def new_figure(ncols: int, width: float = 5.5, height: float = 4.2, legend_room: float = 0.0) -> Figure:
    fig = Figure(figsize=(width * ncols + legend_room, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever the session's default backend is
    fig.subplots(1, ncols, squeeze=False)
    return fig


def finish_figure(fig: Figure, title: str, legend: bool) -> Figure:
    """Suptitle, one legend for all panels (a run appears once), 'no data' in empty panels."""
    fig.suptitle(title, fontweight="bold")
    for ax in fig.axes:
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    if legend:
        handles = {}
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        if handles:
            fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize="small")
    return fig


def curves_figure(runs: Sequence[Run], panels: Sequence[Panel], x: str = "step", title: str = "") -> Figure:
    """One panel per metric, every run overlaid; runs with no data for a panel are left out of it."""
    legend = len(runs) > 1
    fig = new_figure(len(panels), legend_room=2.0 if legend else 0.0)
    for ax, panel in zip(fig.axes, panels):
        for index, run in enumerate(runs):
            xs, ys = run.series(panel.y, x)
            if not len(xs):
                continue
            style = run_style(index)
            if panel.smooth > 0:
                ax.plot(xs, ys, alpha=0.25, linewidth=1, **style)
                ys = ema(ys, panel.smooth)
            ax.plot(xs, ys, label=run.label, linewidth=1.6, marker="o" if panel.markers else None,
                    markersize=3, **style)
        smoothing = f" (EMA {panel.smooth:g}; raw faint)" if panel.smooth > 0 else ""
        ax.set(title=panel.title + smoothing, xlabel=X_LABELS[x], ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())  # 1.5M rather than 1500000
    return finish_figure(fig, title, legend)


def save_figure(fig: Figure, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


# ----------------------------------------------------------------------------- one run's figures

TRAIN_PANELS = (Panel("train_loss", "train loss", LOSS_LABEL), Panel("lr", "learning rate", "learning rate"))
TEST_PANELS = (Panel("val_loss", "test loss", LOSS_LABEL, markers=True),
               Panel("exact_match", "exact match", "exact match", markers=True))


def run_figures(run: Run, filenames: Sequence[str] = ("train.png", "test.png")) -> dict[str, Figure]:
    """train.png / test.png of one run; a figure (or the exact-match panel) with no data yet is left out."""
    figures = {}
    for filename, panels, what in (("train.png", TRAIN_PANELS, "training"), ("test.png", TEST_PANELS, "evaluation")):
        panels = [p for p in panels if run.has(p.y)]
        if filename in filenames and panels:
            figures[filename] = curves_figure([run], panels, title=f"{run.label}: {what}")
    return figures


def plot_run(run_dir, figures: Sequence[str] = ("train.png", "test.png")) -> list[Path]:
    """Redraw a run's train.png and test.png from its metrics.json; returns the files written.

    Called by the training loop at each log and evaluation (figures=("train.png",) at a log with no
    new evaluation saves redrawing test.png). Before the first logged loss there is nothing to draw
    (returns []); an unreadable metrics.json raises RunFolderError.
    """
    try:
        run = load_run(run_dir)
    except NoLossYet:
        return []
    written = []
    for filename, fig in run_figures(run, figures).items():
        save_figure(fig, run.path / filename)
        written.append(run.path / filename)
    return written
