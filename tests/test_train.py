"""The training loop on a tiny model: run folder contents, optimizers and schedules, the loss
normalisation, exact resume, signals, non-finite losses, and DDP against a single process."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lora
import optim
import runs
import train_sft
from configs import parse_args, preset
from data import collate, count_target_tokens
from conftest import ROOT, TINY_VOCAB_SIZE
from errors import UserError
from model import GPT

# short records, so that the byte-level tiny vocabulary keeps them within a 96-token context
WORDS = "red blue green cat dog sun moon tree fish bird".split()


def write_data(folder: Path, n_train=48, n_test=8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"instruction": f"say {WORDS[i % 10]}", "input": WORDS[(i * 3) % 10] if i % 2 else "",
                "output": f"{WORDS[(i * 7) % 10]} {WORDS[i % 10]}"} for i in range(n_train + n_test)]
    (folder / "sft_train.json").write_text(json.dumps(records[:n_train]))
    (folder / "sft_test.json").write_text(json.dumps(records[n_train:]))
    return folder


@pytest.fixture
def run_args(tmp_path, tiny_tokenizer_dir):
    data = write_data(tmp_path / "data")
    return ["--config", "tiny", "--dataset", "sft", "--data-dir", str(data), "--tokenizer", str(tiny_tokenizer_dir),
            "--template", "dialog", "--vocab-size", str(TINY_VOCAB_SIZE), "--block-size", "96", "--n-layer", "2",
            "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--max-steps", "12", "--log-interval", "1",
            "--eval-interval", "6", "--save-interval", "6", "--warmup", "2", "--lr", "1e-2", "--min-lr", "1e-3",
            "--sample-prompts", "1", "--out-dir", str(tmp_path / "runs")]


def run(args, name):
    code = train_sft.main(args + ["--run-name", name])
    return Path(args[args.index("--out-dir") + 1]) / name, code


def train_losses(run_dir):
    records = json.loads((run_dir / "metrics.json").read_text())["records"]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


def test_run_folder_contents(run_args):
    run_dir, code = run(run_args, "full")
    assert code == 0
    hyper = json.loads((run_dir / "hyperparams.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert hyper["preset"] == "tiny" and hyper["config"]["train"]["optimizer"] == "adamw"
    assert hyper["params"]["trainable"] == hyper["params"]["total"]  # full fine-tuning
    assert hyper["data"]["train"]["n_examples"] == 48
    assert metrics["status"] == "finished"
    train = [r for r in metrics["records"] if "train_loss" in r]
    evals = [r for r in metrics["records"] if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [0, 6, 12]
    for r in train:
        assert {"epoch", "tokens", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "rss_mb"} <= set(r)
    assert all(b["tokens"] > a["tokens"] for a, b in zip(train, train[1:]))
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns something
    assert math.isclose(evals[-1]["val_ppl"], math.exp(evals[-1]["val_loss"]), rel_tol=1e-4)
    assert metrics["summary"]["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert metrics["summary"]["steps"] == 12
    assert (run_dir / "train.png").stat().st_size > 0 and (run_dir / "test.png").stat().st_size > 0
    samples = json.loads((run_dir / "samples.json").read_text())
    assert [s["step"] for s in samples] == [0, 6, 12]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000012"
    assert (run_dir / "checkpoints" / "step_0000012" / "model" / "model.safetensors").is_file()
    # the learning rate follows the schedule: warmup to 1e-2, cosine down to exactly min_lr
    assert train[0]["lr"] == pytest.approx(5e-3) and train[1]["lr"] == pytest.approx(1e-2)
    assert train[-1]["lr"] == pytest.approx(1e-3)


def test_lora_run_trains_only_adapters(run_args):
    run_dir, _ = run(run_args + ["--lora", "--rank", "2", "--alpha", "4"], "lora")
    hyper = json.loads((run_dir / "hyperparams.json").read_text())
    assert hyper["params"]["trainable"] == hyper["params"]["lora"] > 0
    step = run_dir / "checkpoints" / "step_0000012"
    assert (step / "adapter" / "adapter_model.safetensors").is_file() and not (step / "model").exists()
    assert (run_dir / "base_model" / "model.safetensors").is_file()  # random-init base kept for eval/export
    model, _, _ = runs.load_run_model(run_dir)
    assert lora.lora_settings(model).rank == 2


def test_loss_is_per_target_token_across_micro_batches(run_args, tmp_path):
    """One step over micro-batches [a, b] == one step over their union: sum / all targets."""
    # plain SGD with lr 1: the weight change is the gradient itself
    _, model_cfg, train = parse_args(run_args + ["--optimizer", "sgd", "--lr", "1", "--min-lr", "0",
                                                 "--grad-clip", "0"])
    grads = []
    for split in ([0, 1, 2, 3], [0, 1], [2, 3]), ([0, 1, 2, 3],):
        trainer = train_sft.standalone_trainer(model_cfg, train, "cpu", tmp_path)
        s = trainer.s
        batches = []
        for indices in split[1:] if len(split) == 3 else split:
            examples = [s.data.train[i] for i in indices]
            x, y = collate(examples, s.tokenizer.eot_id)
            batches.append(train_sft.MicroBatch(x, y, count_target_tokens(y), 0))
        loss = trainer.train_step(batches).loss
        grads.append((loss, [p.detach().clone() for p in s.raw_model.parameters()]))
    (loss_split, w_split), (loss_whole, w_whole) = grads
    assert loss_split == pytest.approx(loss_whole, rel=1e-6)
    for a, b in zip(w_split, w_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adamw"])
def test_optimizers(name, tmp_path):
    model_cfg, train = preset("tiny")
    model = GPT(model_cfg.__class__(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=16))
    train.optimizer, train.weight_decay = name, 0.1
    opt = optim.build_optimizer(model, train, "cpu")
    expected = {"sgd": (torch.optim.SGD, 0.0, False), "momentum": (torch.optim.SGD, 0.9, False),
                "nesterov": (torch.optim.SGD, 0.9, True), "adamw": (torch.optim.AdamW, None, None)}[name]
    assert type(opt) is expected[0]
    if expected[1] is not None:
        assert opt.defaults["momentum"] == expected[1] and opt.defaults["nesterov"] == expected[2]
    else:
        assert opt.defaults["betas"] == (0.9, 0.95)
    for group in opt.param_groups:  # decay on matrices only
        assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_layerwise_lr_decay_and_freezing():
    model_cfg, train = preset("tiny")
    model = GPT(model_cfg.__class__(n_layer=3, n_head=2, n_embd=16, vocab_size=50, block_size=16))
    train.llrd = 0.5
    scales = {id(p): g["lr_scale"] for g in optim.param_groups(model, train) for p in g["params"]}
    block = model.transformer.h
    assert scales[id(model.transformer.ln_f.weight)] == 1.0
    assert scales[id(block[2].attn.c_attn.weight)] == 0.5
    assert scales[id(block[0].attn.c_attn.weight)] == 0.125
    assert scales[id(model.transformer.wte.weight)] == 0.0625
    optim.freeze_first_blocks(model, 1)
    assert not model.transformer.wte.weight.requires_grad and not block[0].mlp.c_fc.weight.requires_grad
    assert block[1].mlp.c_fc.weight.requires_grad


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules(schedule):
    _, train = preset("tiny")
    train.schedule, train.lr, train.min_lr, train.warmup = schedule, 1.0, 0.1, 0.2  # 2 of 10 steps
    lrs = [optim.lr_at(s, train, 10) for s in range(10)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    if schedule == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
        progress = 3 / 7  # step 5: 3 of the 7 steps from the end of warmup (2) to the last step (9)
        shape = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        assert optim.lr_at(5, train, 10) == pytest.approx(0.1 + 0.9 * shape)


def _stop_after(monkeypatch, n_steps):
    """Make the trainer see a SIGTERM after n_steps steps, as a real signal would set it."""
    original = train_sft.Trainer.train_step

    def train_step(self, batches):
        if self.step + 1 == n_steps:  # arrives during step n_steps, which then finishes
            self.stop_signal = signal.SIGTERM
        return original(self, batches)
    monkeypatch.setattr(train_sft.Trainer, "train_step", train_step)


@pytest.mark.parametrize("extra", [[], ["--lora", "--rank", "2", "--lora-dropout", "0.1", "--dropout", "0.1"]])
def test_resume_is_bit_identical(run_args, monkeypatch, extra):
    """Stop at step 8 (checkpoint written on the way out), resume: every loss equals the
    uninterrupted run's, bit for bit (CPU, float32), dropout included."""
    args = run_args + ["--save-interval", "5"] + extra
    straight, _ = run(args, "straight")
    with monkeypatch.context() as patch:
        _stop_after(patch, 8)
        stopped, code = run(args, "stopped")
    assert code == 128 + signal.SIGTERM
    assert json.loads((stopped / "metrics.json").read_text())["status"] == "interrupted"
    assert (stopped / "checkpoints" / "latest").read_text() == "step_0000008"
    assert train_sft.main(["--resume", str(stopped)]) == 0
    assert train_losses(stopped) == train_losses(straight)
    assert len(train_losses(stopped)) == 12


