"""devices.py: every device decision, its CUDA branches included, executed on CPU by giving the
functions the machine's facts (CUDA there or not, GPU count, bfloat16 support, LOCAL_RANK) by hand.
And the command line: an impossible --device is one line on stderr and exit 2, no traceback."""
import subprocess
import sys

import pytest
import torch

import devices
from conftest import ROOT
from devices import Facts
from errors import UserError

CPU_ONLY = Facts()
MAC = Facts(mps_available=True)
ONE_T4 = Facts(cuda_available=True, cuda_count=1, cuda_bf16=False)  # T4 / P100 / V100: no bfloat16
ONE_A100 = Facts(cuda_available=True, cuda_count=1, cuda_bf16=True)
FOUR_A100 = Facts(cuda_available=True, cuda_count=4, cuda_bf16=True)

CPU, MPS = torch.device("cpu"), torch.device("mps")
CUDA0, CUDA2 = torch.device("cuda", 0), torch.device("cuda", 2)


# ----------------------------------------------------------------------------- resolve_device

@pytest.mark.parametrize("facts, rank, expected", [
    (ONE_A100, None, CUDA0),        # a CUDA device always gets its index: set_device accepts only that
    (FOUR_A100, None, CUDA0),
    (FOUR_A100, 2, CUDA2),          # under torchrun each process takes cuda:LOCAL_RANK
    (MAC, None, MPS),
    (Facts(cuda_available=True, cuda_count=1, mps_available=True), None, CUDA0),  # CUDA before MPS
    (CPU_ONLY, None, CPU),
    (CPU_ONLY, 1, CPU),             # torchrun on CPU processes (gloo)
], ids=["1gpu", "4gpu", "torchrun-rank2", "mps", "cuda-over-mps", "cpu", "torchrun-cpu"])
def test_auto(facts, rank, expected):
    device = devices.resolve_device("auto", facts, rank)
    assert device == expected and device.index == expected.index


@pytest.mark.parametrize("name, facts, rank, expected", [
    ("cpu", FOUR_A100, None, CPU),  # asked for: CPU even with GPUs there
    ("cpu", FOUR_A100, 3, CPU),
    ("cuda", ONE_T4, None, CUDA0),
    ("cuda", FOUR_A100, 2, CUDA2),
    ("cuda:2", FOUR_A100, None, CUDA2),
    ("cuda:0", ONE_A100, None, CUDA0),
    ("mps", MAC, None, MPS),
])
def test_explicit_devices(name, facts, rank, expected):
    device = devices.resolve_device(name, facts, rank)
    assert device == expected and device.index == expected.index


@pytest.mark.parametrize("name, facts, rank, words", [
    ("cuda", CPU_ONLY, None, ["--device cuda", "CUDA is not available", "--device cpu"]),
    ("cuda:0", MAC, None, ["--device cuda:0", "CUDA is not available"]),
    ("tpu", FOUR_A100, None, ["--device 'tpu'", "auto, cpu, cuda, cuda:N or mps"]),
    ("cuda:x", FOUR_A100, None, ["--device 'cuda:x'"]),
    ("cuda:", FOUR_A100, None, ["--device 'cuda:'"]),
    ("cuda:-1", FOUR_A100, None, ["--device 'cuda:-1'"]),
    ("gpu", FOUR_A100, None, ["--device 'gpu'"]),
    ("mps", CPU_ONLY, None, ["--device mps", "no Apple GPU"]),
    ("cuda:7", ONE_A100, None, ["--device cuda:7", "needs cuda:7", "1 GPU(s)", "cuda:0 to cuda:0"]),
    ("cuda:4", FOUR_A100, None, ["--device cuda:4", "4 GPU(s)", "cuda:0 to cuda:3"]),
    ("cuda:1", FOUR_A100, 0, ["--device cuda:1 under torchrun", "every process on one GPU"]),
    ("cuda", FOUR_A100, 5, ["--device cuda under torchrun (LOCAL_RANK=5)", "needs cuda:5", "4 GPU(s)"]),
    ("auto", ONE_A100, 1, ["--device auto under torchrun (LOCAL_RANK=1)", "needs cuda:1", "1 GPU(s)"]),
])
def test_impossible_devices_are_one_line_naming_the_option(name, facts, rank, words):
    with pytest.raises(UserError) as err:
        devices.resolve_device(name, facts, rank)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_local_rank_comes_from_the_environment_mapping():
    assert devices.local_rank({}) is None
    assert devices.local_rank({"LOCAL_RANK": "0"}) == 0
    assert devices.local_rank({"LOCAL_RANK": "3", "RANK": "7"}) == 3
    with pytest.raises(UserError, match="LOCAL_RANK='one'"):
        devices.local_rank({"LOCAL_RANK": "one"})


