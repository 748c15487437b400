"""Real `transformers.Trainer` runs of the objectives on a tiny LlamaForCausalLM, on the CPU.

`run(mode, out)` trains one SGD step (lr 1, no clipping) on a fixed batch of 8 rows and saves
the loss, the gradient (parameters before - after) and the logged components to out/result.pt.
Every mode sees the same 8 rows: batch 8; accumulation 4 x 2; under torchrun 2 processes x
accumulation 2 x 2 (DDP over gloo, or DeepSpeed ZeRO-2/3), or one AutoTP group of 2 x
accumulation 2 x 4. Run as a script
(`torchrun tests/hf_runs.py MODE OUT`) it is the worker the multi-process tests launch.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenizer_fixtures import make_corpus, train_bpe_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS, SEQ = 8, 24
OPTIONS = {"ntl": "was", "ntl_weight": 0.3}
MODES = {  # mode: (per-device batch, accumulation, extra TrainingArguments)
    "single": (8, 1, {}),
    "accumulate": (2, 4, {}),
    "ddp": (2, 2, {"ddp_backend": "gloo"}),
    "zero2": (2, 2, {}),
    "zero3_fused": (2, 2, {}),
    "fused": (8, 1, {}),
    "autotp2": (4, 2, {}),  # 2 processes are one TP group of 2: each sees the whole batch
    # A vocab padded to 301 ids: AutoTP shards it unevenly (151 + 150).
    "autotp2_padded": (4, 2, {}),
}


def model_vocab(mode: str, tokenizer) -> int:
    return len(tokenizer) + (1 if mode.endswith("padded") else 0)


def hf_tokenizer():
    """A transformers fast tokenizer over a BPE trained here (digits are single tokens)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=train_bpe_tokenizer(make_corpus(200), 300),
                                   unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def batch(tokenizer, rows: int = ROWS, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths: labels are the ids, -100 on the padding."""
    ids = torch.full((rows, seq), tokenizer.pad_token_id)
    mask = torch.zeros(rows, seq, dtype=torch.long)
    for row, line in enumerate(make_corpus(rows, seed=7)):
        tokens = tokenizer(line)["input_ids"][: seq - 3 * row]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.where(mask.bool(), ids, torch.full_like(ids, -100))}


class Rows(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.data.items()}


def training_args(out: Path, mode: str, report_to: str = "none"):
    from transformers import TrainingArguments

    micro, accumulation, extra = MODES[mode]
    if mode.startswith("autotp"):
        extra = {"deepspeed": str(REPO / "configs" / "deepspeed" / "hf_autotp2.json")}
    if mode.startswith("zero"):
        # The ds_configs launch/train_hf.py and the README use ("auto": Trainer's values).
        extra = {"deepspeed": str(REPO / "configs" / "deepspeed" / f"hf_zero{mode[4]}.json")}
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
        report_to=report_to, save_strategy="no", use_cpu=True, seed=0, data_seed=0,
        dataloader_drop_last=False, disable_tqdm=True, **extra)


def full_parameters(model) -> dict[str, torch.Tensor]:
    """name -> a detached fp32 copy of every parameter (gathered under ZeRO-3)."""
    params = list(model.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def run(mode: str, out: Path, report_to: str = "none", model=None, tokenizer=None) -> dict:
    """One Trainer step in `mode`; returns (and on rank 0 saves) loss, grads and logs."""
    from transformers import Trainer

    from token_objectives.integrations.hf import objective_loss_from_options

    out = Path(out)
    if mode.startswith(("zero", "autotp")):
        from token_objectives.integrations.deepspeed.cpu import disable_shm_comm_op

        disable_shm_comm_op()
    tokenizer = tokenizer or hf_tokenizer()
    model = model or tiny_llama(model_vocab(mode, tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objectives = objective_loss_from_options(OPTIONS, tokenizer, model=model,
                                             fused=mode.endswith("fused"))
    args = training_args(out, mode, report_to)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(batch(tokenizer)),
                      compute_loss_func=objectives)
    objectives.attach(trainer)
    result = trainer.train()
    after = full_parameters(trainer.model_wrapped.module if mode.startswith("zero")
                            else model)
    engine = trainer.model_wrapped
    record = {
        "zero_stage": engine.zero_optimization_stage() if mode.startswith("zero") else None,
        # (vocab_start, width) of this rank's lm_head shard, read when the logits were one.
        "head_shard": objectives.core.head_shard,
        # 0 under ZeRO-3 outside a forward: the weight the fused head used was partitioned.
        "head_numel": model.get_output_embeddings().weight.numel(),
        "loss": result.training_loss,
        # Under AutoTP only the parameters it leaves whole (the others are shards here).
        "grads": {n: before[n] - after[n] for n in before if before[n].shape == after[n].shape},
        "logs": [row for row in trainer.state.log_history if "ntl" in row],
    }
    if mode == "zero3_fused":
        record.update(gathered_head(engine.module, objectives, tokenizer))
    if trainer.is_world_process_zero():
        torch.save(record, out / "result.pt")
    return record


def gathered_head(model, objectives, tokenizer) -> dict:
    """Outside the engine's forward, where ZeRO-3 leaves the lm_head partitioned: the fused
    objective with the weight gathered by fused.gathered, and the objective on logits made
    with the weight gathered by hand (no backward)."""
    import deepspeed
    import torch.nn.functional as F

    from token_objectives.integrations.hf.fused import gathered

    head, data = model.get_output_embeddings(), batch(tokenizer)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=data["input_ids"],
                                     attention_mask=data["attention_mask"]).last_hidden_state
        partitioned = head.weight.numel() == 0
        with gathered(head.weight):
            fused = objectives.fused_objective(hidden, head.weight, data["labels"])
        with deepspeed.zero.GatheredParameters([head.weight]):
            logits = F.linear(hidden, head.weight)
        objectives.fused = False
        plain = objectives({"logits": logits}, data["labels"])
    return {"partitioned_outside_forward": partitioned,
            "gathered_fused_loss": objectives.reduce(fused, None).item(),
            "gathered_logits_loss": plain.item()}


def hand_reference(model, tokenizer, config) -> tuple[float, dict[str, torch.Tensor], dict]:
    """objective_loss on logits[:, :-1] vs labels[:, 1:], / the counted tokens, by hand:
    (loss, grads, component means)."""
    from token_objectives import NumberTable, objective_loss

    model = copy.deepcopy(model)
    data = batch(tokenizer)
    numbers = NumberTable.from_tokenizer(tokenizer, vocab_size=model.config.vocab_size)
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    out = objective_loss(logits[:, :-1], data["labels"][:, 1:], config, numbers)
    tokens = out.counted.sum()
    loss = out.loss.sum() / tokens
    loss.backward()
    means = {"lm_loss": loss.item(), "ce": (out.ce.sum() / tokens).item(),
             "ntl": (out.ntl.sum() / out.ntl_positions.sum()).item(),
             "counted_tokens": tokens.item(),  # counts: the one step's
             "number_tokens": out.ntl_positions.sum().item(),
             "number_token_share": (out.ntl_positions.sum() / tokens).item()}
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, means


def run_modes(modes: list[str], out: Path) -> None:
    """Each mode in turn in one process group, into out/MODE/result.pt (saves the workers'
    start-up per mode); accelerate's and transformers' DeepSpeed state is reset between."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    tokenizer = hf_tokenizer()
    for mode in modes:
        (out / mode).mkdir(parents=True, exist_ok=True)
        run(mode, out / mode, tokenizer=tokenizer)
        AcceleratorState._reset_state(reset_partial_state=False)
        unset_hf_deepspeed_config()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_modes(sys.argv[1].split(","), Path(sys.argv[2]))
