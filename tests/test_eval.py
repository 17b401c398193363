"""eval.py and sample.py end to end, offline: a tiny GPT-2, a tiny LoRA adapter and a tiny reward
model, all random. References come from transformers + peft, so the checks do not rest on our
own generation or loss code."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as evaluate
import lora
import generation
import sample
from configs import GPTConfig, TrainConfig, config_to_dict
from conftest import ROOT, TINY_VOCAB_SIZE
from errors import UserError
from model import GPT
from templates import build_prompt
from test_reward import save_tiny_reward_model
from tokenizer import load_tokenizer

TEMPLATE = "dialog"  # short: the tiny byte-level vocabulary spends a token per character
MAX_NEW = 12
PROMPTS = ["Say hello.", "What is 12 plus 1?", "the cat", "Name a color, please.", "Is the sun a star?"]
TEST_RECORDS = [
    {"instruction": "Add one to each number.", "input": "1 2 3", "output": "2 3 4"},
    {"instruction": "Say hello.", "input": "", "output": "hello there"},
    {"instruction": "What is the first word?", "input": "cat dog", "output": "cat"},
]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    return save_tiny_reward_model(tmp_path_factory.mktemp("reward_model"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, hf_checkpoint) -> Path:
    """A rank-4 adapter on hf_checkpoint with random B (a fresh B of zeros would change nothing)."""
    model = GPT.from_pretrained(hf_checkpoint)
    lora.apply_lora(model, rank=4, alpha=8.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("adapter")
    lora.save_adapter(model, folder, base_model_name_or_path=str(hf_checkpoint))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("eval_inputs")
    lines = ["prompt,act"] + [f'"{p}",x' for p in PROMPTS]
    (folder / "prompts.csv").write_text("\n".join(lines) + "\n")
    (folder / "test.json").write_text(json.dumps(TEST_RECORDS))
    return {"prompts": folder / "prompts.csv", "data": folder / "test.json"}


def run_eval(*args, env=None) -> subprocess.CompletedProcess:
    # One thread: tiny models gain nothing from more, and on a busy machine idle-spinning
    # worker threads make each small matmul wait for a descheduled core.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, env=env, timeout=300)


def hf_models(hf_checkpoint, adapter_dir):
    """(base, tuned) as transformers / peft load them."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(hf_checkpoint).eval()
    tuned = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_checkpoint), str(adapter_dir)).eval()
    return base, tuned


def hf_greedy(model, prompt_ids: list[int], eot: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eot,
                             pad_token_id=eot)[0, len(prompt_ids):].tolist()
    return out[:out.index(eot)] if eot in out else out


