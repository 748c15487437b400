"""The Megatron-LM `pretrain_gpt.py` hook against Megatron-LM's own call sequence.

Megatron-LM does not install here, so the parts of it that the hook meets are reproduced below
from NVIDIA/Megatron-LM at tag core_v0.16.1:

- `pretrain_gpt.py`, `loss_func(loss_mask, output_tensor, model=None)`: the masked loss sum, the
  token count `loss_mask.sum()` as an int, the report {"lm loss": [sum, count]}, then the rerun
  state machine's NaN, Inf (fatal) and spiky-loss (10x, not fatal) checks on the loss; returns
  (loss, num_tokens, report). `forward_step` runs the model with labels and loss_mask and
  hands back `partial(loss_func, loss_mask, model=model)`.
- `megatron/training/training.py`, `train_step`: for each report key, a 2-element value is
  summed over the micro-batches (`torch.vstack(val).sum(dim=0)`), all-reduced (SUM) over the
  data-parallel group with context parallelism, and logged as `val[0] / val[1]`, unguarded; a
  1-element value is averaged over the micro-batches.
- `megatron/training/arguments.py`, `parse_args`: `parser = extra_args_provider(parser)` after
  Megatron-LM's own flags; `pretrain_gpt.py` passes `add_modelopt_args` when ModelOpt is
  installed, else None.

What is not reproduced runs for real: megatron-core 0.16.1's `forward_step_calc_loss`
(`megatron/core/pipeline_parallel/schedules.py`, which divides the loss by the micro-batch's
token count and the number of micro-batches unless `calculate_per_token_loss`), its rerun state
machine, TransformerConfig, GPTModel and, in the gloo workers, the DP all-reduce.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from dist_pool import destroy_model_parallel, initialize_model_parallel
from doc_blocks import doc_block

from token_objectives import ObjectiveConfig
from token_objectives.integrations.megatron import hook as tom
from token_objectives.integrations.megatron.hook import LossComponents
from token_objectives.objectives.components import COMPONENT_NAMES

SPIKY_LOSS_FACTOR = 10  # pretrain_gpt.py

# Megatron-LM's get_args() as the reproduced loss_func reads it.
MEGATRON_ARGS = argparse.Namespace(modelopt_enabled=False, check_for_nan_in_loss_and_grad=True,
                                   check_for_spiky_loss=True)


def megatron_lm_loss_func(loss_mask, output_tensor, model=None):
    """pretrain_gpt.py's loss_func (core_v0.16.1), without its ModelOpt branch (off here)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    args = MEGATRON_ARGS
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    rerun_state_machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        rerun_state_machine.validate_result(result=loss, rejection_func=torch.isnan,
                                            message="found NaN in local forward loss calculation",
                                            tolerance=0.0, fatal=True)
        rerun_state_machine.validate_result(result=loss, rejection_func=torch.isinf,
                                            message="found Inf in local forward loss calculation",
                                            tolerance=0.0, fatal=True)
    if args.check_for_spiky_loss:
        rerun_state_machine.validate_result(
            result=loss,
            rejection_func=partial(rerun_state_machine.is_unexpectedly_large,
                                   threshold=SPIKY_LOSS_FACTOR, context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False)
    return loss, num_tokens, report


def megatron_lm_forward_step(batch: dict, model, loss_func):
    """pretrain_gpt.py's forward_step (core_v0.16.1) after get_batch, mcore model path."""
    output_tensor = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                          loss_mask=batch["loss_mask"])
    return output_tensor, partial(loss_func, batch["loss_mask"], model=model)


def run_micro_batches(outputs: list[tuple], config) -> tuple[list, list[dict]]:
    """megatron-core's forward_step_calc_loss on each (output_tensor, bound loss_func), as the
    no-pipelining schedule calls it: returns (the tensors backward runs on, forward_data_store)."""
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    store: list[dict] = []
    backward = []
    for output_tensor, bound in outputs:
        tensor, _ = forward_step_calc_loss(None, output_tensor, bound, config, None, False,
                                           len(outputs), store, cp_group_size=1,
                                           is_last_stage=True)
        backward.append(tensor)
    return backward, store


