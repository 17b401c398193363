"""Alpaca-style SFT data: read and validate records, tokenise them with the prompt masked out of
the targets, cache the result, and batch it with as little padding as possible.

One example: ids = prompt + response + [eot], labels = ids with the prompt set to -100 (unless
train_on_prompt); the model reads x = ids[:-1] and predicts y = labels[1:]. The final
<|endoftext|> is a target, so the model learns to stop. An example fits when len(x) <= max_len;
a longer one is cut at max_len (losing the end of its response and its eot) or dropped, and
counted either way.

torch is imported only by `collate`, so that prepare_sft_dataset.py starts quickly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from errors import UserError
from files import write_atomic
from templates import build_prompt, get_template

IGNORE_INDEX = -100  # label of a position that is not a target (prompt or padding)
OVERLONG_CHOICES = ("truncate", "drop")
DATASETS = ("sft", "synthetic")
CACHE_VERSION = 1  # bump when the tokenisation or the cache layout changes


@dataclass
class DataConfig:
    """The data options of a training run (flags --dataset, --data-dir, --template, ...)."""
    dataset: str = "sft"  # "sft": data_dir/sft_{train,test}.json; "synthetic": built-in generated tasks
    data_dir: str = "data"
    template: str = "alpaca"
    train_on_prompt: bool = False
    overlong: str = "truncate"  # "truncate" or "drop" examples longer than the context
    max_seq_len: int = 0  # 0 = the model's block_size
    group_by_length: bool = True  # batches of similar length (little padding); off for random batches

    def check(self) -> None:
        if self.dataset not in DATASETS:
            raise UserError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if not self.max_seq_len >= 0:
            raise UserError(f"--max-seq-len must be 0 (the model's context) or more, got {self.max_seq_len}")
        _check_settings(self.template, max(self.max_seq_len, 1), self.overlong)
        if self.dataset == "sft":
            check_split_pair(Path(self.data_dir))


SPLIT_MANIFEST = "sft_manifest.json"  # prepare_sft_dataset.py's record of the pair it wrote


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_split_pair(data_dir: Path) -> None:
    """prepare_sft_dataset.py writes the manifest (both files' hashes) before it renames the new
    train and test files into place: a crash between the two renames leaves a file that does not
    match it, and that pair is refused rather than mixing a new split with an old one."""
    try:
        expected = json.loads((data_dir / SPLIT_MANIFEST).read_text())
    except FileNotFoundError:
        return  # written by hand or by an older version: nothing to compare with
    except (OSError, ValueError) as err:
        raise UserError(f"{data_dir / SPLIT_MANIFEST}: unreadable ({err}); run prepare_sft_dataset.py again") from None
    for name, digest in expected.items():
        path = data_dir / name
        if not path.is_file() or file_sha256(path) != digest:
            raise UserError(f"{path} is not the file prepare_sft_dataset.py last wrote beside its other split "
                            f"(interrupted while replacing the pair?); run prepare_sft_dataset.py again, or "
                            f"delete {data_dir / SPLIT_MANIFEST} if you edited the files on purpose")

# ----------------------------------------------------------------------------- records

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_record(value, where: str, bad_utf8_line: Optional[int], allow_empty_output: bool) -> dict:
    """The record as {instruction, input, output} (input defaults to ""), or a UserError."""
    if not isinstance(value, dict):
        raise UserError(f'{where}: expected an object with "instruction" and "output", got {_json_type(value)}; '
                        "fix or remove that record")
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        if key not in value:
            if required:
                raise UserError(f"{where}: missing {key!r}; every record needs 'instruction' and 'output' strings")
            continue
        if not isinstance(value[key], str):
            hint = 'use "" or leave it out when there is no input' if key == "input" else "fix that record"
            raise UserError(f"{where}: {key!r} must be a string, got {_json_type(value[key])}; {hint}")
        try:  # undecodable bytes arrive as lone surrogates (see parse_records); so do "\udc80" escapes
            value[key].encode("utf-8")
        except UnicodeEncodeError:
            at = f" (first bad byte on line {bad_utf8_line})" if bad_utf8_line else " (an unpaired surrogate)"
            raise UserError(f"{where}: {key!r} is not valid UTF-8{at}; re-save the file as UTF-8") from None
    if not value["output"].strip() and not allow_empty_output:
        raise UserError(f"{where}: empty 'output'; give the record a response or remove it "
                        "(prepare_sft_dataset.py --drop-empty drops such records)")
    return {"instruction": value["instruction"], "input": value.get("input", ""), "output": value["output"]}


def _split_jsonl(text: str, source: str) -> list[tuple[object, str]]:
    items = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            items.append((json.loads(line), f"{source}: record {len(items)} (line {lineno})"))
        except json.JSONDecodeError as err:
            raise UserError(f"{source}: record {len(items)} (line {lineno}): invalid JSON at column {err.colno}: "
                            f"{err.msg}; fix that line (JSONL needs one complete object per line)") from None
    return items


def _split_json(text: str, source: str, jsonl: bool) -> list[tuple[object, str]]:
    """(value, "source: record i ...") for each record of a JSON list or of JSONL lines."""
    if jsonl:
        return _split_jsonl(text, source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise UserError(f"{source}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}; "
                            "fix the file (it should be a JSON list of records)") from None
        return _split_jsonl(text, source)  # several values, one per line: JSONL
    if isinstance(data, dict) and text.strip().count("\n") == 0:
        return [(data, f"{source}: record 0 (line 1)")]  # JSONL with a single record
    if not isinstance(data, list):
        raise UserError(f"{source}: top-level value is {_json_type(data)}; expected a JSON list of records "
                        "(or JSONL, one object per line)")
    return [(value, f"{source}: record {i}") for i, value in enumerate(data)]


def parse_records(raw: bytes, source: str, allow_empty_output: bool = False) -> list[dict]:
    """Validated records from the bytes of a JSON list or JSONL file; `source` names it in errors.
    JSONL is recognised by a .jsonl name or by content that is several JSON values, one per line.
    An empty (or all-whitespace) output is an error unless allow_empty_output."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is harmless
    try:
        text, bad_line = raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        bad_line = raw.count(b"\n", 0, err.start) + 1
        # Keep going so that the error can name the record: bad bytes become lone surrogates,
        # which _check_record refuses.
        text = raw.decode("utf-8", errors="surrogateescape")
    if not text.strip():
        raise UserError(f"{source}: empty file; expected a JSON list of records or JSONL")
    try:
        items = _split_json(text, source, jsonl=source.lower().endswith(".jsonl"))
    except UserError:
        if bad_line:  # the bad bytes are outside any string, which is what broke the JSON
            raise UserError(f"{source}: invalid UTF-8 on line {bad_line}; re-save the file as UTF-8") from None
        raise
    if not items:
        raise UserError(f"{source}: no records; expected a non-empty JSON list of records or JSONL")
    return [_check_record(value, where, bad_line, allow_empty_output) for value, where in items]


def load_records(path: str | os.PathLike) -> list[dict]:
    """Validated {instruction, input, output} records of a JSON list or JSONL file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}; check the path") from None
    return parse_records(raw, str(path))


# ----------------------------------------------------------------------------- tokenisation

def encode_record(record: dict, tokenizer, template: str) -> tuple[list[int], int]:
    """ids = prompt + response + [eot], and the number of prompt tokens. Prompt and response are
    encoded separately, as at generation time, where the model continues the encoded prompt."""
    prompt = tokenizer.encode_ordinary(build_prompt(record, template))
    response = tokenizer.encode_ordinary(record["output"])
    return prompt + response + [tokenizer.eot_id], len(prompt)


def fit_to_context(ids: list[int], n_prompt: int, max_len: int, overlong: str) -> tuple[Optional[list[int]], str]:
    """(ids that fit, "ok" | "truncated") or (None, "dropped_overlong" | "dropped_prompt_too_long").
    x = ids[:-1] fits when len(x) <= max_len. Truncation keeps ids[:max_len + 1]; the first response
    token is then still a target as long as n_prompt <= max_len."""
    if len(ids) <= max_len + 1:
        return ids, "ok"
    if n_prompt > max_len:
        return None, "dropped_prompt_too_long"
    if overlong == "drop":
        return None, "dropped_overlong"
    return ids[:max_len + 1], "truncated"


def length_percentiles(lengths) -> dict:
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return {}
    pct = {f"length_p{q}": int(np.percentile(lengths, q, method="nearest")) for q in (50, 90, 99)}
    return {**pct, "length_max": int(lengths.max())}


def _check_settings(template: str, max_len: int, overlong: str) -> None:
    get_template(template)
    if overlong not in OVERLONG_CHOICES:
        raise UserError(f"--overlong must be one of {', '.join(OVERLONG_CHOICES)}, got {overlong!r}")
    if max_len < 1:
        raise UserError(f"max_len must be at least 1, got {max_len}")


class SFTDataset:
    """Tokenised examples, stored flat: example i is ids[offsets[i]:offsets[i+1]] (prompt, response,
    eot; possibly truncated), of which the first n_masked[i] tokens are not targets.
    `dataset[i]` is (x, y) as int64 arrays; `lengths` are the len(x); `stats` describes the build;
    `source_index[i]` is the record example i came from; `records` are those records, if known."""

    def __init__(self, ids, offsets, n_masked, source_index, stats: dict, records: Optional[list] = None):
        self.ids, self.offsets = np.asarray(ids), np.asarray(offsets, dtype=np.int64)
        self.n_masked, self.source_index = np.asarray(n_masked), np.asarray(source_index)
        self.stats, self.records = stats, records
        self.lengths = np.diff(self.offsets) - 1
        self.from_cache = False

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)
        x, y = ids[:-1], ids[1:].copy()
        y[:max(int(self.n_masked[i]) - 1, 0)] = IGNORE_INDEX  # y[j] is the label of ids[j + 1]
        return x, y

    @classmethod
    def from_records(cls, records: Sequence[dict], tokenizer, template: str = "alpaca", max_len: int = 1024,
                     train_on_prompt: bool = False, overlong: str = "truncate") -> "SFTDataset":
        """Tokenise validated records (see load_records); raises UserError if none fits."""
        _check_settings(template, max_len, overlong)
        kept, n_masked, source_index = [], [], []
        counts = dict.fromkeys(("truncated", "dropped_overlong", "dropped_prompt_too_long"), 0)
        for i, record in enumerate(records):
            ids, n_prompt = encode_record(record, tokenizer, template)
            ids, status = fit_to_context(ids, n_prompt, max_len, overlong)
            if status != "ok":
                counts[status] += 1
            if ids is not None:
                kept.append(ids)
                n_masked.append(0 if train_on_prompt else n_prompt)
                source_index.append(i)
        if not kept:
            raise UserError(f"none of the {len(records)} records fits in max_len={max_len} tokens "
                            f"(template {template!r}); raise the context length or shorten the prompts")
        offsets = np.cumsum([0] + [len(ids) for ids in kept])
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32  # GPT-2's 50257 ids fit in 16 bits
        flat = np.fromiter((t for ids in kept for t in ids), dtype=dtype, count=int(offsets[-1]))
        n_masked = np.array(n_masked, dtype=np.int64)
        lengths = np.diff(offsets) - 1
        stats = {
            "template": template, "max_len": max_len, "train_on_prompt": train_on_prompt, "overlong": overlong,
            "n_records": len(records), "n_examples": len(kept), "n_truncated": counts["truncated"],
            "n_dropped": counts["dropped_overlong"] + counts["dropped_prompt_too_long"],
            "n_dropped_overlong": counts["dropped_overlong"],
            "n_dropped_prompt_too_long": counts["dropped_prompt_too_long"],
            "n_tokens": int(lengths.sum()),
            "n_target_tokens": int((lengths - np.maximum(n_masked - 1, 0)).sum()),
            **length_percentiles(lengths),
        }
        return cls(flat, offsets, n_masked, np.array(source_index, dtype=np.int64), stats, list(records))

    def save(self, path: Path, key: str) -> None:
        arrays = dict(ids=self.ids, offsets=self.offsets, n_masked=self.n_masked, source_index=self.source_index,
                      key=np.array(key), stats=np.array(json.dumps(self.stats)))
        write_atomic(path, lambda tmp: _save_npz(tmp, arrays))

    @classmethod
    def load(cls, path: Path, key: str) -> Optional["SFTDataset"]:
        """The cached dataset, or None if the file is missing, unreadable or for other settings."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                return cls(z["ids"], z["offsets"], z["n_masked"], z["source_index"], json.loads(str(z["stats"])))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return None


def _save_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:  # a file object: given a path, np.savez would append '.npz' to it
        np.savez(f, **arrays)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer does (every token's bytes, the split pattern, the eot id), not
    of where it was loaded from, so moving a checkpoint folder keeps its cached data valid."""
    encoding = tokenizer.encoding
    pattern = getattr(encoding, "_pat_str", encoding.name)  # tiktoken has no public name for it
    h = hashlib.sha256(f"{pattern}\0{tokenizer.eot_id}\0{tokenizer.vocab_size}\0".encode())
    for i in range(tokenizer.vocab_size):
        try:
            h.update(encoding.decode_single_token_bytes(i))
        except KeyError:  # a gap in the id range
            h.update(b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def load_sft_split(data_dir: str | os.PathLike, split: str, tokenizer, template: str = "alpaca",
                   max_len: int = 1024, train_on_prompt: bool = False, overlong: str = "truncate",
                   cache: bool = True) -> SFTDataset:
    """The tokenised data_dir/sft_{split}.json. The tokens are cached beside it in
    sft_{split}.<key>.npz, where key hashes the file's bytes, the tokenizer and every setting, so
    a second run skips tokenisation and any change of data or settings re-tokenises."""
    path = Path(data_dir) / f"sft_{split}.json"
    _check_settings(template, max_len, overlong)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); create it with "
                        f"`python prepare_sft_dataset.py --output-dir {data_dir}` or pass --data-dir") from None
    records = parse_records(raw, str(path))
    settings = dict(version=CACHE_VERSION, template=template, max_len=max_len,
                    train_on_prompt=train_on_prompt, overlong=overlong)
    key = hashlib.sha256(hashlib.sha256(raw).digest() + tokenizer_fingerprint(tokenizer).encode()
                         + json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache_path = path.with_name(f"sft_{split}.{key[:16]}.npz")
    dataset = SFTDataset.load(cache_path, key) if cache else None
    if dataset is not None:
        dataset.records, dataset.from_cache = records, True
        return dataset
    dataset = SFTDataset.from_records(records, tokenizer, template, max_len, train_on_prompt, overlong)
    if cache:
        try:
            dataset.save(cache_path, key)
        except OSError:  # a read-only data folder only costs the speed-up
            pass
    return dataset


# ----------------------------------------------------------------------------- batching

class LengthGroupedBatchSampler:
    """Batches of example indices, for DataLoader(batch_sampler=...).

    Each epoch the indices are shuffled with a generator seeded by (seed, epoch). With
    group_by_length, every run of `bucket_batches * batch_size` shuffled indices is sorted by
    length and cut into batches, and the batches are shuffled, so a batch holds examples of
    similar length (little padding) while the order stays random; the batch with the longest
    example goes first so that running out of memory happens at step 1, not hours in. Without it,
    batches are consecutive runs of the shuffled indices. Grouping pays on real data (Alpaca:
    46% of the positions are padding in random batches of 8, 3.5% grouped), but where the length
    gives away the kind of example, grouped batches hold one kind each and training suffers:
    on synthetic.py's tasks, whose lengths vary little anyway, use group_by_length=False.

    Sharding (DDP): rank r takes batches r, r + world, ...; every rank gets len(self) batches, the
    last (< world) batches of the epoch are left out. Resume: set_epoch(epoch, skip_batches=k)
    makes the next iteration start at this rank's batch k of that epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_by_length: bool = True,
                 num_replicas: int = 1, rank: int = 0, bucket_batches: int = 64):
        self.lengths = np.asarray(lengths)
        if batch_size < 1 or bucket_batches < 1:
            raise UserError(f"batch_size and bucket_batches must be at least 1, got {batch_size}, {bucket_batches}")
        if not 0 <= rank < num_replicas:
            raise UserError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.batch_size, self.seed, self.group_by_length = batch_size, seed, group_by_length
        self.num_replicas, self.rank, self.bucket_batches = num_replicas, rank, bucket_batches
        self.batches_per_epoch = math.ceil(len(self.lengths) / batch_size) // num_replicas  # per rank
        if self.batches_per_epoch == 0:
            raise UserError(f"{len(self.lengths)} examples make fewer than one batch of {batch_size} "
                            f"per rank for {num_replicas} ranks; use more data or a smaller batch")
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise UserError(f"skip_batches must be in [0, {self.batches_per_epoch}], got {skip_batches}")
        self.epoch, self.skip_batches = epoch, skip_batches

    def epoch_batches(self) -> list[np.ndarray]:
        """Every batch of the current epoch, in order, before sharding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        if not self.group_by_length:
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        bucket = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), bucket):
            chunk = order[start:start + bucket]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b]].max())
        batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.epoch_batches()[self.rank::self.num_replicas][:self.batches_per_epoch]
        for batch in mine[self.skip_batches:]:
            yield batch.tolist()

    def __len__(self) -> int:
        """Batches the next iteration yields: batches_per_epoch - skip_batches."""
        return self.batches_per_epoch - self.skip_batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the [B, T] positions of dynamically padded batches that are padding."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - real / padded


def sorted_batches(dataset: SFTDataset, batch_size: int, pad_id: int, max_batches: Optional[int] = None):
    """(x, y) batches of the whole set (or its first max_batches), shortest examples first:
    similar lengths together, so evaluation pads little; the same batches every time."""
    order = np.argsort(dataset.lengths, kind="stable")
    for start in range(0, len(order), batch_size)[:max_batches]:
        yield collate([dataset[i] for i in order[start:start + batch_size]], pad_id)


def collate(examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int):
    """(x, y) LongTensors [B, T], T = the longest x of the batch; x is padded with pad_id (the eot
    id: any real token works, padding is never a target and, on the right, never attended to by
    real positions), y with -100."""
    import torch

    width = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (xi, yi) in enumerate(examples):
        x[row, :len(xi)] = torch.from_numpy(np.asarray(xi, dtype=np.int64))
        y[row, :len(yi)] = torch.from_numpy(np.asarray(yi, dtype=np.int64))
    return x, y


def count_target_tokens(y) -> int:
    """Target tokens in a batch of labels (tensor or array): the denominator of the per-token loss
    when summed over all micro-batches of an optimizer step."""
    return int((y != IGNORE_INDEX).sum())
