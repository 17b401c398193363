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

import os
import shutil
from pathlib import Path
from typing import Callable

from errors import ArgParser, UserError, run_cli
from lora import merge_lora, save_adapter
from runs import RunWeights, load_weights, run_weights
from tokenizer import tokenizer_folder


def export(source: RunWeights, merged_out: Path | None = None, adapter_out: Path | None = None,
           overwrite: bool = False) -> list[str]:
    """Write the requested folders; returns one line per folder written. Each is written under a
    temporary name and renamed into place, so a failure never leaves half an export."""
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
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise UserError(f"{out} exists and is not empty; choose another folder, or pass --overwrite to replace it")
    if merged_out is not None and adapter_out is not None and merged_out.resolve() == adapter_out.resolve():
        raise UserError("--merged and --adapter must be different folders (transformers would load the "
                        "adapter on top of the merged weights)")
    model = load_weights(source)
    done = []
    if adapter_out is not None:
        _write_folder(adapter_out, lambda tmp: save_adapter(model, tmp, source.base))
        done.append(f"wrote LoRA adapter (base {source.base}) to {adapter_out}")
    if merged_out is not None:
        what = "checkpoint"
        if source.adapter_dir is not None:
            merge_lora(model)  # the LoRA modules then hold W + s B A under the base names
            what = "merged checkpoint (LoRA folded in)"
        _write_folder(merged_out, lambda tmp: model.save_pretrained(tmp, tokenizer_dir=source.tokenizer_dir))
        n_params = sum(t.numel() for t in model.hf_state_dict().values())  # what was written: no LoRA tensors
        done.append(f"wrote {what}, {n_params / 1e6:.2f}M parameters, to {merged_out}")
        if not (merged_out / "vocab.json").is_file():
            done.append(f"note: no tokenizer files found to copy into {merged_out}; add vocab.json and "
                        "merges.txt (GPT-2's are on the hub) before loading it with a tokenizer")
    return done


def _write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary sibling folder, then put it in the place of `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = ArgParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder runs/NAME: its latest checkpoint is exported")
    parser.add_argument("--base", help="base model (hub name or HF folder); overrides the run's init_from")
    parser.add_argument("--adapter-dir", type=Path, help="PEFT adapter folder to apply to --base (instead of --run)")
    parser.add_argument("--merged", type=Path, help="write a merged Hugging Face checkpoint folder here")
    parser.add_argument("--adapter", type=Path, help="write the LoRA adapter (PEFT files) here")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder that is not empty")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.adapter_dir is None):
        raise UserError("give exactly one source: --run runs/NAME, or --base and --adapter-dir")
    if args.merged is None and args.adapter is None:
        raise UserError("nothing to write: give --merged OUT and/or --adapter OUT")
    if args.run is not None:
        source = run_weights(args.run, base_override=args.base)
    elif args.base is None:
        raise UserError("--adapter-dir needs --base, the model the adapter was trained on")
    else:
        source = RunWeights(base=args.base, adapter_dir=args.adapter_dir, tokenizer_dir=tokenizer_folder(args.base))
    for line in export(source, args.merged, args.adapter, args.overwrite):
        print(line)


if __name__ == "__main__":
    run_cli(main)
