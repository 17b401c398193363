"""A grid of training runs in one command: every train_sft.py option given several values is an axis.

    python sweep.py --out-dir sweeps/opt --config gpt2-medium/lora --rank 1 10 100 \\
        --optimizer sgd momentum nesterov adamw --max-steps 2000           # 3 x 4 = 12 runs
    python sweep.py ... --lora --no-lora ...        # full fine-tuning vs LoRA as an axis
    python sweep.py ... --dry-run                   # the runs (and their memory plan), nothing started
    python sweep.py ... --eval -- --reward-model DIR --max-prompts 100   # eval.py on each finished run
    python sweep.py ... --devices 0,1,2,3           # four runs at a time, one GPU each

Options with one value are shared by all runs. An option that itself takes several values
(`--lora-targets`, `--lora-layers`) takes one grid value per word, each a comma-separated list:
`--lora-targets attn.c_attn,attn.c_proj mlp.c_fc` is an axis of two values, `--lora-targets
attn.c_attn,mlp.c_fc` one shared value. A boolean option is an axis when both forms are given
(`--lora --no-lora`). Points without LoRA ignore the LoRA options (--rank, --alpha, ...), so
`--lora --no-lora --rank 1 10` is three runs, not four: one full fine-tuning and two ranks.

Every grid point is checked with train_sft.py's own parser before anything starts. The sweep
folder (--out-dir) holds

    sweep.json     the command, the axes, the shared options, and each run's name, options, state
    sweep.log      one line per start, resume, skip and end of a run or its evaluation
    runs/NAME/     the run folders, named <sweep>-<axis values>, e.g. opt-rank10-optimizer_sgd
    logs/NAME.log  a run's output when several run at once (with one at a time it goes to the terminal)
    runs.md, report.html   the table of all runs, and plot.py's HTML report of them

The same command again skips the finished runs and continues the others with `train_sft.py
--resume`, so a killed sweep (kill the process group: the runs are its children) loses only the
steps since each run's last checkpoint. A different grid under the same folder is refused.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from queue import SimpleQueue
from typing import Callable, Optional, Sequence

import runs
from configs import build_parser, parse_args
from errors import ArgParser, UserError, run_cli
from files import write_json_atomic, write_text_atomic
from lora import LoRAConfig

SWEEP_JSON, SWEEP_LOG, RUNS_DIR, LOGS_DIR = "sweep.json", "sweep.log", "runs", "logs"
OWNED = ("out_dir", "run_name", "resume")  # train options that sweep.py sets for each run
LORA_ONLY = tuple(f.name for f in fields(LoRAConfig) if f.name != "lora")  # no effect without --lora
INTERRUPTED = (130, 143, -signal.SIGINT, -signal.SIGTERM)  # train_sft.py stopped by Ctrl-C / SIGTERM
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- the command line

def sweep_parser() -> ArgParser:
    parser = ArgParser(description=__doc__.split("\n\n")[0], usage="python sweep.py --out-dir DIR "
                       "[sweep options] [train_sft.py options, each with one or more values] [-- eval.py options]")
    parser.add_argument("--out-dir", required=True, help="the sweep folder (e.g. sweeps/NAME); its name starts each run's name")
    parser.add_argument("--parallel", type=int, default=None, help="runs at a time (default: one per --devices entry, else 1)")
    parser.add_argument("--devices", help="comma-separated CUDA devices, one run on each at a time through "
                                          "CUDA_VISIBLE_DEVICES (list one twice to share it)")
    parser.add_argument("--eval", action="store_true", help="run eval.py on each finished run; its options follow --")
    parser.add_argument("--dry-run", action="store_true", help="list the runs (and their memory plan), start nothing")
    parser.add_argument("--report", action="store_true", help="only write the table and report of the runs so far")
    return parser


def is_flag(token: str) -> bool:
    # argparse's rule too: a word with a space is a value, even if it starts with dashes
    return token.startswith("--") and len(token) > 2 and " " not in token


def split_command(argv: Sequence[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """([(--flag, its values)], the eval.py options after `--`); `--flag=value` is `--flag value`."""
    argv = list(argv)
    eval_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    options: list[tuple[str, list[str]]] = []
    for token in argv[:len(argv) - len(eval_argv) - ("--" in argv)]:
        if is_flag(token) or token == "-h":
            flag, eq, value = token.partition("=")
            options.append((flag, [value] if eq else []))
        elif not options:
            raise UserError(f"unexpected {token!r} before any option; values follow their option, e.g. --rank 1 10")
        else:
            options[-1][1].append(token)
    return options, eval_argv


@dataclass
class Axis:
    option: str  # the dest, e.g. "rank"
    values: list[list[str]]  # each value as train_sft.py arguments, e.g. [["--rank", "1"], ["--rank", "10"]]
    labels: list[str]  # each value in run names, e.g. ["rank1", "rank10"]


def _label(flag: str, words: Sequence[str]) -> str:
    key = flag.removeprefix("--").replace("-", "_")
    value = "+".join(words)
    if not value:  # a boolean: lora / no_lora
        return key
    return key + ("" if re.match(r"[0-9.]", value) else "_") + value


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", label)


def train_options(options: list[tuple[str, list[str]]]) -> tuple[list[str], list[Axis]]:
    """Shared train_sft.py arguments, and the axes (options given several values), in command order."""
    actions = build_parser("")._option_string_actions
    shared: list[str] = []
    axes: dict[str, Axis] = {}
    seen: set[str] = set()
    for flag, words in options:
        action = actions.get(flag)
        if action is None or flag in ("-h", "--help"):
            raise UserError(f"unknown option {flag}: neither sweep.py's nor train_sft.py's "
                            "(python sweep.py --help, python train_sft.py --help)")
        if action.dest in OWNED:
            raise UserError(f"{flag} is set by sweep.py for each run; the sweep folder is --out-dir")
        if flag in seen or (action.dest in seen and action.nargs != 0):
            raise UserError(f"{flag} given twice; give all its values once, e.g. {flag} A B")
        seen |= {flag, action.dest}
        if action.nargs == 0:  # --lora / --no-lora: both given make an axis
            if words:
                raise UserError(f"{flag} takes no value, got {' '.join(words)}; for an axis give both "
                                f"--{action.dest.replace('_', '-')} and --no-{action.dest.replace('_', '-')}")
            axis = axes.setdefault(action.dest, Axis(action.dest, [], []))
            axis.values.append([flag])
            axis.labels.append(_label(flag, []))
            continue
        if not words:
            raise UserError(f"{flag} needs a value")
        split = [w.split(",") for w in words] if action.nargs == "+" else [[w] for w in words]
        if len(set(words)) < len(words):
            raise UserError(f"{flag} lists a value twice: {' '.join(words)}")
        axes[action.dest] = Axis(action.dest, [[flag, *w] for w in split], [_label(flag, w) for w in split])
    for axis in list(axes.values()):
        if len(axis.values) == 1:  # one value (or one boolean form): shared by all runs
            shared += axis.values[0]
            del axes[axis.option]
    return shared, list(axes.values())


# ----------------------------------------------------------------------------- the grid

@dataclass
class Run:
    name: str
    options: dict  # axis -> its label in this run, e.g. {"rank": "rank10"}
    argv: list[str]  # train_sft.py arguments of a new run
    state: str = "pending"  # pending | running | finished | failed | interrupted
    eval: Optional[str] = None  # None | done | failed
    exit_code: Optional[int] = None


@dataclass
class Grid:
    folder: Path
    shared: list[str]
    axes: list[Axis]
    runs: list[Run]
    collapsed: int = 0  # points without LoRA that differ only in LoRA options, run once

    def identity(self) -> dict:
        """What makes two commands the same sweep (sweep.py's own options are not part of it)."""
        return {"shared": self.shared, "axes": [asdict(a) for a in self.axes]}

    def run_dir(self, run: Run) -> Path:
        return self.folder / RUNS_DIR / run.name


def build_grid(folder: Path, shared: list[str], axes: list[Axis]) -> Grid:
    """Every point of the grid, each parsed and validated by train_sft.py's parser; a bad one is one line."""
    prefix = _safe(folder.resolve().name)
    if not prefix[:1].isalnum():  # runs.new_run_dir's rule for run names
        raise UserError(f"--out-dir {folder}: the sweep folder's name starts each run name, so it must "
                        "start with a letter or digit")
    grid = Grid(folder, shared, axes, [])
    seen = set()
    for point in itertools.product(*[range(len(a.values)) for a in axes]):
        picks = [(a, i) for a, i in zip(axes, point)]
        argv = shared + [w for a, i in picks for w in a.values[i]]
        try:
            _, _, train = parse_args(argv + ["--out-dir", str(folder / RUNS_DIR)])
        except UserError as err:
            labels = ", ".join(a.values[i][0] + (" " + " ".join(a.values[i][1:]) if a.values[i][1:] else "")
                               for a, i in picks)
            raise UserError(f"grid point {labels or '(shared options)'}: {err}") from None
        if not train.lora:  # the LoRA options do nothing here: one run for all their values
            picks = [(a, i) for a, i in picks if a.option not in LORA_ONLY]
        key = tuple((a.option, i) for a, i in picks)
        if key in seen:
            grid.collapsed += 1
            continue
        seen.add(key)
        name = "-".join([prefix] + [_safe(a.labels[i]) for a, i in picks])
        argv = shared + [w for a, i in picks for w in a.values[i]]
        grid.runs.append(Run(name, {a.option: a.labels[i] for a, i in picks},
                             argv + ["--out-dir", str(folder / RUNS_DIR), "--run-name", name]))
    names = [r.name for r in grid.runs]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise UserError(f"two grid points share the run name {clash} (values that differ only in "
                        "characters other than letters, digits and ._+=-); change one of them")
    return grid


def load_record(folder: Path) -> Optional[dict]:
    path = folder / SWEEP_JSON
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err}); move it away or use another --out-dir") from None