def hf_response_loss(model, tokenizer, records) -> float:
    """Cross-entropy per response token (response + eot), prompt tokens excluded."""
    total, count = 0.0, 0
    for record in records:
        prompt = tokenizer.encode_ordinary(build_prompt(record, TEMPLATE))
        ids = prompt + tokenizer.encode_ordinary(record["output"]) + [tokenizer.eot_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor(ids[1:])
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[len(prompt) - 1:]
        total, count = total + losses.sum().item(), count + len(losses)
    return total / count


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def model_eval(tmp_path_factory, hf_checkpoint, adapter_dir, reward_dir, files) -> Path:
    out = tmp_path_factory.mktemp("eval_out")
    result = run_eval("--model", hf_checkpoint, "--adapter", adapter_dir, "--base", hf_checkpoint,
                      "--reward-model", reward_dir, "--prompts", files["prompts"], "--data", files["data"],
                      "--template", TEMPLATE, "--max-new-tokens", MAX_NEW, "--batch-size", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "tuned vs base on 5 prompts" in result.stdout
    return out


def test_eval_model_adapter_writes_sane_reports(model_eval):
    summary = json.loads((model_eval / "reward.json").read_text())
    records = json.loads((model_eval / "responses.json").read_text())["records"]
    assert summary["n_prompts"] == len(records) == len(PROMPTS) and summary["samples_per_prompt"] == 1
    assert [r["prompt"] for r in records] == PROMPTS  # input order kept despite length sorting
    rates = [summary[k] for k in ("win_rate", "tie_rate", "loss_rate")]
    assert sum(rates) == pytest.approx(1.0) and all(r in {i / 5 for i in range(6)} for r in rates)
    lo, hi = summary["win_rate_ci95"]
    assert 0 <= lo <= summary["win_rate"] <= hi <= 1
    counts = {k: sum(r["outcome"] == k for r in records) for k in ("win", "tie", "loss")}
    assert [counts["win"] / 5, counts["tie"] / 5, counts["loss"] / 5] == rates
    for name in ("tuned", "base"):
        rewards = [r[f"{name}_reward"][0] for r in records]
        assert summary[name]["mean_reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-9)
        assert summary[name]["val_ppl"] == pytest.approx(math.exp(summary[name]["val_loss"]), rel=1e-9)
    assert summary["reward_model"] and summary["models"]["base"]


def test_eval_responses_match_transformers_and_peft(model_eval, hf_checkpoint, adapter_dir):
    """Batched, length-sorted, LoRA-merged generation answers exactly like peft, one prompt at a time."""
    tokenizer = load_tokenizer(hf_checkpoint)
    base, tuned = hf_models(hf_checkpoint, adapter_dir)
    records = json.loads((model_eval / "responses.json").read_text())["records"]
    for record in records:
        ids = tokenizer.encode_ordinary(build_prompt(record["prompt"], TEMPLATE))
        assert record["tuned"] == [tokenizer.decode(hf_greedy(tuned, ids, tokenizer.eot_id))]
        assert record["base"] == [tokenizer.decode(hf_greedy(base, ids, tokenizer.eot_id))]
    assert any(r["tuned"] != r["base"] for r in records)  # the adapter really was applied


def test_eval_rewards_and_losses_match_references(model_eval, hf_checkpoint, adapter_dir, reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    summary = json.loads((model_eval / "reward.json").read_text())
    records = json.loads((model_eval / "responses.json").read_text())["records"]
    rm_tokenizer = AutoTokenizer.from_pretrained(reward_dir, local_files_only=True)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir, local_files_only=True).eval()
    with torch.no_grad():
        for record in records:
            for name in ("tuned", "base"):
                encoded = rm_tokenizer(record["prompt"], record[name][0], truncation=True, max_length=64,
                                       return_tensors="pt")
                assert record[f"{name}_reward"][0] == pytest.approx(rm(**encoded).logits[0, 0].item(), abs=1e-5)
    tokenizer = load_tokenizer(hf_checkpoint)
    base, tuned = hf_models(hf_checkpoint, adapter_dir)
    # float32 sums over a few dozen tokens in a different order: agreement to ~1e-6 relative.
    assert summary["base"]["val_loss"] == pytest.approx(hf_response_loss(base, tokenizer, TEST_RECORDS), rel=1e-4)
    assert summary["tuned"]["val_loss"] == pytest.approx(hf_response_loss(tuned, tokenizer, TEST_RECORDS), rel=1e-4)


def make_run(root: Path, hf_checkpoint: Path, adapter_dir: Path, data_dir: Path) -> Path:
    """A LoRA run folder as train_sft.py leaves it: hyperparams, metrics, checkpoints/latest."""
    run = root / "runs" / "tiny-lora"
    step = run / "checkpoints" / "step_0000010"
    (step / "adapter").mkdir(parents=True)
    for f in adapter_dir.iterdir():
        (step / "adapter" / f.name).write_bytes(f.read_bytes())
    (run / "checkpoints" / "latest").write_text("step_0000010")
    model = GPTConfig(block_size=64, vocab_size=TINY_VOCAB_SIZE, n_layer=2, n_head=2, n_embd=32)
    train = TrainConfig(init_from=str(hf_checkpoint), lora=True, rank=4, alpha=8.0, template=TEMPLATE,
                        dataset="sft", data_dir=str(data_dir))
    (run / "hyperparams.json").write_text(json.dumps({"preset": "tiny/lora", "config": config_to_dict(model, train)}))
    (run / "metrics.json").write_text(json.dumps({"run_name": run.name, "status": "finished", "summary": {},
                                                  "records": [{"step": 10, "epoch": 1.0, "train_loss": 5.0}]}))
    return run


def test_eval_run_folder_uses_the_runs_settings(tmp_path, hf_checkpoint, adapter_dir, reward_dir, files, model_eval):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "sft_test.json").write_text(json.dumps(TEST_RECORDS))
    run = make_run(tmp_path, hf_checkpoint, adapter_dir, data_dir)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    # No --template, --base or --data: the run's template, init_from and test split.
    evaluate.main(["--run", str(run), "--prompts", str(prompts), "--reward-model", str(reward_dir),
                   "--max-new-tokens", str(MAX_NEW)])
    summary = json.loads((run / "eval" / "reward.json").read_text())
    responses = json.loads((run / "eval" / "responses.json").read_text())
    assert responses["template"] == TEMPLATE and summary["models"]["base"] == str(hf_checkpoint)
    assert summary["test_data"] == str(data_dir / "sft_test.json")
    # Same weights, prompts and settings as the --model/--adapter run: the same answers and losses.
    expected = json.loads((model_eval / "reward.json").read_text())
    expected_records = json.loads((model_eval / "responses.json").read_text())["records"]
    pairs = [(r["tuned"], r["base"]) for r in responses["records"]]
    assert pairs == [(r["tuned"], r["base"]) for r in expected_records]
    for name in ("tuned", "base"):
        for key in ("val_loss", "mean_reward"):
            assert summary[name][key] == pytest.approx(expected[name][key], rel=1e-6)
    from runs import load_run  # what plot.py shows next to the run

    assert load_run(run).reward == {"win_rate": summary["win_rate"], "mean_reward": summary["tuned"]["mean_reward"]}


def test_eval_run_without_prompts_answers_its_test_split(tmp_path, hf_checkpoint, adapter_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "sft_test.json").write_text(json.dumps(TEST_RECORDS))
    run = make_run(tmp_path, hf_checkpoint, adapter_dir, data_dir)
    evaluate.main(["--run", str(run), "--no-reward", "--max-new-tokens", "4", "--max-prompts", "2"])
    records = json.loads((run / "eval" / "responses.json").read_text())["records"]
    assert [(r["prompt"], r["input"]) for r in records] == [(t["instruction"], t["input"])
                                                                 for t in TEST_RECORDS[:2]]
    (data_dir / "sft_test.json").unlink()
    with pytest.raises(UserError, match="--prompts FILE"):
        evaluate.main(["--run", str(run), "--no-reward", "--out", str(tmp_path / "again")])


def test_eval_without_reward_and_several_samples(tmp_path, hf_checkpoint, adapter_dir, files):
    out = tmp_path / "out"
    evaluate.main(["--model", str(hf_checkpoint), "--adapter", str(adapter_dir), "--prompts", str(files["prompts"]),
                   "--template", TEMPLATE, "--no-reward", "--samples-per-prompt", "3", "--temperature", "1.0",
                   "--max-new-tokens", "6", "--out", str(out), "--max-prompts", "2"])
    summary = json.loads((out / "reward.json").read_text())
    records = json.loads((out / "responses.json").read_text())["records"]
    assert summary["win_rate"] is None and summary["tuned"]["mean_reward"] is None
    assert summary["tuned"]["val_loss"] is None  # --model without --data: no test split to measure
    assert len(records) == 2 and all(len(r["tuned"]) == len(r["base"]) == 3 for r in records)
    assert any(len(set(r["tuned"])) > 1 for r in records)  # sampling, not three copies of one answer


def test_eval_refuses_what_cannot_work(tmp_path, hf_checkpoint, files):
    common = ["--prompts", str(files["prompts"]), "--no-reward", "--out", str(tmp_path)]
    with pytest.raises(UserError, match="--base"):
        evaluate.main(["--model", str(hf_checkpoint), *common])
    with pytest.raises(UserError, match="--temperature"):
        evaluate.main(["--model", str(hf_checkpoint), "--samples-per-prompt", "2", *common])
    with pytest.raises(UserError, match="--max-new-tokens"):
        evaluate.main(["--model", str(hf_checkpoint), "--base", str(hf_checkpoint), "--max-new-tokens", "64", *common])
    with pytest.raises(UserError, match="either --run"):
        evaluate.main(["--base", str(hf_checkpoint), *common])


def test_missing_reward_model_offline_is_one_line_naming_the_option(tmp_path, hf_checkpoint, files):
    result = run_eval("--model", hf_checkpoint, "--base", hf_checkpoint, "--prompts", files["prompts"],
                      "--reward-model", "nobody-here/no-such-reward-model", "--out", tmp_path / "out",
                      env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--reward-model DIR" in lines[0]
    assert not (tmp_path / "out").exists()  # it failed before generating anything


# ----------------------------------------------------------------------------- prompt files

@pytest.mark.parametrize("name, text, expected", [
    ("p.csv", 'act,prompt\nx,"Hello, world"\ny,"two\nlines"\n', ["Hello, world", "two\nlines"]),
    ("p.json", '["a", "b"]', ["a", "b"]),
    ("p.jsonl", '"a"\n{"instruction": "b", "input": "c"}\n', ["a", "b"]),
    ("p.txt", "first\n\n  second  \n", ["first", "second"]),
    ("p", "no suffix: text\n", ["no suffix: text"]),
])
def test_load_prompts(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    prompts = evaluate.load_prompts(tmp_path / name)
    assert [p["instruction"] for p in prompts] == expected
    if name == "p.jsonl":
        assert prompts[1]["input"] == "c" and evaluate.reward_prompt_text(prompts[1]) == "b\n\nc"


@pytest.mark.parametrize("name, content, message", [
    ("p.csv", b"act,text\nx,hello\n", "no 'prompt' column"),
    ("p.csv", b"prompt\nhello\n\"\"\n", "row 3 has an empty prompt"),
    ("p.json", b'{"prompt": "x"}', "expected a JSON list"),
    ("p.json", b'["ok", 3]', "item 1"),
    ("p.json", b'["ok",', "invalid JSON"),
    ("p.txt", b"\n \n", "no prompts"),
    ("p.txt", b"caf\xe9\n", "not valid UTF-8"),
    ("missing.txt", None, "cannot read"),
])
def test_bad_prompt_files(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        evaluate.load_prompts(tmp_path / name)
    assert "--prompts" in str(err.value) and "\n" not in str(err.value)


def test_bad_prompt_file_exits_2_with_one_line(tmp_path):
    (tmp_path / "p.csv").write_text("act,text\nx,hello\n")
    result = run_eval("--model", "unused", "--prompts", tmp_path / "p.csv", "--no-reward")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "no 'prompt' column" in result.stderr


def test_real_prompt_set(shared_assets):
    prompts = evaluate.load_prompts(shared_assets / "prompts" / "prompts.csv")
    assert len(prompts) == 166 and all(p["instruction"] and p["input"] == "" for p in prompts)


# ----------------------------------------------------------------------------- generation helpers

def test_generate_responses_batching_order_and_seeds(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint)
    tokenizer = load_tokenizer(hf_checkpoint)
    settings = generation.GenerationSettings(max_new_tokens=8)
    one_by_one = [generation.generate_responses(model, tokenizer, [p], TEMPLATE, settings, progress=False)[0]
                  for p in PROMPTS]
    batched = generation.generate_responses(model, tokenizer, PROMPTS, TEMPLATE, settings, batch_size=3, progress=False)
    assert batched == one_by_one
    sampled = generation.GenerationSettings(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95, seed=3)
    first = generation.generate_responses(model, tokenizer, PROMPTS, TEMPLATE, sampled, 2, samples_per_prompt=2,
                                      progress=False)
    again = generation.generate_responses(model, tokenizer, PROMPTS, TEMPLATE, sampled, 2, samples_per_prompt=2,
                                      progress=False)
    assert first == again and all(len(r) == 2 for r in first)
    sampled.seed = 4
    assert generation.generate_responses(model, tokenizer, PROMPTS, TEMPLATE, sampled, 2, samples_per_prompt=2,
                                     progress=False) != first


def test_sample_cli_prompt_flag_and_stdin(hf_checkpoint, adapter_dir, capsys, monkeypatch):
    import io

    args = ["--model", str(hf_checkpoint), "--adapter", str(adapter_dir), "--template", TEMPLATE,
            "--max-new-tokens", str(MAX_NEW)]
    tokenizer = load_tokenizer(hf_checkpoint)
    _, tuned = hf_models(hf_checkpoint, adapter_dir)
    expected = [tokenizer.decode(hf_greedy(tuned, tokenizer.encode_ordinary(build_prompt(p, TEMPLATE)),
                                           tokenizer.eot_id)).strip() for p in PROMPTS[:2]]
    sample.main([*args, "--prompt", PROMPTS[0]])
    assert capsys.readouterr().out == expected[0] + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n"))
    sample.main(args[2:])  # --adapter alone: its adapter_config.json names the base
    assert capsys.readouterr().out == "".join(e + "\n" for e in expected)


def test_prepare_for_generation_keeps_the_function(hf_checkpoint, adapter_dir):
    model = generation.load_weights(str(hf_checkpoint), str(adapter_dir))
    x = torch.randint(0, TINY_VOCAB_SIZE, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)[0]
        generation.prepare_for_generation(model, torch.device("cpu"), rows=1)
        after = model(x)[0]
    assert lora.lora_modules(model) and all(m.merged for m in lora.lora_modules(model).values())
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert c_fc.shape == (128, 32) and c_fc.t().is_contiguous()  # [out, in] weight, [in, out] memory
    # Merging adds s*B@A into W in float32: the same function up to rounding (logits ~1).
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
