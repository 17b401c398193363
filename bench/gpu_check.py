"""The GPU path in one command: does it work, how fast, how much memory, how many host syncs.

    python bench/gpu_check.py                       # on the first GPU; under 8 minutes on an H100
    python bench/gpu_check.py --quick --device cpu  # tiny shapes on CPU: that the script itself runs

Offline: every model has random weights at the real shapes. Five parts, each on its own (one
failing is recorded as {"ok": false, "error": ...} and the rest still run):
  train_e2e   python train_sft.py --config tiny, a few hundred steps: final losses, tokens/s, memory
  steps       gpt2-medium LoRA r=16 and full fine-tuning, 8 x 512, --dtype auto (bfloat16 on
              Ampere and newer), compile off and on, each in a fresh process: tokens/s, MFU against
              the card's dense bfloat16 peak (bench_train.py's FLOP model and table), peak allocated
              and reserved memory, and one more step run whole (its batch fetch included) under
              torch.cuda.set_sync_debug_mode("error") with the step's one host read let through
              and counted: `sync_check` passes when nothing else synchronised, else names the op
  resume      tiny/lora: 2N steps straight vs N steps, then --resume to 2N (constant learning
              rate, so the two schedules agree): the losses of steps N+1..2N must agree within
              RESUME_RTOL (float32: exactly; bfloat16: see RESUME_RTOL)
  generation  greedy decoding of a batch, GPT.generate vs transformers' generate() on the same
              weights in the generation dtype (devices.generation_dtype): tokens/s each
  export      export.py --merged of the resume part's LoRA run, loaded by transformers onto the
              device: its float32 logits against our model's (LoRA unmerged) within EXPORT_ATOL
Prints one JSON document on stdout and a short table on stderr. Tokenizer: --tokenizer, else
../shared/assets/gpt2_bpe if present, else tiktoken's gpt2 (from TIKTOKEN_CACHE_DIR, set to
../shared/assets/tiktoken_cache when that exists).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import devices  # noqa: E402
from errors import one_line, run_cli  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ASSETS = ROOT.parent / "shared" / "assets"
# Losses after a resume against the uninterrupted run. float32 on one device replays the same
# kernels on the same data: bit-identical. Under bfloat16 autocast CUDA's atomic adds (embedding
# and index backward) sum in a varying order and bfloat16 (8 bits of mantissa, ~4e-3) rounds the
# difference up: a few steps later the losses differ in the 3rd-4th digit, not more.
RESUME_RTOL = {"float32": 0.0, "bfloat16": 5e-3, "float16": 5e-3}
EXPORT_ATOL = 1e-3  # float32 logits, TF32 off (torch's default for matmuls): differences ~1e-5
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__")


# ----------------------------------------------------------------------------- shapes

def shapes(quick: bool) -> SimpleNamespace:
    """What each part runs: the real shapes, or --quick's tiny ones (a CPU can run them in seconds)."""
    if quick:
        return SimpleNamespace(model="tiny", batch=2, seq=32, warmup=1, steps=2, e2e_steps=4, resume_steps=2,
                               gen_batch=2, gen_prompt=8, gen_new=8, gen_repeats=1,
                               tiny=["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64",
                                     "--batch-size", "4", "--eval-batches", "1"])
    return SimpleNamespace(model="gpt2-medium", batch=8, seq=512, warmup=3, steps=5, e2e_steps=300, resume_steps=50,
                           gen_batch=8, gen_prompt=64, gen_new=128, gen_repeats=3, tiny=[])


def small_gpt(vocab_size: int):
    from configs import GPTConfig
    return GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size)


# ----------------------------------------------------------------------------- train_sft runs

