"""export.py: merged and adapter exports from a run folder or from --base/--adapter-dir, checked
by loading the results with transformers/peft; error paths end in one line and exit code 2.
Logit tolerance 1e-4 (float32, PEFT/HF Conv1D vs our linear order of operations ~1e-6)."""
import json
import subprocess
import sys

import pytest
import torch

from runs import save_checkpoint
from configs import GPTConfig, TrainConfig, config_to_dict
from conftest import ROOT, TINY_VOCAB_SIZE
from errors import UserError
from export import main
from lora import apply_lora, lora_modules
from model import GPT


def tokens():
    return torch.randint(0, TINY_VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(tokens())[0]


def hf_logits(folder):
    from transformers import GPT2LMHeadModel

    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(folder).eval()(input_ids=tokens()).logits


def write_run(run_dir, init_from, lora=True):
    run_dir.mkdir(parents=True)
    config = config_to_dict(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=TINY_VOCAB_SIZE),
                            TrainConfig(init_from=init_from, lora=lora))
    (run_dir / "hyperparams.json").write_text(json.dumps({"preset": "gpt2/lora", "config": config}))


def save_lora_checkpoint(run_dir, step, checkpoint, seed):
    """A LoRA checkpoint as the training loop writes it; returns the model it holds."""
    model = GPT.from_pretrained(checkpoint)
    apply_lora(model, rank=4, alpha=8.0, layers=[1])
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(std=0.2)
    save_checkpoint(run_dir, step, model, {}, base_model=str(checkpoint))  # the training loop's writer
    return model


@pytest.fixture
def lora_run(tmp_path, hf_checkpoint):
    """runs/demo with two LoRA checkpoints; `latest` names the second. Returns (run dir, its model)."""
    run_dir = tmp_path / "runs" / "demo"
    write_run(run_dir, str(hf_checkpoint))
    save_lora_checkpoint(run_dir, 5, hf_checkpoint, seed=1)
    model = save_lora_checkpoint(run_dir, 10, hf_checkpoint, seed=2)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    return run_dir, model


def test_merged_export_of_the_latest_checkpoint(lora_run, tmp_path, hf_checkpoint, capsys):
    run_dir, model = lora_run
    main(["--run", str(run_dir), "--merged", str(tmp_path / "merged")])
    assert "wrote merged checkpoint" in capsys.readouterr().out
    merged = hf_logits(tmp_path / "merged")
    assert (merged - hf_logits(hf_checkpoint)).abs().max() > 1e-2  # the adapter is in there
    torch.testing.assert_close(merged, logits(model), rtol=0, atol=1e-4)  # and it is step 10's
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "merged" / name).read_bytes() == (hf_checkpoint / name).read_bytes()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_adapter_export_loads_in_peft(lora_run, tmp_path, hf_checkpoint):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    run_dir, model = lora_run
    main(["--run", str(run_dir), "--adapter", str(tmp_path / "adapter")])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_checkpoint) and config["layers_to_transform"] == [1]
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_checkpoint), tmp_path / "adapter")
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=tokens()).logits
    torch.testing.assert_close(theirs, logits(model), rtol=0, atol=1e-4)


def test_base_and_adapter_dir(lora_run, tmp_path, hf_checkpoint):
    run_dir, model = lora_run
    adapter_dir = run_dir / "checkpoints" / "step_0000010" / "adapter"
    main(["--base", str(hf_checkpoint), "--adapter-dir", str(adapter_dir), "--merged", str(tmp_path / "m"),
          "--adapter", str(tmp_path / "a")])
    torch.testing.assert_close(hf_logits(tmp_path / "m"), logits(model), rtol=0, atol=1e-4)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_lora_run_on_a_saved_random_base(tmp_path, hf_checkpoint):
    """init_from null: the training loop saved the random base as runs/NAME/base_model/."""
    run_dir = tmp_path / "scratch"
    write_run(run_dir, None)
    GPT.from_pretrained(hf_checkpoint).save_pretrained(run_dir / "base_model")
    model = save_lora_checkpoint(run_dir, 7, run_dir / "base_model", seed=3)
    (run_dir / "checkpoints" / "latest").rename(run_dir / "latest.bak")
    with pytest.raises(UserError, match="no checkpoint yet"):
        main(["--run", str(run_dir), "--merged", str(tmp_path / "out")])
    (run_dir / "latest.bak").rename(run_dir / "checkpoints" / "latest")
    main(["--run", str(run_dir), "--merged", str(tmp_path / "out")])
    torch.testing.assert_close(hf_logits(tmp_path / "out"), logits(model), rtol=0, atol=1e-4)


