"""templates.py and data.py: prompt text, masks and labels, truncation, the token cache, collation
and the length-grouped batch sampler. All offline, with the tiny tokenizer (single bytes have
ids equal to their value, so a one-character answer "5" is token 53)."""
import json
from functools import partial

import numpy as np
import pytest
import torch

from data import (IGNORE_INDEX, LengthGroupedBatchSampler, SFTDataset, collate, count_target_tokens,
                  load_sft_split, padding_fraction, sorted_batches, tokenizer_fingerprint)
from errors import UserError
from templates import TEMPLATES, build_prompt
from tokenizer import ENDOFTEXT, load_tokenizer

WITH_INPUT = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
NO_INPUT = {"instruction": "Greet me.", "input": "", "output": "hello there"}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _build(records, tok, **options):
    return SFTDataset.from_records(records, tok, **{"max_len": 512, **options})


# ----------------------------------------------------------------------------- templates

def test_alpaca_template_is_stanfords_text():
    assert build_prompt(WITH_INPUT, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert build_prompt(NO_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nGreet me.\n\n### Response:\n")


def test_llms_from_scratch_and_dialog_templates():
    preamble = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
    assert build_prompt(WITH_INPUT, "llms-from-scratch") == (
        preamble + "\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert build_prompt(NO_INPUT, "llms-from-scratch") == (
        preamble + "\n\n### Instruction:\nGreet me.\n\n### Response:\n")
    assert build_prompt(WITH_INPUT, "dialog") == "Human: Add the numbers.\n\n2 and 3\n\nAssistant: "
    assert build_prompt(NO_INPUT, "dialog") == "Human: Greet me.\n\nAssistant: "


def test_build_prompt_takes_a_bare_instruction_and_keeps_braces():
    assert build_prompt("Greet me.", "alpaca") == build_prompt(NO_INPUT, "alpaca")
    assert "{input} {0}" in build_prompt({"instruction": "{input} {0}"}, "dialog")


def test_unknown_template_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        build_prompt(NO_INPUT, "chatml")
    assert all(name in str(err.value) for name in TEMPLATES)


# ----------------------------------------------------------------------------- examples

@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("record", [WITH_INPUT, NO_INPUT], ids=["with_input", "no_input"])
def test_prompt_is_masked_and_eot_is_the_last_target(tok, record, template):
    prompt = tok.encode_ordinary(build_prompt(record, template))
    response = tok.encode_ordinary(record["output"])
    x, y = _build([record], tok, template=template)[0]
    assert tok.decode(x) == build_prompt(record, template) + record["output"]
    assert x.tolist() == prompt + response
    # y[j] is the target after x[:j+1]: nothing until the last prompt token, then the response and eot
    assert y.tolist() == [IGNORE_INDEX] * (len(prompt) - 1) + response + [tok.eot_id]
    assert x.dtype == y.dtype == np.int64


def test_labels_by_hand(tok):
    x, y = _build([WITH_INPUT], tok)[0]
    assert y[-2:].tolist() == [ord("5"), tok.eot_id] and (y[:-2] == IGNORE_INDEX).all()
    assert x[-2:].tolist() == [ord("\n"), ord("5")]  # "\n" (end of prompt) predicts "5", "5" predicts eot


def test_train_on_prompt_keeps_every_target(tok):
    x, y = _build([WITH_INPUT], tok, train_on_prompt=True)[0]
    assert y.tolist() == x[1:].tolist() + [tok.eot_id]


def test_literal_endoftext_in_the_data_stays_text(tok):
    x, y = _build([{"instruction": "Say it.", "input": "", "output": f"a {ENDOFTEXT} b"}], tok)[0]
    assert tok.eot_id not in x.tolist() and y.tolist().count(tok.eot_id) == 1


def test_long_response_is_truncated_at_the_context_and_counted(tok):
    record = {"instruction": "Count.", "input": "", "output": "1 2 3 4 5 6 7 8 9 10 11 12"}
    prompt = tok.encode_ordinary(build_prompt(record))
    response = tok.encode_ordinary(record["output"])
    fits = dict(record, output="1")  # same prompt, one-token answer: len(x) = len(prompt) + 1
    ds = _build([record, fits], tok, max_len=len(prompt) + 3)
    x, y = ds[0]
    assert len(x) == len(prompt) + 3 and x.tolist() == prompt + response[:3]
    assert y.tolist() == [IGNORE_INDEX] * (len(prompt) - 1) + response[:4]  # no eot: the answer was cut
    assert ds.stats["n_truncated"] == 1 and ds.stats["n_dropped"] == 0 and len(ds) == 2


def test_prompt_filling_the_context_keeps_one_target_and_longer_is_dropped(tok):
    short = {"instruction": "Hi.", "input": "", "output": "yes"}
    long = {"instruction": "Hi, how are you doing today?", "input": "", "output": "yes"}
    n_short = len(tok.encode_ordinary(build_prompt(short)))
    assert len(tok.encode_ordinary(build_prompt(long))) > n_short
    for train_on_prompt in (False, True):  # a prompt that does not fit is dropped either way
        ds = _build([short, long], tok, max_len=n_short, train_on_prompt=train_on_prompt)
        assert len(ds) == 1 and ds.source_index.tolist() == [0]
        assert ds.stats["n_dropped_prompt_too_long"] == 1 and ds.stats["n_truncated"] == 1
        x, y = ds[0]
        assert len(x) == n_short and y[-1] == tok.encode_ordinary("yes")[0]
    assert count_target_tokens(_build([short, long], tok, max_len=n_short)[0][1]) == 1


def test_overlong_drop_drops_and_counts(tok):
    long = {"instruction": "Count.", "input": "", "output": "1 2 3 4 5 6 7 8 9 10 11 12"}
    max_len = len(tok.encode_ordinary(build_prompt(long))) + 3
    ds = _build([long, dict(long, output="1")], tok, max_len=max_len, overlong="drop")
    assert len(ds) == 1 and ds.source_index.tolist() == [1]
    assert ds.stats["n_dropped_overlong"] == 1 and ds.stats["n_dropped"] == 1 and ds.stats["n_truncated"] == 0
    with pytest.raises(UserError, match="none of the 1 records fits"):
        _build([long], tok, max_len=max_len, overlong="drop")
    with pytest.raises(UserError, match="overlong"):
        _build([long], tok, overlong="cut")


def test_stats_count_targets_and_lengths(tok):
    records = [WITH_INPUT, NO_INPUT] * 3
    ds = _build(records, tok)
    examples = [ds[i] for i in range(len(ds))]
    assert ds.stats["n_examples"] == 6 and ds.stats["n_records"] == 6
    assert ds.stats["n_target_tokens"] == sum(count_target_tokens(y) for _, y in examples)
    assert ds.stats["n_tokens"] == sum(len(x) for x, _ in examples) == ds.lengths.sum()
    assert ds.stats["length_max"] == max(len(x) for x, _ in examples)
    json.dumps(ds.stats)  # goes into hyperparams.json


# ----------------------------------------------------------------------------- cache

def _counting(tokenizer):
    """Make tokenizer.encode_ordinary count its calls."""
    calls = [0]
    encode = tokenizer.encode_ordinary

    def counted(text):
        calls[0] += 1
        return encode(text)

    tokenizer.encode_ordinary = counted
    return calls


def _same(a: SFTDataset, b: SFTDataset) -> bool:
    return (len(a) == len(b) and a.stats == b.stats and a.records == b.records
            and all(np.array_equal(a[i][k], b[i][k]) for i in range(len(a)) for k in (0, 1)))


def test_cache_is_used_and_invalidated(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    calls = _counting(tok)
    (tmp_path / "sft_train.json").write_text(json.dumps([WITH_INPUT, NO_INPUT]))
    load = partial(load_sft_split, tmp_path, "train", tok)

    first = load(max_len=512)
    assert calls[0] > 0 and not first.from_cache
    calls[0] = 0
    second = load(max_len=512)
    assert calls[0] == 0 and second.from_cache and _same(first, second)

    for changed in (dict(max_len=256), dict(max_len=512, template="dialog"), dict(max_len=512, train_on_prompt=True),
                    dict(max_len=512, overlong="drop")):
        calls[0] = 0
        assert not load(**changed).from_cache and calls[0] > 0, changed
    assert len(list(tmp_path.glob("sft_train.*.npz"))) == 5  # one per setting, none overwritten

    (tmp_path / "sft_train.json").write_text(json.dumps([NO_INPUT]))  # new content, same settings
    calls[0] = 0
    third = load(max_len=512)
    assert not third.from_cache and calls[0] > 0 and len(third) == 1


def test_corrupt_cache_is_rebuilt(tmp_path, tok):
    (tmp_path / "sft_test.json").write_text(json.dumps([WITH_INPUT]))
    first = load_sft_split(tmp_path, "test", tok)
    [cache] = tmp_path.glob("sft_test.*.npz")
    cache.write_bytes(b"not a zip file")
    again = load_sft_split(tmp_path, "test", tok)
    assert not again.from_cache and _same(first, again)
    assert load_sft_split(tmp_path, "test", tok).from_cache


def test_cache_follows_tokenizer_content_not_its_folder(tmp_path, tiny_tokenizer_dir):
    same = tmp_path / "copy"
    same.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (same / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
    other = tmp_path / "fewer_merges"  # the tiny vocabulary without its last merge
    other.mkdir()
    vocab = json.loads((tiny_tokenizer_dir / "vocab.json").read_text())
    last_merge = (tiny_tokenizer_dir / "merges.txt").read_text().splitlines()[-1]
    del vocab[last_merge.replace(" ", "")]
    vocab[ENDOFTEXT] = len(vocab) - 1
    (other / "vocab.json").write_text(json.dumps(vocab))
    (other / "merges.txt").write_text("\n".join((tiny_tokenizer_dir / "merges.txt").read_text().splitlines()[:-1]))
    prints = [tokenizer_fingerprint(load_tokenizer(d)) for d in (tiny_tokenizer_dir, same, other)]
    assert prints[0] == prints[1] != prints[2]


def test_missing_split_says_how_to_make_it(tmp_path, tok):
    with pytest.raises(UserError, match="prepare_sft_dataset.py"):
        load_sft_split(tmp_path, "train", tok)


# ----------------------------------------------------------------------------- batches

def test_sorted_batches_cover_the_set_shortest_first(tok):
    records = [{"instruction": "say" + " more" * (i * 7 % 10), "input": "", "output": "ok"} for i in range(10)]
    ds = _build(records, tok)
    batches = list(sorted_batches(ds, 3, tok.eot_id))
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    widths = [x.shape[1] for x, _ in batches]
    assert widths == sorted(widths) and widths[-1] == max(ds.lengths)
    assert sum(count_target_tokens(y) for _, y in batches) == ds.stats["n_target_tokens"]
    assert [x.tolist() for x, _ in sorted_batches(ds, 3, tok.eot_id, max_batches=2)] == [x.tolist() for x, _ in batches[:2]]


def test_collate_pads_x_with_pad_id_and_y_with_ignore(tok):
    ds = _build([WITH_INPUT, NO_INPUT], tok)
    (x0, y0), (x1, y1) = ds[0], ds[1]
    x, y = collate([ds[0], ds[1]], pad_id=tok.eot_id)
    width = max(len(x0), len(x1))
    assert x.shape == y.shape == (2, width) and x.dtype == y.dtype == torch.long
    short = 0 if len(x0) < len(x1) else 1
    n = len(ds[short][0])
    assert x[short, :n].tolist() == ds[short][0].tolist() and (x[short, n:] == tok.eot_id).all()
    assert y[short, :n].tolist() == ds[short][1].tolist() and (y[short, n:] == IGNORE_INDEX).all()
    assert count_target_tokens(y) == count_target_tokens(y0) + count_target_tokens(y1) == ds.stats["n_target_tokens"]


def test_dataloader_with_the_sampler_yields_padded_batches(tok):
    ds = _build([WITH_INPUT, NO_INPUT] * 5, tok)
    sampler = LengthGroupedBatchSampler(ds.lengths, batch_size=4, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=partial(collate, pad_id=tok.eot_id))
    shapes = [x.shape[0] for x, _ in loader]
    assert sorted(shapes) == [2, 4, 4] and len(loader) == 3


def _alpaca_like_lengths(n=5000, seed=0):
    """Lengths spread like Alpaca's in GPT-2 tokens (median ~100, long right tail)."""
    return np.clip(np.random.default_rng(seed).lognormal(4.6, 0.55, n).astype(int), 20, 1024)


def _epoch(sampler, epoch, skip=0):
    sampler.set_epoch(epoch, skip_batches=skip)
    return list(sampler)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_every_index_once_per_epoch(group_by_length):
    lengths = _alpaca_like_lengths(1003)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, group_by_length=group_by_length)
    for epoch in (0, 1):
        batches = _epoch(sampler, epoch)
        assert sorted(i for b in batches for i in b) == list(range(1003))
        assert len(batches) == len(sampler) == 126 and sorted(map(len, batches))[1:] == [8] * 125


def test_length_grouping_removes_almost_all_padding():
    lengths = _alpaca_like_lengths()
    grouped = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0)
    plain = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0, group_by_length=False)
    # Sorting 512 examples at a time leaves neighbours within a few tokens of each other (3% here,
    # 3.5% on real Alpaca); random batches of 8 from this spread are about half padding.
    assert padding_fraction(lengths, _epoch(grouped, 0)) < 0.05
    assert padding_fraction(lengths, _epoch(plain, 0)) > 0.3


def test_order_is_deterministic_per_seed_and_epoch_and_random_otherwise():
    lengths = _alpaca_like_lengths(2000)
    a, b = (LengthGroupedBatchSampler(lengths, 8, seed=3) for _ in range(2))
    assert _epoch(a, 5) == _epoch(b, 5)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 0) != _epoch(LengthGroupedBatchSampler(lengths, 8, seed=4), 0)
    # batches come in random order, not sorted by length: maxima of consecutive batches go both ways
    maxima = [lengths[b].max() for b in _epoch(a, 0)]
    assert maxima[0] == lengths.max()  # except the longest, first, so that out-of-memory shows at once
    ups = sum(m2 > m1 for m1, m2 in zip(maxima[1:], maxima[2:]))
    assert 0.3 < ups / (len(maxima) - 2) < 0.7


