"""Export a fine-tuned model: a merged Hugging Face checkpoint and/or the LoRA adapter alone.

    python export.py --run runs/NAME --merged out/NAME-merged      # latest checkpoint of a run
    python export.py --run runs/NAME --adapter out/NAME-adapter    # PEFT adapter files only
    python export.py --base gpt2 --adapter-dir DIR --merged out/merged

A run's base model is config.train.init_from in runs/NAME/hyperparams.json, or runs/NAME/base_model/
for LoRA on a randomly initialised base; --base overrides it (e.g. when the base folder has moved).
The merged folder loads with transformers.GPT2LMHeadModel.from_pretrained and carries the tokenizer
files; the adapter folder loads with peft.PeftModel.from_pretrained on top of the base.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from checkpoints import latest_checkpoint, read_hyperparams, run_base_source
from errors import ArgParser, UserError, run_cli
from lora import load_adapter, merge_lora, read_adapter_config, save_adapter
from model import GPT
from tokenizer import tokenizer_folder


@dataclass
class Source:
    """Where the weights to export come from: a base plus a LoRA adapter, or a full model folder."""
    base: str | None = None  # hub name or HF folder the adapter applies to
    adapter_dir: Path | None = None  # PEFT adapter folder (LoRA runs)
    model_dir: Path | None = None  # HF checkpoint folder (full fine-tuning runs)
    tokenizer_dir: Path | None = None  # None leaves the choice to save_pretrained: the folder the
    # model was loaded from (the base's, or model_dir's, own tokenizer files)


def source_from_run(run_dir: Path, base_override: str | None = None) -> Source:
    """The latest checkpoint of a run folder (layout in checkpoints.py) and what it needs."""
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass --run runs/NAME of a training run")
    hyperparams = read_hyperparams(run_dir)
    try:
        train = hyperparams["config"]["train"]
        init_from, tokenizer = train.get("init_from"), train.get("tokenizer")
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"{run_dir / 'hyperparams.json'}: no config.train; is this a run folder written by "
                        "train_sft.py?") from None
    step = latest_checkpoint(run_dir)
    if step is None:
        raise UserError(f"{run_dir}: no checkpoint yet (checkpoints/latest is missing or names no folder); "
                        "train past save_interval steps, or export with --base and --adapter-dir")
    if (step / "adapter").is_dir():
        base = base_override or run_base_source(run_dir, init_from)
        if base is None:
            raise UserError(f"{run_dir}: LoRA run from random weights without a saved base_model/; "
                            "pass --base with the base checkpoint folder")
        return Source(base=base, adapter_dir=step / "adapter", tokenizer_dir=tokenizer_folder(tokenizer))
    if (step / "model").is_dir():
        return Source(model_dir=step / "model", tokenizer_dir=tokenizer_folder(tokenizer, step / "model", init_from))
    raise UserError(f"{step}: neither adapter/ nor model/ inside; the checkpoint is incomplete, "
                    "export an earlier one by editing checkpoints/latest")


def load_source(source: Source) -> GPT:
    """The model to export: the full checkpoint, or the base with the adapter applied."""
    if source.model_dir is not None:
        return GPT.from_pretrained(source.model_dir)
    read_adapter_config(source.adapter_dir)  # fail on a bad adapter before loading the base
    try:
        model = GPT.from_pretrained(source.base)
    except UserError as err:
        raise UserError(f"base model {source.base!r}: {err} (set the base with --base)") from None
    load_adapter(model, source.adapter_dir)
    return model


def export(source: Source, merged_out: Path | None = None, adapter_out: Path | None = None) -> list[str]:
    """Write the requested folders; returns one line per folder written."""
    if source.adapter_dir is None and adapter_out is not None:
        raise UserError(f"{source.model_dir} is a full fine-tuning checkpoint: there is no adapter to "
                        "export; use --merged")
    inputs = {Path(p).resolve() for p in (source.base, source.adapter_dir, source.model_dir) if p and Path(p).exists()}
    outputs = [p for p in (merged_out, adapter_out) if p is not None]
    for out in outputs:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} exists and is not a folder; choose another output path")
        if out.resolve() in inputs:
            raise UserError(f"{out} is one of the inputs; write the export to a new folder")
    if merged_out is not None and adapter_out is not None and merged_out.resolve() == adapter_out.resolve():
        raise UserError("--merged and --adapter must be different folders (transformers would load the "
                        "adapter on top of the merged weights)")
    model = load_source(source)
    done = []
    if adapter_out is not None:
        save_adapter(model, adapter_out, source.base)
        done.append(f"wrote LoRA adapter (base {source.base}) to {adapter_out}")
    if merged_out is not None:
        what = "checkpoint"
        if source.adapter_dir is not None:
            merge_lora(model)  # the LoRA modules then hold W + s B A under the base names
            what = "merged checkpoint (LoRA folded in)"
        model.save_pretrained(merged_out, tokenizer_dir=source.tokenizer_dir)
        n_params = sum(t.numel() for t in model.hf_state_dict().values())  # what was written: no LoRA tensors
        done.append(f"wrote {what}, {n_params / 1e6:.2f}M parameters, to {merged_out}")
        if not (merged_out / "vocab.json").is_file():
            done.append(f"note: no tokenizer files found to copy into {merged_out}; add vocab.json and "
                        "merges.txt (GPT-2's are on the hub) before loading it with a tokenizer")
    return done


def main(argv: list[str] | None = None) -> None:
    parser = ArgParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder runs/NAME: its latest checkpoint is exported")
    parser.add_argument("--base", help="base model (hub name or HF folder); overrides the run's init_from")
    parser.add_argument("--adapter-dir", type=Path, help="PEFT adapter folder to apply to --base (instead of --run)")
    parser.add_argument("--merged", type=Path, help="write a merged Hugging Face checkpoint folder here")
    parser.add_argument("--adapter", type=Path, help="write the LoRA adapter (PEFT files) here")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.adapter_dir is None):
        raise UserError("give exactly one source: --run runs/NAME, or --base and --adapter-dir")
    if args.merged is None and args.adapter is None:
        raise UserError("nothing to write: give --merged OUT and/or --adapter OUT")
    if args.run is not None:
        source = source_from_run(args.run, args.base)
    elif args.base is None:
        raise UserError("--adapter-dir needs --base, the model the adapter was trained on")
    else:
        source = Source(base=args.base, adapter_dir=args.adapter_dir)
    for line in export(source, args.merged, args.adapter):
        print(line)


if __name__ == "__main__":
    run_cli(main)