def check_same_grid(grid: Grid, record: Optional[dict]) -> None:
    if record is not None and record.get("grid") != grid.identity():
        raise UserError(f"{grid.folder} holds a different sweep (see its {SWEEP_JSON}: command "
                        f"{record.get('command')!r}); give the same options or another --out-dir")


def action(grid: Grid, run: Run) -> str:
    """The contract with train_sft.py: no folder -> start; finished -> skip; else -> --resume."""
    run_dir = grid.run_dir(run)
    if not run_dir.exists():
        return "start"
    return "skip" if runs.run_status(run_dir) == "finished" else "resume"


# ----------------------------------------------------------------------------- scheduling

def schedule(jobs: Sequence, slots: Sequence[Optional[str]], work: Callable[[object, Optional[str]], bool],
             stop: threading.Event, on_interrupt: Callable[[], None] = lambda: None) -> None:
    """work(job, slot) for every job in order, as many at a time as there are slots, each on a slot no
    other job holds meanwhile. Once `stop` is set (or a work returns False), no new job starts. On
    Ctrl-C: stop, on_interrupt(), wait for the jobs under way, then raise KeyboardInterrupt."""
    free: SimpleQueue = SimpleQueue()
    for slot in slots:
        free.put(slot)

    def one(job) -> None:
        slot = free.get()  # never waits long: there are as many workers as slots
        try:
            if not stop.is_set() and not work(job, slot):
                stop.set()
        finally:
            free.put(slot)

    pool = ThreadPoolExecutor(len(slots))
    futures = [pool.submit(one, job) for job in jobs]
    try:
        for future in futures:
            future.result()
    except KeyboardInterrupt:
        stop.set()
        on_interrupt()
        raise
    finally:
        pool.shutdown(wait=True)


