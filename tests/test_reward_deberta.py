"""reward.py with the default reward model's architecture, offline: a tiny random
DebertaV2ForSequenceClassification and a SentencePiece tokenizer trained here, saved the way
OpenAssistant/reward-model-deberta-v3-large-v2 ships its tokenizer (spm.model, tokenizer_config.json,
special_tokens_map.json, added_tokens.json; no tokenizer.json). References call the model directly."""
import io
import json
import sys
from pathlib import Path

import pytest
import torch

import eval as evaluate
import reward
from errors import UserError
from test_eval import TEMPLATE, adapter_dir, files, run_eval  # noqa: F401  (fixtures)

MAX_POSITIONS = 32  # the model's max_length: pairs of a few words already overflow it
SPECIAL = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]  # ids 0-3, as in DeBERTa-v3's spm.model; [MASK] is added after
CORPUS = """The quick brown fox jumps over the lazy dog.
What is twelve plus one? It is thirteen.
Say hello to the world, please, and wave your hand.
A reward model reads a question and an answer, then scores the answer.
Name a color in one word: blue, green, red, yellow or purple.
Is the sun a star? Yes, the sun is a star at the centre of our solar system.
Write a short poem about the sea and the wind and the evening light.
Explain how a computer stores numbers using binary digits.
Give me three tips for learning to cook vegetables at home.""".splitlines()


def train_spm(vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   pad_piece=SPECIAL[0], bos_piece=SPECIAL[1], eos_piece=SPECIAL[2],
                                   unk_piece=SPECIAL[3], num_threads=1, minloglevel=2)
    return model.getvalue()


def save_tiny_deberta_reward_model(folder: Path, vocab_size: int = 100, seed: int = 0) -> Path:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spm.model").write_bytes(train_spm(vocab_size))
    tokens = {"bos_token": "[CLS]", "cls_token": "[CLS]", "eos_token": "[SEP]", "mask_token": "[MASK]",
              "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"}
    # The hub repository's tokenizer_config.json, model_max_length (no limit) included.
    config = {**tokens, "do_lower_case": False, "model_max_length": 1000000000000000019884624838656,
              "sp_model_kwargs": {}, "special_tokens_map_file": None, "split_by_punct": False,
              "tokenizer_class": "DebertaV2Tokenizer", "vocab_type": "spm"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens))
    (folder / "added_tokens.json").write_text(json.dumps({"[MASK]": vocab_size}))
    # DeBERTa-v3-large's architecture (relative attention, no absolute positions, no token types), tiny;
    # the embedding has spare rows past [MASK], as DeBERTa-v3's 128100 for 128000 pieces.
    model_config = DebertaV2Config(
        vocab_size=vocab_size + 4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=MAX_POSITIONS, relative_attention=True, position_buckets=8,
        pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
        type_vocab_size=0, pooler_hidden_size=16, num_labels=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = DebertaV2ForSequenceClassification(model_config)
    with torch.no_grad():  # std 0.02 weights give near-equal scores: make one dropped token visible
        for name, p in model.named_parameters():
            if name.startswith(("pooler", "classifier")) and p.dim() == 2:
                p.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def deberta_dir(tmp_path_factory) -> Path:
    folder = save_tiny_deberta_reward_model(tmp_path_factory.mktemp("deberta_reward"))
    assert not (folder / "tokenizer.json").exists()  # shipped as the hub has it: transformers converts spm.model
    return folder


@pytest.fixture(scope="module")
def rm(deberta_dir) -> reward.RewardModel:
    return reward.load_reward_model(str(deberta_dir))


@pytest.fixture(scope="module")
def reference(deberta_dir):
    """The folder as the model card loads it, independently of reward.py."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(deberta_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(deberta_dir, local_files_only=True).eval()
    return tokenizer, model


def kept_lengths(n_prompt: int, n_response: int, budget: int) -> tuple[int, int]:
    """reward.py's documented truncation rule, written out: tokens kept of (prompt, response)."""
    if n_prompt + n_response <= budget:
        return n_prompt, n_response
    shorter = min(n_prompt, n_response)
    half = budget // 2
    keep_short, keep_long = (shorter, budget - shorter) if shorter <= half else (half, budget - half)
    return (keep_short, keep_long) if n_prompt <= n_response else (keep_long, keep_short)


def reference_score(reference, prompt: str, response: str) -> tuple[float, bool]:
    """The model on [CLS] prompt [SEP] response [SEP], cut by kept_lengths; and whether it was cut."""
    tokenizer, model = reference
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (prompt, response)]
    n_prompt, n_response = kept_lengths(len(ids[0]), len(ids[1]), MAX_POSITIONS - 3)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    input_ids = [cls, *ids[0][:n_prompt], sep, *ids[1][:n_response], sep]
    with torch.no_grad():
        value = model(input_ids=torch.tensor([input_ids])).logits[0, 0].item()
    return value, n_prompt + n_response < len(ids[0]) + len(ids[1])


# ----------------------------------------------------------------------------- loading and scoring

