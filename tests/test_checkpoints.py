"""Hugging Face checkpoint folders: loading what transformers writes (both key styles, safetensors
and pytorch_model.bin), writing what transformers loads, and one clear UserError for each way a
folder can be wrong. Weights are random; the only reference is transformers itself."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from configs import GPTConfig
from conftest import ROOT, TINY_VOCAB_SIZE
from errors import UserError
from model import GPT
from tokenizer import load_tokenizer

WEIGHTS = "model.safetensors"


def logits_of(model, seed=0) -> torch.Tensor:
    """Eval-mode logits of a GPT or a GPT2LMHeadModel on fixed random ids."""
    idx = torch.randint(0, TINY_VOCAB_SIZE, (2, 20), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def copy_folder(src, tmp_path, name="ckpt"):
    return shutil.copytree(src, tmp_path / name)


def edit_weights(folder, edit) -> None:
    """Rewrite model.safetensors as edit(state) returns it."""
    state = load_file(folder / WEIGHTS)
    save_file(edit(state), folder / WEIGHTS, metadata={"format": "pt"})


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def bare_keys_with_mask_buffers(state: dict) -> dict:
    """The hub's original layout: no `transformer.` prefix, plus each layer's causal-mask buffer."""
    out = {k.removeprefix("transformer."): v for k, v in state.items()}
    n_positions = state["transformer.wpe.weight"].shape[0]
    mask = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions)
    for layer in {k.split(".")[1] for k in out if k.startswith("h.")}:
        out[f"h.{layer}.attn.bias"] = mask.clone()  # safetensors refuses shared storage
        out[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def with_tied_head(state: dict) -> dict:
    """Some checkpoints store the tied head explicitly."""
    return {**state, "lm_head.weight": state["transformer.wte.weight"].clone()}


def to_pytorch_bin(folder) -> None:
    """Replace model.safetensors by the older pytorch_model.bin (transformers 5 no longer writes it)."""
    torch.save(load_file(folder / WEIGHTS), folder / "pytorch_model.bin")
    (folder / WEIGHTS).unlink()


def assert_same_weights(ours: GPT, hf: GPT2LMHeadModel):
    """Exactly HF's tensors under HF's names; HF's Conv1D weights (in, out) are our nn.Linear
    weights (out, in) transposed. Independent of scale, unlike a logits check."""
    hf_params = dict(hf.named_parameters())
    assert {name for name, _ in ours.named_parameters()} == set(hf_params)
    for name, p in ours.named_parameters():
        module_name, kind = name.rsplit(".", 1)
        conv1d = type(hf.get_submodule(module_name)).__name__ == "Conv1D" and kind == "weight"
        assert torch.equal(p, hf_params[name].t() if conv1d else hf_params[name]), name


@pytest.fixture(scope="module")
def hf_model(hf_checkpoint):
    return GPT2LMHeadModel.from_pretrained(hf_checkpoint).eval()


@pytest.fixture(scope="module")
def hf_reference(hf_model):
    return logits_of(hf_model)


# ---------------------------------------------------------------------------- loading

@pytest.mark.parametrize("layout", ["save_pretrained", "bare_keys_with_buffers", "tied_head_stored", "pytorch_bin",
                                    "sharded"])
def test_load_hf_checkpoint(layout, hf_checkpoint, hf_model, hf_reference, tmp_path):
    folder = copy_folder(hf_checkpoint, tmp_path)
    if layout == "bare_keys_with_buffers":
        edit_weights(folder, bare_keys_with_mask_buffers)
        assert "h.0.attn.c_attn.weight" in load_file(folder / WEIGHTS)
    elif layout == "tied_head_stored":
        edit_weights(folder, with_tied_head)
    elif layout == "pytorch_bin":
        to_pytorch_bin(folder)
    elif layout == "sharded":
        (folder / WEIGHTS).unlink()
        hf_model.save_pretrained(folder, max_shard_size="40KB")  # an index.json and several shards
        assert len(set(json.loads((folder / f"{WEIGHTS}.index.json").read_text())["weight_map"].values())) > 1
    model = GPT.from_pretrained(folder)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 2, 32, 64, TINY_VOCAB_SIZE)
    assert_same_weights(model, hf_model)
    assert (logits_of(model) - hf_reference).abs().max() <= 1e-4


def test_from_pretrained_overrides_training_fields(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint, dropout=0.2, grad_checkpointing=True)
    assert model.config.dropout == 0.2 and model.config.grad_checkpointing
    assert model.transformer.drop.p == 0.2
    with pytest.raises(TypeError, match="dropuot"):  # a misspelt field must not be silently ignored
        GPT.from_pretrained(hf_checkpoint, dropuot=0.2)


def random_gpt(seed=0) -> GPT:
    """Our own random model (not loaded from HF), every tensor random, so the export is tested alone."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=48, vocab_size=TINY_VOCAB_SIZE, n_layer=2, n_head=5, n_embd=40))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_save_pretrained_loads_in_transformers(tiny_tokenizer_dir, tmp_path):
    ours = random_gpt()
    out = tmp_path / "export"
    ours.save_pretrained(out, tokenizer_dir=tiny_tokenizer_dir)
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", WEIGHTS, "vocab.json"]  # no temp files left
    hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert_same_weights(ours, hf)
    assert hf.config.n_positions == 48 and hf.config.n_head == 5
    assert (logits_of(hf) - logits_of(ours)).abs().max() <= 1e-4
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes()


