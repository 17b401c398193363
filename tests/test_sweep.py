"""sweep.py: a 2 x 2 grid of tiny runs end to end (a kill -9 mid-grid, resume, a rerun that does
nothing), bad axes refused before anything exists, --dry-run, the LoRA collapse, and the device
scheduling."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import sweep
from conftest import ROOT
from errors import UserError
from test_train import run_args  # noqa: F401 - the tiny run's options, a fixture


@pytest.fixture
def shared(run_args):
    """test_train's tiny 12-step run, with a checkpoint every 3 steps and one evaluation at the end;
    its --out-dir is the sweep's own option, and --lr an axis here."""
    options = dict(zip(run_args[::2], run_args[1::2]))  # it is all --flag value pairs
    del options["--out-dir"], options["--lr"]
    options.update({"--eval-interval": "12", "--save-interval": "3", "--sample-prompts": "0"})
    return [word for pair in options.items() for word in pair]


AXES = ["--lr", "1e-2", "3e-3", "--optimizer", "sgd", "adamw"]
NAMES = ["grid-lr1e-2-optimizer_sgd", "grid-lr1e-2-optimizer_adamw", "grid-lr3e-3-optimizer_sgd",
         "grid-lr3e-3-optimizer_adamw"]


def start_sweep(argv, tmp_path):
    # one thread per run: the tiny runs are faster so, and two of them share the 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def status(run_dir):
    path = run_dir / "metrics.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def test_grid_killed_resumed_and_rerun(tmp_path, shared):
    folder = tmp_path / "grid"
    argv = ["--out-dir", str(folder), *shared, *AXES]
    run_dirs = [folder / "runs" / name for name in NAMES]

    # 1. kill -9 the whole sweep once run 1 is finished and run 2 has saved a checkpoint
    proc = start_sweep(argv, tmp_path)
    deadline = time.time() + 60
    while not (status(run_dirs[0]) == "finished" and (run_dirs[1] / "checkpoints" / "latest").exists()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert status(run_dirs[1]) == "running"  # killed mid-run, as intended
    killed_at = int((run_dirs[1] / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 3 <= killed_at < 12 and not run_dirs[2].exists() and not run_dirs[3].exists()
    record = json.loads((folder / "sweep.json").read_text())
    assert [(r["name"], r["state"]) for r in record["runs"]] == list(zip(NAMES, ["finished", "running", "pending",
                                                                                 "pending"]))
    finished_mtime = (run_dirs[0] / "metrics.json").stat().st_mtime_ns

    # 2. the same grid again (two at a time: sweep.py's own options are not part of the grid)
    proc = start_sweep(argv + ["--parallel", "2"], tmp_path)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert all(status(d) == "finished" for d in run_dirs)
    log = (folder / "sweep.log").read_text()
    assert f"skip {NAMES[0]} (finished)" in log and f"resume {NAMES[1]}" in log
    assert f"start {NAMES[2]}" in log and f"start {NAMES[3]}" in log
    assert (run_dirs[0] / "metrics.json").stat().st_mtime_ns == finished_mtime
    resumed = json.loads((run_dirs[1] / "metrics.json").read_text())["records"]
    assert [r["step"] for r in resumed if "train_loss" in r] == list(range(1, 13))  # each step once
    record = json.loads((folder / "sweep.json").read_text())
    assert [r["state"] for r in record["runs"]] == ["finished"] * 4
    assert record["grid"]["shared"] == shared
    assert [(a["option"], a["labels"]) for a in record["grid"]["axes"]] == [
        ("lr", ["lr1e-2", "lr3e-3"]), ("optimizer", ["optimizer_sgd", "optimizer_adamw"])]
    assert all(f"| {name} |" in out for name in NAMES)  # the summary table
    assert (folder / "runs.md").is_file() and (folder / "report.html").is_file()

    # 3. once more: nothing to do
    mtimes = [(d / "metrics.json").stat().st_mtime_ns for d in run_dirs]
    lines = len(log.splitlines())
    assert sweep.main(argv) == 0
    new_lines = (folder / "sweep.log").read_text().splitlines()[lines + 1:]  # after the header line
    assert [line.split(" ", 3)[3] for line in new_lines] == [f"skip {n} (finished)" for n in NAMES]
    assert [(d / "metrics.json").stat().st_mtime_ns for d in run_dirs] == mtimes

    # 4. another grid in the same folder is refused
    with pytest.raises(UserError, match="holds a different sweep"):
        sweep.main(argv[:-1])


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        sweep.run_cli(lambda: sys.exit(sweep.main(argv)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


@pytest.mark.parametrize("axes, message", [
    (["--ranks", "1", "2"], "error: unknown option --ranks"),
    (["--optimizer", "sgd", "adam"], "error: grid point --optimizer adam: --optimizer must be one of"),
    (["--lr", "1e-3", "fast"], "error: grid point --lr fast: argument --lr: invalid float value: 'fast'"),
    (["--lora", "--rank", "4", "0"], "error: grid point --rank 0: --rank must be at least 1"),
    (["--rank", "1", "--rank", "2"], "error: --rank given twice"),
    (["--run-name", "a", "b"], "error: --run-name is set by sweep.py"),
    (["--lr", "1e-3", "1e-3"], "error: --lr lists a value twice"),
    (["--", "--no-reward"], "error: options after -- are eval.py's; add --eval"),
    (["--eval", "--", "--max-prompts", "0"], "error: --samples-per-prompt, --batch-size"),  # eval.py's own check
    (["--eval", "--", "--out", "x"], "error: eval.py's --run and --out are set by sweep.py"),
])
def test_bad_axes_refused_before_anything_exists(tmp_path, shared, capsys, axes, message):
    folder = tmp_path / "bad"
    assert refused(capsys, ["--out-dir", str(folder), *shared, *axes]).startswith(message)
    assert not folder.exists()


def test_dry_run_lists_the_runs(tmp_path, shared, capsys):
    folder = tmp_path / "grid"
    assert sweep.main(["--out-dir", str(folder), *shared, *AXES, "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split()[1] for line in listed] == NAMES
    assert listed[1].endswith("(start): --lr 1e-2 --optimizer adamw")
    assert out.count("memory plan per rank") == (4 if (ROOT / "memplan.py").exists() else 0)
    assert not folder.exists()


def test_lora_options_collapse_without_lora_and_list_axes(tmp_path, shared):
    shared_argv, axes = sweep.train_options(sweep.split_command(
        ["--lora", "--no-lora", "--rank", "1", "8", "--lora-targets", "attn.c_attn,mlp.c_fc", "attn.c_proj"])[0])
    grid = sweep.build_grid(tmp_path / "g", shared, axes)
    assert shared_argv == [] and grid.collapsed == 3  # 2 x 2 points without LoRA are one run
    assert [(r.name, r.argv[len(shared):-4]) for r in grid.runs] == [
        ("g-lora-rank1-lora_targets_attn.c_attn+mlp.c_fc", ["--lora", "--rank", "1", "--lora-targets", "attn.c_attn", "mlp.c_fc"]),
        ("g-lora-rank1-lora_targets_attn.c_proj", ["--lora", "--rank", "1", "--lora-targets", "attn.c_proj"]),
        ("g-lora-rank8-lora_targets_attn.c_attn+mlp.c_fc", ["--lora", "--rank", "8", "--lora-targets", "attn.c_attn", "mlp.c_fc"]),
        ("g-lora-rank8-lora_targets_attn.c_proj", ["--lora", "--rank", "8", "--lora-targets", "attn.c_proj"]),
        ("g-no_lora", ["--no-lora"])]
    # one word with commas is one shared value
    assert sweep.train_options([("--lora-targets", ["attn.c_attn,mlp.c_fc"])]) == (
        ["--lora-targets", "attn.c_attn", "mlp.c_fc"], [])


def test_schedule_gives_each_run_its_own_device():
    holders, log, lock = {}, [], threading.Lock()

    def work(job, slot):
        with lock:
            assert slot not in holders, f"{slot} held by {holders[slot]} and {job}"
            holders[slot] = job
            log.append((job, slot, len(holders)))
        time.sleep(0.01 * (job % 3 + 1))
        with lock:
            del holders[slot]
        return True

    slots = sweep.device_slots(None, "0,1,3")
    assert slots == ["0", "1", "3"]
    sweep.schedule(list(range(10)), slots, work, threading.Event())
    assert sorted(job for job, _, _ in log) == list(range(10))  # every job once
    assert sorted(job for job, _, _ in log[:3]) == [0, 1, 2]  # in grid order
    assert max(n for _, _, n in log) == 3  # three at a time, never more
    assert {slot for _, slot, _ in log} == {"0", "1", "3"}


def test_schedule_stops_starting_after_an_interrupted_run():
    started = []

    def work(job, slot):
        started.append(job)
        return job != 1  # job 1 was interrupted

    sweep.schedule(list(range(5)), [None], work, threading.Event())
    assert started == [0, 1]


@pytest.mark.parametrize("parallel, devices, slots", [(None, None, [None]), (3, None, [None] * 3),
                                                      (1, "2,5", ["2"]), (None, "0,0,1", ["0", "0", "1"])])
def test_device_slots(parallel, devices, slots):
    assert sweep.device_slots(parallel, devices) == slots


@pytest.mark.parametrize("parallel, devices, message", [
    (0, None, "--parallel must be at least 1"), (3, "0,1", "--parallel 3 with 2 device"),
    (None, "0,cuda:1", "give CUDA device indices")])
def test_bad_device_options(parallel, devices, message):
    with pytest.raises(UserError, match=message):
        sweep.device_slots(parallel, devices)