def train_step_sums(losses_reduced: list[dict]) -> dict[str, torch.Tensor]:
    """training.py's train_step up to its DP all-reduce: per key, the micro-batches' pairs
    summed, or the legacy 1-element values averaged."""
    sums = {}
    for key in losses_reduced[0].keys():
        val = [x[key].view(-1) for x in losses_reduced]
        if val[0].numel() == 2:
            sums[key] = torch.vstack(val).sum(dim=0)
        elif val[0].numel() == 1:
            sums[key] = torch.cat(val).mean()
        else:
            raise ValueError(f"Invalid value shape: {val[0].shape} for key {key}")
    return sums


def train_step_values(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """training.py's train_step after the all-reduce: sum / count, unguarded."""
    return {key: float(v[0] / v[1]) if v.numel() == 2 else float(v) for key, v in sums.items()}


def dp_all_reduce(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What all_reduce(SUM) over the DP group leaves on every rank, for in-process ranks."""
    return {key: torch.stack([rank[key] for rank in per_rank]).sum(0) for key in per_rank[0]}


def transformer_config(per_token: bool):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                             calculate_per_token_loss=per_token)


def _micro_batch(seed: int, numbers: bool, b: int = 2, s: int = 6):
    """A per-token loss carrying LossComponents, and a 0/1 loss_mask; no number token unless
    `numbers`."""
    gen = torch.Generator().manual_seed(seed)
    is_number = (torch.rand(b, s, generator=gen) > 0.5) & numbers
    ntl = torch.rand(b, s, generator=gen) * 2 * is_number
    ce = torch.rand(b, s, generator=gen) * 4
    weight = 0.5 + torch.rand(b, s, generator=gen)
    loss = weight * ce + 0.3 * ntl
    loss.token_objectives_components = LossComponents(ce=ce, ce_part=loss - 0.3 * ntl,
                                                      ntl=ntl, is_number=is_number,
                                                      weight=weight)
    mask = (torch.rand(b, s, generator=gen) > 0.2).float()
    if numbers:
        mask[0, is_number[0].nonzero()[0]] = 1.0  # at least one counted number token
    return loss, mask


# Two DP ranks of three micro-batches; four of the six micro-batches hold no number token.
RANKS = [[(1, True), (2, False), (3, False)], [(4, False), (5, True), (6, False)]]


def _truth(batches) -> dict[str, float]:
    """float64 per-token means over every micro-batch of every rank."""
    total = {k: torch.zeros((), dtype=torch.float64) for k in
             ("loss", "ce", "ntl", "tokens", "numbers", "weight")}
    for loss, mask in batches:
        parts = tom.components_of(loss)
        m = mask.double()
        total["loss"] += (loss.double() * m).sum()
        total["ce"] += (parts.ce.double() * m).sum()
        total["ntl"] += (parts.ntl.double() * m).sum()
        total["weight"] += (parts.weight.double() * m).sum()
        total["tokens"] += m.sum()
        total["numbers"] += (parts.is_number & (mask != 0)).double().sum()
    return {"lm loss": float(total["loss"] / total["tokens"]),
            "ce": float(total["ce"] / total["tokens"]),
            "ntl": float(total["ntl"] / total["numbers"]),
            "counted tokens": float(total["tokens"]),
            "number tokens": float(total["numbers"]),
            "number token share": float(total["numbers"] / total["tokens"]),
            "pdl weight": float(total["weight"] / total["tokens"])}


def _logged(loss_fn, ranks) -> dict[str, float]:
    config = transformer_config(per_token=True)
    per_rank = []
    for batches in ranks:
        outputs = [(loss, partial(loss_fn, mask, model=None)) for loss, mask in batches]
        _, store = run_micro_batches(outputs, config)
        per_rank.append(train_step_sums(store))
    return train_step_values(dp_all_reduce(per_rank))


@pytest.mark.parametrize("which", ["wrap_loss_func", "loss_func"])
def test_logged_ntl_is_per_number_token_over_micro_batches_and_dp(which):
    reports = sum(len(rank) for rank in RANKS)  # micro-batches x DP ranks
    loss_fn = tom.wrap_loss_func(megatron_lm_loss_func, reports_per_step=lambda: reports) \
        if which == "wrap_loss_func" else partial(tom.loss_func, reports_per_step=reports)
    ranks = [[_micro_batch(seed, numbers) for seed, numbers in rank] for rank in RANKS]
    logged = _logged(loss_fn, ranks)
    truth = _truth([batch for rank in ranks for batch in rank])
    for name, value in truth.items():
        assert logged[name] == pytest.approx(value, rel=1e-5), name
    # The counts are the step's, exactly, not a mean per micro-batch.
    assert logged["number tokens"] == truth["number tokens"] > 1
    assert logged["counted tokens"] == truth["counted tokens"]
    assert logged["ce part"] + 0.3 * logged["ntl part"] == pytest.approx(logged["lm loss"],
                                                                        rel=1e-5)


def test_a_step_without_number_tokens_logs_ntl_0():
    ranks = [[_micro_batch(seed, False) for seed in (7, 8)] for _ in range(2)]
    logged = _logged(tom.wrap_loss_func(megatron_lm_loss_func, reports_per_step=lambda: 4),
                     ranks)
    # training.py divides unguarded: the wrapped report must not make it 0 / 0.
    assert logged["ntl"] == 0.0 and logged["number tokens"] == 0.0
    assert logged["number token share"] == 0.0
    assert logged["lm loss"] == pytest.approx(_truth([b for r in ranks for b in r])["lm loss"],
                                              rel=1e-5)
    # Our own loss_func reports the bare [0, 0]; our loop guards the division.
    from token_objectives.training.megatron import report_values

    sums = dp_all_reduce([train_step_sums([tom.loss_func(mask, loss)[2] for loss, mask in r])
                          for r in ranks])
    assert sums["ntl"].tolist() == [0.0, 0.0]
    assert report_values(sums)["ntl"] == 0.0


def test_wrap_loss_func_keeps_megatron_lm_loss_func():
    loss, mask = _micro_batch(1, True)
    wrapped = tom.wrap_loss_func(megatron_lm_loss_func, reports_per_step=lambda: 1)
    assert tom.wrap_loss_func(wrapped) is wrapped
    assert wrapped.__wrapped__ is megatron_lm_loss_func
    total, tokens, report = wrapped(mask, loss, model=None)
    own_total, own_tokens, own_report = megatron_lm_loss_func(mask, loss, model=None)
    assert torch.equal(total, own_total) and torch.equal(tokens, own_tokens)
    assert torch.equal(report["lm loss"], own_report["lm loss"])
    assert tuple(report) == COMPONENT_NAMES
    # Outside Megatron-LM the default reads a calculator nobody set up: the error says so.
    with pytest.raises(RuntimeError, match="reports_per_step="):
        tom.wrap_loss_func(megatron_lm_loss_func)(mask, loss, model=None)
    # The rerun state machine's fatal NaN check runs on the combined loss (on a CPU-only
    # machine its error path fails looking up the CUDA device, after rejecting the loss).
    bad = loss.clone()
    bad[0, 0] = float("nan")
    bad.token_objectives_components = tom.components_of(loss)
    with pytest.raises((RuntimeError, AssertionError)):
        wrapped(mask, bad, model=None)
    # No components (a model without the objectives): Megatron-LM's report as it was.
    assert set(wrapped(mask, loss.detach().clone())[2]) == {"lm loss"}


def test_per_token_loss_is_what_makes_the_gradient_exact():
    """Without --calculate-per-token-loss megatron-core divides each micro-batch by its own
    count: the gradient weighs tokens of small micro-batches more. The hook refuses it."""
    batches = [_micro_batch(seed, True) for seed in (1, 2)]
    batches[1][1][1:] = 0  # a micro-batch with fewer tokens
    wrapped = tom.wrap_loss_func(megatron_lm_loss_func, reports_per_step=lambda: 2)
    outputs = [(loss.clone(), partial(wrapped, mask, model=None)) for loss, mask in batches]
    summed, _ = run_micro_batches(outputs, transformer_config(per_token=True))
    outputs = [(loss.clone(), partial(wrapped, mask, model=None)) for loss, mask in batches]
    averaged, _ = run_micro_batches(outputs, transformer_config(per_token=False))
    tokens = sum(float(mask.sum()) for _, mask in batches)
    exact = sum(float((loss * mask).sum()) for loss, mask in batches) / tokens
    # finalize_model_grads scales by 1 / the global token count when per-token loss is on.
    assert sum(float(t) for t in summed) / tokens == pytest.approx(exact, rel=1e-6)
    assert sum(float(t) for t in averaged) != pytest.approx(exact, rel=1e-3)

    args = _parse([])
    args.calculate_per_token_loss = False
    with pytest.raises(ValueError, match="Add --calculate-per-token-loss"):
        tom.check_megatron_lm_args(args)


def test_the_wrapped_model_provider_checks_before_building(monkeypatch):
    args = _parse(["--ntl", "none"])
    args.calculate_per_token_loss = False
    training = types.ModuleType("megatron.training")
    training.get_args = lambda: args
    training.get_tokenizer = lambda: types.SimpleNamespace(vocab_size=REAL_VOCAB)
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    built = []
    provider = tom.wrap_model_provider(lambda **kwargs: built.append(kwargs))
    with pytest.raises(ValueError, match="--calculate-per-token-loss"):
        provider(pre_process=True, post_process=True)
    assert not built


def megatron_lm_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The Megatron-LM flags the hook reads (megatron/training/arguments.py names them)."""
    parser.add_argument("--calculate-per-token-loss", action="store_true")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--tokenizer-model", type=str, default=None)
    return parser


def _parse(argv: list[str], extra_args_provider=None) -> argparse.Namespace:
    """parse_args: Megatron-LM's flags, then `parser = extra_args_provider(parser)`."""
    parser = megatron_lm_flags(argparse.ArgumentParser(allow_abbrev=False))
    parser = (extra_args_provider or tom.add_objective_args)(parser)
    return parser.parse_args(["--calculate-per-token-loss", *argv])


def test_chained_args_provider_and_every_config_field_is_a_flag():
    def other_provider(parser):  # stands where pretrain_gpt.py puts add_modelopt_args
        parser.add_argument("--other-flag", type=int, default=0)
        return parser

    argv = ["--other-flag", "3", "--ntl", "huber", "--ntl-weight", "0.5", "--ntl-huber-delta",
            "2.5", "--ntl-no-reweigh", "--ntl-max-number-length", "7", "--pdl-alpha", "0.2",
            "--label-smoothing", "0.1", "--objective-z-loss", "1e-4", "--pdl-eps", "0.5",
            "--pdl-unseen", "0.25", "--pdl-no-normalize-table"]
    parser = megatron_lm_flags(argparse.ArgumentParser(allow_abbrev=False))
    tom.chain_args_provider(other_provider)(parser).format_help()
    args = _parse(argv, tom.chain_args_provider(other_provider))
    assert args.other_flag == 3
    config = tom.objective_config_from_args(args)
    assert config == ObjectiveConfig(ntl="huber", ntl_weight=0.5, huber_delta=2.5,
                                     reweigh=False, max_number_length=7, pdl_alpha=0.2,
                                     label_smoothing=0.1, z_loss=1e-4, pdl_eps=0.5,
                                     pdl_unseen=0.25, pdl_normalize_table=False)
    assert tom.objective_config_from_args(_parse(["--pdl-unseen", "rarest"])).pdl_unseen \
        == "rarest"
    number = tom.objective_config_from_args(_parse(["--ntl", "number",
                                                    "--ntl-number-level-float"]))
    assert number.number_level_float and number.ntl == "number"
    assert tom.objective_config_from_args(_parse(["--ntl", "none"])).ntl is None
    assert _parse([], tom.chain_args_provider(None)).ntl == "was"
    # One source: every ObjectiveConfig field is a flag, but the two Megatron fixes.
    flagged = {field.name for field, _, _ in tom._config_options()}
    names = {field.name for field in dataclasses.fields(ObjectiveConfig)}
    assert flagged | set(tom._NOT_FLAGS) == names


def test_a_parser_that_has_label_smoothing_keeps_it():
    def fork_flags(parser):
        parser.add_argument("--label-smoothing", type=float, default=0.0)
        return parser

    args = _parse(["--label-smoothing", "0.2"], tom.chain_args_provider(fork_flags))
    assert tom.objective_config_from_args(args).label_smoothing == 0.2


def test_hook_errors_name_the_flag(tmp_path, corpus_lines):
    from tokenizer_fixtures import word_level_tokenizer

    args = _parse(["--ntl", "was"])
    args.padded_vocab_size = 128
    with pytest.raises(ValueError, match="--objective-tokenizer"):
        tom.objectives_from_args(args)
    # The fused head gathers sequence-parallel hidden states itself (tests/test_fused_linear.py).
    tom.check_megatron_lm_args(_parse(["--objective-fused-lm-head", "--sequence-parallel"]))
    # CE only with a tokenizer that has no digit at all: no NumberTable is built.
    path = tmp_path / "tokenizer.json"
    word_level_tokenizer(["a", "b", "c"]).save(str(path))
    args = _parse(["--ntl", "none", "--objective-tokenizer", str(path)])
    args.padded_vocab_size = 128
    objectives = tom.objectives_from_args(args, real_vocab_size=4)
    assert objectives.numbers is None
    assert (objectives.vocab_size, objectives.real_vocab_size) == (128, 4)
    with pytest.raises(ValueError, match="has 3 ids but"):
        tom.objectives_from_args(args, real_vocab_size=3)
    # The trainer's tokenizer may add special ids past the file's: they are real columns.
    assert tom.objectives_from_args(args, real_vocab_size=6).real_vocab_size == 6


# ---- the whole hook in gloo workers: TP=2 x DP=2, GPT-2-style BPE, padded vocab ----

REAL_VOCAB = 300  # the tokenizer's size; padded to 512 for make-vocab-size-divisible-by 128, TP 2
PADDED_VOCAB = 512


def hook_task(tokenizer_path: str, frequencies_path: str, argv: list[str]) -> dict:
    """Megatron-LM's get_args/get_tokenizer globals, then the wrapped model_provider,
    forward_step, loss_func and train_step's reduction over 2 micro-batches and the DP group."""
    import torch.distributed as dist
    from megatron.core import num_microbatches_calculator as calculator
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from token_objectives.integrations.megatron import cpu_patches

    cpu_patches.apply()
    groups_before = initialize_model_parallel(tensor_model_parallel_size=2)
    # What Megatron-LM's initialize_megatron sets up: 2 micro-batches of 2 on each of 2 DP
    # ranks, which wrap_loss_func's counts read.
    calculator.init_num_microbatches_calculator(0, None, 8, 2, 2)
    args = _parse(["--objective-tokenizer", tokenizer_path, "--pdl-frequencies",
                   frequencies_path, *argv])
    args.padded_vocab_size = PADDED_VOCAB  # set by Megatron-LM's tokenizer build
    training = types.ModuleType("megatron.training")
    training.get_args = lambda: args
    training.get_tokenizer = lambda: types.SimpleNamespace(vocab_size=REAL_VOCAB)
    sys.modules["megatron.training"] = training
    try:
        config = TransformerConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
            tensor_model_parallel_size=2, use_cpu_initialization=True, hidden_dropout=0.0,
            attention_dropout=0.0, gradient_accumulation_fusion=False,
            masked_softmax_fusion=False, bias_activation_fusion=False,
            bias_dropout_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
            calculate_per_token_loss=args.calculate_per_token_loss,
        )

        def model_provider(pre_process=True, post_process=True, vp_stage=None):
            torch.manual_seed(11)
            return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=PADDED_VOCAB,
                            max_sequence_length=16, pre_process=pre_process,
                            post_process=post_process, share_embeddings_and_output_weights=True,
                            position_embedding_type="rope")

        # docs/megatron-lm.md's 0.16 lines, run on this module's model_provider and loss_func.
        pretrain_gpt = {"model_provider": model_provider, "loss_func": megatron_lm_loss_func}
        exec(doc_block("megatron-lm-0-16").text, pretrain_gpt)
        model = pretrain_gpt["model_provider"](pre_process=True, post_process=True)
        with torch.no_grad():
            # Every hidden state gets a constant 10 in channel 0, and the padded rows a 10
            # there: padded logits are ~100, far above the real ones.
            norm = model.decoder.final_layernorm
            norm.weight[0], norm.bias[0] = 0.0, 10.0
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            shard = model.embedding.word_embeddings.weight
            ids = torch.arange(shard.shape[0]) + tp_rank * shard.shape[0]
            shard[ids >= REAL_VOCAB, 0] = 10.0
        dp_rank = parallel_state.get_data_parallel_rank()
        gen = torch.Generator().manual_seed(100 + dp_rank)
        loss_fn = pretrain_gpt["loss_func"]
        outputs, batches = [], []
        for _ in range(2):
            batch = {"tokens": torch.randint(0, REAL_VOCAB, (2, 16), generator=gen),
                     "labels": torch.randint(0, REAL_VOCAB, (2, 16), generator=gen),
                     "position_ids": torch.arange(16).expand(2, 16),
                     "loss_mask": (torch.rand(2, 16, generator=gen) > 0.25).float()}
            batches.append(batch)
            outputs.append(megatron_lm_forward_step(batch, model, loss_fn))
        _, store = run_micro_batches(outputs, config)
        sums = train_step_sums(store)
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        for value in sums.values():
            dist.all_reduce(value, group=group)
        logged = train_step_values(sums)
        # The reference: the model's own logits (no labels), gathered over TP.
        full = []
        with torch.no_grad():
            for batch in batches:
                shard_logits = model(batch["tokens"], batch["position_ids"], None)
                pieces = [torch.empty_like(shard_logits) for _ in range(2)]
                dist.all_gather(pieces, shard_logits.contiguous(),
                                group=parallel_state.get_tensor_model_parallel_group())
                full.append(torch.cat(pieces, dim=-1))
        return {"logged": logged, "logits": full,
                "labels": [b["labels"] for b in batches],
                "masks": [b["loss_mask"] for b in batches],
                "pdl": None if tom.components_of(outputs[0][0]) is None
                else model._token_objectives_attached.pdl_weights}
    finally:
        del sys.modules["megatron.training"]
        calculator.destroy_num_microbatches_calculator()
        destroy_model_parallel(groups_before)


