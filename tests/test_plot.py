"""plot.py and plotting.py on synthetic run folders of both formats, built in tmp_path."""
import csv
import io
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import plot
import plotting
from configs import config_to_dict, preset
from plotting import plot_run
from runs import RunFolderError, load_run

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def new_run(folder: Path, preset_name="tiny/lora", train_overrides=None, steps=100, summary=None,
            status="finished", reward=None, exact_match=False, device="cpu", trainable=123456) -> Path:
    """A run folder as train_sft.py writes it: a train record every 10 steps, an evaluation every 50."""
    model, train = preset(preset_name)
    train = replace(train, **(train_overrides or {}))
    write_json(folder / "hyperparams.json", {
        "preset": preset_name, "config": config_to_dict(model, train),
        "params": {"total": 10 * trainable, "trainable": trainable, "lora": trainable if train.lora else 0},
        "data": {}, "torch_version": "test", "device": device, "created": "2024-01-01T00:00:00"})
    records = []
    for step in range(10, steps + 1, 10):
        records.append(dict(step=step, epoch=step / 100, tokens=step * 1000, lr=1e-3 * step / steps,
                            train_loss=3.0 - step / 100, grad_norm=1.0, tokens_per_s=1000.0 + step,
                            elapsed_s=step / 2, rss_mb=500.0 + step))
        if step % 50 == 0:
            records.append(dict(step=step, epoch=step / 100, tokens=step * 1000, elapsed_s=step / 2 + 1,
                                val_loss=2.5 - step / 200, val_ppl=math.exp(2.5 - step / 200),
                                **({"exact_match": step / 200} if exact_match else {})))
    write_json(folder / "metrics.json", {"run_name": folder.name, "status": status, "records": records,
                                         "summary": summary or {}})
    if reward is not None:
        write_json(folder / "eval" / "reward.json", reward)
    return folder


def old_run(folder: Path, hyperparams=None) -> Path:
    """The old system's format: a list of iter records (evaluations: both losses, or test loss only)."""
    records = [{"iter": i, "train loss": 4.0 - i / 100} for i in range(0, 101, 20)]
    records[3]["test loss"] = 3.5  # an evaluation step with both keys
    records.append({"iter": 100, "test loss": 3.25})  # one with the test loss only
    write_json(folder / "metrics.json", records)
    write_json(folder / "hyperparams.json", hyperparams if hyperparams is not None else {
        "learning_rate": "0.0003", "lora_rank": "16", "lora_alpha": "32", "optim": "adamw",
        "batch_size": "8", "model": "gpt2-medium", "num_epochs": "2", "notes": "first try"})
    return folder


LORA_SUMMARY = dict(total_time_s=3725.4, peak_mem_mb=1234.5, best_val_loss=2.0, final_val_loss=2.1,
                    tokens_per_s=15000.25, steps=100)
REWARD = {"tuned": {"mean_reward": 0.4321, "val_loss": 2.0, "val_ppl": 7.39}, "base": {"mean_reward": 0.1},
          "win_rate": 0.625, "tie_rate": 0.1, "loss_rate": 0.275, "win_rate_ci95": [0.5, 0.7],
          "n_prompts": 40, "samples_per_prompt": 1, "reward_model": "rm"}


@pytest.fixture
def three_runs(tmp_path):
    """A finished LoRA run with a reward evaluation, a full fine-tune still running, an old run."""
    lora = new_run(tmp_path / "lora-r8", train_overrides=dict(rank=8, alpha=16.0, min_lr=1e-5),
                   summary=LORA_SUMMARY, reward=REWARD)
    full = new_run(tmp_path / "full-sgd", preset_name="gpt2",
                   train_overrides=dict(optimizer="sgd", lr=1e-3, warmup=50, grad_accum=4, batch_size=2),
                   steps=60, status="running", trainable=124439808)
    old = old_run(tmp_path / "old-r16")
    return [lora, full, old]


def parse_markdown(text: str) -> list[dict]:
    lines = text.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


# ----------------------------------------------------------------------------- loading

def test_new_and_old_formats_load_to_the_same_names(three_runs):
    lora, full, old = (load_run(p) for p in three_runs)
    assert not lora.legacy and old.legacy
    assert lora.series("val_loss")[0].tolist() == [50, 100]
    assert old.series("train_loss")[0].tolist() == [0, 20, 40, 60, 80, 100]
    assert old.series("val_loss")[0].tolist() == [60, 100]  # both-key record and test-loss-only record
    assert old.series("val_loss")[1].tolist() == [3.5, 3.25]
    assert not old.has("train_loss", "tokens") and lora.has("train_loss", "tokens")
    assert old.hparams["lr"] == 3e-4 and old.hparams["rank"] == 16 and old.hparams["lora"] is True
    assert old.hparams["optimizer"] == "adamw" and old.hparams["model"] == "gpt2-medium"
    assert full.status == "running" and full.summary == {}