def device_slots(parallel: Optional[int], devices: Optional[str]) -> list[Optional[str]]:
    """One entry per concurrent run: a CUDA device, or None (the run picks its own, e.g. the CPU)."""
    if devices is None:
        n = 1 if parallel is None else parallel
        if n < 1:
            raise UserError(f"--parallel must be at least 1, got {n}")
        return [None] * n
    listed = [d.strip() for d in devices.split(",")]
    if not all(re.fullmatch(r"[0-9]+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+", d) for d in listed):
        raise UserError(f"--devices {devices!r}: give CUDA device indices (or UUIDs), e.g. --devices 0,1")
    n = len(listed) if parallel is None else parallel
    if not 1 <= n <= len(listed):
        raise UserError(f"--parallel {n} with {len(listed)} device(s): each concurrent run needs its own "
                        "--devices entry (list a device twice to put two runs on it)")
    return listed[:n]


# ----------------------------------------------------------------------------- running

class Sweep:
    """Runs the grid's jobs and keeps sweep.json and sweep.log up to date."""

    def __init__(self, grid: Grid, command: str, eval_argv: Optional[list[str]], to_terminal: bool):
        self.grid, self.command, self.eval_argv, self.to_terminal = grid, command, eval_argv, to_terminal
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.children: dict[str, subprocess.Popen] = {}
        self.done = 0

    def write(self) -> None:
        with self.lock:
            write_json_atomic(self.grid.folder / SWEEP_JSON, {
                "command": self.command, "grid": self.grid.identity(),
                "runs": [asdict(r) for r in self.grid.runs]})

    def log(self, line: str, show: bool = True) -> None:
        with self.lock:
            with open(self.grid.folder / SWEEP_LOG, "a") as f:
                f.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {line}\n")
        if show:
            print(f"sweep: {line}", flush=True)

    def call(self, run: Run, argv: list[str], slot: Optional[str]) -> Optional[int]:
        """One child process (train_sft.py or eval.py) on the slot's device; its exit code, or None
        when the sweep was stopped before it started."""
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        out = None
        if not self.to_terminal:
            (self.grid.folder / LOGS_DIR).mkdir(exist_ok=True)
            out = open(self.grid.folder / LOGS_DIR / f"{run.name}.log", "a")
        try:
            with self.lock:
                if self.stop.is_set():
                    return None
                child = subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=out)
                self.children[run.name] = child
            code = child.wait()
        finally:
            self.children.pop(run.name, None)
            if out is not None:
                out.close()
        return code

    def work(self, run: Run, slot: Optional[str]) -> bool:
        """Train (start, resume or skip) and evaluate one run; False when it was interrupted."""
        n, index = len(self.grid.runs), self.grid.runs.index(run) + 1
        run_dir = self.grid.run_dir(run)
        todo = action(self.grid, run)
        on = f" on device {slot}" if slot is not None else ""
        if todo == "skip":
            run.state = "finished"
            self.log(f"[{index}/{n}] skip {run.name} (finished)")
        else:
            argv = run.argv if todo == "start" else ["--resume", str(run_dir)]
            self.log(f"[{index}/{n}] {todo} {run.name}{on}")
            run.state = "running"
            self.write()
            run.exit_code = self.call(run, [str(HERE / "train_sft.py"), *argv], slot)
            if run.exit_code is None:
                run.state = "pending" if todo == "start" else "interrupted"
                return False
            finished = run.exit_code == 0 and runs.run_status(run_dir) == "finished"
            run.state = ("finished" if finished else "interrupted" if run.exit_code in INTERRUPTED else "failed")
            self.log(f"[{index}/{n}] end {run.name}: {run.state}" + ("" if finished else f" (exit {run.exit_code})"))
        if run.state == "finished" and self.eval_argv is not None:
            self.evaluate(run, run_dir, slot, f"[{index}/{n}]")
        self.write()
        return run.state != "interrupted" and not self.stop.is_set()

    def evaluate(self, run: Run, run_dir: Path, slot: Optional[str], progress: str) -> None:
        if (run_dir / runs.EVAL / "reward.json").exists():
            run.eval = "done"
            self.log(f"{progress} skip eval {run.name} (eval/reward.json exists)")
            return
        self.log(f"{progress} eval {run.name}")
        code = self.call(run, [str(HERE / "eval.py"), "--run", str(run_dir), *self.eval_argv], slot)
        if code is None:
            return
        run.eval = "done" if code == 0 else "failed"
        if code in INTERRUPTED:  # the run itself is finished; the sweep stops here
            self.stop.set()
        self.log(f"{progress} eval {run.name}: {run.eval}" + ("" if code == 0 else f" (exit {code})"))

    def interrupt(self) -> None:
        """Ctrl-C: let each running child save a checkpoint and stop (a terminal's Ctrl-C reaches
        them too; a second SIGINT does no harm)."""
        with self.lock:
            for child in self.children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)


