"""prepare_sft_dataset.py, run as a subprocess the way a user runs it: the split, duplicate
dropping, the summary, and one readable line with exit code 2 (and no output) for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOOD = [{"instruction": f"Question {i}?", "input": "" if i % 2 else f"context {i}", "output": f"Answer {i}."}
        for i in range(20)]


def prepare(tmp_path: Path, tokenizer_dir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "prepare_sft_dataset.py"), "--tokenizer", str(tokenizer_dir),
               "--output-dir", str(tmp_path / "out"), *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def _write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def _read(tmp_path: Path, split: str) -> list:
    return json.loads((tmp_path / "out" / f"sft_{split}.json").read_text(encoding="utf-8"))


def test_split_is_seeded_and_duplicates_are_dropped(tmp_path, tiny_tokenizer_dir):
    duplicates = [dict(GOOD[3], output="another answer"), dict(GOOD[4])]
    path = _write(tmp_path, "data.json", GOOD + duplicates)
    run = prepare(tmp_path, tiny_tokenizer_dir, "--input", str(path), "--test-size", "5", "--seed", "3")
    assert run.returncode == 0, run.stderr
    assert "read 22 records" in run.stdout and "dropped 2 exact duplicates" in run.stdout
    assert "p50" in run.stdout and "longer than the context of 1024: 0" in run.stdout
    train, test = _read(tmp_path, "train"), _read(tmp_path, "test")
    assert len(train) == 15 and len(test) == 5
    assert sorted(train + test, key=lambda r: r["instruction"]) == sorted(GOOD, key=lambda r: r["instruction"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sft_manifest.json", "sft_test.json",
                                                                   "sft_train.json"]  # no temp files

    again = prepare(tmp_path, tiny_tokenizer_dir, "--input", str(path), "--test-size", "5", "--seed", "3")
    assert again.returncode == 0 and _read(tmp_path, "test") == test and _read(tmp_path, "train") == train
    other = prepare(tmp_path, tiny_tokenizer_dir, "--input", str(path), "--test-size", "0.25", "--seed", "4")
    assert other.returncode == 0 and len(_read(tmp_path, "test")) == 5 and _read(tmp_path, "test") != test


def test_jsonl_gives_the_same_records_and_stale_caches_go(tmp_path, tiny_tokenizer_dir):
    path = _write(tmp_path, "data.jsonl", "\n".join(json.dumps(r) for r in GOOD).encode() + b"\n\n")
    stale = tmp_path / "out" / "sft_train.0123456789abcdef.npz"
    stale.parent.mkdir()
    stale.write_bytes(b"old tokens")
    run = prepare(tmp_path, tiny_tokenizer_dir, "--input", str(path), "--test-size", "2")
    assert run.returncode == 0, run.stderr
    assert sorted(_read(tmp_path, "train") + _read(tmp_path, "test"), key=str) == sorted(GOOD, key=str)
    assert not stale.exists()


def test_summary_counts_examples_longer_than_the_context(tmp_path, tiny_tokenizer_dir):
    records = GOOD + [{"instruction": "Long?", "output": "word " * 300}, {"instruction": "x" * 300, "output": "y"}]
    path = _write(tmp_path, "data.json", records)
    run = prepare(tmp_path, tiny_tokenizer_dir, "--input", str(path), "--max-len", "200", "--test-size", "1")
    assert run.returncode == 0, run.stderr
    assert "longer than the context of 200: 2" in run.stdout and "prompt alone longer (always dropped): 1" in run.stdout


def test_empty_outputs_are_refused_unless_dropped(tmp_path, tiny_tokenizer_dir):
    path = _write(tmp_path, "data.json", GOOD + [{"instruction": "Blank?", "input": "", "output": ""}])
    refused = prepare(tmp_path, tiny_tokenizer_dir, "--input", str(path))
    assert refused.returncode == 2 and "record 20" in refused.stderr and "--drop-empty" in refused.stderr
    dropped = prepare(tmp_path, tiny_tokenizer_dir, "--input", str(path), "--drop-empty", "--test-size", "2")
    assert dropped.returncode == 0 and "and 1 empty outputs" in dropped.stdout
    assert len(_read(tmp_path, "train")) == 18


OK = {"instruction": "a", "output": "b"}
BAD_INPUTS = {  # name: (file name, content, words the message must contain)
    "missing file": ("absent.json", None, ["absent.json", "cannot read"]),
    "invalid JSON": ("data.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": }]',
                     ["line 2", "invalid JSON"]),
    "invalid JSONL": ("data.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a",\n',
                      ["record 1 (line 2)"]),
    "top-level object": ("data.json", b'{\n  "data": []\n}', ["top-level value is an object"]),
    "top-level number": ("data.json", b"42", ["top-level value is a number"]),
    "record not an object": ("data.json", [OK, "text"], ["record 1", "got a string"]),
    "JSONL record not an object": ("data.jsonl", b'{"instruction": "a", "output": "b"}\n[1]\n',
                                   ["record 1 (line 2)", "a list"]),
    "missing instruction": ("data.json", [OK, OK, {"output": "b"}], ["record 2", "missing 'instruction'"]),
    "missing output": ("data.json", [{"instruction": "a"}], ["record 0", "missing 'output'"]),
    "number instruction": ("data.json", [OK, {"instruction": 3, "output": "b"}],
                           ["record 1", "'instruction' must be a string"]),
    "list output": ("data.json", [{"instruction": "a", "output": ["b"]}], ["record 0", "'output' must be a string"]),
    "null input": ("data.json", [OK, {"instruction": "a", "input": None, "output": "b"}],
                   ["record 1", "'input'", "null"]),
    "empty output": ("data.json", [OK, {"instruction": "a", "output": "  \n"}], ["record 1", "empty 'output'"]),
    "bad UTF-8 in a string": ("data.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", '
                                           b'"output": "x"}]',
                              ["record 1", "'instruction' is not valid UTF-8", "line 2"]),
    "bad UTF-8 outside strings": ("data.json", b'[{"instruction": "a", "output": "b"}\xff]',
                                  ["invalid UTF-8 on line 1"]),
    "empty list": ("data.json", b"[]", ["no records"]),
    "empty file": ("data.json", b"\n", ["empty file"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_tokenizer_dir, case):
    name, content, words = BAD_INPUTS[case]
    if content is not None:
        _write(tmp_path, name, content)
    run = prepare(tmp_path, tiny_tokenizer_dir, "--input", str(tmp_path / name))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")
    assert str(tmp_path / name) in run.stderr, run.stderr
    for word in words:
        assert word in run.stderr, (word, run.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, words", [
    (["--input", "http://127.0.0.1:9/alpaca_data.json"], ["cannot download", "--input FILE"]),
    (["--test-size", "1.5"], ["--test-size"]),
    (["--test-size", "20"], ["--test-size 20 gives 20 test records out of 20"]),
    (["--template", "chatml"], ["alpaca", "llms-from-scratch", "dialog"]),
    (["--max-len", "0"], ["--max-len"]),
    (["--seed", "x"], ["--seed", "--help"]),
], ids=["offline URL", "fraction > 1", "no training left", "unknown template", "max-len 0", "bad seed"])
def test_bad_options_are_one_line_exit_2(tmp_path, tiny_tokenizer_dir, args, words):
    path = _write(tmp_path, "data.json", GOOD)
    run = prepare(tmp_path, tiny_tokenizer_dir, "--input", str(path), *args)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert all(word in run.stderr for word in words), run.stderr
    assert not (tmp_path / "out").exists()


def test_real_alpaca_subset(tmp_path, shared_assets):
    """The 5,000 Stanford records: two have an empty output; GPT-2 lengths are Alpaca's."""
    path = shared_assets / "alpaca" / "alpaca_5000_subset.json"
    run = prepare(tmp_path, shared_assets / "gpt2_bpe", "--input", str(path), "--drop-empty")
    assert run.returncode == 0, run.stderr
    assert "dropped 0 exact duplicates (same instruction + input) and 2 empty outputs" in run.stdout
    assert len(_read(tmp_path, "train")) == 4748 and len(_read(tmp_path, "test")) == 250
    assert "p50 97, p90 180, p99 322, max 723" in run.stdout