def test_pick_device_resolves_with_the_given_facts_and_env():
    assert devices.pick_device("auto", CPU_ONLY, env={}) == CPU
    assert devices.pick_device("cpu", FOUR_A100, env={"LOCAL_RANK": "2"}) == CPU  # no set_device for CPU
    with pytest.raises(UserError, match="LOCAL_RANK=5"):
        devices.pick_device("cuda", FOUR_A100, env={"LOCAL_RANK": "5"})
    with pytest.raises(UserError, match="CUDA is not available"):
        devices.pick_device("cuda", CPU_ONLY, env={})


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("dtype, device, facts, expected", [
    ("auto", CUDA0, ONE_A100, torch.bfloat16),
    ("auto", CUDA0, ONE_T4, torch.float16),      # no bfloat16 on the card: float16 + GradScaler
    ("auto", CPU, CPU_ONLY, None),
    ("auto", MPS, MAC, None),
    ("float32", CUDA0, ONE_A100, None),          # None: no autocast at all
    ("float32", CPU, CPU_ONLY, None),
    ("bfloat16", CUDA0, ONE_A100, torch.bfloat16),
    ("bfloat16", CPU, CPU_ONLY, torch.bfloat16),  # asked for on CPU: given (CPU autocast does bfloat16)
    ("bfloat16", MPS, MAC, torch.bfloat16),
    ("float16", CUDA0, ONE_A100, torch.float16),
    ("float16", CUDA0, ONE_T4, torch.float16),
    ("float16", CPU, CPU_ONLY, torch.float16),
])
def test_compute_dtype(dtype, device, facts, expected):
    assert devices.compute_dtype(dtype, device, facts) == expected


def test_compute_dtype_refusals():
    with pytest.raises(UserError, match="--dtype bfloat16: this GPU does not support bfloat16"):
        devices.compute_dtype("bfloat16", CUDA0, ONE_T4)
    with pytest.raises(UserError, match="--dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        devices.compute_dtype("fp8", CPU, CPU_ONLY)


def test_dtype_name():
    assert [devices.dtype_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["float32", "bfloat16", "float16"]


def test_needs_grad_scaler_only_for_float16():
    assert devices.needs_grad_scaler(torch.float16)
    assert not any(devices.needs_grad_scaler(d) for d in (None, torch.bfloat16, torch.float32))
    # the decision chain a T4 takes with --dtype auto, and an A100's
    assert devices.needs_grad_scaler(devices.compute_dtype("auto", CUDA0, ONE_T4))
    assert not devices.needs_grad_scaler(devices.compute_dtype("auto", CUDA0, ONE_A100))


@pytest.mark.parametrize("device, facts, expected", [
    (CUDA0, ONE_A100, torch.bfloat16), (CUDA2, FOUR_A100, torch.bfloat16), (CUDA0, ONE_T4, torch.float16),
    (CPU, CPU_ONLY, torch.float32), (CPU, FOUR_A100, torch.float32), (MPS, MAC, torch.float32),
])
def test_generation_dtype(device, facts, expected):
    assert devices.generation_dtype(device, facts) == expected


# ----------------------------------------------------------------------------- the rest of the CUDA branches

def test_fused_adamw_only_on_cuda():
    assert devices.fused_adamw(CUDA0) and devices.fused_adamw(CUDA2)
    assert not devices.fused_adamw(CPU) and not devices.fused_adamw(MPS)


def test_dist_backend_and_ddp_device_ids():
    assert devices.dist_backend(CUDA2) == "nccl" and devices.ddp_device_ids(CUDA2) == [2]
    assert devices.dist_backend(CPU) == "gloo" and devices.ddp_device_ids(CPU) is None


def test_synchronize_only_on_cuda():
    assert devices.needs_synchronize(CUDA0) and not devices.needs_synchronize(CPU)
    devices.synchronize(CPU)  # a no-op, not an error, on a machine without CUDA


def test_device_name_of_a_cpu_needs_no_cuda():
    assert isinstance(devices.device_name(CPU), str) and devices.device_name(CPU)


def test_memory_now_on_cpu_is_the_process_rss():
    memory = devices.memory_now(CPU)
    assert set(memory) == {"rss_mb", "peak_rss_mb"}
    assert 0 < memory["rss_mb"] <= memory["peak_rss_mb"]


def test_probe_agrees_with_torch():
    facts = Facts.probe()
    assert facts.cuda_available == torch.cuda.is_available()
    assert facts.cuda_count == (torch.cuda.device_count() if facts.cuda_available else 0)
    if not facts.cuda_available:
        assert not facts.cuda_bf16


# ----------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("device, words", [("cuda", "CUDA is not available"), ("cuda:7", "CUDA is not available"),
                                           ("tpu", "is not a device this tool runs on")])
def test_train_sft_impossible_device_is_one_line_exit_2(device, words, tmp_path):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, "train_sft.py", "--config", "tiny", "--dataset", "synthetic",
                           "--device", device, "--out-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --device {device!r}" if device == "tpu"
                                                   else f"error: --device {device}"), done.stderr
    assert words in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-made
