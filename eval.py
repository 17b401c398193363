"""Evaluate a fine-tuned model against its base: reward-model win rate and test loss.

    python eval.py --run runs/NAME                      # prompts: the instructions of the run's test split
    python eval.py --run runs/NAME --prompts ../shared/assets/prompts/prompts.csv --reward-model DIR
    python eval.py --model DIR --adapter DIR --base DIR --prompts prompts.txt --no-reward

Both models answer every prompt (wrapped in the run's template), a reward model scores each
(prompt, response) pair, and each model's response-only loss and perplexity on the test split
are computed. Written to OUT/responses.json (prompts, responses, rewards, settings) and
OUT/reward.json (the summary plot.py shows), where OUT is runs/NAME/eval with --run.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

import reward
from configs import TrainConfig
from data import SFTDataset, load_records, load_sft_split
from devices import pick_device
from errors import UserError, run_cli
from files import write_text_atomic
from generation import (GenerationSettings, Loaded, add_generation_args, adapter_base, check_vocab,
                        count_truncated_prompts, generate_responses, generation_settings, load_for_generation,
                        load_weights, model_parser, prepare_for_generation, prompt_record)
from model import GPT, resolve_checkpoint
from runs import run_base_source
from validation import evaluate_loss

DEFAULT_OUT = "eval_out"  # without --run


# ----------------------------------------------------------------------------- prompt files

def load_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompts as {instruction, input} records from a CSV with a `prompt` column, a JSON list
    (or JSONL) of strings or of {instruction, input} records, or a text file, one per line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise UserError(f"--prompts {path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path}: not valid UTF-8; re-save it as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        prompts = _csv_prompts(text, path)
    elif suffix in (".json", ".jsonl"):
        prompts = _json_prompts(text, path)
    else:
        prompts = [{"instruction": line.strip(), "input": ""} for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in the file")
    return prompts


def _csv_prompts(text: str, path: Path) -> list[dict]:
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
        columns = {name.strip().lower(): name for name in (rows[0].keys() if rows else []) if name}
    except csv.Error as err:
        raise UserError(f"--prompts {path}: malformed CSV ({err})") from None
    if "prompt" not in columns:
        raise UserError(f"--prompts {path}: no 'prompt' column (columns: {', '.join(columns) or 'none'}); "
                        "add a header row with a column named prompt")
    prompts = []
    for i, row in enumerate(rows):
        value = (row.get(columns["prompt"]) or "").strip()
        if not value:
            raise UserError(f"--prompts {path}: row {i + 2} has an empty prompt; fill it in or remove the row")
        prompts.append({"instruction": value, "input": ""})
    return prompts


def _json_prompts(text: str, path: Path) -> list[dict]:
    try:
        items = json.loads(text) if path.suffix.lower() == ".json" else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UserError(f"--prompts {path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg})") from None
    if not isinstance(items, list):
        raise UserError(f"--prompts {path}: expected a JSON list of strings or of {{instruction, input}} records")
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item.strip():
            prompts.append({"instruction": item.strip(), "input": ""})
        elif isinstance(item, dict) and isinstance(item.get("instruction"), str) and item["instruction"].strip() \
                and isinstance(item.get("input", ""), str):
            prompts.append(prompt_record(item))
        else:
            raise UserError(f"--prompts {path}: item {i} is not a non-empty string or a record with an "
                            "'instruction' string (and optional 'input' string)")
    return prompts


def reward_prompt_text(record: dict) -> str:
    """What the reward model reads as the question: the instruction and its input."""
    return record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")


# ----------------------------------------------------------------------------- test loss

@dataclass
class LossData:
    """Where the response loss is measured: records in memory, or the run's sft_test.json
    (records None: read through load_sft_split, which caches the tokens)."""
    source: str
    records: Optional[list[dict]] = None
    data_dir: Optional[str] = None


def test_data(args, loaded: Loaded) -> Optional[LossData]:
    """The test records: --data, else the run's test split; None when there is none."""
    if args.data:
        return LossData(args.data, records=load_records(args.data))
    return None if loaded.train is None else run_test_split(loaded.train)


def run_test_split(train) -> LossData:
    """The test split a run was evaluated on while it trained."""
    if train.dataset == "synthetic":
        from synthetic import run_split

        return LossData("synthetic test split", records=run_split(train.seed, with_train=False)[1])
    path = Path(train.data_dir) / "sft_test.json"
    if not path.is_file():
        raise UserError(f"{path} (the run's test split) does not exist; "
                        "pass --data FILE, or --prompts FILE with --no-loss")
    return LossData(str(path), data_dir=train.data_dir)


def test_prompts(test: Optional[LossData]) -> list[dict]:
    """Without --prompts: the instructions (and inputs) of the test records."""
    if test is None:
        raise UserError("no prompts: pass --prompts FILE (CSV, JSON or text), or --run/--data to use test records")
    return [prompt_record(r) for r in (test.records if test.records is not None else load_records(test.source))]


