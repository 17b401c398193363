"""Small instruction tasks, generated from a seed, for training a tiny model from scratch on a CPU.

Each record is Alpaca-style {instruction, input, output}. Every task is a rule over a short list
of words or digits (copy, reverse, sort, first/last item, count, add one, largest number), so a
held-out instance is a new combination of familiar tokens and a model that learns the rule can
answer it: held-out exact match measures learning, not memorisation.

Lists are written "cat,dog,sun", without spaces, so that an item is the same single GPT-2 token
wherever it stands (" dog" and "dog" are different tokens): copying, reversing and sorting are
then pure token moves, which a tiny model learns far sooner. Answers use 12 words, the digits and
the comma; prompt + answer stay under 70 GPT-2 tokens with the alpaca template.
"""
from __future__ import annotations

import random
from typing import Callable

WORDS = ("ball", "bird", "book", "box", "car", "cat", "cup", "dog", "egg", "hat", "key", "sun")
DIGITS = tuple(range(10))


def _words(rng: random.Random, lo: int, hi: int, distinct: bool = False) -> list[str]:
    n = rng.randint(lo, hi)
    return rng.sample(WORDS, n) if distinct else [rng.choice(WORDS) for _ in range(n)]


def _join(items) -> str:
    return ",".join(str(item) for item in items)


def _copy(rng):
    words = _words(rng, 2, 5)
    return _join(words), _join(words)


def _reverse(rng):
    words = _words(rng, 2, 4)
    return _join(words), _join(reversed(words))


def _sort(rng):
    words = _words(rng, 2, 4, distinct=True)
    return _join(words), _join(sorted(words))


def _first(rng):
    words = _words(rng, 2, 5)
    return _join(words), words[0]


def _last(rng):
    words = _words(rng, 2, 5)
    return _join(words), words[-1]


def _count(rng):
    words = _words(rng, 1, 6)
    return _join(words), str(len(words))


def _add_one(rng):
    numbers = [rng.randint(0, 8) for _ in range(rng.randint(2, 4))]
    return _join(numbers), _join(n + 1 for n in numbers)


def _largest(rng):
    numbers = rng.sample(DIGITS, rng.randint(2, 5))
    return _join(numbers), str(max(numbers))


# name -> (instruction, generator of (input, output))
TASKS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]]]] = {
    "copy": ("Repeat the list.", _copy),
    "reverse": ("Reverse the list.", _reverse),
    "sort": ("Sort the list alphabetically.", _sort),
    "first": ("What is the first item?", _first),
    "last": ("What is the last item?", _last),
    "count": ("How many items are there?", _count),
    "add_one": ("Add one to each number.", _add_one),
    "largest": ("What is the largest number?", _largest),
}
_TASK_OF_INSTRUCTION = {instruction: name for name, (instruction, _) in TASKS.items()}


def make_record(rng: random.Random) -> dict:
    """One record of a task drawn uniformly."""
    instruction, generate = TASKS[rng.choice(list(TASKS))]
    text_input, output = generate(rng)
    return {"instruction": instruction, "input": text_input, "output": output}


def _key(record: dict) -> tuple[str, str]:
    return record["instruction"], record["input"]


# train / test records of the built-in dataset: the `tiny` preset's 1500 steps of 32 see each
# training record once. The test split is drawn first, so it does not depend on n_train.
SYNTHETIC_SIZES = (48000, 500)


def make_synthetic_split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) records. Test instances are distinct, and no test instance (instruction +
    input) occurs in train; train may repeat an instance, as a sample from the task mix would."""
    rng = random.Random(seed)
    test, test_keys = [], set()
    while len(test) < n_test:
        record = make_record(rng)
        if _key(record) not in test_keys:
            test_keys.add(_key(record))
            test.append(record)
    train = []
    while len(train) < n_train:
        record = make_record(rng)
        if _key(record) not in test_keys:
            train.append(record)
    return train, test


def run_split(seed: int, with_train: bool = True) -> tuple[list[dict], list[dict]]:
    """The records a `--dataset synthetic` run trains and tests on (SYNTHETIC_SIZES, its seed).
    with_train=False makes only the test records, the same ones: they are drawn first."""
    n_train, n_test = SYNTHETIC_SIZES
    return make_synthetic_split(n_train if with_train else 0, n_test, seed)


def task_of(record: dict) -> str:
    """The task a synthetic record belongs to (for per-task scores)."""
    return _TASK_OF_INSTRUCTION[record["instruction"]]


def exact_match(prediction: str, reference: str) -> bool:
    """The answer is right when it equals the reference up to surrounding whitespace."""
    return prediction.strip() == reference.strip()