def test_skip_resumes_mid_epoch():
    sampler = LengthGroupedBatchSampler(_alpaca_like_lengths(500), 8, seed=0)
    full = _epoch(sampler, 2)
    assert _epoch(sampler, 2, skip=10) == full[10:] and len(sampler) == len(full) - 10
    assert _epoch(sampler, 3) != full and len(sampler) == len(full)  # a new epoch starts from its first batch
    with pytest.raises(UserError):
        sampler.set_epoch(0, skip_batches=len(full) + 1)


def test_ddp_shards_are_disjoint_and_equal_sized():
    lengths = _alpaca_like_lengths(1001)  # 126 batches of 8: 42 per rank for 3 ranks
    world = 3
    ranks = [LengthGroupedBatchSampler(lengths, 8, seed=7, num_replicas=world, rank=r) for r in range(world)]
    shards = [_epoch(s, 4) for s in ranks]
    everything = _epoch(LengthGroupedBatchSampler(lengths, 8, seed=7), 4)
    assert [len(s) for s in shards] == [len(r) for r in ranks] == [42] * 3
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == len(set(seen))  # disjoint
    for rank, shard in enumerate(shards):  # rank r takes every world-th batch of the same order
        assert shard == everything[rank::world][:42]
    uneven = [LengthGroupedBatchSampler(lengths, 8, seed=7, num_replicas=4, rank=r) for r in range(4)]
    assert {len(_epoch(s, 0)) for s in uneven} == {31}  # 126 batches: 2 left out so all ranks step together
    with pytest.raises(UserError):
        LengthGroupedBatchSampler(lengths, 8, num_replicas=2, rank=2)
