"""The GPTModel hook in real gloo processes: the objectives on the vocab-sharded logits, and the
fused LM head that skips the output layer."""

from __future__ import annotations

import torch

from token_objectives import ObjectiveConfig


def fused_head_task(seed: int) -> dict:
    """TP=2 GPTModel: per-token loss and embedding gradient, with and without the fused head."""
    import torch.distributed as dist
    from megatron.core import parallel_state
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
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
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
        objectives = Objectives(ObjectiveConfig(ntl="was"), NumberTable.from_values(values))
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
        parallel_state.destroy_model_parallel()


def test_fused_head_skips_the_output_layer_and_matches(pool4):
    for result in pool4.run(fused_head_task, 3):
        plain, fused = result[False], result[True]
        assert plain["output_layer_calls"] == 1 and fused["output_layer_calls"] == 0
        torch.testing.assert_close(fused["loss"], plain["loss"], rtol=1e-5, atol=1e-5)
        # The tied word-embedding shard receives the LM head's gradient in both modes.
        assert plain["grad"].abs().sum() > 0
        torch.testing.assert_close(fused["grad"], plain["grad"], rtol=1e-4, atol=1e-6)
        assert result["generation_width"] == 64  # V/tp logits when there are no labels
