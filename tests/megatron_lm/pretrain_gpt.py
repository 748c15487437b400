"""GPT pretraining through Megatron-LM's own loop (`megatron.training.pretrain`, megatron-core
0.19), with the token objectives added by the three lines marked "token objectives" at the end.

    CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nproc-per-node 2 tests/megatron_lm/pretrain_gpt.py \
        --tensor-model-parallel-size 2 --calculate-per-token-loss \
        --ntl was --objective-tokenizer TOKENIZER ...  (Megatron-LM's GPT flags)

The rest is a plain GPT pretraining script for Megatron-LM 0.19 (data, batch, forward and loss,
written here, short); the flags are Megatron-LM's own plus those of the objectives'
`add_objective_args` (integrations/megatron/hook.py).
Megatron and torch are imported where they are used: the process that Megatron's checkpoint
writer spawns runs this file's top level again, and should start fast.

Test-only parts, marked "test only": on a machine without CUDA the patches of `cpu_cuda.py` are
applied before `pretrain` (none on a GPU); the weights are redrawn as
`launch/pretrain_megatron.py` draws them, so that both loops start from the same model;
PRETRAIN_GPT_NAN_AT=N makes the per-token losses of iteration N NaN.
"""

from __future__ import annotations

import os
from functools import partial

# One micro-batch as the GPTDataset gives it, sent from TP rank 0: name -> torch dtype.
BATCH = {"tokens": "int64", "labels": "int64", "loss_mask": "float32", "position_ids": "int64"}


def get_batch(data_iterator):
    """tokens, labels, loss_mask, position_ids [b, s]: read on TP rank 0, broadcast over TP."""
    import torch
    from megatron.core import mpu
    from megatron.training import get_args

    if not (mpu.is_pipeline_first_stage() or mpu.is_pipeline_last_stage()):
        return None, None, None, None
    args = get_args()
    device = torch.cuda.current_device()
    if mpu.get_tensor_model_parallel_rank() == 0:
        sample = next(data_iterator)
        batch = [sample[name].to(device=device, dtype=getattr(torch, dtype))
                 for name, dtype in BATCH.items()]
    else:
        shape = (args.micro_batch_size, args.seq_length)
        batch = [torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                 for dtype in BATCH.values()]
    for tensor in batch:
        torch.distributed.broadcast(tensor, mpu.get_tensor_model_parallel_src_rank(),
                                    group=mpu.get_tensor_model_parallel_group())
    return batch


def loss_func(loss_mask, output_tensor, model=None):
    """Per-token losses [b, s] -> (masked sum, token count, {"lm loss": [sum, count]}); a NaN
    or Inf sum is reported to Megatron's rerun state machine before anything is reduced."""
    import torch
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    mask = loss_mask.reshape(-1).float()
    loss = (output_tensor.reshape(-1).float() * mask).sum()
    tokens = mask.sum().detach().to(torch.int)
    if get_args().check_for_nan_in_loss_and_grad:
        machine = get_rerun_state_machine()
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(result=loss, rejection_func=reject, tolerance=0.0,
                                    message=f"found {what} in local forward loss calculation",
                                    fatal=True)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}


def forward_step(data_iterator, model):
    from megatron.training import get_args

    tokens, labels, loss_mask, position_ids = get_batch(data_iterator)
    output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    if NAN_AT == get_args().curr_iteration + 1 and output is not None:  # test only
        output = output * float("nan")
    return output, partial(loss_func, loss_mask, model=model)


def datasets_provider(num_samples, vp_stage=None):
    """Megatron-core GPTDatasets (train, valid, test) over --data-path, split by --split."""
    from megatron.core import mpu
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=get_blend_and_blend_per_split(args)[0],
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,  # None is given to the model: its causal mask
    )

    def built_here():  # TP rank 0 of the stages that take tokens or labels reads the batches
        return mpu.get_tensor_model_parallel_rank() == 0 and (
            mpu.is_pipeline_first_stage() or mpu.is_pipeline_last_stage())

    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, built_here, config).build()


datasets_provider.is_distributed = True  # every rank enters the builder (it holds barriers)


# ---------------------------------------------------------------------------------- test only
NAN_AT = int(os.environ.get("PRETRAIN_GPT_NAN_AT", "0"))


def same_init_as_our_loop(models):
    """A pre-wrap hook: the weights `launch/pretrain_megatron.py` starts from (drawn per global
    parameter name, the same at every TP / PP size), so that the two loops compare step by
    step."""
    from types import SimpleNamespace

    from megatron.training import get_args

    from token_objectives.training.megatron import layout_independent_init

    args = get_args()
    cfg = SimpleNamespace(
        model=SimpleNamespace(init_method_std=args.init_method_std, num_layers=args.num_layers,
                              tie_embeddings=not args.untie_embeddings_and_output_weights),
        train=SimpleNamespace(seed=args.seed))
    for model in models:
        layout_independent_init(model, cfg)
    return models


def prepare_test_environment() -> None:
    """Python 3.11 (megatron-core 0.19 asks for 3.12: megatron.training imports
    typing.override), the megatron-core package's prebuilt dataset helpers (Megatron-LM's
    start-up runs `make` on them, and the package has no Makefile), and on a machine without
    CUDA the CPU patches."""
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    from megatron.core.datasets import utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        pass  # a Megatron-LM checkout: its Makefile builds them
    else:
        utils.compile_helpers = lambda: None
    import torch

    if not torch.cuda.is_available():
        import cpu_cuda

        cpu_cuda.apply()


if __name__ == "__main__":
    prepare_test_environment()  # test only
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args

    has_nvidia_modelopt, add_modelopt_args = False, None  # test only (pretrain_gpt.py's import)
    # The lines docs/megatron-lm.md and the README tell users to add, as they are there.
    from token_objectives.integrations.megatron import hook as token_objectives_megatron

    args = parse_and_validate_args(
        extra_args_provider=token_objectives_megatron.chain_args_provider(   # 1: the flags
            add_modelopt_args if has_nvidia_modelopt else None),
        args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},
    )
    loss_func = token_objectives_megatron.wrap_loss_func(loss_func)         # 2: the report
    model_cfg = gpt_config_from_args(args)
    model_cfg.pre_wrap_hooks.append(same_init_as_our_loop)  # test only
    model_cfg.pre_wrap_hooks.append(token_objectives_megatron.attach_to_model_chunks)  # 3: the loss
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), datasets_provider,
             ModelType.encoder_or_decoder, forward_step)
