"""`token-objectives ensemble`: load local models, read prompts, write one JSON line per prompt.

Prompts file: a `.jsonl` file holds one JSON object per line with a "prompt" string (its other
fields are copied to the output line, e.g. an "id"); any other file holds one prompt per
non-empty line (use JSONL for prompts that contain newlines). Models are Hugging Face
`save_pretrained` directories holding the tokenizer too; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from token_objectives.tables.errors import InputError
from token_objectives.tables.output_files import add_mode_argument, check_output_path, set_mode

__all__ = ["add_arguments", "check_model_dir", "load_models", "main", "read_prompts", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ensemble` subcommand's options (kept free of torch imports)."""
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="DIR",
        help="a local save_pretrained directory (model + tokenizer); repeat per model, the first "
        "is the primary model of the gate",
    )
    parser.add_argument(
        "--weights", type=float, nargs="+", help="one mixing weight per --model (default: equal)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=1.0,
        help="key-token gate: ensemble only when the primary model's top probability is <= this "
        "(1.0, the default: every step; 0.0: never; e.g. 0.5 skips the confident steps)",
    )
    parser.add_argument("--prompts", required=True, help="one prompt per line, or .jsonl")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of argmax")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt)")
    parser.add_argument("--device", default="cpu", help="torch device for every model")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32"
    )
    add_mode_argument(parser)


def read_prompts(path: str | Path) -> list[dict]:
    """Records with at least a "prompt" str, from a .jsonl file or a one-prompt-per-line file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    lines = _decoded_lines(path)
    if path.suffix != ".jsonl":
        return [{"prompt": line} for line in lines if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno}); write one "
                '{"prompt": "..."} object per line (or use a plain text file, one prompt per line)'
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(
                f'{path}:{number} is not a JSON object with a "prompt" string; write one '
                '{"prompt": "..."} object per line (or use a plain text file, one prompt per line)'
            )
        records.append(record)
    return records


def _decoded_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file; a line that is not UTF-8 is an error naming it."""
    lines, offset = [], 0
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                lines.append(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as error:
                raise InputError(
                    f"{path}:{number}: not UTF-8 ({error.reason} at byte "
                    f"{offset + error.start} of the file); convert the file to UTF-8"
                ) from None
            offset += len(raw)
    return lines


# What save_pretrained writes: the model's weights (whole or sharded) and its tokenizer.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")


def check_model_dir(directory: str) -> None:
    """A --model directory must hold a local Hugging Face model: config.json, weights and a
    tokenizer. Raises FileNotFoundError or InputError naming the directory and what it lacks."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {directory!r} does not exist; the ensemble never downloads: "
            "pass local save_pretrained directories (model and tokenizer saved together)"
        )
    missing = [what for what, names in (("config.json", ("config.json",)),
                                        ("weights", WEIGHT_FILES),
                                        ("tokenizer", TOKENIZER_FILES))
               if not any((path / name).is_file() for name in names)]
    if missing:
        raise InputError(
            f"--model {directory} holds no {' and no '.join(missing)}; pass a local Hugging Face "
            f"model directory as model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR) "
            f"write it (config.json, model.safetensors or pytorch_model.bin, tokenizer.json or "
            f"tokenizer_config.json)"
        )


def load_models(dirs: list[str], device: str = "cpu", dtype: str = "float32"):
    """Load each directory's causal LM and tokenizer, local files only; every directory is
    checked (`check_model_dir`) before the first model loads.

    Returns (models, tokenizers, eos_ids) where eos_ids[m] lists the EOS ids of the model's
    generation_config.
    """
    for directory in dirs:
        check_model_dir(directory)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models, tokenizers, eos_ids = [], [], []
    for directory in dirs:
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=torch_dtype
        )
        models.append(model.to(device).eval())
        tokenizers.append(AutoTokenizer.from_pretrained(directory, local_files_only=True))
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos_ids.append([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    return models, tokenizers, eos_ids


def run(args: argparse.Namespace) -> int:
    """Generate for every prompt and write the JSONL output; prints a one-line summary."""
    from token_objectives.ensemble.generate import EnsembleConfig, GaCEnsemble, check_weights

    weights = args.weights or [1.0] * len(args.model)
    check_weights(weights, len(args.model))  # before the (slow) model loading
    config = EnsembleConfig(
        weights=tuple(weights),
        threshold=args.threshold,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
    )
    # Before the model loading and the generation: a path that cannot be written fails now.
    check_output_path(args.output, "--output")
    prompts = read_prompts(args.prompts)
    models, tokenizers, eos_ids = load_models(args.model, args.device, args.dtype)
    ensemble = GaCEnsemble(models, tokenizers, config, eos_ids=eos_ids, names=list(args.model))
    steps = gated = 0
    with open(args.output, "w", encoding="utf-8") as out:
        # Set now, not at the end: the lines written before a failure stay readable too.
        set_mode(out.fileno(), args.mode)
        for record in prompts:
            result = ensemble.generate(record["prompt"])
            steps += result.steps
            gated += result.gated_steps
            line = {
                **record,
                "text": result.text,
                "new_tokens": len(result.union_ids),
                "stop_reason": result.stop_reason,
                "steps": result.steps,
                "gated_steps": result.gated_steps,
                "gated_fraction": result.gated_fraction,
                "models": list(args.model),
                "forward_passes": result.forward_passes,
            }
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    passes = [runner.forward_passes for runner in ensemble.runners]
    print(
        f"ensembled {len(prompts)} prompt(s): {steps} steps, "
        f"{gated / steps if steps else 0.0:.1%} gated, forward passes per model {passes} "
        f"-> {args.output}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`token-objectives ensemble ARGS`: parse ARGS, then `run`."""
    parser = argparse.ArgumentParser(
        prog="token-objectives ensemble",
        description="GaC token-level ensemble of local models with different tokenizers")
    add_arguments(parser)
    return run(parser.parse_args(argv))