def build_test_set(test: LossData, loaded: Loaded, max_len: int) -> SFTDataset:
    """Tokenised like the run's training data: its template, context and overlong rule; the
    loss is on response tokens only, whatever train_on_prompt was."""
    train = loaded.train
    if train and train.max_seq_len:
        max_len = min(max_len, train.max_seq_len)
    options = dict(template=loaded.template, max_len=max_len, train_on_prompt=False,
                   overlong=train.overlong if train else "truncate")
    if test.records is None:
        return load_sft_split(test.data_dir, "test", loaded.tokenizer, **options)
    return SFTDataset.from_records(test.records, loaded.tokenizer, **options)


# ----------------------------------------------------------------------------- evaluation

def base_source(args, loaded: Loaded) -> str:
    """What the tuned model is compared with: --base, else the run's or the adapter's base."""
    if args.base:
        return args.base
    if args.run:
        source = run_base_source(Path(args.run), loaded.train.init_from)
        if source is None:
            raise UserError(f"{args.run} was trained from random weights and saved no base_model/; "
                            "pass --base NAME_OR_DIR to compare against")
        return source
    if args.adapter:
        return args.model or adapter_base(args.adapter)
    raise UserError("--model without --adapter has no base to compare with; pass --base NAME_OR_DIR")


def evaluate_model(name: str, model: GPT, loaded: Loaded, prompts, args, settings: GenerationSettings,
                   test: Optional[LossData]) -> dict:
    """One model's responses and test loss."""
    rows = min(args.batch_size, len(prompts) * args.samples_per_prompt)  # sequences decoded together
    prepare_for_generation(model, args.device, rows)
    budget = model.config.block_size - settings.max_new_tokens
    n_cut = count_truncated_prompts(loaded.tokenizer, prompts, loaded.template, max(budget, 1))
    if n_cut:
        print(f"note: {n_cut} prompts are longer than the {budget} tokens left by --max-new-tokens; "
              f"the {name} model reads their last {budget} tokens")
    responses = generate_responses(model, loaded.tokenizer, prompts, loaded.template, settings,
                                   args.batch_size, args.samples_per_prompt, desc=f"{name}: generate")
    result = {"responses": responses, "val_loss": None, "val_ppl": None}
    if test is not None:
        dataset = build_test_set(test, loaded, model.config.block_size)
        result.update(**evaluate_loss(model, dataset, args.batch_size, loaded.tokenizer.eot_id,
                                      ce_chunk=TrainConfig.ce_chunk),  # the training default
                      test_examples=len(dataset),
                      test_target_tokens=dataset.stats["n_target_tokens"])
    return result


def score_responses(rm: reward.RewardModel, prompts, responses: list[list[str]], batch_size: int,
                    desc: str) -> tuple[np.ndarray, int]:
    """Rewards of shape [n_prompts, samples_per_prompt], and how many pairs were truncated."""
    pairs = [(reward_prompt_text(p), r) for p, rs in zip(prompts, responses) for r in rs]
    scored = reward.score_pairs(rm, [q for q, _ in pairs], [r for _, r in pairs], batch_size, desc=desc)
    return np.array(scored.scores).reshape(len(prompts), -1), scored.n_truncated


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False))


def responses_payload(prompts, results: dict, settings: GenerationSettings, meta: dict,
                      rewards: Optional[dict] = None, outcomes=None) -> dict:
    records = []
    for i, prompt in enumerate(prompts):
        record = {"prompt": prompt["instruction"], "input": prompt["input"]}
        for name in ("tuned", "base"):
            record[name] = results[name]["responses"][i]
            if rewards is not None:
                record[f"{name}_reward"] = rewards[name][i].tolist()
        if outcomes is not None:
            record["outcome"] = {reward.WIN: "win", reward.TIE: "tie", reward.LOSS: "loss"}[int(outcomes[i])]
        records.append(record)
    return {**meta, "settings": asdict(settings), "records": records}


def summary_payload(results: dict, stats: dict, rewards: Optional[dict], meta: dict) -> dict:
    models = {name: {"mean_reward": float(rewards[name].mean()) if rewards else None,
                     **{k: v for k, v in results[name].items() if k != "responses"}}
              for name in ("tuned", "base")}
    return {**models, **stats, **meta}


