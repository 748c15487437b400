"""The GPTModel hook in real gloo processes: the objectives on the vocab-sharded logits, and the
fused LM head that skips the output layer. On megatron-core 0.19 both go through GPTModel's
`output_processor` door, on 0.16 through the replaced loss (integrations/megatron/versions.py);
the same tests run under both."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from dist_pool import destroy_model_parallel, initialize_model_parallel
from reference import reference_objective_loss

from token_objectives import Objective, ObjectiveConfig

VOCAB, HIDDEN, SEQ, BATCH, TP = 2048, 16, 16, 2, 2
HEAD_ROWS = 4  # the fused head's chunk: [4, V/tp] logits, an eighth of the [s, b, V/tp] ones


def fused_head_task(seed: int) -> dict:
    """TP=2 GPTModel: per-token loss and embedding gradient, with and without the fused head."""
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from token_objectives.integrations.megatron import cpu_patches
    from token_objectives.integrations.megatron.hook import (
        Objectives,
        attach_objectives,
        detach_objectives,
    )
    from token_objectives.tables.numbers import NumberTable

    cpu_patches.apply()
    groups_before = initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        torch.manual_seed(seed)
        config = TransformerConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
            tensor_model_parallel_size=2, use_cpu_initialization=True, hidden_dropout=0.0,
            attention_dropout=0.0, gradient_accumulation_fusion=False,
            masked_softmax_fusion=False, bias_activation_fusion=False,
            bias_dropout_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        )
        vocab = 128
        model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=vocab,
                         max_sequence_length=16, share_embeddings_and_output_weights=True,
                         position_embedding_type="rope")
        values = torch.full((vocab,), float("nan"))
        values[10:20] = torch.arange(10.0)
        objectives = Objectives(Objective(ObjectiveConfig(ntl="was"),
                                           NumberTable.from_values(values)))
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (2, 16), generator=gen)
        labels = torch.randint(0, vocab, (2, 16), generator=gen)
        labels[:, 3:6] = torch.randint(10, 20, (2, 3), generator=gen)
        position_ids = torch.arange(16).expand(2, 16)
        calls = {"output_layer": 0}
        layer_forward = model.output_layer.forward

        def counted(*args, **kwargs):
            calls["output_layer"] += 1
            return layer_forward(*args, **kwargs)

        model.output_layer.forward = counted
        results = {}
        for fused in (False, True):
            attach_objectives(model, objectives, fused_head=fused)
            model.zero_grad()
            calls["output_layer"] = 0
            loss = model(tokens, position_ids, None, labels=labels)
            loss.sum().backward()
            results[fused] = {
                "loss": loss.detach(),
                "grad": model.embedding.word_embeddings.weight.grad.clone(),
                "output_layer_calls": calls["output_layer"],
            }
            detach_objectives(model)
        attach_objectives(model, objectives, fused_head=True)
        logits = model(tokens, position_ids, None)  # no labels: the real output layer runs
        results["generation_width"] = logits.shape[-1]
        results["rank"] = dist.get_rank()
        return results
    finally:
        destroy_model_parallel(groups_before)


def test_fused_head_skips_the_output_layer_and_matches(pool4):
    for result in pool4.run(fused_head_task, 3):
        plain, fused = result[False], result[True]
        assert plain["output_layer_calls"] == 1 and fused["output_layer_calls"] == 0
        torch.testing.assert_close(fused["loss"], plain["loss"], rtol=1e-5, atol=1e-5)
        # The tied word-embedding shard receives the LM head's gradient in both modes.
        assert plain["grad"].abs().sum() > 0
        torch.testing.assert_close(fused["grad"], plain["grad"], rtol=1e-4, atol=1e-6)
        assert result["generation_width"] == 64  # V/tp logits when there are no labels


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any op returns while active, in bytes (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out


def output_door_task(seed: int, sequence_parallel: bool) -> dict:
    """TP=2 (DP=2) GPTModel with untied embeddings, with and without the fused head, against a
    float64 reference on the gathered hidden states and output weight: the per-token loss, the
    output weight's and the hidden states' gradients, the output layer's calls and the largest
    tensor of forward + backward."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from token_objectives.integrations.megatron import cpu_patches, versions
    from token_objectives.integrations.megatron.hook import Objectives, attach_objectives
    from token_objectives.tables.numbers import NumberTable
    from token_objectives.training.layer_specs import decoder_block_spec

    cpu_patches.apply()
    groups_before = initialize_model_parallel(tensor_model_parallel_size=TP)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = dist.get_rank(tp_group)
    try:
        config = TransformerConfig(
            num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=32,
            tensor_model_parallel_size=TP, sequence_parallel=sequence_parallel,
            use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
            gradient_accumulation_fusion=False, masked_softmax_fusion=False,
            bias_activation_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False,
            apply_rope_fusion=False,
        )
        values = torch.full((VOCAB,), float("nan"))
        values[10:20] = torch.arange(10.0)
        numbers = NumberTable.from_values(values)
        objective_config = ObjectiveConfig(ntl="was")
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        labels[:, 3:6] = torch.randint(10, 20, (BATCH, 3), generator=gen)
        position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
        results = {"door": "output_processor" if versions.has_output_processor() else "replaced"}
        for fused in (False, True):
            torch.manual_seed(seed)
            # torch norms marked for sequence parallelism (megatron-core's refuses it)
            spec = decoder_block_spec(SimpleNamespace(layer_spec="local",
                                                      normalization="LayerNorm"), config)
            model = GPTModel(config, spec, vocab_size=VOCAB,
                             max_sequence_length=SEQ, share_embeddings_and_output_weights=False,
                             position_embedding_type="rope")
            attach_objectives(model, Objectives(Objective(objective_config, numbers),
                                                head_rows_per_chunk=HEAD_ROWS), fused_head=fused)
            calls = []
            model.output_layer.register_forward_hook(lambda *_, calls=calls: calls.append(1))
            captured = {}

            def keep(module, inputs, output, captured=captured):
                output.retain_grad()
                captured["hidden"] = output

            model.decoder.register_forward_hook(keep)
            largest = _LargestTensor()
            with largest:
                loss = model(tokens, position_ids, None, labels=labels)
                loss.sum().backward()
            hidden = captured["hidden"]  # [s, b, h], [s/tp, b, h] under sequence parallelism
            weight = model.output_layer.weight  # [V/tp, h]
            results[fused] = {
                "loss": loss.detach(), "weight_grad": weight.grad.clone(),
                "hidden_grad": hidden.grad.clone(), "output_layer_calls": len(calls),
                "largest_bytes": largest.bytes,
            }
            if not fused:  # the reference, on everything gathered over TP
                shards = [torch.empty_like(weight) for _ in range(TP)]
                dist.all_gather(shards, weight.detach(), group=tp_group)
                full_weight = torch.cat(shards).double().requires_grad_()
                full_hidden = hidden.detach()
                if sequence_parallel:
                    slices = [torch.empty_like(full_hidden) for _ in range(TP)]
                    dist.all_gather(slices, full_hidden, group=tp_group)
                    full_hidden = torch.cat(slices)
                full_hidden = full_hidden.double().requires_grad_()
                logits = full_hidden @ full_weight.T  # [s, b, V]
                ref = reference_objective_loss(logits, labels.T, objective_config, numbers,
                                               seq_dim=0)
                ref.loss.sum().backward()
                rows = VOCAB // TP
                hidden_grad = full_hidden.grad
                if sequence_parallel:
                    hidden_grad = hidden_grad.chunk(TP)[tp_rank]
                results["reference"] = {
                    "loss": ref.loss.detach().T, "hidden_grad": hidden_grad,
                    "weight_grad": full_weight.grad[tp_rank * rows:(tp_rank + 1) * rows],
                }
            if fused:  # no labels: Megatron's own output layer, V/tp wide
                results["generation_width"] = model(tokens, position_ids, None).shape[-1]
        return results
    finally:
        destroy_model_parallel(groups_before)


