"""--fsdp on CPU with 2 gloo ranks (sharding.py): the losses of a single process with the same
global batch, checkpoints in the single-process formats, exact resume, and each rank holding
half of the bytes; and the memory plan's --dry-run and --max-memory (memplan.py)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import memplan
import train_sft
from conftest import ROOT
from errors import UserError
from test_train import run_args, train_losses  # noqa: F401  (run_args is a fixture)

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
LORA = ["--lora", "--rank", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            str(ROOT / "train_sft.py"), *args]


def run_single(args, name) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *args, "--run-name", name],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_fsdp(args, name) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun([*args, "--fsdp", "--run-name", name]), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def shard_bytes(stdout: str) -> dict[int, dict]:
    lines = [line.split("fsdp shard bytes: ", 1)[1] for line in stdout.splitlines() if "fsdp shard bytes: " in line]
    return {r["rank"]: r for r in map(json.loads, lines)}


def final_weights(run_dir: Path, base: str = "") -> dict[str, torch.Tensor]:
    """The last checkpoint's tensors, or with base="base_model" those of the saved random base."""
    from safetensors.torch import load_file
    if base:
        return load_file(str(run_dir / base / "model.safetensors"))
    step = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    folder, name = (step / "adapter", "adapter_model.safetensors") if (step / "adapter").is_dir() else \
        (step / "model", "model.safetensors")
    return load_file(str(folder / name))


