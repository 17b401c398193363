"""synthetic.py: seeded, valid, correct, held-out, short, and scored by exact match."""
import json

import pytest

from data import SFTDataset, parse_records
from synthetic import DIGITS, SYNTHETIC_SIZES, TASKS, WORDS, exact_match, make_synthetic_split, run_split, task_of
from templates import build_prompt
from tokenizer import load_tokenizer

RULES = {  # the expected output of each task from its input, written independently of the generator
    "copy": lambda words: ",".join(words),
    "reverse": lambda words: ",".join(words[::-1]),
    "sort": lambda words: ",".join(sorted(words)),
    "first": lambda words: words[0],
    "last": lambda words: words[-1],
    "count": lambda words: str(len(words)),
    "add_one": lambda numbers: ",".join(str(int(n) + 1) for n in numbers),
    "largest": lambda numbers: str(max(int(n) for n in numbers)),
}


@pytest.fixture(scope="module")
def split():
    return make_synthetic_split(3000, 300, seed=0)


def test_same_seed_same_records_other_seed_other_records(split):
    assert make_synthetic_split(3000, 300, seed=0) == split
    assert make_synthetic_split(3000, 300, seed=1)[1] != split[1]
    assert len(split[0]) == 3000 and len(split[1]) == 300


def test_eval_regenerates_the_test_records_a_run_trained_beside():
    """eval.py makes only the test split (with_train=False); it is the one train_sft.py held out."""
    train, test = run_split(seed=3)
    assert run_split(seed=3, with_train=False) == ([], test) and len(train) == SYNTHETIC_SIZES[0]


def test_no_test_instance_in_train(split):
    train, test = split
    key = lambda r: (r["instruction"], r["input"])  # noqa: E731
    assert len({key(r) for r in test}) == len(test)
    assert not {key(r) for r in test} & {key(r) for r in train}


def test_every_answer_follows_its_task_rule_and_every_task_appears(split):
    train, test = split
    for record in train + test:
        assert record["output"] == RULES[task_of(record)](record["input"].split(",")), record
    assert {task_of(r) for r in test} == set(TASKS) == set(RULES)


def test_records_are_valid_alpaca_records(split, tiny_tokenizer_dir):
    records = split[0][:200]
    assert parse_records(json.dumps(records).encode(), "synthetic") == records
    ds = SFTDataset.from_records(records, load_tokenizer(tiny_tokenizer_dir), max_len=1024)
    assert ds.stats["n_examples"] == 200 and ds.stats["n_truncated"] == 0


def test_output_vocabulary_is_small(split):
    answers = {item for record in split[0] for item in record["output"].split(",")}
    assert answers <= set(WORDS) | {str(d) for d in DIGITS}  # 22 single GPT-2 tokens (and the comma)


def test_examples_are_short_and_items_are_single_gpt2_tokens(split, shared_assets):
    tok = load_tokenizer(shared_assets / "gpt2_bpe")
    train, test = split
    lengths = [len(tok.encode_ordinary(build_prompt(r) + r["output"])) + 1 for r in train + test]
    assert max(lengths) < 70  # "well under 100" with the alpaca template, eot included
    for record in train[:200]:  # every item and comma is one token, at the start of the text or not
        for text in (record["input"], record["output"]):
            assert len(tok.encode_ordinary(text)) == 2 * len(text.split(",")) - 1
            assert tok.encode_ordinary("\n" + text)[1:] == tok.encode_ordinary(text)


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match(" cat,dog\n", "cat,dog")
    assert not exact_match("cat, dog", "cat,dog")
    assert not exact_match("Cat,dog", "cat,dog")
    assert not exact_match("", "7")
