"""The training benchmarks: bench_train.py's FLOP model against torch's own FLOP counter, and a
tiny end-to-end run of bench_train.py and bench_alpaca.py (their numbers must hang together)."""
import json
import math
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, mm_flop

import lora
from configs import GPTConfig, preset
from conftest import ROOT
from model import GPT

sys.path.insert(0, str(ROOT / "bench"))
import bench_train  # noqa: E402


@pytest.mark.parametrize("rank", [None, 4], ids=["full", "lora"])
def test_step_flops_equal_torch_flop_counter(rank):
    """Every matmul of a forward + backward, counted by torch (attention through the math
    backend, whose matmuls the counter sees), equals the formula exactly. The counter knows
    addmm but not its in-place form, which LoRALinear uses: it is taught that one."""
    cfg = GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    if rank:
        lora.apply_lora(model, rank, 2.0 * rank)
    x = torch.randint(0, cfg.vocab_size, (3, 32))
    y = x.clone()
    y[:, :10] = -100
    in_place_addmm = {torch.ops.aten.addmm_: lambda _, a, b, *args, **kwargs: mm_flop(a, b)}
    with FlopCounterMode(display=False, custom_mapping=in_place_addmm) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(x, y, targets_only=True)
        loss.backward()
    head_rows = int((y != -100).sum())
    assert bench_train.step_flops(cfg, 3, 32, head_rows, rank) == counter.get_total_flops()


def test_peak_tflops():
    assert bench_train.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", None) == 989.4
    assert bench_train.peak_tflops("NVIDIA H100 PCIe", "bfloat16", None) == 756.0
    assert bench_train.peak_tflops("NVIDIA H100 80GB HBM3", "float32", None) is None  # TF32 or not: ask
    assert bench_train.peak_tflops("cpu", "float32", 2.5) == 2.5
    assert bench_train.peak_tflops("Some Future GPU", "bfloat16", None) is None


def test_memory_table_flag_sets_the_old_systems_configuration():
    args = bench_train.parse_args(["--memory-table", "--steps", "1"])
    assert (args.model, args.methods, args.rank, args.optimizers) == ("gpt2-medium", ["lora"], 1,
                                                                      ["sgd", "momentum", "adamw"])
    assert args.steps == 1


def run_json(cmd: list) -> dict:
    done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_bench_train_tiny_run(tiny_tokenizer_dir):
    batch, seq = 2, 16
    report = run_json(["bench/bench_train.py", "--model", "tiny", "--batch", str(batch), "--seq", str(seq),
                       "--steps", "2", "--optimizers", "sgd", "adamw", "--threads", "1",
                       "--tokenizer", str(tiny_tokenizer_dir)])
    results = {(r["method"], r["optimizer"]): r for r in report["results"]}
    assert set(results) == {("full", "sgd"), ("full", "adamw"), ("lora-r16", "sgd"), ("lora-r16", "adamw")}
    model_cfg = preset("tiny")[0]
    n_params = sum(p.numel() for p in GPT(model_cfg).parameters())
    head_rows = batch * (seq - int(0.5 * seq))  # --prompt-frac 0.5 masks the first half of each row
    for (method, optimizer), r in results.items():
        assert math.isclose(r["tokens_per_s"], batch * seq / r["step_s_median"], rel_tol=1e-2)
        assert r["step_s_min"] <= r["step_s_median"]
        assert r["peak_rss_mb"] >= r["rss_after_build_mb"] > 0 and r["peak_above_baseline_mb"] > 0
        rank = None if method == "full" else 16
        flops = bench_train.step_flops(model_cfg, batch, seq, head_rows, rank)
        assert r["model_tflop_per_step"] == round(flops / 1e12, 4)
        assert r["mfu"] is None  # no known peak for a CPU
        assert math.isfinite(r["last_loss"]) and 9.0 < r["last_loss"] < 12.0  # ~ln(50257) at random init
        state = r["state_mb"]
        assert state["optimizer_state"] == (2 * state["gradients"] if optimizer == "adamw" else 0.0)
    assert results[("full", "sgd")]["trainable_params"] == n_params
    assert results[("lora-r16", "sgd")]["trainable_params"] == 16 * 4 * 128 * (4 + 2 + 5 + 5)  # r (in+out), 4 blocks


def test_bench_alpaca_tiny_run(tmp_path, tiny_tokenizer_dir):
    pytest.importorskip("peft")
    words = "red blue green cat dog sun moon tree fish bird".split()
    records = [{"instruction": f"say {words[i % 10]}", "input": "",
                "output": " ".join(words[(i * k) % 10] for k in range(1 + i % 7))} for i in range(20)]
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records))
    report = run_json(["bench/bench_alpaca.py", "--model", "tiny", "--data", str(data), "--template", "dialog",
                       "--tokenizer", str(tiny_tokenizer_dir), "--threads", "1"])
    ours, ref = report["results"]["ours"], report["results"]["reference"]
    assert report["records"] == 20 and report["steps"] == 3  # batches of 8: 8 + 8 + 4
    assert ours["target_tokens"] == ref["target_tokens"] > 0
    for r in (ours, ref):
        assert 0.0 <= r["pad_fraction"] < 1.0
        assert math.isclose(r["useful_tokens_per_s"], r["target_tokens"] / r["time_s"], rel_tol=0.05)
        assert 9.5 < r["mean_train_loss"] < 12.0  # the same random GPT-2 on both sides: ~ln(50257)
    assert math.isclose(report["ratio_useful_tokens_per_s"],
                        ours["useful_tokens_per_s"] / ref["useful_tokens_per_s"], rel_tol=1e-2)


def test_gpu_check_quick_on_cpu(tiny_tokenizer_dir):
    """bench/gpu_check.py --quick on CPU: every part runs on tiny shapes and reports what it measured,
    so that the script is known to work before a GPU ever runs it (~30 s of CPU time)."""
    pytest.importorskip("transformers")
    report = run_json(["bench/gpu_check.py", "--quick", "--device", "cpu", "--tokenizer", str(tiny_tokenizer_dir)])
    assert report["device"] == "cpu" and report["quick"] is True
    parts = report["parts"]
    assert set(parts) == {"train_e2e", "steps", "resume", "generation", "export"}
    assert all(p["ok"] for p in parts.values()), {k: p.get("error") for k, p in parts.items()}
    e2e = parts["train_e2e"]
    assert e2e["status"] == "finished" and e2e["steps"] == 4 and e2e["dtype"] == "float32" and e2e["tokens_per_s"] > 0
    steps = {(r["method"], r["compile"]): r for r in parts["steps"]["results"]}
    assert set(steps) == {("lora-r16", False), ("full", False)}
    for r in steps.values():
        assert r["ok"] and r["tokens_per_s"] > 0 and r["mfu"] is None and r["peak_rss_mb"] > 0
        assert r["sync_check"]["pass"] is None  # sync-debug mode is CUDA's; tests/test_sync.py covers CPU
    resume = parts["resume"]  # float32 on CPU: the resumed run's losses are the uninterrupted run's, exactly
    assert resume["pass"] and resume["bit_identical"] and resume["max_rel_diff"] == 0.0
    gen = parts["generation"]
    assert gen["ours_tokens_per_s"] > 0 and gen["hf_tokens_per_s"] > 0 and gen["same_token_fraction"] == 1.0
    assert parts["export"]["pass"] and parts["export"]["hf_device"] == "cpu"