def print_summary(summary: dict) -> None:
    def cell(value, spec: str) -> str:
        width = int(spec.split(".")[0])
        return "-".rjust(width) if value is None else format(value, spec)

    print(f"\n{'model':<6} {'mean reward':>12} {'test loss':>10} {'test ppl':>10}")
    for name in ("base", "tuned"):
        m = summary[name]
        cells = (cell(m["mean_reward"], "12.3f"), cell(m["val_loss"], "10.4f"), cell(m["val_ppl"], "10.2f"))
        print(f"{name:<6} " + " ".join(cells))
    if summary["win_rate"] is not None:
        lo, hi = summary["win_rate_ci95"]
        print(f"tuned vs base on {summary['n_prompts']} prompts: win {summary['win_rate']:.1%} "
              f"(95% CI {lo:.1%} to {hi:.1%}), tie {summary['tie_rate']:.1%}, loss {summary['loss_rate']:.1%}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--base", help="base model to compare with, HF folder or hub name (default: the run's "
                                       "init_from or base_model/, or the adapter's base)")
    parser.add_argument("--prompts", help="CSV with a prompt column, JSON list (strings or {instruction, input}), "
                                          "or text, one prompt per line (default: the test records' prompts)")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--data", help="test records (JSON/JSONL) for the loss (default: the run's test split)")
    parser.add_argument("--no-loss", action="store_true", help="skip the test loss")
    parser.add_argument("--reward-model", default=reward.DEFAULT_REWARD_MODEL,
                        help="HF sequence-classification reward model: a local folder or a hub name")
    parser.add_argument("--no-reward", action="store_true", help="skip reward scoring (responses and losses only)")
    parser.add_argument("--samples-per-prompt", type=int, default=1,
                        help="K sampled responses per prompt (needs --temperature > 0); prompts compare by mean reward")
    parser.add_argument("--batch-size", type=int, default=8, help="generation and loss batch size")
    parser.add_argument("--reward-batch-size", type=int, default=8)
    parser.add_argument("--tie-tol", type=float, default=reward.TIE_TOL, help="|reward difference| counted as a tie")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the win-rate CI")
    parser.add_argument("--out", help=f"output folder (default: RUN/eval with --run, else {DEFAULT_OUT})")
    add_generation_args(parser)
    args = parser.parse_args(argv)
    counts = ("samples_per_prompt", "batch_size", "reward_batch_size", "bootstrap", "max_prompts")
    if any(getattr(args, name) is not None and getattr(args, name) < 1 for name in counts):
        raise UserError(f"{', '.join('--' + n.replace('_', '-') for n in counts)} must be at least 1")
    if args.samples_per_prompt > 1 and args.temperature == 0:
        raise UserError("--samples-per-prompt > 1 with greedy decoding repeats one answer; "
                        "add --temperature (e.g. 0.7)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.device = pick_device(args.device)  # one decision, used for both models and the reward model
    settings = generation_settings(args)
    prompts = load_prompts(args.prompts) if args.prompts else None
    # Everything that can fail without network or on a bad path fails here, before any generation:
    # the reward model, both models' weights, the test data.
    rm = None if args.no_reward else reward.load_reward_model(args.reward_model, "cpu")
    loaded = load_for_generation(args)
    # The test records give the loss and, without --prompts, the prompts: read once, when needed.
    records = None if args.no_loss and prompts else test_data(args, loaded)
    prompts = (prompts or test_prompts(records))[:args.max_prompts]
    test = None if args.no_loss else records
    base = base_source(args, loaded)
    base_folder = resolve_checkpoint(base)
    out = Path(args.out or (Path(args.run) / "eval" if args.run else DEFAULT_OUT))
    started = time.time()

    results = {"tuned": evaluate_model("tuned", loaded.model, loaded, prompts, args, settings, test)}
    loaded.model = None  # free the tuned model before the base loads
    base_model = load_weights(str(base_folder))
    check_vocab(loaded.tokenizer, base_model, f"the base model {base}")
    results["base"] = evaluate_model("base", base_model, loaded, prompts, args, settings, test)
    del base_model
    meta = {"models": {"tuned": loaded.description, "base": base}, "template": loaded.template,
            "test_data": test.source if test else None, "batch_size": args.batch_size}
    write_json(out / "responses.json", responses_payload(prompts, results, settings, meta))

    rewards, outcomes, truncated = None, None, None
    stats = dict.fromkeys(("win_rate", "tie_rate", "loss_rate", "win_rate_ci95"))
    if rm is not None:
        rm.model.to(args.device)
        scored = {name: score_responses(rm, prompts, results[name]["responses"], args.reward_batch_size,
                                        f"{name}: reward") for name in ("tuned", "base")}
        rewards = {name: values for name, (values, _) in scored.items()}
        truncated = {name: count for name, (_, count) in scored.items()}
        identical = [t == b for t, b in zip(results["tuned"]["responses"], results["base"]["responses"])]
        outcomes = reward.prompt_outcomes(rewards["tuned"], rewards["base"], identical, args.tie_tol)
        stats = reward.win_statistics(outcomes, args.bootstrap, seed=args.seed)
        write_json(out / "responses.json", responses_payload(prompts, results, settings, meta, rewards, outcomes))

    summary = summary_payload(results, stats, rewards, {
        "n_prompts": len(prompts), "samples_per_prompt": args.samples_per_prompt,
        "reward_model": rm.name if rm else None,
        "reward_max_length": rm.max_length if rm else None,
        "reward_truncated_pairs": truncated,  # per model: pairs cut to reward_max_length (reward.py's rule)
        "comparison": "mean reward per prompt over its samples; ties (|diff| <= tie_tol or identical "
                      "responses) counted separately",
        "tie_tol": args.tie_tol, "bootstrap_resamples": args.bootstrap, "seed": args.seed, **meta,
        "generation": asdict(settings), "elapsed_s": round(time.time() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_json(out / "reward.json", summary)
    print_summary(summary)
    print(f"wrote {out / 'reward.json'} and {out / 'responses.json'}")


if __name__ == "__main__":
    run_cli(main)
