"""One self-contained HTML page comparing runs: `python plot.py runs/* --html` -> runs/_compare/report.html.

The page holds plot.py's table (sortable by clicking a header, or on opening with `#sort=KEY` or
`#sort=-KEY` for descending, KEY a runs.csv column; the options that differ between runs shaded,
the best results starred), its figures as inline PNGs, every run's answer to each prompt of
eval.py (its eval/responses.json) beside the base model's, with rewards and win/tie/loss, and each
run's samples.json (its fixed test prompts answered at each evaluation). Nothing is fetched: it
opens offline and can be mailed as one file.

Size grows with the text shown, not with runs x runs: each response appears once, and a base
answer that several runs share (same base model and settings) is shown once per prompt.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.colors import to_hex

from files import write_text_atomic
from plot import COLUMNS, NOT_APPLICABLE, Column, compare_figures, left_out_notes, run_style, table_row
from runs import Run, RunFolderError, read_json

# The table's columns that are choices made before training (shaded where runs differ), and the
# results where one run is best: column key -> True when higher is better.
OPTION_KEYS = ("model", "trainable_params", "optimizer", "lr", "min_lr", "warmup", "weight_decay",
               "lora_rank", "lora_alpha", "batch_size", "grad_accum", "epochs")
BEST = {"best_val_loss": False, "final_val_loss": False, "perplexity": False, "win_rate": True,
        "mean_reward": True, "tokens_per_s": True, "peak_mem_mb": False}
OUTCOMES = ("win", "tie", "loss")  # eval.py's verdict of a prompt, tuned against base


def esc(text) -> str:
    return html.escape(str(text), quote=True)


# ----------------------------------------------------------------------------- reading eval and samples

@dataclass
class Answer:
    """One run's answer to one eval.py prompt (responses: one per sample; reward: their mean)."""
    run: int  # index into the runs
    tuned: list[str]
    base: list[str]
    tuned_reward: Optional[float] = None
    base_reward: Optional[float] = None
    outcome: Optional[str] = None


@dataclass
class Prompt:
    instruction: str
    input: str
    answers: list[Answer] = field(default_factory=list)


def _read_json(path: Path, notes: list[str]):
    """The file's JSON, or None (with a note) when it cannot be read: the page is still useful without it."""
    try:
        return read_json(path)
    except RunFolderError as err:
        notes.append(f"{err}; left out of the report")
        return None


def _texts(value) -> Optional[list[str]]:
    """eval.py writes a list of samples per prompt; a single string is read as one sample."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _mean_reward(value) -> Optional[float]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return sum(values) / len(values)


def read_answers(runs: Sequence[Run], notes: list[str]) -> list[Prompt]:
    """Every prompt of the runs' eval/responses.json, in order of first appearance, with each run's answer."""
    prompts: dict[tuple[str, str], Prompt] = {}
    for index, run in enumerate(runs):
        path = run.path / "eval" / "responses.json"
        if not path.exists():
            continue
        payload = _read_json(path, notes)
        records = payload.get("records") if isinstance(payload, dict) else None
        if payload is not None and not isinstance(records, list):
            notes.append(f"{path}: no 'records' list; left out of the report")
        skipped = 0
        for record in records or []:
            if not isinstance(record, dict):
                record = {}
            tuned, base = _texts(record.get("tuned")), _texts(record.get("base"))
            if not isinstance(record.get("prompt"), str) or tuned is None or base is None:
                skipped += 1
                continue
            key = (record["prompt"], record.get("input") if isinstance(record.get("input"), str) else "")
            outcome = record.get("outcome") if record.get("outcome") in OUTCOMES else None
            prompts.setdefault(key, Prompt(*key)).answers.append(Answer(
                index, tuned, base, _mean_reward(record.get("tuned_reward")),
                _mean_reward(record.get("base_reward")), outcome))
        if skipped:
            notes.append(f"{path}: {skipped} record(s) without prompt, tuned and base responses; left out")
    return list(prompts.values())


def read_samples(run: Run, notes: list[str]) -> list[dict]:
    """samples.json's {step, instruction, input, response, reference} records that are complete."""
    path = run.path / "samples.json"
    if not path.exists():
        return []
    samples = _read_json(path, notes)
    if not isinstance(samples, list):
        if samples is not None:
            notes.append(f"{path}: not a list of samples; left out of the report")
        return []
    good = [s for s in samples if isinstance(s, dict) and isinstance(s.get("step"), int)
            and isinstance(s.get("instruction"), str) and isinstance(s.get("response"), str)]
    if len(good) < len(samples):
        notes.append(f"{path}: {len(samples) - len(good)} record(s) without step, instruction or response left out")
    return good