def hf_logits(run_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The last checkpoint loaded as transformers/peft load it."""
    from transformers import GPT2LMHeadModel
    step = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    if (step / "adapter").is_dir():
        from peft import PeftModel
        config = json.loads((step / "adapter" / "adapter_config.json").read_text())
        base = GPT2LMHeadModel.from_pretrained(config["base_model_name_or_path"])
        model = PeftModel.from_pretrained(base, step / "adapter")
    else:
        model = GPT2LMHeadModel.from_pretrained(step / "model")
    with torch.no_grad():
        return model.eval()(tokens).logits


@pytest.mark.parametrize("method", ["full", "lora", "dora-random-base-compiled"])
def test_fsdp_matches_single_process(run_args, hf_checkpoint, method):
    """2 ranks x batch 4 with --fsdp == 1 process x batch 4 x grad_accum 2: the same losses,
    evaluations and checkpoints (to float32 sums in another order), and each rank holds half.
    LoRA trains a pretrained base (hf_checkpoint); DoRA a random one, which the run folder keeps,
    with the FSDP model compiled (torch.compile after fully_shard; inductor's fused float32 sums
    stay within the same 1e-5)."""
    options = {"full": [], "lora": LORA + ["--init-from", str(hf_checkpoint)],
               "dora-random-base-compiled": LORA + ["--dora"]}[method]
    args = run_args + options + ["--max-steps", "4", "--eval-interval", "2", "--save-interval", "4"]
    run_single(args + ["--grad-accum", "2"], "single")
    fsdp = run_fsdp(args + (["--compile"] if method.endswith("compiled") else []), "fsdp")
    runs_dir = Path(args[args.index("--out-dir") + 1])
    single_dir, fsdp_dir = runs_dir / "single", runs_dir / "fsdp"
    a, b = train_losses(single_dir), train_losses(fsdp_dir)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    assert [l for _, l in b] == pytest.approx([l for _, l in a], rel=1e-5)

    def evals(run_dir):
        return [(r["step"], r["val_loss"]) for r in json.loads((run_dir / "metrics.json").read_text())["records"]
                if "val_loss" in r]
    assert [s for s, _ in evals(fsdp_dir)] == [0, 2, 4]  # evaluation under FSDP, on every rank in lockstep
    assert [l for _, l in evals(fsdp_dir)] == pytest.approx([l for _, l in evals(single_dir)], rel=1e-5)
    if method.startswith("dora-random-base"):  # gathered from the shards before training: the same random base
        fsdp_base, single_base = final_weights(fsdp_dir, "base_model"), final_weights(single_dir, "base_model")
        assert fsdp_base.keys() == single_base.keys()
        assert all(torch.equal(fsdp_base[k], single_base[k]) for k in single_base)
    samples = [json.loads((d / "samples.json").read_text()) for d in (fsdp_dir, single_dir)]
    assert [r["step"] for r in samples[0]] == [0, 2, 4]  # generation under FSDP, on every rank in lockstep
    assert samples[0][0] == samples[1][0]  # the same weights at step 0: the same greedy answer

    # the checkpoint: the single process's format and (to rounding) weights; transformers/peft load it
    single_w, fsdp_w = final_weights(single_dir), final_weights(fsdp_dir)
    assert single_w.keys() == fsdp_w.keys()
    for name in single_w:
        torch.testing.assert_close(fsdp_w[name], single_w[name], rtol=1e-4, atol=1e-5, msg=name)
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf_logits(fsdp_dir, tokens), hf_logits(single_dir, tokens), rtol=1e-4, atol=1e-4)

    # Measured bytes: the two ranks' shards add up to exactly the full tensors (nothing is
    # replicated), and each holds half up to FSDP2's dim-0 split: a tensor of d rows gives rank 0
    # ceil(d/2) of them, so a rank is off by at most half a row per tensor (rows are at most
    # 4 x n_embd float32 wide; AdamW keeps two tensors per parameter).
    shards = shard_bytes(fsdp.stdout)
    assert sorted(shards) == [0, 1]
    hyper = json.loads((fsdp_dir / "hyperparams.json").read_text())
    assert hyper["config"]["train"]["fsdp"] and hyper["memory_plan"]["inputs"]["fsdp"]
    n_tensors = sum(1 for _ in train_sft.GPT(train_sft.GPTConfig(**hyper["config"]["model"])).parameters())
    n_tensors += 3 * 4 * hyper["config"]["model"]["n_layer"]  # at most A, B and DoRA's magnitude of 4 targets per block
    row_bytes = 4 * 4 * hyper["config"]["model"]["n_embd"]
    for kind, per_param in (("params", 1), ("grads", 1), ("optimizer", 2)):
        (local0, full), (local1, full1) = shards[0][kind], shards[1][kind]
        assert full == full1 and full > 0 and local0 + local1 == full, (kind, shards)
        for local in (local0, local1):
            assert abs(local - full / 2) <= per_param * n_tensors * row_bytes / 2, (kind, local, full)
    assert shards[0]["optimizer_unsharded"] < 0.01 * shards[0]["optimizer"][1]  # AdamW's step counts


def test_fsdp_resume_is_exact(run_args, tmp_path):
    """kill -9 an FSDP run after its first checkpoint, resume it under torchrun: its losses equal
    an uninterrupted FSDP run's, bit for bit (the optimizer state is gathered and re-sharded)."""
    args = run_args + ["--max-steps", "16", "--save-interval", "3", "--eval-interval", "1000"]
    straight = tmp_path / "runs" / "straight"
    run_fsdp(args, straight.name)
    killed = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(torchrun([*args, "--fsdp", "--run-name", killed.name]), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait(timeout=60)
    assert json.loads((killed / "metrics.json").read_text())["status"] != "finished"  # killed mid-run
    resumed = subprocess.run(torchrun(["--resume", str(killed)]), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(killed) == train_losses(straight)
    assert len(train_losses(killed)) == 16


def test_fsdp_refusals(run_args, monkeypatch):
    with pytest.raises(UserError, match="torchrun"):
        train_sft.main(run_args + ["--fsdp", "--run-name", "x"])
    monkeypatch.setattr(train_sft.dist, "is_initialized", lambda: True)  # as under torchrun: the next checks
    with pytest.raises(UserError, match="float16"):
        train_sft.main(run_args + ["--fsdp", "--dtype", "float16", "--run-name", "x"])
    assert not (Path(run_args[run_args.index("--out-dir") + 1]) / "x").exists()


def test_dry_run_prints_the_plan_and_builds_nothing(run_args, capsys, monkeypatch):
    monkeypatch.setattr(train_sft, "build_model", lambda *a: pytest.fail("--dry-run built the model"))
    monkeypatch.setattr(train_sft, "load_datasets", lambda *a: pytest.fail("--dry-run read the data"))
    assert train_sft.main(run_args + ["--dry-run", "--run-name", "dry"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per rank: batch 4 x 96 tokens" in out and "peak" in out
    assert not (Path(run_args[run_args.index("--out-dir") + 1]) / "dry").exists()


def test_dry_run_reads_only_config_json(hf_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(train_sft, "read_hf_state_dict", lambda *a: pytest.fail("--dry-run read the weights"))
    assert train_sft.main(["--config", "gpt2", "--init-from", str(hf_checkpoint), "--dry-run",
                           "--max-seq-len", "64", "--batch-size", "2"]) == 0
    assert "batch 2 x 64 tokens" in capsys.readouterr().out


def test_max_memory_proposes_what_fits(run_args, capsys):
    big = run_args + ["--batch-size", "64", "--max-memory", "20MB"]
    assert train_sft.main(big + ["--dry-run"]) == 0
    advice = capsys.readouterr().out.splitlines()[-1]
    assert advice.startswith("--max-memory 20MB: ") and "--batch-size" in advice
    with pytest.raises(UserError, match="predicted not to fit.*--batch-size"):
        train_sft.main(big + ["--run-name", "big"])  # a real run refuses, naming the options that fit
    with pytest.raises(UserError, match="--max-memory"):
        train_sft.main(run_args + ["--max-memory", "lots", "--dry-run"])



def test_real_run_prints_its_plan_and_stores_it_beside_the_measured_peak(run_args, capsys):
    run_dir = Path(run_args[run_args.index("--out-dir") + 1]) / "planned"
    assert train_sft.main(run_args + ["--max-steps", "2", "--run-name", "planned"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per rank: batch 4 x 96 tokens" in out
    plan = json.loads((run_dir / "hyperparams.json").read_text())["memory_plan"]
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    assert plan["total"] > plan["weights"] > 0 and summary["peak_mem_mb"] > 0 and summary["peak_mem_of"] == "peak_rss_mb"
    # the last line sets the measured peak beside the plan (on CPU without a ratio: RSS holds the process)
    size = memplan._gb  # format_plan's decimal units
    assert out.splitlines()[-1] == (f"memory: peak RSS {size(round(summary['peak_mem_mb'] * 2**20))} (the whole "
                                    f"process); the plan said {size(plan['total'])} of tensors and allocator slack "
                                    f"per rank")