def test_full_fine_tuning_run(tmp_path, hf_checkpoint):
    run_dir = tmp_path / "full"
    write_run(run_dir, str(hf_checkpoint), lora=False)
    model = GPT.from_pretrained(hf_checkpoint)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)  # "trained"
    model_dir = save_checkpoint(run_dir, 3, model, {}, base_model=str(hf_checkpoint),
                                tokenizer_dir=hf_checkpoint) / "model"
    (model_dir / "vocab.json").unlink()  # a checkpoint without tokenizer files: init_from's are copied
    main(["--run", str(run_dir), "--merged", str(tmp_path / "out")])
    torch.testing.assert_close(hf_logits(tmp_path / "out"), logits(model), rtol=0, atol=1e-4)
    assert (tmp_path / "out" / "vocab.json").read_bytes() == (hf_checkpoint / "vocab.json").read_bytes()
    with pytest.raises(UserError, match="full fine-tuning"):
        main(["--run", str(run_dir), "--adapter", str(tmp_path / "adapter")])


def test_argument_and_run_errors(lora_run, tmp_path, hf_checkpoint):
    run_dir, _ = lora_run
    adapter_dir = run_dir / "checkpoints" / "step_0000010" / "adapter"
    x = str(tmp_path / "x")  # an output that no failing call may create
    cases = [
        ([], "exactly one source"),
        (["--run", str(run_dir), "--adapter-dir", str(adapter_dir), "--merged", x], "exactly one source"),
        (["--run", str(run_dir)], "nothing to write"),
        (["--adapter-dir", str(adapter_dir), "--merged", x], "needs --base"),
        (["--run", str(run_dir), "--merged", x, "--bogus"], "unrecognized arguments"),
        (["--run", str(run_dir), "--merged", str(tmp_path / "o"), "--adapter", str(tmp_path / "o")],
         "different folders"),
        (["--base", str(hf_checkpoint), "--adapter-dir", str(adapter_dir), "--merged", str(hf_checkpoint)],
         "one of the inputs"),
        (["--base", str(hf_checkpoint), "--adapter-dir", str(tmp_path / "none"), "--merged", x],
         "adapter folder .* does not exist"),
        (["--base", str(tmp_path / "no_base"), "--adapter-dir", str(adapter_dir), "--merged", x],
         "set the base with --base"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            main(argv)
    (run_dir / "hyperparams.json").write_text(json.dumps({"config": {"model": {}, "train": {"init_from": None}}}))
    with pytest.raises(UserError, match="random weights without a saved base_model/.*--base"):
        main(["--run", str(run_dir), "--merged", str(tmp_path / "o")])
    main(["--run", str(run_dir), "--base", str(hf_checkpoint), "--merged", str(tmp_path / "o")])  # --base fixes it
    assert not (tmp_path / "x").exists()


def test_cli_subprocess(lora_run, tmp_path):
    run_dir, model = lora_run
    ok = subprocess.run([sys.executable, "export.py", "--run", str(run_dir), "--merged", str(tmp_path / "merged")],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("wrote merged checkpoint")
    torch.testing.assert_close(hf_logits(tmp_path / "merged"), logits(model), rtol=0, atol=1e-4)
    bad = subprocess.run([sys.executable, "export.py", "--run", str(tmp_path / "runs" / "missing"), "--merged",
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: run folder") and "Traceback" not in bad.stderr
    assert not (tmp_path / "out").exists()