# ----------------------------------------------------------------------------- the runs table

def cell_text(column: Column, value) -> str:
    if value is None:
        return ""
    return NOT_APPLICABLE if value == NOT_APPLICABLE else column.markdown(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def best_values(rows: list[dict]) -> dict:
    """Column key -> the best value, for the result columns where at least two runs have one."""
    best = {}
    for key, higher in BEST.items():
        values = [row[key] for row in rows if _is_number(row[key])]
        if len(values) > 1:
            best[key] = max(values) if higher else min(values)
    return best


def table_html(runs: Sequence[Run]) -> str:
    rows = [table_row(run) for run in runs]
    differs = {key for key in OPTION_KEYS if len({repr(row[key]) for row in rows}) > 1}
    best = best_values(rows)
    head = "".join(
        f'<th data-key="{c.key}" data-type="{"num" if c.numeric else "text"}"'
        f'{" class=differs" if c.key in differs else ""} title="{esc(c.key)}: click to sort">{esc(c.title)}</th>'
        for c in COLUMNS)
    body = []
    for index, (run, row) in enumerate(zip(runs, rows)):
        cells = []
        for c in COLUMNS:
            value = row[c.key]
            known = value is not None and value != NOT_APPLICABLE
            classes = [k for k, on in (("differs", c.key in differs), ("num", c.numeric),
                                       ("best", known and best.get(c.key) == value)) if on]
            attrs = (f' data-v="{esc(value)}"' if known else "") + (f' class="{" ".join(classes)}"' if classes else "")
            text = esc(cell_text(c, value))
            if c.key == "run":
                text = f'{swatch(index)}{text}{" <small>(old format)</small>" if run.legacy else ""}'
                attrs += f' title="{esc(run.path)}"'
            cells.append(f"<td{attrs}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wide"><table id="runs"><thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody></table></div>")


def run_color(index: int) -> str:
    """The run's colour in the figures."""
    return to_hex(run_style(index)["color"])


def swatch(index: int) -> str:
    return f'<span class="swatch" style="background:{run_color(index)}"></span>'


# ----------------------------------------------------------------------------- figures

def figures_html(runs: Sequence[Run], smooth: float) -> str:
    images = []
    for filename, fig in compare_figures(runs, smooth).items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        images.append(f'<img alt="{esc(filename)}" src="data:image/png;base64,{data}">')
    return "\n".join(images)


# ----------------------------------------------------------------------------- responses

def _reward(value: Optional[float]) -> str:
    return "" if value is None else f'<span class="reward">reward {value:.3f}</span>'


def _responses(texts: list[str]) -> str:
    if len(texts) == 1:
        return f"<pre>{esc(texts[0])}</pre>"
    return "".join(f"<pre><b>sample {i + 1}</b>\n{esc(t)}</pre>" for i, t in enumerate(texts))


def prompt_html(number: int, prompt: Prompt, runs: Sequence[Run]) -> str:
    tally = {o: sum(a.outcome == o for a in prompt.answers) for o in OUTCOMES}
    tally_text = " ".join(f'<span class="{o}">{tally[o]} {o}</span>' for o in OUTCOMES if tally[o])
    title = prompt.instruction if len(prompt.instruction) <= 120 else prompt.instruction[:119] + "…"
    cards = []
    for a in prompt.answers:
        verdict = f'<span class="{a.outcome}">{a.outcome} vs base</span>' if a.outcome else ""
        cards.append(f'<div class="card" style="border-color:{run_color(a.run)}">'
                     f'<h4>{swatch(a.run)}{esc(runs[a.run].name)} {_reward(a.tuned_reward)} {verdict}</h4>'
                     f'{_responses(a.tuned)}</div>')
    # Runs with the same base model and settings gave the same base answer: show it once (with
    # each distinct reward, should the runs have been scored by different reward models).
    bases: dict[tuple, list[Answer]] = {}
    for a in prompt.answers:
        bases.setdefault(tuple(a.base), []).append(a)
    for texts, answers in bases.items():
        whose = ", ".join(esc(runs[a.run].name) for a in answers)
        rewards = " ".join(_reward(r) for r in dict.fromkeys(a.base_reward for a in answers) if r is not None)
        cards.append(f'<div class="card base"><h4>base model <small>(of {whose})</small> {rewards}</h4>'
                     f'{_responses(list(texts))}</div>')
    answered = {a.run for a in prompt.answers}
    missing = [esc(run.name) for i, run in enumerate(runs) if i not in answered]
    input_html = f'<p class="input"><b>input</b></p><pre>{esc(prompt.input)}</pre>' if prompt.input else ""
    opened = " open" if number == 1 else ""  # an example in view; the others open on a click
    return (f'<details class="prompt"{opened}><summary><b>{number}.</b> {esc(title)} {tally_text}</summary>'
            f'<pre class="instruction">{esc(prompt.instruction)}</pre>{input_html}'
            f'<div class="cards">{"".join(cards)}</div>'
            + (f'<p class="missing">not answered by: {", ".join(missing)}</p>' if missing else "")
            + "</details>")


def samples_html(index: int, run: Run, samples: list[dict]) -> str:
    """One run's samples.json: each test prompt once, then its answer at every evaluation step."""
    by_prompt: dict[tuple[str, str], list[dict]] = {}
    for s in samples:
        by_prompt.setdefault((s["instruction"], s.get("input") or ""), []).append(s)
    steps = sorted({s["step"] for s in samples})
    parts = []
    for (instruction, input_text), answers in by_prompt.items():
        reference = next((a["reference"] for a in answers if isinstance(a.get("reference"), str)), None)
        parts.append(f'<div class="sample"><pre class="instruction">{esc(instruction)}</pre>'
                     + (f"<p><b>input</b></p><pre>{esc(input_text)}</pre>" if input_text else "")
                     + (f'<p><b>reference</b></p><pre class="reference">{esc(reference)}</pre>' if reference else "")
                     + "".join(f'<p><b>step {a["step"]}</b></p><pre>{esc(a["response"])}</pre>'
                               for a in sorted(answers, key=lambda a: a["step"]))
                     + "</div>")
    span = f"steps {steps[0]}–{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
    return (f'<details class="samples"><summary>{swatch(index)}{esc(run.name)}: {len(by_prompt)} prompt(s), '
            f'{len(steps)} evaluation(s), {span}</summary>{"".join(parts)}</details>')


# ----------------------------------------------------------------------------- the page

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ddd;padding:2px 5px;white-space:nowrap}
th{background:#f4f4f4;cursor:pointer;white-space:normal;vertical-align:bottom}
th[aria-sort=ascending]::after{content:" ▲"} th[aria-sort=descending]::after{content:" ▼"}
td.num{text-align:right} .differs{background:#fff6d5} th.differs{background:#f6e6a8}
td.best{font-weight:bold;background:#d9f2d9} td.best::after{content:" ★";color:#2a7a2a}
.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.4em;border-radius:2px}
.wide{overflow-x:auto;max-width:100%}
.figures{display:flex;flex-wrap:wrap;gap:.5em} .figures img{max-width:100%;height:auto}
details{margin:.3em 0;border:1px solid #e3e3e3;border-radius:4px;padding:.2em .6em}
summary{cursor:pointer}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:.6em;margin:.5em 0}
.card{border:1px solid #ccc;border-left-width:5px;border-radius:4px;padding:.3em .6em;min-width:0}
.card.base{border-color:#bbb;background:#f6f6f6}
.card h4{margin:.2em 0;font-size:13px}
pre{white-space:pre-wrap;word-wrap:break-word;font:12.5px/1.35 ui-monospace,monospace;margin:.2em 0;
    max-height:24em;overflow:auto}
pre.instruction{font-weight:bold} pre.reference{color:#555}
.win{color:#1a7f1a;font-weight:bold} .tie{color:#8a6d00;font-weight:bold} .loss{color:#b22;font-weight:bold}
.reward{color:#555;font-weight:normal} .missing,.notes{color:#777}
#filter{width:24em;padding:3px}
"""

# Sorting: by a header click (a second click reverses) or, on opening, by #sort=KEY / #sort=-KEY.
# Unknown cells (no data-v) stay last either way. The prompt filter hides non-matching prompts.
SCRIPT = """
const table = document.getElementById('runs');
const heads = [...table.tHead.rows[0].cells];
function sortRuns(key, desc) {
  const col = heads.findIndex(th => th.dataset.key === key);
  if (col < 0) return;
  const numeric = heads[col].dataset.type === 'num';
  const body = table.tBodies[0];
  const rows = [...body.rows].sort((a, b) => {
    const x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    if (x === undefined || y === undefined) return (x === undefined) - (y === undefined);
    const order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
    return desc ? -order : order;
  });
  rows.forEach(row => body.appendChild(row));
  heads.forEach(th => th.removeAttribute('aria-sort'));
  heads[col].setAttribute('aria-sort', desc ? 'descending' : 'ascending');
}
heads.forEach(th => th.addEventListener('click', () => {
  const desc = th.getAttribute('aria-sort') === 'ascending';
  sortRuns(th.dataset.key, desc);
  history.replaceState(null, '', '#sort=' + (desc ? '-' : '') + th.dataset.key);
}));
const wanted = location.hash.match(/^#sort=(-?)(\\w+)$/);
if (wanted) sortRuns(wanted[2], wanted[1] === '-');
const filter = document.getElementById('filter');
if (filter) filter.addEventListener('input', () => {
  const query = filter.value.toLowerCase();
  document.querySelectorAll('details.prompt').forEach(d => {
    d.hidden = query !== '' && !d.textContent.toLowerCase().includes(query);
  });
});
"""


def report_html(runs: Sequence[Run], smooth: float = 0.0, title: str = "Run comparison") -> tuple[str, list[str]]:
    """The page, and the notes about files it could not use (also shown on the page)."""
    notes: list[str] = []
    prompts = read_answers(runs, notes)
    samples = [(i, run, read_samples(run, notes)) for i, run in enumerate(runs)]
    page_notes = [f"{run.path}: {n}" for run in runs for n in run.notes] + left_out_notes(runs) + notes
    evaluated = len({a.run for prompt in prompts for a in prompt.answers})
    parts = [
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}: {len(runs)} run(s)</h1>",
        '<p><a href="#table">table</a> · <a href="#figures">figures</a> · <a href="#responses">responses</a> · '
        '<a href="#samples">samples</a></p>',
        '<h2 id="table">Runs</h2><p>Click a header to sort. Shaded: options that differ between runs. '
        "★: the best value among the runs.</p>", table_html(runs),
        '<h2 id="figures">Curves, speed and memory</h2>', f'<div class="figures">{figures_html(runs, smooth)}</div>',
        f'<h2 id="responses">Responses to the evaluation prompts ({len(prompts)} prompt(s), '
        f'{evaluated} run(s) evaluated)</h2>',
    ]
    if prompts:
        parts.append('<p><input id="filter" type="search" placeholder="filter prompts and responses"> '
                     "Each run's answer beside the base model's; reward and win/tie/loss where eval.py "
                     "scored them.</p>")
        parts += [prompt_html(n + 1, p, runs) for n, p in enumerate(prompts)]
    else:
        parts.append("<p>No run has eval/responses.json; run eval.py --run runs/NAME first.</p>")
    parts.append('<h2 id="samples">Samples during training</h2>')
    with_samples = [samples_html(i, run, s) for i, run, s in samples if s]
    parts += with_samples or ["<p>No run has samples.json.</p>"]
    if page_notes:
        parts.append('<h2>Notes</h2><ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in page_notes)
                     + "</ul>")
    parts.append(f"<script>{SCRIPT}</script></body></html>\n")
    return "\n".join(parts), notes


def write_report(runs: Sequence[Run], out_path, smooth: float = 0.0) -> list[str]:
    """Write the page to out_path (atomically); returns notes about files it left out."""
    page, notes = report_html(runs, smooth)
    write_text_atomic(Path(out_path), page)
    return notes
