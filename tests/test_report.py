"""report.py: the HTML page of plot.py --html, parsed with html.parser and rendered by headless Chromium."""
import base64
import html
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import report
from runs import load_run
from test_plot import LORA_SUMMARY, PNG_MAGIC, REWARD, new_run, old_run, run_cli, write_json

XSS = "<script>alert(1)</script>"
PROMPTS = [("Give three tips for staying healthy.", ""), ("Translate to French.", "Good morning & goodbye"),
           (f"Repeat this: {XSS}", "")]


# ----------------------------------------------------------------------------- a small DOM

VOID = {"img", "input", "meta", "br", "hr", "link", "source", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict
    children: list = field(default_factory=list)  # Nodes and text

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def classes(self) -> set:
        return set((self.attrs.get("class") or "").split())

    def find_all(self, tag=None, cls=None) -> list["Node"]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (cls is None or cls in child.classes()):
                    found.append(child)
                found += child.find_all(tag, cls)
        return found


class TreeBuilder(HTMLParser):
    """Builds the element tree; fails on an end tag that closes nothing (malformed markup)."""

    def __init__(self):
        super().__init__()  # convert_charrefs: text arrives unescaped, as a browser shows it
        self.stack = [Node("document", {})]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(text: str) -> Node:
    builder = TreeBuilder()
    builder.feed(text)
    builder.close()
    assert len(builder.stack) == 1, f"unclosed <{builder.stack[-1].tag}>"
    return builder.stack[0]


def table_rows(page: Node) -> list[list[Node]]:
    return [row.find_all("td") for row in page.find_all("table")[0].find_all("tbody")[0].find_all("tr")]


def column(page: Node, key: str) -> int:
    return [th.attrs["data-key"] for th in page.find_all("th")].index(key)


# ----------------------------------------------------------------------------- run folders

def add_eval(folder: Path, answers, rewards=None, base="The base model says hello.") -> Path:
    """eval/responses.json as eval.py writes it (one sample per prompt); with rewards, scored against 0.3."""
    records = []
    for i, ((instruction, input_text), answer) in enumerate(zip(PROMPTS, answers)):
        record = {"prompt": instruction, "input": input_text, "tuned": [answer], "base": [f"{base} ({i})"]}
        if rewards is not None:
            outcome = "win" if rewards[i] > 0.3 else "tie" if rewards[i] == 0.3 else "loss"
            record.update(tuned_reward=[rewards[i]], base_reward=[0.3], outcome=outcome)
        records.append(record)
    write_json(folder / "eval" / "responses.json", {"n_prompts": len(records), "settings": {}, "records": records})
    return folder


def add_samples(folder: Path, steps=(50, 100)) -> Path:
    write_json(folder / "samples.json", [
        {"step": step, "instruction": instruction, "input": input_text,
         "response": f"{folder.name} at step {step}: {instruction[:12]}",
         "reference": f"reference of {instruction[:12]}"}
        for step in steps for instruction, input_text in PROMPTS[:2]])
    return folder


@pytest.fixture
def three_runs(tmp_path):
    """A scored LoRA run (one answer is a script tag), a full run evaluated without a reward model, an old run."""
    lora = new_run(tmp_path / "lora-r8", train_overrides=dict(rank=8, alpha=16.0), summary=LORA_SUMMARY,
                   reward=REWARD)
    add_eval(add_samples(lora), ["Eat well & sleep.", "Bonjour", XSS], rewards=[0.8, 0.3, -0.5])
    full = new_run(tmp_path / "full-sgd", preset_name="gpt2", train_overrides=dict(optimizer="sgd"), steps=60,
                   status="running")
    add_eval(add_samples(full, steps=(50,)), ["Drink water.", "Salut", "I will not."])
    return [lora, full, old_run(tmp_path / "old-r16")]


def build(folders, tmp_path, name="report.html") -> tuple[str, Node]:
    out = tmp_path / name
    notes = report.write_report([load_run(f) for f in folders], out)
    assert notes == []
    text = out.read_text(encoding="utf-8")
    return text, parse(text)


# ----------------------------------------------------------------------------- the page

def test_table_lists_every_run_with_plot_py_cells(three_runs, tmp_path):
    _, page = build(three_runs, tmp_path)
    rows = table_rows(page)
    assert [r[0].text() for r in rows] == ["lora-r8", "full-sgd", "old-r16 (old format)"]
    best = column(page, "best_val_loss")
    assert [r[best].text() for r in rows] == ["2.0000", "2.2500", "3.2500"]  # plot.py's formatting
    assert [r[best].attrs.get("data-v") for r in rows] == ["2.0", "2.25", "3.25"]  # full value for sorting
    assert [("best" in r[best].classes()) for r in rows] == [True, False, False]  # lowest loss
    rank = column(page, "lora_rank")
    assert [r[rank].text() for r in rows] == ["8", "—", "16"] and "data-v" not in rows[1][rank].attrs
    win = column(page, "win_rate")  # one run scored: nothing to compare, no star
    assert rows[0][win].text() == "62.5%" and not any("best" in r[win].classes() for r in rows)


def test_only_the_options_that_differ_are_shaded(tmp_path):
    a = new_run(tmp_path / "a", train_overrides=dict(lr=1e-3), summary=dict(LORA_SUMMARY, best_val_loss=2.5))
    b = new_run(tmp_path / "b", train_overrides=dict(lr=3e-3), summary=LORA_SUMMARY)
    _, page = build([a, b], tmp_path)
    assert [th.attrs["data-key"] for th in page.find_all("th", "differs")] == ["lr"]
    rows = table_rows(page)
    assert all([c for c in row if "differs" in c.classes()] == [row[column(page, "lr")]] for row in rows)
    best = column(page, "best_val_loss")
    assert ["best" in r[best].classes() for r in rows] == [False, True]


def test_every_prompt_has_every_answer_escaped(three_runs, tmp_path):
    text, page = build(three_runs, tmp_path)
    sections = page.find_all("details", "prompt")
    assert [s.find_all("pre", "instruction")[0].text() for s in sections] == [p for p, _ in PROMPTS]
    assert "Good morning & goodbye" in sections[1].text()
    for section, lora_answer, full_answer in zip(sections, ["Eat well & sleep.", "Bonjour", XSS],
                                                 ["Drink water.", "Salut", "I will not."]):
        cards = section.find_all("div", "card")
        assert [c.find_all("h4")[0].text().split()[0] for c in cards] == ["lora-r8", "full-sgd", "base"]
        assert cards[0].find_all("pre")[0].text() == lora_answer
        assert cards[1].find_all("pre")[0].text() == full_answer
        # Both runs had the same base answer: shown once, naming both runs.
        assert "of lora-r8, full-sgd" in cards[2].text() and len(section.find_all("div", "base")) == 1
        assert section.find_all("p", "missing")[0].text() == "not answered by: old-r16"
    # The script tag in a response and in a prompt is text, escaped in the file; only the page's own script runs.
    assert len(page.find_all("script")) == 1 and XSS not in text
    assert text.count(html.escape(XSS)) == 3  # the prompt's summary, its full text, lora's answer
    assert sections[2].find_all("summary")[0].text().startswith(f"3. Repeat this: {XSS}")


def test_rewards_and_outcomes_against_the_base(three_runs, tmp_path):
    _, page = build(three_runs, tmp_path)
    sections = page.find_all("details", "prompt")
    heads = [[" ".join(c.find_all("h4")[0].text().split()) for c in s.find_all("div", "card")] for s in sections]
    assert heads[0] == ["lora-r8 reward 0.800 win vs base", "full-sgd",
                        "base model (of lora-r8, full-sgd) reward 0.300"]
    assert heads[1][0] == "lora-r8 reward 0.300 tie vs base" and heads[2][0] == "lora-r8 reward -0.500 loss vs base"
    assert [s.find_all("summary")[0].find_all("span")[0].text() for s in sections] == ["1 win", "1 tie", "1 loss"]


def test_samples_per_run_in_step_order(three_runs, tmp_path):
    _, page = build(three_runs, tmp_path)
    samples = page.find_all("details", "samples")
    assert [s.find_all("summary")[0].text() for s in samples] == [
        "lora-r8: 2 prompt(s), 2 evaluation(s), steps 50–100", "full-sgd: 2 prompt(s), 1 evaluation(s), step 50"]
    first = samples[0].find_all("div", "sample")[0]
    assert [p.text() for p in first.find_all("pre")] == [
        PROMPTS[0][0], "reference of Give three t", "lora-r8 at step 50: Give three t",
        "lora-r8 at step 100: Give three t"]


def test_figures_are_inline_pngs_and_the_old_run_is_in_them(three_runs, tmp_path):
    text, page = build(three_runs, tmp_path)
    images = page.find_all("img")
    assert [i.attrs["alt"] for i in images] == ["loss_vs_step.png", "loss_vs_tokens.png", "lr.png", "speed_memory.png"]
    for image in images:
        prefix, data = image.attrs["src"].split(",", 1)
        assert prefix == "data:image/png;base64" and base64.b64decode(data)[:8] == PNG_MAGIC
    assert "http://" not in text and "https://" not in text  # nothing fetched
    notes = page.find_all("ul", "notes")[0].text()
    assert "old-r16: no token counts" in notes


def test_unreadable_eval_files_are_notes_not_failures(three_runs, tmp_path):
    (three_runs[0] / "eval" / "responses.json").write_text("{half")
    write_json(three_runs[1] / "samples.json", [{"step": 50}, {"step": 50, "instruction": "q", "response": "a"}])
    notes = report.write_report([load_run(f) for f in three_runs], tmp_path / "r.html")
    assert len(notes) == 2 and "responses.json is not valid JSON" in notes[0] and "1 record(s) without" in notes[1]
    page = parse((tmp_path / "r.html").read_text())
    assert len(page.find_all("details", "prompt")) == 3  # full-sgd's answers remain
    assert "(3 prompt(s), 1 run(s) evaluated)" in page.find_all("h2")[2].text()
    assert "responses.json is not valid JSON" in page.find_all("ul", "notes")[0].text()


def test_plot_cli_html_option(three_runs, tmp_path):
    out = tmp_path / "out"
    result = run_cli(*three_runs, "--out", out, "--html")
    assert result.returncode == 0, result.stderr
    assert f"report: {out / 'report.html'}" in result.stderr.splitlines()
    assert len(table_rows(parse((out / "report.html").read_text()))) == 3


def test_twenty_runs_by_two_hundred_prompts_stays_linear(tmp_path):
    """Each response is written once and a shared base answer once per prompt, so the page is the
    escaped text plus a bounded markup per answer plus the figures: measured ~230 bytes of markup
    per card (the table, style and prompt headers included), 400 allowed. A page that repeated each
    answer, or the shared base answer per run, would exceed the bound."""
    n_runs, n_prompts = 20, 200
    prompts = [(f"Prompt {p}: explain topic {p} in detail.", "") for p in range(n_prompts)]
    folders = []
    for r in range(n_runs):
        folder = new_run(tmp_path / f"run{r:02d}", train_overrides=dict(lr=1e-4 * (r + 1)))
        records = [{"prompt": q, "input": "", "tuned": [f"run {r} answers {p}: " + "words & more " * 20],
                    "base": [f"base answers {p}: " + "text " * 40], "tuned_reward": [0.1 * r], "base_reward": [0.5],
                    "outcome": "win" if r > 5 else "loss"} for p, (q, _) in enumerate(prompts)]
        write_json(folder / "eval" / "responses.json", {"records": records})
        folders.append(folder)
    out = tmp_path / "big.html"
    report.write_report([load_run(f) for f in folders], out)
    text = out.read_text(encoding="utf-8")
    answers = n_runs * n_prompts * len(html.escape(f"run 10 answers 100: " + "words & more " * 20))
    bases = n_prompts * len("base answers 100: " + "text " * 40)
    figures = sum(len(i.attrs["src"]) for i in parse(text).find_all("img"))
    assert len(text) < answers + bases + 400 * n_runs * n_prompts + figures + 100_000, len(text)
    assert text.count("base answers 7: ") == 1  # shared by 20 runs, shown once
    page = parse(text)
    assert len(page.find_all("details", "prompt")) == n_prompts and len(table_rows(page)) == n_runs
    assert len(page.find_all("div", "card")) == n_prompts * (n_runs + 1)


# ----------------------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(tmp_path, *args) -> str:
    # Its own profile folder: concurrent test runs do not share (and lock) one.
    result = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox",
                             f"--user-data-dir={tmp_path / 'profile'}", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium or chromium-browser binary (apt-get install chromium)")
def test_chromium_renders_the_page_and_sorts_by_the_url(three_runs, tmp_path):
    build(three_runs, tmp_path)
    url = (tmp_path / "report.html").as_uri()
    # Highest final val loss first: the page's script reorders the rows, unlike the file's order.
    dom = parse(chromium(tmp_path, "--dump-dom", url + "#sort=-final_val_loss"))
    rows = table_rows(dom)
    assert [r[0].text() for r in rows] == ["old-r16 (old format)", "full-sgd", "lora-r8"]
    assert dom.find_all("th")[column(dom, "final_val_loss")].attrs["aria-sort"] == "descending"
    win = column(dom, "win_rate")  # unknown cells stay last in either direction
    assert [r[0].text() for r in table_rows(parse(chromium(tmp_path, "--dump-dom", url + "#sort=win_rate")))][0] \
        == "lora-r8"
    answers = [c.find_all("pre")[0].text() for c in dom.find_all("details", "prompt")[2].find_all("div", "card")]
    assert answers[0] == XSS and len(dom.find_all("script")) == 1  # rendered as text, never run
    assert rows[2][win].text() == "62.5%"

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", url)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (900, 1280)
    # Not blank: the table, text and figures darken a real share of the page.
    assert (pixels < 200).mean() > 0.01 and len(np.unique(pixels)) > 50