def test_peak_memory_without_a_summary_prefers_the_peak_fields(tmp_path):
    folder = new_run(tmp_path / "r", steps=20)
    _set_record(folder, 0, "peak_rss_mb", 900.0)  # what train_sft.py logs on CPU next to rss_mb
    assert load_run(folder).stat("peak_mem_mb") == 900.0  # not the largest rss_mb (520)
    _set_record(folder, 1, "peak_alloc_mb", 300.0)  # CUDA
    assert load_run(folder).stat("peak_mem_mb") == 300.0


def test_old_hyperparams_alternative_spellings(tmp_path):
    run = load_run(old_run(tmp_path / "o", {"LR": "1e-4", "Rank": "0", "optimizer": "sgd", "bs": "4",
                                            "max_iters": "500", "warmup_iters": "20", "wd": "0.1"}))
    hp = run.hparams
    assert (hp["lr"], hp["optimizer"], hp["batch_size"], hp["max_steps"], hp["warmup"], hp["weight_decay"]) \
        == (1e-4, "sgd", 4, 500, 20, 0.1)
    assert hp["lora"] is False  # rank 0: full fine-tuning


def _truncate(folder: Path):
    text = (folder / "metrics.json").read_text()
    (folder / "metrics.json").write_text(text[: len(text) // 2])


def _set_record(folder: Path, index: int, key: str, value):
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["records"][index][key] = value
    write_json(folder / "metrics.json", metrics)


@pytest.mark.parametrize("damage, why", [
    (lambda f: [p.unlink() for p in f.rglob("*.json")], "empty folder"),
    (lambda f: (f / "metrics.json").unlink(), "no metrics.json"),
    (_truncate, "metrics.json is not valid JSON"),
    (lambda f: _set_record(f, 2, "train_loss", "2.5"), "metrics.json record 2: 'train_loss' is '2.5', expected a number"),
    (lambda f: _set_record(f, 0, "step", None), "metrics.json record 0 has no 'step'"),
    (lambda f: write_json(f / "metrics.json", {"status": "running"}), "no 'records' list"),
    (lambda f: write_json(f / "metrics.json", {"records": []}), "no loss records yet"),
    (lambda f: write_json(f / "metrics.json", "oops"), "metrics.json holds a string"),
    (lambda f: write_json(f / "hyperparams.json", {"lr": "fast"}), "hyperparams.json: 'lr' is 'fast', expected a number"),
    (lambda f: write_json(f / "hyperparams.json", {"config": {"train": {"lr": True}}}), "'lr' is True"),
])
def test_bad_folder_is_refused_with_the_reason(tmp_path, damage, why):
    folder = new_run(tmp_path / "bad")
    damage(folder)
    with pytest.raises(RunFolderError, match=re.escape(why)) as err:
        load_run(folder)
    assert "\n" not in str(err.value)


def test_missing_hyperparams_or_bad_reward_are_notes_not_skips(tmp_path):
    folder = new_run(tmp_path / "r", reward={"win_rate": "high"})
    (folder / "hyperparams.json").unlink()
    run = load_run(folder)
    assert run.hparams == {} and run.reward == {}
    assert len(run.notes) == 2 and "hyperparams.json" in run.notes[0] and "reward.json" in run.notes[1]


# ----------------------------------------------------------------------------- table

def test_table_cells(three_runs):
    runs = [load_run(p) for p in three_runs]
    md = {row["run"]: row for row in parse_markdown(plot.markdown_table(runs))}
    assert list(md) == ["lora-r8", "full-sgd", "old-r16"]  # argument order
    lora, full, old = md["lora-r8"], md["full-sgd"], md["old-r16"]
    assert (lora["model"], lora["trainable"], lora["optim"], lora["lr"], lora["min lr"], lora["warmup"],
            lora["wd"]) == ("tiny/lora", "123.46K", "adamw", "0.002", "1e-05", "50", "0.1")
    assert (lora["rank"], lora["alpha"], lora["batch"], lora["accum"], lora["epochs"], lora["steps"]) \
        == ("8", "16", "32", "1", "1", "100")
    assert (lora["best val loss"], lora["final val loss"], lora["ppl"]) == ("2.0000", "2.1000", "7.39")
    assert (lora["win rate"], lora["reward"], lora["time"], lora["tok/s"], lora["peak MB"], lora["status"]) \
        == ("62.5%", "0.432", "1h02m", "15,000", "1,234", "finished")
    # Full fine-tuning: no LoRA cells; no summary yet, so the numbers come from the records.
    assert (full["model"], full["trainable"], full["rank"], full["alpha"], full["batch"], full["accum"]) \
        == ("gpt2", "124.44M", "—", "—", "2", "4")
    assert (full["best val loss"], full["final val loss"], full["ppl"]) == ("2.2500", "2.2500", "9.49")
    assert (full["steps"], full["epochs"], full["time"], full["tok/s"], full["peak MB"]) \
        == ("60", "0.6", "30.0s", "1,035", "560")  # peak MB: the largest rss_mb
    assert (full["win rate"], full["reward"], full["status"]) == ("", "", "running")
    # Old run: strings read as numbers; no tokens/s, memory or time were recorded.
    assert (old["model"], old["optim"], old["lr"], old["rank"], old["alpha"], old["batch"], old["epochs"]) \
        == ("gpt2-medium", "adamw", "0.0003", "16", "32", "8", "2")
    assert (old["best val loss"], old["final val loss"], old["steps"]) == ("3.2500", "3.2500", "100")
    assert (old["trainable"], old["tok/s"], old["peak MB"], old["time"], old["status"]) == ("",) * 5

    rows = list(csv.DictReader(io.StringIO(plot.csv_table(runs))))
    assert [r["run"] for r in rows] == ["lora-r8", "full-sgd", "old-r16"]
    assert {k: rows[0][k] for k in ("trainable_params", "lr", "min_lr", "lora_rank", "lora_alpha",
                                    "perplexity", "win_rate", "wall_time_s", "tokens_per_s", "peak_mem_mb")} \
        == {"trainable_params": "123456", "lr": "0.002", "min_lr": "1e-05", "lora_rank": "8",
            "lora_alpha": "16", "perplexity": "7.38906", "win_rate": "0.625", "wall_time_s": "3725.4",
            "tokens_per_s": "15000.2", "peak_mem_mb": "1234.5"}
    assert (rows[1]["lora_rank"], rows[1]["tokens_per_s"], rows[2]["peak_mem_mb"]) == ("", "1035", "")


def test_table_escapes_pipes_and_handles_a_run_without_hyperparams(tmp_path):
    folder = new_run(tmp_path / "a|b")
    (folder / "hyperparams.json").unlink()
    row = plot.markdown_table([load_run(folder)]).splitlines()[2]
    assert row.startswith("| a\\|b |  |  |") and "—" not in row  # unknown is blank, not "n/a"


# ----------------------------------------------------------------------------- figures

def test_compare_figures_line_counts(three_runs):
    runs = [load_run(p) for p in three_runs]
    figs = plot.compare_figures(runs, smooth=0.0)
    train_ax, test_ax = figs["loss_vs_step.png"].axes
    assert len(train_ax.get_lines()) == 3 and len(test_ax.get_lines()) == 3
    train_ax, test_ax = figs["loss_vs_tokens.png"].axes
    assert len(train_ax.get_lines()) == 2 and len(test_ax.get_lines()) == 2  # the old run has no tokens
    assert len(figs["lr.png"].axes[0].get_lines()) == 2  # nor a learning rate
    memory_ax, speed_ax = figs["speed_memory.png"].axes
    assert len(memory_ax.patches) == 2 and len(speed_ax.patches) == 2  # old run: "n/a", no bar
    assert [p.get_width() for p in memory_ax.patches] == [1234.5, 560.0]
    legend = figs["loss_vs_step.png"].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["lora-r8", "full-sgd", "old-r16 (old format)"]
    # The same run has the same colour in every figure.
    assert train_ax.get_lines()[1].get_color() == figs["loss_vs_step.png"].axes[0].get_lines()[1].get_color()
    notes = plot.left_out_notes(runs)
    assert len(notes) == 2 and all("old-r16" in n for n in notes) and "loss_vs_tokens.png" in notes[0]


def test_smoothing_adds_a_faint_raw_curve_under_the_ema(three_runs):
    runs = [load_run(p) for p in three_runs]
    train_ax = plot.compare_figures(runs, smooth=0.9)["loss_vs_step.png"].axes[0]
    lines = train_ax.get_lines()
    assert len(lines) == 6
    raw, smoothed = lines[0], lines[1]
    assert raw.get_alpha() == 0.25 and smoothed.get_label() == "lora-r8"
    np.testing.assert_allclose(smoothed.get_ydata(), plotting.ema(np.asarray(raw.get_ydata()), 0.9))


def test_ema_is_debiased():
    # A constant series stays constant (no pull towards 0 at the start); a step is followed geometrically.
    np.testing.assert_allclose(plotting.ema(np.full(5, 2.0), 0.9), 2.0)
    out = plotting.ema(np.array([0.0, 1.0]), 0.5)
    np.testing.assert_allclose(out, [0.0, 0.5 * 1.0 / (1 - 0.25)])


def test_plot_run_writes_train_and_test_png(tmp_path):
    folder = new_run(tmp_path / "r", exact_match=True)
    written = plot_run(folder)
    assert written == [folder / "train.png", folder / "test.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in written)
    assert sorted(p.name for p in folder.iterdir()) == ["hyperparams.json", "metrics.json", "test.png", "train.png"]
    assert not list(folder.glob(".*.tmp"))  # the temp files were renamed into place
    figs = plotting.run_figures(load_run(folder))
    assert [ax.get_title() for ax in figs["train.png"].axes] == ["train loss", "learning rate"]
    assert [len(ax.get_lines()) for ax in figs["train.png"].axes] == [1, 1]
    assert [ax.get_title() for ax in figs["test.png"].axes] == ["test loss", "exact match"]
    assert len(figs["test.png"].axes[0].get_lines()[0].get_xdata()) == 2


def test_plot_run_before_the_first_evaluation_and_on_an_old_run(tmp_path):
    folder = new_run(tmp_path / "r", steps=40)  # no evaluation yet
    assert plot_run(folder) == [folder / "train.png"]
    assert plot_run(folder, figures=("test.png",)) == []
    write_json(folder / "metrics.json", {"run_name": "r", "status": "failed", "records": [], "summary": {}})
    assert plot_run(folder) == []  # failed before its first log: nothing to draw, and no error
    old = old_run(tmp_path / "old")
    assert plot_run(old) == [old / "train.png", old / "test.png"]
    # No exact match and no learning rate: those panels are left out rather than drawn empty.
    assert [len(f.axes) for f in plotting.run_figures(load_run(old)).values()] == [1, 1]


# ----------------------------------------------------------------------------- command line

def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "plot.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_skips_a_bad_folder_and_ignores_its_output_folder(three_runs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    out = tmp_path / "_compare"
    out.mkdir()
    result = run_cli(*three_runs, bad, out, "--out", out, "--smooth", "0.5")
    assert result.returncode == 0, result.stderr
    assert f"skipped {bad}: empty folder" in result.stderr.splitlines()
    assert "_compare" not in result.stderr.replace(f"to {out}/", "")  # not reported as skipped
    assert any("no token counts" in line for line in result.stderr.splitlines())
    assert sorted(p.name for p in out.iterdir()) == ["loss_vs_step.png", "loss_vs_tokens.png", "lr.png",
                                                     "runs.csv", "runs.md", "speed_memory.png"]
    assert (out / "runs.md").read_text() == result.stdout
    assert len(parse_markdown(result.stdout)) == 3
    assert all((out / f).read_bytes()[:8] == PNG_MAGIC for f in ("lr.png", "speed_memory.png"))


def test_cli_exits_2_with_one_line_when_no_run_is_valid(tmp_path):
    (tmp_path / "empty").mkdir()
    half = new_run(tmp_path / "half")
    _truncate(half)
    result = run_cli(tmp_path / "empty", half, "--out", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and lines[0].startswith("skipped ") and lines[1].startswith(f"skipped {half}: ")
    assert lines[2].startswith("error: no readable run among the 2 folder(s)")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_cli_bad_option_is_one_line(tmp_path):
    result = run_cli(tmp_path, "--smooth", "1.5")
    assert result.returncode == 2 and result.stderr == "error: --smooth must be in [0, 1), got 1.5\n"


def test_same_folder_names_are_told_apart_by_path(tmp_path):
    a, b = new_run(tmp_path / "x" / "run"), old_run(tmp_path / "y" / "run")
    runs = plot.load_runs([str(a), str(b)], tmp_path / "_compare")
    assert [r.name for r in runs] == [str(a), str(b)]