def memory_lines(argv: list[str]) -> list[str]:
    """memplan's prediction for one run, when memplan.py is there."""
    try:
        import memplan
    except ImportError:
        return []
    _, model_cfg, train = parse_args(argv)
    try:
        return memplan.format_plan(memplan.plan(memplan.PlanInputs.from_configs(model_cfg, train))).splitlines()
    except UserError as err:
        return [f"memory plan: not available ({err})"]


def dry_run(grid: Grid) -> None:
    n = len(grid.runs)
    print(f"{n} run(s) in {grid.folder}" + (f" ({grid.collapsed} grid point(s) without LoRA differ only in "
                                            "LoRA options and are run once)" if grid.collapsed else ""))
    print(f"shared: {shlex.join(grid.shared) or '(none)'}")
    for index, run in enumerate(grid.runs, 1):
        own = run.argv[len(grid.shared):-4]  # the axis values (without --out-dir and --run-name)
        print(f"[{index}/{n}] {run.name} ({action(grid, run)}): {shlex.join(own) or '(shared options only)'}")
        for line in memory_lines(run.argv):
            print(f"    {line}")


def write_summary(grid: Grid) -> None:
    """The table of the runs that exist, runs.md beside it, and report.html."""
    import plot  # here: matplotlib is needed only at the end
    loaded = []
    for run in grid.runs:
        if grid.run_dir(run).exists():
            try:
                loaded.append(runs.load_run(grid.run_dir(run)))
            except runs.RunFolderError as err:
                print(f"note: {run.name}: {err}", file=sys.stderr)
    if not loaded:
        print("sweep: no run has started yet")
        return
    table = plot.markdown_table(loaded)
    write_text_atomic(grid.folder / "runs.md", table)
    print(table, end="")
    # report.py (plot.py --html's page): the table, the curves, the eval responses and samples
    from report import write_report
    for note in write_report(loaded, grid.folder / "report.html"):
        print(f"note: {note}", file=sys.stderr)
    print(f"sweep: wrote {grid.folder / 'runs.md'} and {grid.folder / 'report.html'}")