def run_tool(args, module: str, argv: list[str]) -> None:
    """python MODULE.py ARGV in a subprocess, as a user runs it; with --quick its main(argv) in
    this process instead (on a CPU each interpreter start would be most of the smoke run)."""
    if args.quick:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON document
            code = importlib.import_module(module).main(argv)  # a UserError propagates: the part fails
        if code:
            raise RuntimeError(f"{module}.py exited {code}")
        return
    done = subprocess.run([sys.executable, f"{module}.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=args.part_timeout, env=args.env)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.py exited {done.returncode}: {done.stderr.strip()[-600:]}")


def train(args, name: str, config: str | None, extra: list[str]) -> dict:
    """A train_sft.py run in args.work: a new one with `config`, or (config None) --resume NAME."""
    out_dir = args.work
    argv = ["--device", args.device, "--log-interval", "1", *extra]
    if config is None:
        argv += ["--resume", str(out_dir / name)]
    else:
        argv += ["--config", config, "--run-name", name, "--out-dir", str(out_dir), "--sample-prompts", "0",
                 *args.data_flags, *args.shape.tiny]
    start = time.perf_counter()
    run_tool(args, "train_sft", argv)
    metrics = json.loads((out_dir / name / "metrics.json").read_text())
    return {**metrics, "wall_s": time.perf_counter() - start}


def train_losses(metrics: dict) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in metrics["records"] if "train_loss" in r}


def part_train_e2e(args) -> dict:
    steps = args.shape.e2e_steps
    m = train(args, "e2e", "tiny", ["--max-steps", str(steps), "--eval-interval", str(steps)])
    losses, evals = train_losses(m), [r for r in m["records"] if "val_loss" in r]
    hyper = json.loads((args.work / "e2e" / "hyperparams.json").read_text())
    return {"status": m["status"], "steps": m["summary"]["steps"], "dtype": hyper["compute_dtype"],
            "device": hyper["device"], "first_train_loss": losses[min(losses)], "last_train_loss": losses[max(losses)],
            "val_loss_start": evals[0]["val_loss"], "val_loss_end": evals[-1]["val_loss"],
            "exact_match_end": evals[-1].get("exact_match"), "tokens_per_s": m["summary"]["tokens_per_s"],
            "peak_mem_mb": m["summary"]["peak_mem_mb"], "wall_s": round(m["wall_s"], 1)}


def part_resume(args) -> dict:
    n = args.shape.resume_steps
    common = ["--schedule", "constant", "--warmup", "0", "--eval-interval", str(2 * n)]
    straight = train(args, "straight", "tiny/lora", [*common, "--max-steps", str(2 * n), "--save-interval", str(2 * n)])
    train(args, "stopped", "tiny/lora", [*common, "--max-steps", str(n), "--save-interval", str(n)])
    resumed = train(args, "stopped", None, ["--max-steps", str(2 * n)])
    a, b = train_losses(straight), train_losses(resumed)
    after = [s for s in range(n + 1, 2 * n + 1)]
    if not all(s in a and s in b for s in after):
        raise RuntimeError(f"missing train losses after step {n}: straight {sorted(a)}, resumed {sorted(b)}")
    dtype = json.loads((args.work / "straight" / "hyperparams.json").read_text())["compute_dtype"]
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in after)
    return {"dtype": dtype, "steps": f"{n} + resume to {2 * n}", "bit_identical": all(a[s] == b[s] for s in after),
            "max_rel_diff": worst, "rtol": RESUME_RTOL[dtype], "pass": worst <= RESUME_RTOL[dtype],
            "final_loss_straight": a[2 * n], "final_loss_resumed": b[2 * n]}


