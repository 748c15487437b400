"""Greedy answers of a local Hugging Face causal LM, batched with left padding.

Used by `correction/` (build-correction-data) and `evaluation/` (evaluate --hf-model). Reads a
Hugging Face model directory: the form of the DeepSpeed loop's LlamaForCausalLM once exported
with `save_pretrained` (docs/correction_data.md shows how). Megatron dist checkpoints are not read.
"""

from __future__ import annotations

import os

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32", device: str | None = None):
    """`AutoModelForCausalLM` from a local directory, in eval mode on `device` (default: cuda
    when available, else cpu). Its generation_config is reset, so that a checkpoint's sampling
    or repetition settings cannot change the greedy answers."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{str(path)!r} is not a Hugging Face model directory (no config.json). Pass a local "
            f"one (config.json + weights, e.g. from model.save_pretrained(dir)); nothing is "
            f"downloaded, and Megatron dist checkpoints are not read"
        )
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device=device, dtype=_DTYPES[dtype]).eval()
    model.generation_config = GenerationConfig()
    return model


def stop_ids(model, eos_id: int) -> list[int]:
    """`eos_id` (the data's end of document) first, then the model config's own eos ids."""
    own = getattr(model.config, "eos_token_id", None)
    own = [] if own is None else [own] if isinstance(own, int) else list(own)
    return [eos_id, *(i for i in own if i != eos_id)]


@torch.no_grad()
def greedy_answers(model, prompts: list[list[int]], max_new_tokens: int, stop: list[int],
                   batch_size: int) -> list[list[int]]:
    """Each prompt's greedy continuation, cut before its first stop id (at most max_new_tokens
    ids, the stop id itself never included).

    prompts: token ids, in any order and of any lengths; answers come back in the same order.
    stop: the ids that end an answer; stop[0] also pads. Prompts are batched by length (fewer
    pad positions) and padded on the left, so every row's new tokens start at the same column.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=list(stop), pad_token_id=stop[0], use_cache=True)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        # Pad positions are never attended to (attention_mask 0), so any valid id will do.
        input_ids = torch.tensor([[stop[0]] * (width - len(prompts[i])) + prompts[i]
                                  for i in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i])
                                       for i in rows], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                generation_config=config)
        for row, new_ids in zip(rows, output[:, width:].tolist(), strict=True):
            answers[row] = until_stop(new_ids, stop)
    return answers


def until_stop(ids: list[int], stop: list[int]) -> list[int]:
    """`ids` up to, not including, the first stop id (finished rows are padded with one)."""
    ends = [position for position, token in enumerate(ids) if token in stop]
    return ids[:ends[0]] if ends else ids
