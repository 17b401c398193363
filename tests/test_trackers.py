"""trackers.py: a TensorBoard event file written through the tracker holds the logged scalars at
their steps; resume purges the lost steps; a missing library is one line naming the install."""
import builtins
import json

import pytest

import trackers
from errors import UserError

RECORDS = [  # the shapes of metrics.json's records: evaluation, training (with a None), evaluation
    {"step": 0, "epoch": 0.0, "tokens": 0, "elapsed_s": 0.5, "val_loss": 5.5, "val_ppl": 244.69},
    {"step": 1, "epoch": 0.1, "tokens": 120, "lr": 1e-3, "train_loss": 5.25, "grad_norm": 2.0,
     "tokens_per_s": None, "elapsed_s": 0.75},
    {"step": 2, "epoch": 0.2, "tokens": 250, "lr": 5e-4, "train_loss": 4.75, "grad_norm": 1.5,
     "tokens_per_s": 480.0, "elapsed_s": 1.0},
    {"step": 2, "epoch": 0.2, "tokens": 250, "elapsed_s": 1.25, "val_loss": 4.5, "val_ppl": 90.0171},
]


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_records_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = trackers.open_tracker("tensorboard", tmp_path, "run", {"train": {"lr": 1e-3}})
    for record in RECORDS:
        tracker.log(record)
    tracker.close()
    got = read_scalars(tmp_path / trackers.TENSORBOARD_DIR)
    expected = {}
    for record in RECORDS:
        for key, value in record.items():
            if key != "step" and value is not None:
                expected.setdefault(key, []).append((record["step"], value))
    assert set(got) == set(expected)  # every numeric field, nothing else (no "step", no None)
    for key, points in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        # event files store float32: 1e-7 relative is float32's rounding
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=1e-7), key


def test_tensorboard_resume_purges_the_lost_steps(tmp_path):
    pytest.importorskip("tensorboard")
    tracker = trackers.open_tracker("tensorboard", tmp_path, "run", {})
    for step in (1, 2, 3, 4):
        tracker.log({"step": step, "train_loss": float(step)})
    tracker.close()
    # the checkpoint was at step 2: steps 3 and 4 are logged again, with other values
    tracker = trackers.open_tracker("tensorboard", tmp_path, "run", {}, resume_step=2)
    for step in (3, 4):
        tracker.log({"step": step, "train_loss": 10.0 * step})
    tracker.close()
    assert read_scalars(tmp_path / trackers.TENSORBOARD_DIR)["train_loss"] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


@pytest.mark.parametrize("kind, module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_library_is_one_line(monkeypatch, tmp_path, kind, module):
    real_import = builtins.__import__

    def blocking_import(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocking_import)
    for name in [m for m in list(__import__("sys").modules) if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(__import__("sys").modules, name)
    with pytest.raises(UserError) as err:
        trackers.open_tracker(kind, tmp_path, "run", {})
    assert str(err.value) == f"--tracker {kind} needs the {module} package: pip install {module}"
    assert not list(tmp_path.iterdir())  # nothing written


def test_no_tracker_and_unknown_kind(tmp_path):
    assert trackers.open_tracker(None, tmp_path, "run", {}) is None
    with pytest.raises(UserError, match="--tracker must be one of tensorboard, wandb, got 'mlflow'"):
        trackers.open_tracker("mlflow", tmp_path, "run", {})


def test_wandb_offline_logs_the_records(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login: offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert trackers.wandb_mode() == "offline"
    tracker = trackers.open_tracker("wandb", tmp_path, "run-1.x", {"train": {"lr": 1e-3}})
    for record in RECORDS:
        tracker.log(record)
    # wandb commits a step when a later step arrives: steps 0 and 1 are in the summary (each key's
    # last committed value), step 2 waits for close()
    summary = dict(tracker.run.summary)
    tracker.close()
    assert {k: v for k, v in summary.items() if not k.startswith("_")} == {
        "epoch": 0.1, "tokens": 120, "lr": 1e-3, "train_loss": 5.25, "grad_norm": 2.0, "elapsed_s": 0.75,
        "val_loss": 5.5, "val_ppl": 244.69}
    assert summary["_step"] == 1
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