def part_export(args) -> dict:
    """The resume part's uninterrupted LoRA run, exported merged and loaded by transformers."""
    from transformers import GPT2LMHeadModel

    import runs
    run_dir, out = args.work / "straight", args.work / "exported"
    if not run_dir.is_dir():
        raise RuntimeError("no run to export: the resume part did not make one")
    run_tool(args, "export", ["--run", str(run_dir), "--merged", str(out)])
    device = torch.device(args.device)
    hf = GPT2LMHeadModel.from_pretrained(out, local_files_only=True).to(device).eval()
    ours = runs.load_weights(runs.run_weights(run_dir)).to(device).eval()  # LoRA still separate
    x = torch.randint(0, ours.config.vocab_size, (2, min(64, ours.config.block_size)),
                      generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        diff = (hf(x).logits.float() - ours(x)[0].float()).abs().max().item()
    return {"hf_device": str(next(hf.parameters()).device), "max_abs_logit_diff": diff, "atol": EXPORT_ATOL,
            "pass": diff <= EXPORT_ATOL}


# ----------------------------------------------------------------------------- steps (child processes)

def count_host_reads(log: list):
    """Let each explicit host read of a CUDA tensor through sync-debug mode, and log where it came
    from (reads of host tensors, e.g. non-fused AdamW's step counters, wait for nothing)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name):
        def counted(self, *a, **kw):
            if not self.is_cuda:
                return originals[name](self, *a, **kw)
            caller = sys._getframe(1)
            log.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return originals[name](self, *a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return counted

    for name in HOST_READS:
        setattr(torch.Tensor, name, wrap(name))
    return lambda: [setattr(torch.Tensor, n, f) for n, f in originals.items()]


def first_repo_frame(err: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if str(ROOT) in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"


def sync_check(trainer, batches, device: torch.device) -> dict:
    """One whole step (its batch fetch too) under sync-debug "error": any synchronising op
    raises, except the explicit host reads, which are let through and counted."""
    cuda = device.type == "cuda"
    if not cuda:
        return {"mode": "none on CPU (no device to wait for; tests/test_sync.py counts the reads on CPU)",
                "host_reads": None, "reads": [], "first_offending_op": None, "pass": None}
    reads: list[str] = []
    restore = count_host_reads(reads)
    try:
        torch.cuda.set_sync_debug_mode("error")
        trainer.train_step([next(batches)])
        devices.synchronize(device)
        error = None
    except RuntimeError as err:
        error = f"{one_line(err)} (at {first_repo_frame(err)})"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        restore()
    return {"mode": "error",
            "host_reads": len(reads), "reads": reads, "first_offending_op": error,
            "pass": error is None and len(reads) == 1}


def run_step_child(args, method: str, compiled: bool) -> dict:
    import bench_train
    child = SimpleNamespace(model=args.shape.model, rank=16, batch=args.shape.batch, seq=args.shape.seq,
                            prompt_frac=0.5, dtype="auto", device=args.device, tokenizer=args.tokenizer,
                            warmup=args.shape.warmup, steps=args.shape.steps)
    with tempfile.TemporaryDirectory() as run_dir:
        shape = small_gpt(args.vocab_size) if args.quick else None
        trainer = bench_train.bench_trainer(child, method, "adamw", compiled, Path(run_dir), shape)
        device, batches, times = trainer.s.device, trainer.micro_batches(), []
        devices.memory_now(device)  # CUDA: the peaks from here on
        for i in range(child.warmup + child.steps):
            start = time.perf_counter()
            result = trainer.train_step([next(batches)])
            devices.synchronize(device)
            if i >= child.warmup:
                times.append(time.perf_counter() - start)
        memory = devices.memory_now(device)
        check = sync_check(trainer, batches, device)
    step_s = statistics.median(times)
    flops = bench_train.step_flops(trainer.s.raw_model.config, child.batch, child.seq, result.targets,
                                   16 if method == "lora" else None)
    dtype = devices.dtype_name(trainer.s.compute_dtype)
    peak = bench_train.peak_tflops(devices.device_name(device), dtype, args.peak_tflops)
    return {"method": "lora-r16" if method == "lora" else "full", "compile": compiled, "dtype": dtype,
            "tokens_per_s": round(child.batch * child.seq / step_s, 1), "step_s_median": round(step_s, 4),
            "achieved_tflops": round(flops / step_s / 1e12, 3),
            "mfu": round(flops / step_s / 1e12 / peak, 4) if peak else None, "last_loss": round(result.loss, 4),
            **{k: round(v, 1) for k, v in memory.items()}, "sync_check": check}


def part_steps(args) -> dict:
    results = []
    for method in ("lora", "full"):
        for compiled in args.compile:
            if args.quick:  # in this process: no interpreter start per configuration
                results.append({"ok": True, **run_step_child(args, method, compiled)})
                continue
            cmd = [sys.executable, __file__, "--child", f"{method},{compiled}", "--device", args.device,
                   *(["--quick"] if args.quick else []), *(["--tokenizer", args.tokenizer] if args.tokenizer else []),
                   *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.part_timeout, env=args.env)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr.strip()[-600:])
                results.append({"ok": True, **json.loads(done.stdout.strip().splitlines()[-1])})
            except Exception as err:  # one configuration failing (out of memory, compile) keeps the others
                results.append({"ok": False, "method": method, "compile": compiled, "error": one_line(err)})
            print(f"  steps {method} compile={compiled}: done", file=sys.stderr, flush=True)
    return {"model": args.shape.model, "batch": args.shape.batch, "seq": args.shape.seq, "results": results}


# ----------------------------------------------------------------------------- generation

def part_generation(args) -> dict:
    import bench_generate
    from configs import GPTConfig
    from generation import prepare_for_generation

    sh = args.shape
    ours, hf = bench_generate.build_models(0, small_gpt(args.vocab_size) if args.quick else GPTConfig())
    device = torch.device(args.device)
    dtype = devices.generation_dtype(device, devices.Facts.probe())
    ours = prepare_for_generation(ours, device, rows=sh.gen_batch)  # what eval.py and sample.py run
    hf = hf.to(device=device, dtype=dtype)
    prompts = torch.randint(0, ours.config.vocab_size, (sh.gen_batch, sh.gen_prompt),
                            generator=torch.Generator().manual_seed(1))
    on_device, mask = prompts.to(device), torch.ones_like(prompts).to(device)

    def run_ours():
        return ours.generate(prompts.tolist(), sh.gen_new, eot_id=None)

    def run_hf():
        out = hf.generate(on_device, attention_mask=mask, max_new_tokens=sh.gen_new, min_new_tokens=sh.gen_new,
                          do_sample=False)
        return out[:, sh.gen_prompt:].tolist()  # on the host: the time includes the last token's arrival

    with torch.inference_mode():
        run_ours(), run_hf()  # warm-up
        timings = bench_generate.timed({"ours": run_ours, "hf": run_hf}, sh.gen_repeats)
    n = sh.gen_batch * sh.gen_new
    (t_ours, out_ours), (t_hf, out_hf) = timings["ours"], timings["hf"]
    same = sum(a == b for ra, rb in zip(out_ours, out_hf) for a, b in zip(ra, rb)) / n
    return {"dtype": devices.dtype_name(dtype) if dtype != torch.float32 else "float32", "batch": sh.gen_batch,
            "prompt_len": sh.gen_prompt, "new_tokens": sh.gen_new, "ours_tokens_per_s": round(n / t_ours, 1),
            "hf_tokens_per_s": round(n / t_hf, 1), "ratio_ours_over_hf": round(t_hf / t_ours, 3),
            "same_token_fraction": round(same, 4)}


# ----------------------------------------------------------------------------- main

PARTS = {"train_e2e": part_train_e2e, "steps": part_steps, "resume": part_resume, "generation": part_generation,
         "export": part_export}


def table(report: dict) -> str:
    lines = ["| part | result |", "|---|---|"]
    for name in PARTS:
        r = report["parts"][name]
        if not r.get("ok"):
            lines.append(f"| {name} | FAILED: {r.get('error', '?')[:120]} |")
        elif name == "steps":
            for s in r["results"]:
                what = f"steps {s['method']} compile={'on' if s['compile'] else 'off'}"
                if not s["ok"]:
                    lines.append(f"| {what} | FAILED: {s['error'][:120]} |")
                    continue
                mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
                mem = s.get("peak_alloc_mb", s.get("peak_rss_mb"))
                sync = s["sync_check"]
                syncs = "n/a on CPU" if sync["pass"] is None else \
                    f"{sync['host_reads']} ({'pass' if sync['pass'] else 'FAIL: ' + str(sync['first_offending_op'])})"
                lines.append(f"| {what} | {s['tokens_per_s']} tok/s, MFU {mfu}, peak {mem} MB, syncs/step {syncs} |")
        elif name == "train_e2e":
            lines.append(f"| {name} | {r['status']}, {r['steps']} steps, loss {r['first_train_loss']:.3f} -> "
                         f"{r['last_train_loss']:.3f}, {r['tokens_per_s']} tok/s, {r['wall_s']} s |")
        elif name == "resume":
            lines.append(f"| {name} | {'pass' if r['pass'] else 'FAIL'}: max rel diff {r['max_rel_diff']:.2e} "
                         f"(rtol {r['rtol']}, {r['dtype']}) |")
        elif name == "generation":
            lines.append(f"| {name} | ours {r['ours_tokens_per_s']} vs hf {r['hf_tokens_per_s']} tok/s "
                         f"(x{r['ratio_ours_over_hf']}) |")
        else:
            lines.append(f"| {name} | {'pass' if r['pass'] else 'FAIL'}: max |logit diff| "
                         f"{r['max_abs_logit_diff']:.2e} on {r['hf_device']} |")
    return "\n".join(lines)


def data_flags(args, tmp: Path) -> list[str]:
    """--quick trains on a few dozen short records (the synthetic set takes a CPU a minute to
    make); the real check on the tiny preset's own synthetic tasks."""
    flags = ["--tokenizer", args.tokenizer] if args.tokenizer else []
    if not args.quick:
        return flags
    words = "red blue green cat dog sun moon tree fish bird".split()
    records = [{"instruction": f"say {words[i % 10]}", "input": "", "output": f"{words[(i * 7) % 10]} {words[i % 10]}"}
               for i in range(40)]
    (tmp / "data").mkdir()
    (tmp / "data" / "sft_train.json").write_text(json.dumps(records[:32]))
    (tmp / "data" / "sft_test.json").write_text(json.dumps(records[32:]))
    return flags + ["--dataset", "sft", "--data-dir", str(tmp / "data"), "--template", "dialog",
                    "--vocab-size", str(args.vocab_size)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help=devices.DEVICE_HELP)
    p.add_argument("--quick", action="store_true", help="tiny shapes, compile off: a smoke run of the script")
    p.add_argument("--compile", choices=["off", "on", "both"], default=None,
                   help="for the steps part (default: both; off with --quick)")
    p.add_argument("--tokenizer", default=None, help="GPT-2 BPE folder (default ../shared/assets/gpt2_bpe, "
                                                     "else tiktoken's gpt2)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not in the table")
    p.add_argument("--part-timeout", type=int, default=300, help="seconds any one subprocess may take")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.compile = [c == "on" for c in {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[
        args.compile or ("off" if args.quick else "both")]]
    if args.tokenizer is None and (ASSETS / "gpt2_bpe").is_dir():
        args.tokenizer = str(ASSETS / "gpt2_bpe")
    args.env = dict(os.environ)
    if args.tokenizer is None and "TIKTOKEN_CACHE_DIR" not in args.env and (ASSETS / "tiktoken_cache").is_dir():
        args.env["TIKTOKEN_CACHE_DIR"] = str(ASSETS / "tiktoken_cache")
    args.shape = shapes(args.quick)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.device = str(devices.pick_device(args.device))  # "cuda:0": the same GPU for every part and child
    if args.child:
        method, compiled = args.child.split(",")
        print(json.dumps(run_step_child(args, method, compiled == "True")))
        return
    os.environ.update(args.env)
    args.vocab_size = load_tokenizer(args.tokenizer).vocab_size  # --quick's small models take the tokenizer's
    device = torch.device(args.device)
    report = {"device": args.device, "device_name": devices.device_name(device), "torch": torch.__version__,
              "quick": args.quick, "tokenizer": args.tokenizer or "tiktoken gpt2", "parts": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args.work = Path(tmp)
        args.data_flags = data_flags(args, args.work)
        for name in PARTS:
            if name not in args.parts:
                report["parts"][name] = {"ok": False, "error": "not run (--parts)"}
                continue
            print(f"{name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                report["parts"][name] = {"ok": True, **PARTS[name](args)}
            except Exception as err:  # recorded; the other parts still run
                traceback.print_exc()
                report["parts"][name] = {"ok": False, "error": one_line(err)}
            report["parts"][name]["part_s"] = round(time.perf_counter() - t0, 1)
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(table(report), file=sys.stderr)
    print(json.dumps(report, indent=2, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v))


if __name__ == "__main__":
    run_cli(main)
