"""Compare training runs: loss, learning-rate, speed and memory figures, and a table, one row per run.

    python plot.py runs/*                                   # -> runs/_compare/
    python plot.py runs/lora-r* old_runs/* --smooth 0.9 --out runs/_compare/lora-rank

Reads the run folders that train_sft.py writes and the old system's (metrics.json as a list of
{"iter", "train loss", "test loss"} records), so old and new runs can share a figure. A folder that
cannot be read is reported in one line (`skipped <folder>: <why>`) and left out; a folder named
`_compare` (the default output) among the arguments is ignored. The table is printed as Markdown on
stdout and saved as runs.md and runs.csv; notes and the list of files written go to stderr.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from errors import ArgParser, UserError, run_cli
from files import write_text_atomic
from plotting import LOSS_LABEL, Panel, curves_figure, finish_figure, new_figure, run_style, save_figure
from runs import Run, RunFolderError, load_run

COMPARE_DIR = "_compare"
NOT_APPLICABLE = "—"  # e.g. the LoRA rank of a full fine-tuning run; a blank cell means "not known"


# ----------------------------------------------------------------------------- figures

def loss_panels(smooth: float) -> tuple[Panel, Panel]:
    return (Panel("train_loss", "train loss", LOSS_LABEL, smooth=smooth),
            Panel("val_loss", "test loss", LOSS_LABEL, markers=True))


def speed_memory_figure(runs: Sequence[Run]) -> Figure:
    """Horizontal bars (run names can be long): peak memory and training throughput by run."""
    fig = new_figure(2, width=5.0, height=1.6 + 0.4 * len(runs))
    bars = ((fig.axes[0], "peak_mem_mb", "peak memory", "MB (CUDA: peak allocated; CPU: peak RSS)"),
            (fig.axes[1], "tokens_per_s", "training throughput", "non-pad tokens/s"))
    positions = np.arange(len(runs))
    for ax, key, title, unit in bars:
        for index, run in enumerate(runs):
            value = run.stat(key)
            if value is None:
                ax.text(0, index, " n/a", va="center", color="gray")
                continue
            ax.barh(index, value, color=run_style(index)["color"])
            device = run.hparams.get("device") if key == "peak_mem_mb" else None
            ax.text(value, index, f" {value:,.0f}" + (f" ({device})" if device else ""), va="center",
                    fontsize="small")
        ax.set(title=title, xlabel=unit, yticks=positions, yticklabels=[r.label for r in runs])
        ax.set_ylim(len(runs) - 0.5, -0.5)  # first run on top, as in the table
        ax.margins(x=0.25)  # room for the value written after each bar
        ax.grid(axis="x", alpha=0.3)
    return finish_figure(fig, "Speed and memory by run", legend=False)


def compare_figures(runs: Sequence[Run], smooth: float = 0.0) -> dict[str, Figure]:
    """File name -> figure, every run overlaid with the same colour everywhere."""
    return {
        "loss_vs_step.png": curves_figure(runs, loss_panels(smooth), "step", "Loss against optimizer steps"),
        "loss_vs_tokens.png": curves_figure(runs, loss_panels(smooth), "tokens", "Loss against tokens seen"),
        "lr.png": curves_figure(runs, [Panel("lr", "learning rate schedule", "learning rate")], "step",
                                "Learning rate"),
        "speed_memory.png": speed_memory_figure(runs),
    }


def left_out_notes(runs: Sequence[Run]) -> list[str]:
    """Runs that a figure cannot show, e.g. old runs have no token counts."""
    notes = []
    for run in runs:
        if not (run.has("train_loss", "tokens") or run.has("val_loss", "tokens")):
            why = "old format, " if run.legacy else ""
            notes.append(f"{run.path}: no token counts ({why}left out of loss_vs_tokens.png)")
        if not run.has("lr"):
            notes.append(f"{run.path}: no learning-rate records (left out of lr.png)")
    return notes


# ----------------------------------------------------------------------------- table

def _g(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _count(value) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= size:
            return f"{value / size:.2f}{suffix}"
    return f"{value:g}"


def _duration(seconds) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{seconds:.1f}s" if seconds < 60 else f"{minutes}m{secs:02d}s" if not hours else f"{hours}h{minutes:02d}m"


@dataclass(frozen=True)
class Column:
    key: str  # CSV header and row key
    title: str  # Markdown header
    markdown: Callable[[object], str] = str  # a known value as a Markdown cell
    numeric: bool = True  # right-aligned in Markdown


COLUMNS = (
    Column("run", "run", numeric=False),
    Column("model", "model", numeric=False),
    Column("trainable_params", "trainable", _count),
    Column("optimizer", "optim", numeric=False),
    Column("lr", "lr", _g),
    Column("min_lr", "min lr", _g),
    Column("warmup", "warmup", _g),
    Column("weight_decay", "wd", _g),
    Column("lora_rank", "rank", _g),
    Column("lora_alpha", "alpha", _g),
    Column("batch_size", "batch", _g),
    Column("grad_accum", "accum", _g),
    Column("epochs", "epochs", _g),
    Column("steps", "steps", lambda v: f"{v:.0f}"),
    Column("best_val_loss", "best val loss", lambda v: f"{v:.4f}"),
    Column("final_val_loss", "final val loss", lambda v: f"{v:.4f}"),
    Column("perplexity", "ppl", lambda v: f"{v:.2f}"),
    Column("win_rate", "win rate", lambda v: f"{v:.1%}"),
    Column("mean_reward", "reward", lambda v: f"{v:.3f}"),
    Column("wall_time_s", "time", _duration),
    Column("tokens_per_s", "tok/s", lambda v: f"{v:,.0f}"),
    Column("peak_mem_mb", "peak MB", lambda v: f"{v:,.0f}"),
    Column("status", "status", numeric=False),
)


def table_row(run: Run) -> dict:
    """Column key -> value (None = not known, NOT_APPLICABLE = does not apply to this run)."""
    hp = run.hparams
    # Without hyperparams.json nothing is known; with it, a run that is not LoRA has no rank.
    rank, alpha = (hp.get("rank"), hp.get("alpha")) if hp.get("lora") or not hp else (NOT_APPLICABLE,) * 2
    epochs = [r["epoch"] for r in run.records if "epoch" in r]
    best = run.stat("best_val_loss")
    return {
        "run": run.name,
        "model": hp.get("model"),
        "trainable_params": hp.get("trainable"),
        "optimizer": hp.get("optimizer"),
        **{key: hp.get(key) for key in ("lr", "min_lr", "warmup", "weight_decay")},
        "lora_rank": rank,
        "lora_alpha": alpha,
        "batch_size": hp.get("batch_size"),
        "grad_accum": hp.get("grad_accum"),
        "epochs": epochs[-1] if epochs else hp.get("epochs"),
        "steps": run.stat("steps"),
        "best_val_loss": best,
        "final_val_loss": run.stat("final_val_loss"),
        "perplexity": None if best is None else math.exp(min(best, 700.0)),  # 700: exp() overflows past ~709
        "win_rate": run.reward.get("win_rate"),
        "mean_reward": run.reward.get("mean_reward"),
        "wall_time_s": run.stat("total_time_s"),
        "tokens_per_s": run.stat("tokens_per_s"),
        "peak_mem_mb": run.stat("peak_mem_mb"),
        "status": run.status,
    }


def _markdown_cell(column: Column, value) -> str:
    if value is None:
        return ""
    text = value if value == NOT_APPLICABLE else column.markdown(value)
    return text.replace("|", "\\|")


def markdown_table(runs: Sequence[Run]) -> str:
    rows = [[_markdown_cell(c, table_row(run)[c.key]) for c in COLUMNS] for run in runs]
    lines = ["| " + " | ".join(c.title for c in COLUMNS) + " |",
             "|" + "|".join("---:" if c.numeric else "---" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv_cell(value) -> str:
    """Full values for machines: no units, no thousands separators, blank when unknown or n/a."""
    if value is None or value == NOT_APPLICABLE:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def csv_table(runs: Sequence[Run]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([c.key for c in COLUMNS])
    for run in runs:
        row = table_row(run)
        writer.writerow([_csv_cell(row[c.key]) for c in COLUMNS])
    return out.getvalue()


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgParser(description=__doc__.split("\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders (default: every folder in runs/)")
    parser.add_argument("--out", default=f"runs/{COMPARE_DIR}", help="folder for the figures and tables")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA factor for the train-loss curves, in [0, 1); 0 = raw, 0.9 = strong")
    parser.add_argument("--html", action="store_true",
                        help="also write report.html: table, figures, eval responses and samples in one file")
    args = parser.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        raise UserError(f"--smooth must be in [0, 1), got {args.smooth}")
    if not args.runs:
        args.runs = sorted(str(p) for p in Path("runs").glob("*") if p.is_dir())
        if not args.runs:
            raise UserError("no run folders given and none in runs/; pass them, e.g. python plot.py runs/*")
    return args


def load_runs(folders: Sequence[str], out: Path) -> list[Run]:
    """The readable runs, in argument order; the others are reported on stderr and left out."""
    runs = []
    for folder in folders:
        path = Path(folder)
        if path.name == COMPARE_DIR or (path.exists() and path.resolve() == out.resolve()):
            continue  # our own output, picked up by runs/*
        try:
            runs.append(load_run(path))
        except RunFolderError as err:
            print(f"skipped {folder}: {err}", file=sys.stderr)
    if not runs:
        raise UserError(f"no readable run among the {len(folders)} folder(s) given (see 'skipped' above); "
                        f"a run folder holds the metrics.json that train_sft.py writes")
    # Two folders with the same name (runs/a, old/a) are told apart by their paths.
    names = [run.name for run in runs]
    return [replace(run, name=str(run.path)) if names.count(run.name) > 1 else run for run in runs]


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    runs = load_runs(args.runs, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder --out {out}: {err.strerror}") from None
    for note in [f"{run.path}: {n}" for run in runs for n in run.notes] + left_out_notes(runs):
        print(f"note: {note}", file=sys.stderr)
    written = []
    for filename, fig in compare_figures(runs, args.smooth).items():
        save_figure(fig, out / filename)
        written.append(filename)
    table = markdown_table(runs)
    for filename, text in (("runs.md", table), ("runs.csv", csv_table(runs))):
        write_text_atomic(out / filename, text)
        written.append(filename)
    if args.html:
        from report import write_report  # here, not at the top: report.py imports this module
        for note in write_report(runs, out / "report.html", args.smooth):
            print(f"note: {note}", file=sys.stderr)
        written.append("report.html")
        print(f"report: {out / 'report.html'}", file=sys.stderr)
    print(table, end="")
    print(f"wrote {len(runs)} run(s) to {out}/: {', '.join(written)}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