def counts(grid: Grid) -> str:
    states = [r.state for r in grid.runs]
    return ", ".join(f"{states.count(s)} {s}" for s in ("finished", "failed", "interrupted", "pending") if s in states)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    options, eval_argv = split_command(argv)
    own_flags = {s for a in sweep_parser()._actions for s in a.option_strings}
    args = sweep_parser().parse_args([w for f, words in options if f in own_flags for w in (f, *words)])
    shared, axes = train_options([(f, words) for f, words in options if f not in own_flags])
    slots = device_slots(args.parallel, args.devices)
    if "--" in argv and not args.eval:
        raise UserError("options after -- are eval.py's; add --eval to evaluate each run")
    if args.eval:
        import eval as eval_cli  # its own parser checks the options now, not after the first run
        if any(f.partition("=")[0] in ("--run", "--out") for f in eval_argv):
            raise UserError("eval.py's --run and --out are set by sweep.py (RUN/eval/ of each run)")
        eval_cli.parse_args(["--run", "RUN", *eval_argv])
    folder = Path(args.out_dir)
    record = load_record(folder)
    if args.report and not (shared or axes):  # `--out-dir DIR --report`: the sweep recorded there
        if record is None:
            raise UserError(f"{folder / SWEEP_JSON} not found: not a sweep folder")
        grid = Grid(folder, [], [], [Run(**r) for r in record["runs"]])
    else:
        grid = build_grid(folder, shared, axes)
        check_same_grid(grid, record)
    if args.devices is not None and any(w.partition("=")[0] == "--device" for w in grid.shared):
        raise UserError("--device with --devices: --devices gives each run its GPU (as cuda:0) through CUDA_VISIBLE_DEVICES")
    if args.dry_run:
        dry_run(grid)
        return 0
    if args.report:
        write_summary(grid)
        return 0

    folder.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(grid, shlex.join(["python", "sweep.py", *argv]), eval_argv if args.eval else None,
                  to_terminal=len(slots) == 1)
    sweep.write()
    sweep.log(f"{len(grid.runs)} run(s), {len(slots)} at a time: {sweep.command}", show=False)
    try:
        schedule(grid.runs, slots, sweep.work, sweep.stop, on_interrupt=sweep.interrupt)
    except KeyboardInterrupt:
        pass  # the runs under way have saved and stopped; the summary says what is left
    sweep.write()
    write_summary(grid)
    print(f"sweep: {counts(grid)}" + ("; continue with the same command" if sweep.stop.is_set() else ""))
    failed = [r for r in grid.runs if r.state == "failed" or r.eval == "failed"]
    return 130 if sweep.stop.is_set() else 1 if failed else 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