def _signal_after_first_checkpoint(args, run_dir: Path, sig) -> subprocess.CompletedProcess:
    # one thread, like the tests' own process (conftest): the same float reduction order, so a
    # run continued in-process can be compared bit for bit
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_sft.py"), *args, "--run-name", run_dir.name],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigterm_saves_and_exits_cleanly(run_args, tmp_path):
    run_dir = tmp_path / "runs" / "term"
    proc = _signal_after_first_checkpoint(run_args + ["--max-steps", "2000", "--save-interval", "3"], run_dir,
                                          signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "Traceback" not in proc.stderr and f"--resume {run_dir}" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    last_step = max(r["step"] for r in metrics["records"])
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{last_step:07d}"  # nothing lost


def test_kill9_loses_only_steps_since_the_last_checkpoint(run_args, tmp_path):
    """kill -9 mid-run, then --resume: the finished run's losses equal an uninterrupted run's."""
    args = run_args + ["--max-steps", "30", "--save-interval", "3", "--eval-interval", "1000"]
    straight, _ = run(args, "straight")
    run_dir = tmp_path / "runs" / "killed"
    proc = _signal_after_first_checkpoint(args, run_dir, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    json.loads((run_dir / "metrics.json").read_text())  # still valid JSON
    assert train_sft.main(["--resume", str(run_dir)]) == 0
    assert train_losses(run_dir) == train_losses(straight)


def test_resume_refuses_other_options(run_args):
    run_dir, _ = run(run_args + ["--max-steps", "2"], "done")
    with pytest.raises(UserError, match="--resume"):
        train_sft.main(["--resume", str(run_dir), "--lr", "1"])


def test_non_finite_loss_stops_with_step(run_args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *run_args, "--lr", "1e6", "--warmup", "0",
                           "--grad-clip", "0", "--save-interval", "1", "--run-name", "nan"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "non-finite" in proc.stderr and "at step" in proc.stderr and "Traceback" not in proc.stderr
    run_dir = tmp_path / "runs" / "nan"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
    from safetensors.torch import load_file
    for weights in (run_dir / "checkpoints").glob("step_*/model/model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(weights).values())


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden"])
def test_unsafe_run_names_are_refused(run_args, name):
    with pytest.raises(UserError, match="run-name"):
        train_sft.main(run_args + ["--run-name", name])


def test_existing_run_name_is_refused(run_args):
    run(run_args + ["--max-steps", "1"], "taken")
    with pytest.raises(UserError, match="already exists"):
        run(run_args, "taken")


def test_default_run_names_are_readable_and_unique(run_args):
    _, _, train = parse_args(run_args + ["--lora", "--rank", "4"])
    first = runs.new_run_dir(train, "tiny/lora")
    first.mkdir(parents=True)
    second = runs.new_run_dir(train, "tiny/lora")
    assert first.name.startswith("tiny-lora-r4-adamw-lr0.01-") and second != first
    _, _, dora = parse_args(run_args + ["--lora", "--dora", "--rank", "4"])
    assert runs.new_run_dir(dora, "tiny/lora").name.startswith("tiny-dora-r4-")


def test_bfloat16_and_grad_checkpointing_run(run_args):
    run_dir, code = run(run_args + ["--dtype", "bfloat16", "--grad-checkpointing", "--max-steps", "3"], "bf16")
    assert code == 0
    assert all(math.isfinite(loss) for _, loss in train_losses(run_dir))


def test_synthetic_default_task_runs(tiny_tokenizer_dir, tmp_path):
    """The built-in synthetic dataset end to end (a few steps): exact match is measured."""
    code = train_sft.main(["--config", "tiny", "--tokenizer", str(tiny_tokenizer_dir), "--template", "dialog",
                           "--vocab-size", str(TINY_VOCAB_SIZE), "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                           "--block-size", "160", "--max-steps", "2", "--eval-interval", "2",
                           "--out-dir", str(tmp_path), "--run-name", "syn"])
    assert code == 0
    evals = [r for r in json.loads((tmp_path / "syn" / "metrics.json").read_text())["records"] if "val_loss" in r]
    assert all(0.0 <= r["exact_match"] <= 1.0 for r in evals)


def test_ddp_two_processes_match_single_process(run_args, tmp_path):
    """2 gloo ranks x batch 4 == 1 process x batch 4 x grad_accum 2 (same global batches)."""
    args = run_args + ["--max-steps", "4", "--eval-interval", "100", "--save-interval", "100"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *args, "--grad-accum", "2",
                             "--run-name", "single"], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          str(ROOT / "train_sft.py"), *args, "--run-name", "ddp"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs = tmp_path / "runs"
    a, b = train_losses(runs / "single"), train_losses(runs / "ddp")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    # float32 sums in another order (all-reduce) differ in the last bits only
    assert [l for _, l in b] == pytest.approx([l for _, l in a], rel=1e-5)
    hyper = json.loads((runs / "ddp" / "hyperparams.json").read_text())
    assert hyper["world_size"] == 2 and hyper["global_batch"] == 8


def test_dora_and_neftune_reach_a_pretrained_model(run_args, hf_checkpoint):
    args = list(run_args)
    i = args.index("--vocab-size")
    del args[i:i + 10]  # the architecture comes from the checkpoint
    run_dir, code = run(args + ["--init-from", str(hf_checkpoint), "--lora", "--rank", "2", "--dora",
                                "--neftune-alpha", "5", "--max-steps", "2"], "dora")
    assert code == 0
    step = next((run_dir / "checkpoints").glob("step_*"))
    assert any(k.endswith("lora_magnitude_vector") for k in lora.read_adapter_weights(step / "adapter"))
    assert json.loads((run_dir / "hyperparams.json").read_text())["config"]["model"]["neftune_alpha"] == 5