def test_loads_the_hub_layout_and_scores_like_the_model_card(rm, reference):
    from transformers import DebertaV2ForSequenceClassification, DebertaV2Tokenizer

    tokenizer, model = reference
    assert isinstance(rm.tokenizer, DebertaV2Tokenizer) and isinstance(rm.model, DebertaV2ForSequenceClassification)
    assert rm.max_length == MAX_POSITIONS  # the tokenizer has no limit; the model's positions set it
    # The tokenizer really is the trained SentencePiece model: words become its pieces, not [UNK]s.
    assert tokenizer.unk_token_id not in tokenizer("the sun is a star")["input_ids"]
    prompts = ["Say hello.", "What is twelve plus one?", "Name a color.", "Is the sun a star?"]
    responses = ["hello", "It is thirteen.", "blue", "Yes, the sun is a star."]
    result = reward.score_pairs(rm, prompts, responses, batch_size=3, progress=False)
    with torch.no_grad():  # exactly the model card's call, one pair at a time
        expected = [model(**tokenizer(p, r, return_tensors="pt")).logits[0, 0].item()
                    for p, r in zip(prompts, responses)]
    # Padding to the batch's longest pair changes only the float32 summation order (scores ~1).
    assert result.scores == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 4) for s in result.scores}) == len(prompts)  # each pair got its own score
    assert result.truncated == [False] * 4 and result.n_truncated == 0
    assert reward.score(rm, prompts, responses, batch_size=3, progress=False) == result.scores


def test_empty_response_is_still_a_pair(rm, reference):
    tokenizer, model = reference
    ids = tokenizer("Say hello.", add_special_tokens=False)["input_ids"]
    input_ids = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id, tokenizer.sep_token_id]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([input_ids])).logits[0, 0].item()
    for batch in (["Say hello."], ["Say hello.", "What is twelve plus one?"]):  # alone and batched
        scores = reward.score(rm, batch, [""] + ["It is thirteen."] * (len(batch) - 1), progress=False)
        assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_over_long_pairs_are_cut_by_the_rule_and_counted(rm, reference):
    tokenizer, _ = reference
    budget = MAX_POSITIONS - tokenizer.num_special_tokens_to_add(pair=True)
    short, long = "Say hello.", "Write a short poem about the sea and the wind and the evening light. " * 2
    pairs = [(short, short), (short, long), (long, short), (long, long), (long, "")]
    # A pair that fills max_length exactly is not truncated; one token more is ("the": one piece).
    n_short = len(tokenizer(short, add_special_tokens=False)["input_ids"])
    pairs += [(short, " ".join(["the"] * (budget - n_short + extra))) for extra in (0, 1)]
    assert [len(tokenizer(p, r)["input_ids"]) for p, r in pairs[-2:]] == [MAX_POSITIONS, MAX_POSITIONS + 1]
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    result = reward.score_pairs(rm, prompts, responses, batch_size=4, progress=False)
    expected = [reference_score(reference, p, r) for p, r in pairs]
    assert result.scores == pytest.approx([s for s, _ in expected], abs=1e-5)
    assert result.truncated == [cut for _, cut in expected]
    assert result.truncated == [len(tokenizer(p, r)["input_ids"]) > MAX_POSITIONS for p, r in pairs]
    assert result.truncated == [False, True, True, True, True, False, True] and result.n_truncated == 5
    # The rule at work: a short prompt is kept whole, two long parts keep half the budget each.
    assert kept_lengths(n_short, 100, budget) == (n_short, budget - n_short)
    assert kept_lengths(100, 100, budget) == (budget // 2, budget - budget // 2)


def test_missing_sentencepiece_is_one_line_naming_it(deberta_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece -> ImportError
    with pytest.raises(UserError, match="SentencePiece model, which needs the sentencepiece and protobuf") as err:
        reward.load_reward_model(str(deberta_dir))
    assert "\n" not in str(err.value) and "requirements-eval.txt" in str(err.value)


# ----------------------------------------------------------------------------- eval.py end to end

def test_eval_cli_scores_with_the_deberta_folder(tmp_path, hf_checkpoint, adapter_dir, files, deberta_dir,  # noqa: F811
                                                 reference):
    out = tmp_path / "eval"
    result = run_eval("--model", hf_checkpoint, "--adapter", adapter_dir, "--base", hf_checkpoint,
                      "--reward-model", deberta_dir, "--prompts", files["prompts"], "--template", TEMPLATE,
                      "--max-new-tokens", 30, "--max-prompts", 3, "--no-loss", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "reward.json").read_text())
    records = json.loads((out / "responses.json").read_text())["records"]
    assert summary["reward_model"] == str(deberta_dir) and len(records) == 3
    cut = {"tuned": 0, "base": 0}
    for record in records:
        question = evaluate.reward_prompt_text({"instruction": record["prompt"], "input": record["input"]})
        for name in ("tuned", "base"):
            expected, was_cut = reference_score(reference, question, record[name][0])
            assert record[f"{name}_reward"][0] == pytest.approx(expected, abs=1e-5)
            cut[name] += was_cut
    assert sum(cut.values()) > 0  # 30 new tokens outgrow MAX_POSITIONS: the run went through truncation
    assert summary["reward_truncated_pairs"] == cut and summary["reward_max_length"] == 32