def test_save_then_load_is_exact(tmp_path):
    ours = random_gpt()
    ours.save_pretrained(tmp_path / "a")
    back = GPT.from_pretrained(tmp_path / "a")
    assert back.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    assert not (tmp_path / "a" / "vocab.json").exists()  # no tokenizer known, none invented


def test_hf_to_ours_to_hf_keeps_logits_and_tokenizer(hf_checkpoint, hf_reference, tmp_path):
    """The checkpoint's tokenizer goes with it; saving over the source folder works."""
    ours = GPT.from_pretrained(hf_checkpoint)
    ours.save_pretrained(tmp_path / "out", tokenizer_dir=hf_checkpoint)
    assert (tmp_path / "out" / "vocab.json").read_bytes() == (hf_checkpoint / "vocab.json").read_bytes()
    assert (logits_of(GPT2LMHeadModel.from_pretrained(tmp_path / "out")) - hf_reference).abs().max() <= 1e-4
    again = GPT.from_pretrained(tmp_path / "out")
    again.save_pretrained(tmp_path / "out", tokenizer_dir=tmp_path / "out")  # onto itself
    assert (logits_of(GPT.from_pretrained(tmp_path / "out")) - hf_reference).abs().max() <= 1e-4
    assert load_tokenizer(tmp_path / "out").vocab_size == TINY_VOCAB_SIZE


def test_openai_tokenizer_names_are_saved_under_hf_names(tiny_tokenizer_dir, tmp_path):
    openai = tmp_path / "openai"
    openai.mkdir()
    shutil.copy(tiny_tokenizer_dir / "vocab.json", openai / "encoder.json")
    shutil.copy(tiny_tokenizer_dir / "merges.txt", openai / "vocab.bpe")
    random_gpt().save_pretrained(tmp_path / "out", tokenizer_dir=openai)
    assert (tmp_path / "out" / "merges.txt").read_bytes() == (tiny_tokenizer_dir / "merges.txt").read_bytes()
    assert (tmp_path / "out" / "vocab.json").read_bytes() == (tiny_tokenizer_dir / "vocab.json").read_bytes()


# ---------------------------------------------------------------------------- bad folders

