"""Where and in which precision to run: every device-specific decision of the project, in one file.

Each decision is a small function of plain facts (is CUDA there, how many GPUs, does the GPU do
bfloat16, which rank is this under torchrun), so a CPU test can execute every branch, the CUDA
ones included. `Facts.probe()` reads the facts from torch once; nothing else asks torch.

What differs on CUDA, and where it is decided:
  device and index ............ resolve_device   (set_device only ever gets an index)
  process-group backend ....... dist_backend     (nccl on CUDA, gloo elsewhere)
  DDP device_ids .............. ddp_device_ids
  autocast dtype, GradScaler .. compute_dtype, needs_grad_scaler
  fused AdamW ................. fused_adamw
  memory statistics ........... memory_now       (CUDA peak allocated/reserved, else process RSS)
  timing ...................... needs_synchronize (CUDA kernels run asynchronously)
  device name ................. device_name      (the GPU's, for MFU peaks and the run's record)
  generation dtype ............ generation_dtype
"""
from __future__ import annotations

import os
import platform
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
_TORCH_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class Facts:
    """What this machine has. Tests build these by hand; real runs call probe()."""
    cuda_available: bool = False
    cuda_count: int = 0
    mps_available: bool = False
    cuda_bf16: bool = False  # whether the CUDA device does bfloat16 (Ampere and newer)

    @classmethod
    def probe(cls) -> "Facts":
        cuda = torch.cuda.is_available()
        mps = getattr(torch.backends, "mps", None)
        return cls(cuda_available=cuda, cuda_count=torch.cuda.device_count() if cuda else 0,
                   mps_available=bool(mps and mps.is_available()),
                   cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()))


def local_rank(env: Mapping[str, str] = os.environ) -> Optional[int]:
    """This process's index on its machine under torchrun (LOCAL_RANK), None outside torchrun."""
    value = env.get("LOCAL_RANK")
    if value is None:
        return None
    if not value.isdigit():
        raise UserError(f"LOCAL_RANK={value!r} in the environment is not a process index; launch with torchrun, "
                        "which sets it, or unset it")
    return int(value)


def resolve_device(name: str, facts: Facts, rank: Optional[int] = None) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N, mps) as a concrete torch.device; a CUDA device always
    carries its index. Under torchrun (`rank` = LOCAL_RANK) each process takes cuda:LOCAL_RANK."""
    given = name
    if name == "auto":
        name = "cuda" if facts.cuda_available else "mps" if facts.mps_available else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not facts.mps_available:
            raise UserError("--device mps: this machine has no Apple GPU (MPS); use --device auto or cpu")
        return torch.device("mps")
    kind, colon, index = name.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise UserError(f"--device {name!r} is not a device this tool runs on; use {DEVICE_HELP}")
    if not facts.cuda_available:
        raise UserError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}"
                        f"{' is a CPU build' if torch.version.cuda is None else ''}); use --device cpu or auto")
    if index and rank is not None:
        raise UserError(f"--device {name} under torchrun would put every process on one GPU; use --device "
                        "cuda (each process takes cuda:LOCAL_RANK) or CUDA_VISIBLE_DEVICES")
    chosen = int(index) if index else (rank or 0)
    if chosen >= facts.cuda_count:
        what = f"--device {given}" + (f" under torchrun (LOCAL_RANK={rank})" if not index else "")
        raise UserError(f"{what} needs cuda:{chosen}, but this machine has {facts.cuda_count} GPU(s) "
                        f"(cuda:0 to cuda:{facts.cuda_count - 1})")
    return torch.device("cuda", chosen)


def dist_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def ddp_device_ids(device: torch.device) -> Optional[list[int]]:
    """DDP wants the GPU of a CUDA process and nothing for CPU processes."""
    return [device.index] if device.type == "cuda" else None


def compute_dtype(dtype: str, device: torch.device, facts: Facts) -> Optional[torch.dtype]:
    """The autocast dtype for --dtype (None: plain float32). `auto` is bfloat16 on CUDA devices
    that support it, float16 (with a GradScaler) on those that do not (T4, P100, V100), and float32
    on CPU and MPS, where autocast buys little and changes the numbers."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if facts.cuda_bf16 else torch.float16
    if dtype == "bfloat16" and device.type == "cuda" and not facts.cuda_bf16:
        raise UserError("--dtype bfloat16: this GPU does not support bfloat16; use --dtype float16 or auto")
    return _TORCH_DTYPES[dtype]


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def needs_grad_scaler(dtype: Optional[torch.dtype]) -> bool:
    """float16 overflows without loss scaling; bfloat16 has float32's range and needs none."""
    return dtype == torch.float16


def fused_adamw(device: torch.device) -> bool:
    """The fused AdamW kernel is CUDA's; elsewhere the multi-tensor (foreach) path is the fast one."""
    return device.type == "cuda"


def needs_synchronize(device: torch.device) -> bool:
    """CUDA runs kernels asynchronously: a timer must wait for them to finish."""
    return device.type == "cuda"


def generation_dtype(device: torch.device, facts: Facts) -> torch.dtype:
    """Weights' dtype for generation: half precision on CUDA (memory-bound decoding runs about
    twice as fast), float32 elsewhere, where it keeps results equal to the float32 reference."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if facts.cuda_bf16 else torch.float16


def device_name(device: torch.device) -> str:
    """The GPU's model name (bench_train's peak table keys on it), else the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or device.type


def pin_memory(device: torch.device) -> bool:
    """Batches are built on the host: pinned pages make the copy to a GPU asynchronous."""
    return device.type == "cuda"


def rng_state(device: torch.device) -> dict:
    """The random-number states a bit-identical resume needs: CPU's, and the GPUs' on CUDA."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def synchronize(device: torch.device) -> None:
    if needs_synchronize(device):
        torch.cuda.synchronize(device)


def pick_device(name: str, facts: Optional[Facts] = None, env: Mapping[str, str] = os.environ) -> torch.device:
    """resolve_device with this machine's facts and torchrun's LOCAL_RANK; sets the current CUDA
    device (by index) so that NCCL and the caching allocator use the right GPU."""
    device = resolve_device(name, facts or Facts.probe(), local_rank(env))
    if device.type == "cuda":
        torch.cuda.set_device(device.index)
    return device


def process_memory_mb() -> dict:
    """This process's resident memory now and its high-water mark, in MB (2**20 bytes). On Linux
    both come from /proc/self/status: VmHWM is this process's own peak, whereas getrusage's
    ru_maxrss carries a larger parent's peak across fork + exec (torchrun, pytest). Elsewhere
    (macOS) only the peak is known, from ru_maxrss, which macOS counts in bytes."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss_mb": peak / 2**20 if sys.platform == "darwin" else peak / 1024}
    kb = {name: int(value.split()[0]) for name, value in
          (line.split(":", 1) for line in status.splitlines()) if name in ("VmRSS", "VmHWM")}
    return {"rss_mb": kb["VmRSS"] / 1024, "peak_rss_mb": kb["VmHWM"] / 1024}


def memory_now(device: torch.device) -> dict:
    """Peak CUDA memory since the last call (allocated and reserved), or the process RSS."""
    if device.type != "cuda":
        return process_memory_mb()
    stats = {"peak_alloc_mb": torch.cuda.max_memory_allocated(device) / 2**20,
             "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    torch.cuda.reset_peak_memory_stats(device)
    return stats
