"""The figures drawn from run folders: a run's own train.png and test.png (`plot_run`, refreshed
at each evaluation and at the end of training), and the panels plot.py compares runs with. Runs
are read through runs.load_run, which gives both the current and the old system's format in one.

Figures use matplotlib's object API on the Agg canvas, not pyplot: no global figure state, nothing
to close, safe to call from inside a training loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from files import write_atomic
from runs import NoLossYet, Run, load_run


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