def drop_key(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def add_key(key):
    return lambda state: {**state, key: torch.zeros(32)}


def untie_head(state):
    return {**state, "lm_head.weight": state["transformer.wte.weight"] + 0.01}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_WEIGHTS = {
    "missing key": (drop_key("transformer.h.1.mlp.c_fc.bias"), ["missing: transformer.h.1.mlp.c_fc.bias"]),
    "unexpected key": (add_key("transformer.h.2.ln_1.weight"), ["unexpected: transformer.h.2.ln_1.weight"]),
    "untied head": (untie_head, ["lm_head.weight differs from wte", "tied"]),
}

BAD_CONFIGS = {  # config.json changes -> words the message must contain
    "wrong n_embd": (dict(n_embd=64), ["wrong shape", "transformer.wte.weight", "(281, 32) != (281, 64)"]),
    "fewer layers": (dict(n_layer=1), ["unexpected", "transformer.h.1."]),
    "missing n_embd": (dict(n_embd=None), ["missing or non-integer n_embd"]),
    "string n_head": (dict(n_head="2"), ["non-integer n_head"]),
    "relu": (dict(activation_function="relu"), ["unsupported", "activation_function='relu'"]),
    "cross attention": (dict(add_cross_attention=True), ["unsupported", "add_cross_attention"]),
    "not gpt2": (dict(model_type="bert"), ["not a GPT-2 config", "bert"]),
    "heads do not divide": (dict(n_head=3), ["not divisible by n_head 3"]),
}


def load_error(folder) -> str:
    with pytest.raises(UserError) as caught:
        GPT.from_pretrained(folder)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def assert_mentions(message: str, *parts: str):
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_bad_weights_are_named(case, hf_checkpoint, tmp_path):
    edit, words = BAD_WEIGHTS[case]
    folder = copy_folder(hf_checkpoint, tmp_path)
    edit_weights(folder, edit)
    assert_mentions(load_error(folder), str(folder), *words)


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs_are_named(case, hf_checkpoint, tmp_path):
    changes, words = BAD_CONFIGS[case]
    folder = copy_folder(hf_checkpoint, tmp_path)
    edit_config(folder, **changes)
    assert_mentions(load_error(folder), str(folder), *words)


def test_invalid_json_config(hf_checkpoint, tmp_path):
    folder = copy_folder(hf_checkpoint, tmp_path)
    (folder / "config.json").write_text('{"n_layer": 2,')
    assert_mentions(load_error(folder), str(folder / "config.json"), "cannot read the model config")


def test_missing_config(hf_checkpoint, tmp_path):
    folder = copy_folder(hf_checkpoint, tmp_path)
    (folder / "config.json").unlink()
    assert_mentions(load_error(folder), str(folder / "config.json"), "cannot read the model config")


def test_missing_folder(tmp_path):
    assert_mentions(load_error(tmp_path / "no_such_run" / "ckpt"), "no_such_run", "does not exist")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert_mentions(load_error(tmp_path / "weights.safetensors"), "not a folder")


def test_missing_weights_file(hf_checkpoint, tmp_path):
    folder = copy_folder(hf_checkpoint, tmp_path)
    (folder / WEIGHTS).unlink()
    assert_mentions(load_error(folder), str(folder), "no model.safetensors or pytorch_model.bin")


def sharded_copy(hf_model, tmp_path):
    folder = tmp_path / "sharded"
    hf_model.save_pretrained(folder, max_shard_size="40KB")
    return folder, folder / f"{WEIGHTS}.index.json"


def test_bad_shard_indexes(hf_model, tmp_path):
    folder, index = sharded_copy(hf_model, tmp_path)
    first_shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    (folder / first_shard).unlink()
    assert_mentions(load_error(folder), str(index), repr(first_shard), "missing")
    outside = {"weight_map": {"transformer.wte.weight": "../elsewhere.safetensors"}}
    index.write_text(json.dumps(outside))
    assert_mentions(load_error(folder), str(index), "../elsewhere.safetensors", "missing")
    index.write_text('{"weight_map": ')
    assert_mentions(load_error(folder), str(index), "not a readable checkpoint index")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_weights_file(fmt, hf_checkpoint, tmp_path):
    folder = copy_folder(hf_checkpoint, tmp_path)
    if fmt == "bin":
        to_pytorch_bin(folder)
    truncate(folder / (WEIGHTS if fmt == "safetensors" else "pytorch_model.bin"))
    assert_mentions(load_error(folder), str(folder), "cannot read the weights", "damaged or incomplete")


# ---------------------------------------------------------------------------- hub names offline

def test_hub_name_offline_suggests_a_local_folder(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads its environment once, at import: set the variable and the constant.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty: nothing cached
    start = time.monotonic()
    message = load_error("gpt2")
    assert time.monotonic() - start < 10
    assert_mentions(message, "'gpt2'", "local folder", "config.json")


def closed_port() -> int:
    """A local port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("source", ["openai-community/gpt2", "./no-such-folder", "a/b/c"])
def test_org_slash_name_goes_to_the_hub_and_paths_do_not(monkeypatch, tmp_path, source):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    message = load_error(source)
    if source.count("/") == 1 and not source.startswith("."):
        assert_mentions(message, "hub", "local folder")
    else:
        assert_mentions(message, "does not exist")


def test_hub_name_without_offline_flag_fails_fast(tmp_path):
    """No HF_HUB_OFFLINE: the download is tried and must fail quickly and cleanly when the hub
    cannot be reached (simulated by pointing HF_ENDPOINT at a closed local port, so that the
    test never downloads even on a machine with internet)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HUB_CACHE=str(tmp_path))
    code = ("from errors import UserError\nfrom model import GPT\ntry:\n    GPT.from_pretrained('gpt2-medium')\n"
            "except UserError as err:\n    print('UserError:', err)\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert time.monotonic() - start < 60, "the hub download retried for too long"
    assert result.returncode == 0, result.stderr
    assert_mentions(result.stdout, "UserError:", "'gpt2-medium'", "local folder")