def _check_output_door(results: list[dict]) -> None:
    logits_bytes = SEQ * BATCH * (VOCAB // TP) * 4
    for result in results:
        ref = result["reference"]
        for fused in (False, True):
            got = result[fused]
            torch.testing.assert_close(got["loss"].double(), ref["loss"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["weight_grad"].double(), ref["weight_grad"],
                                       rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got["hidden_grad"].double(), ref["hidden_grad"],
                                       rtol=1e-4, atol=1e-6)
        plain, fused = result[False], result[True]
        assert plain["output_layer_calls"] == 1
        # 0.16's fused head stands in for the output layer's forward, so the module is still
        # called there; through the output_processor door it is not called at all.
        assert fused["output_layer_calls"] == (0 if result["door"] == "output_processor" else 1)
        # The measure sees the [s, b, V/tp] logits where they exist, and the fused head never
        # holds them: its largest tensor is the weight shard, not a logits chunk.
        assert plain["largest_bytes"] >= logits_bytes, plain["largest_bytes"]
        assert fused["largest_bytes"] < logits_bytes, fused["largest_bytes"]
        assert result["generation_width"] == VOCAB // TP


def test_output_door_at_tp2_equals_float64_without_the_logits(pool4):
    results = pool4.run(output_door_task, 5, False)
    _check_output_door(results)
    import megatron.core as core

    print(f"megatron-core {core.__version__}: door {results[0]['door']}, largest tensor "
          f"{results[0][False]['largest_bytes']} B with logits, {results[0][True]['largest_bytes']}"
          f" B fused")


def test_output_door_under_sequence_parallelism(pool4):
    _check_output_door(pool4.run(output_door_task, 6, True))
