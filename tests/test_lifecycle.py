"""The life of a run folder: a failed start leaves nothing, a crash is recorded as failed, a run
killed before its first checkpoint starts again, a run can be extended, changed data and damaged
files are caught, two processes never share a run, old checkpoints are pruned; and the
command-line tools turn operating-system errors into one line."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import configs
import files
import prepare_sft_dataset
import runs
import train_sft
from conftest import ROOT
from errors import UserError, one_line
from model import read_weights_file
from test_train import run, run_args, train_losses, write_data  # noqa: F401  (run_args is a fixture)


def command(script: str, *args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def step_folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


# ----------------------------------------------------------------------------- 1. starting

def test_failed_start_leaves_nothing_and_the_same_command_runs_again(run_args, tmp_path):
    out = tmp_path / "runs"
    broken = run_args + ["--init-from", str(tmp_path / "no-such-model")]
    with pytest.raises(UserError):
        run(broken, "again")
    assert not out.exists() or list(out.iterdir()) == []  # no run folder, no temporary one
    data = Path(run_args[run_args.index("--data-dir") + 1])
    (data / "sft_train.json").write_text("[{]")  # malformed data: fails after the model is built
    with pytest.raises(UserError):
        run(run_args, "again")
    assert not out.exists() or list(out.iterdir()) == []
    write_data(data)
    run_dir, code = run(run_args + ["--max-steps", "2"], "again")
    assert code == 0 and runs.run_status(run_dir) == "finished"


def _fail_at_step(monkeypatch, step: int, error: Exception) -> None:
    real = train_sft.Trainer.train_step

    def train_step(self, batches):
        if self.step + 1 == step:
            raise error
        return real(self, batches)
    monkeypatch.setattr(train_sft.Trainer, "train_step", train_step)


def test_a_crash_is_failed_and_a_run_without_checkpoint_restarts_from_step_0(run_args, monkeypatch, capsys):
    """A RuntimeError (as CUDA's out-of-memory error is) at step 3, before the first checkpoint:
    status failed with the error, the --resume command printed; --resume then starts again from
    step 0 and ends exactly as an uninterrupted run."""
    straight, _ = run(run_args, "straight")
    with monkeypatch.context() as patch:
        _fail_at_step(patch, 3, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"))
        run_dir, code = run(run_args, "crashed")
    assert code == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"] == metrics["summary"]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert metrics["summary"]["last_checkpoint"] is None
    err = capsys.readouterr().err
    assert f"--resume {run_dir}" in err and "last checkpoint: none yet" in err
    assert train_sft.main(["--resume", str(run_dir)]) == 0
    assert "starting it again from step 0" in capsys.readouterr().out
    assert train_losses(run_dir) == train_losses(straight)
    assert runs.run_status(run_dir) == "finished"


def test_failed_after_a_checkpoint_names_it(run_args, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _fail_at_step(patch, 8, RuntimeError("boom"))
        run_dir, code = run(run_args, "late")
    assert code == 1
    assert json.loads((run_dir / "metrics.json").read_text())["summary"]["last_checkpoint"] == "step_0000006"
    assert "last checkpoint: step_0000006" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. extending

def test_extending_a_constant_schedule_run_equals_a_longer_run(run_args):
    args = run_args + ["--schedule", "constant", "--warmup", "0", "--save-interval", "6", "--eval-interval", "6"]
    straight, _ = run(args + ["--max-steps", "12"], "twelve")
    short, code = run(args + ["--max-steps", "6"], "six")
    assert code == 0 and runs.run_status(short) == "finished"
    assert train_sft.main(["--resume", str(short), "--max-steps", "12", "--log-interval", "1"]) == 0
    assert train_losses(short) == train_losses(straight)  # bit for bit: CPU, float32
    assert runs.read_hyperparams(short)["config"]["train"]["max_steps"] == 12  # a later --resume keeps it
    with pytest.raises(UserError, match="at step 12, past the 4 steps"):
        train_sft.main(["--resume", str(short), "--max-steps", "4"])


def test_resume_refuses_options_that_change_the_run(run_args):
    run_dir, _ = run(run_args + ["--max-steps", "2"], "done")
    for args in (["--lr", "1"], ["--dtype", "float32"], ["--config", "tiny"]):
        with pytest.raises(UserError) as err:
            train_sft.main(["--resume", str(run_dir), *args])
        assert args[0] in str(err.value) and "--max-steps, --epochs" in str(err.value)


def test_resume_with_changed_data_is_refused(run_args):
    run_dir, _ = run(run_args + ["--max-steps", "4", "--save-interval", "2"], "data")
    data = Path(run_args[run_args.index("--data-dir") + 1])
    records = json.loads((data / "sft_train.json").read_text())
    (data / "sft_train.json").write_text(json.dumps(records[1:]))
    with pytest.raises(UserError, match=r"the train split in .* changed"):
        train_sft.main(["--resume", str(run_dir), "--max-steps", "8"])
    assert set(runs.read_hyperparams(run_dir)["fingerprint"]) == {"train split", "test split", "tokenizer", "template"}


# ----------------------------------------------------------------------------- 5. flags

def test_flags_that_a_preset_would_override_win():
    _, _, train = configs.parse_args(["--data-dir", "mine"])
    assert train.dataset == "sft"
    _, _, train = configs.parse_args(["--data-dir", "mine", "--dataset", "synthetic"])
    assert train.dataset == "synthetic"
    _, _, train = configs.parse_args(["--epochs", "2"])  # the tiny preset sets max_steps=1500
    assert (train.max_steps, train.epochs) == (0, 2.0)
    _, _, train = configs.parse_args(["--epochs", "2", "--max-steps", "5"])
    assert train.max_steps == 5
    usage = " ".join(configs.build_parser("").format_help().split())
    assert "implies --dataset sft" in usage and "wins over the preset's max_steps" in usage


@pytest.mark.parametrize("args, shown", [
    (["--max-steps", "-1"], "[0, inf)"), (["--epochs", "0"], "(0, inf)"), (["--eval-batches", "-1"], "[0, inf)"),
    (["--grad-clip", "-1"], "[0, inf)"), (["--warmup", "-1"], "[0, inf)"), (["--weight-decay", "-0.1"], "[0, inf)"),
    (["--momentum", "1"], "[0, 1)"), (["--beta1", "-0.1"], "[0, 1)"), (["--beta2", "1.5"], "[0, 1)"),
    (["--eps", "0"], "(0, inf)"), (["--llrd", "0"], "(0, 1]"), (["--llrd", "1.5"], "(0, 1]"),
    (["--freeze-layers", "100"], "[0, 4]"), (["--sample-prompts", "-1"], "[0, inf)"),
    (["--keep-checkpoints", "-1"], "[0, inf)"), (["--n-layer", "0"], "[1, inf)"), (["--momentum", "nan"], "[0, 1)"),
])
def test_numeric_options_are_range_checked(args, shown):
    with pytest.raises(UserError) as err:
        configs.parse_args(args)
    assert args[0] in str(err.value) and shown in str(err.value)


# ----------------------------------------------------------------------------- 6. data preparation

def test_prepare_replaces_train_and_test_as_one_unit(tmp_path, monkeypatch, tiny_tokenizer_dir):
    source = tmp_path / "records.json"
    out = tmp_path / "data"
    prepare = ["--input", str(source), "--output-dir", str(out), "--test-size", "3", "--tokenizer",
               str(tiny_tokenizer_dir)]
    source.write_text(json.dumps([{"instruction": f"old {i}", "output": "x"} for i in range(12)]))
    prepare_sft_dataset.main(prepare)
    configs.DataConfig(data_dir=str(out)).check()  # a complete pair passes
    source.write_text(json.dumps([{"instruction": f"new {i}", "output": "y"} for i in range(12)]))
    real_replace = os.replace

    def crash_on_second_rename(src, dst):
        if Path(dst).name == "sft_test.json":
            raise OSError(28, "No space left on device", str(dst))
        real_replace(src, dst)
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash_on_second_rename)
        with pytest.raises(OSError):
            prepare_sft_dataset.main(prepare)
    assert "new" in (out / "sft_train.json").read_text() and "old" in (out / "sft_test.json").read_text()
    with pytest.raises(UserError, match="sft_test.json is not the file prepare_sft_dataset.py last wrote"):
        configs.DataConfig(data_dir=str(out)).check()  # ...is refused
    assert sorted(p.name for p in out.iterdir()) == ["sft_manifest.json", "sft_test.json", "sft_train.json"]
    prepare_sft_dataset.main(prepare)  # running it again repairs it
    configs.DataConfig(data_dir=str(out)).check()
    assert "new" in (out / "sft_test.json").read_text()


# ----------------------------------------------------------------------------- 7. operating-system errors

def test_os_errors_are_one_line(run_args, tmp_path):
    args = list(run_args)
    out_index = args.index("--out-dir") + 1
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    args[out_index] = str(a_file / "runs")  # a file where a folder should be
    assert_one_line_error(command("train_sft.py", *args, "--max-steps", "1"), str(a_file))
    if os.geteuid() == 0:
        read_only = Path("/sys/kernel/runs-test")  # read-only even for root
    else:
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
    args[out_index] = str(read_only)
    assert_one_line_error(command("train_sft.py", *args, "--max-steps", "1"), str(read_only))
    args[out_index] = str(tmp_path / "runs")
    assert_one_line_error(command("train_sft.py", *args, "--run-name", "x" * 300), "--run-name", "at most")
    proc = command("prepare_sft_dataset.py", "--input", str(a_file), "--output-dir", str(a_file / "data"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_full_disk_names_the_file_being_written(tmp_path):
    """write() on a full disk raises ENOSPC without a file name; the one line names it, and
    neither the target nor a temporary is left behind."""
    def full_disk(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    target = tmp_path / "metrics.json"
    with pytest.raises(OSError) as caught:
        files.write_atomic(target, full_disk)
    assert one_line(caught.value) == f"{target}: No space left on device"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 7. damaged files, two processes

@pytest.mark.parametrize("damage", ["weights", "state"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(run_args, damage, capsys):
    args = run_args + ["--save-interval", "4", "--keep-checkpoints", "0"]
    straight, _ = run(args, "straight")
    run_dir, _ = run(args, "damaged")
    last = run_dir / "checkpoints" / "step_0000012"
    target = last / ("model/model.safetensors" if damage == "weights" else "state.pt")
    target.write_bytes(target.read_bytes()[:len(target.read_bytes()) // 2])  # truncated
    capsys.readouterr()
    assert train_sft.main(["--resume", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert "checkpoint step_0000012 is unusable" in out.err and "step_0000008" in out.out
    assert train_losses(run_dir) == train_losses(straight)


def test_damaged_run_files_are_one_line(run_args):
    run_dir, _ = run(run_args + ["--max-steps", "2"], "files")
    (run_dir / "metrics.json").write_text('{"records": [')
    assert_one_line_error(command("train_sft.py", "--resume", run_dir), "metrics.json")
    (run_dir / "hyperparams.json").write_text("")
    assert_one_line_error(command("train_sft.py", "--resume", run_dir), "hyperparams.json")


def test_a_second_process_on_the_same_run_is_refused(run_args, tmp_path):
    run_dir, _ = run(run_args + ["--max-steps", "2"], "locked")
    holder = subprocess.Popen([sys.executable, "-c", "import runs, sys, time; held = runs.lock_run(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(120)", str(run_dir)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_one_line_error(command("train_sft.py", "--resume", run_dir), "in use by another training process")
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS releases the lock of a killed process
        holder.wait()
    runs.lock_run(run_dir).close()


# ----------------------------------------------------------------------------- 8. checkpoints and export

def test_keep_checkpoints_prunes_older_ones(run_args):
    run_dir, _ = run(run_args + ["--save-interval", "2"], "pruned")
    assert step_folders(run_dir) == ["step_0000010", "step_0000012"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000012"
    every, _ = run(run_args + ["--save-interval", "2", "--keep-checkpoints", "0"], "every")
    assert len(step_folders(every)) == 6
    (every / "checkpoints" / "step_0000014.tmp").mkdir()  # being written
    (every / "checkpoints" / "latest").write_text("step_0000008")  # newer ones: from before a resume
    runs.prune_checkpoints(every, 1)
    assert step_folders(every) == ["step_0000008", "step_0000010", "step_0000012", "step_0000014.tmp"]


def test_export_refuses_a_non_empty_folder_unless_overwrite(run_args, tmp_path):
    run_dir, _ = run(run_args + ["--max-steps", "2"], "export")
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert_one_line_error(command("export.py", "--run", run_dir, "--merged", target), "not empty", "--overwrite")
    assert (target / "keep.txt").exists()
    proc = command("export.py", "--run", run_dir, "--merged", target, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (target / "model.safetensors").exists() and not (target / "keep.txt").exists()


def test_unsafe_pickle_refusal_is_one_line(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(2), "extra": time.struct_time((2000, 1, 1, 0, 0, 0, 0, 1, 0))}, path)
    with pytest.raises(UserError) as err:
        read_weights_file(path)
    message = str(err.value)
    assert "\n" not in message and "safe_serialization=True" in message and "weights_only=False" not in message