@pytest.fixture(scope="module")
def gpt2_style_tokenizer(tmp_path_factory, corpus_lines):
    from tokenizer_fixtures import gpt2_style_bpe_tokenizer

    from token_objectives.tables.frequencies import save_frequencies
    from token_objectives.tables.tokenizers import tokenizer_identity

    tokenizer = gpt2_style_bpe_tokenizer(corpus_lines, vocab_size=REAL_VOCAB)
    assert tokenizer.get_vocab_size() == REAL_VOCAB
    directory = tmp_path_factory.mktemp("gpt2_bpe")
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    counts = torch.randint(1, 1000, (PADDED_VOCAB,))
    counts[REAL_VOCAB:] = 0
    frequencies = directory / "frequencies.safetensors"
    save_frequencies(frequencies, counts.numpy(), tokenizer_identity=tokenizer_identity(tokenizer))
    return str(path), str(frequencies)


@pytest.mark.parametrize("argv", [["--ntl", "none"], ["--ntl", "none", "--pdl-alpha", "0.5"],
                                  ["--ntl", "none", "--objective-fused-lm-head"]],
                         ids=["ce", "pdl", "ce-fused-head"])
def test_ce_and_pdl_through_the_hook_leave_the_padding_out(pool4, gpt2_style_tokenizer, argv):
    tokenizer_path, frequencies_path = gpt2_style_tokenizer
    results = pool4.run(hook_task, tokenizer_path, frequencies_path, argv)
    sums = torch.zeros(3, dtype=torch.float64)  # loss, ce, tokens over DP ranks 0 and 1
    for result in results[::2]:  # TP rank 0 of each DP rank
        weights = result["pdl"]
        for logits, labels, mask in zip(result["logits"], result["labels"], result["masks"],
                                        strict=True):
            assert logits.shape[-1] == PADDED_VOCAB
            assert logits[..., REAL_VOCAB:].min() > logits[..., :REAL_VOCAB].max() + 50
            ce = F.cross_entropy(logits[..., :REAL_VOCAB].double().flatten(0, 1),
                                 labels.flatten(), reduction="none")
            w = torch.ones_like(ce) if weights is None else weights.double()[labels.flatten()]
            sums += torch.stack([(w * ce * mask.flatten()).sum(), (ce * mask.flatten()).sum(),
                                 mask.sum().double()])
    for result in results:
        logged = result["logged"]
        assert logged["lm loss"] == pytest.approx(float(sums[0] / sums[2]), rel=1e-4)
        assert logged["ce"] == pytest.approx(float(sums[1] / sums[2]), rel=1e-4)
        assert logged["ntl"] == 0.0 and logged["number tokens"] == 0.0
        assert logged["counted tokens"] == sums[2]  # the step's count over DP, exactly
