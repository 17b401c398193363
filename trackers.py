"""Optional experiment trackers: the scalars of metrics.json, also sent to TensorBoard or wandb.

    tracker = open_tracker("tensorboard", run_dir, run_name, config)   # None when kind is None
    tracker.log(record)    # every numeric field of a metrics.json record, at record["step"]
    tracker.close()

metrics.json stays the source of truth (plot.py, report.py and --resume read it); a tracker is a
live view of the same numbers. Each library is imported only when asked for, so neither is a
dependency of training.

- tensorboard: event files in RUN/tensorboard/ (`tensorboard --logdir runs`). On resume, pass the
  checkpoint's step as `resume_step`: events logged after it (lost progress, logged again) are
  purged, as metrics.json drops its records after that step.
- wandb: files in RUN/wandb/. When WANDB_MODE is not set and no API key is configured
  (WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc), the run is logged offline, to be sent
  later with `wandb sync RUN/wandb/offline-run-*`; set WANDB_MODE=online/offline/disabled to choose.
  The wandb run id is derived from the run name, so a resumed run continues the same wandb run.
"""
from __future__ import annotations

import importlib
import json
import netrc
import os
import re
from pathlib import Path
from typing import Optional, Protocol

from errors import UserError

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"


class Tracker(Protocol):
    def log(self, record: dict) -> None: ...
    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The record's numeric fields except the step itself (None, text and bools are not scalars)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--tracker {package} needs the {package} package: pip install {package}") from None


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict, resume_step: Optional[int]):
        _import("tensorboard", "tensorboard")  # torch's writer needs it; say so in one line if absent
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at steps > resume_step are dropped, they will be logged again
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()  # a crash must not lose what metrics.json already holds

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> Optional[str]:
    """None (wandb decides, from WANDB_MODE or its login) when WANDB_MODE is set or a key exists;
    else "offline", so that a machine without an account or network still logs."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbTracker:
    def __init__(self, run_dir: Path, run_name: str, config: dict, resume_step: Optional[int]):
        wandb = _import("wandb", "wandb")
        run_id = re.sub(r"[^A-Za-z0-9_-]", "_", run_name)[:128]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sft-gpt2"), name=run_name, id=run_id,
                              dir=str(run_dir), config=config, mode=wandb_mode(), resume="allow")

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def check_kind(kind: Optional[str]) -> None:
    if kind is not None and kind not in TRACKERS:
        raise UserError(f"--tracker must be one of {', '.join(TRACKERS)}, got {kind!r}")


def open_tracker(kind: Optional[str], run_dir: Path, run_name: str, config: dict,
                 resume_step: Optional[int] = None) -> Optional[Tracker]:
    """The tracker of that kind, or None without one. `config`: the run's resolved configuration
    (configs.config_to_dict); `resume_step`: the checkpoint's step when the run is resumed."""
    check_kind(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, config, resume_step)
    if kind == "wandb":
        return WandbTracker(run_dir, run_name, config, resume_step)
    return None
