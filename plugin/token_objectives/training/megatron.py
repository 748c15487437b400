"""Pretraining a megatron-core GPTModel with the objectives: TP, PP and DP, checkpoints, logs.

`run(config)` is the loop `launch/pretrain_megatron.py` starts under torchrun; tests call it in
processes that already hold a gloo process group. Built from megatron-core pieces: parallel_state,
GPTModel (the Transformer Engine layer spec when it imports, else the local one), GPTDataset,
DistributedDataParallel, the Megatron optimizer (distributed or not) and its LR scheduler,
get_forward_backward_func, finalize_model_grads and dist_checkpointing.

Normalisation: the config sets calculate_per_token_loss, so `loss_func` returns sums and token
counts; the schedule adds up the counts over micro-batches and finalize_model_grads divides the
gradients by the GLOBAL count (all-reduced over DP).

Batch-scheduled sampling (the `scheduled_sampling` section, docs/sampling.md): when p > 0, a
no-grad forward-only pass of megatron-core's schedule over the step's ground-truth micro-batches
gives the vocab-sharded logits on the last stage, `ScheduledSampler.predict` turns them into ids
(one TP all-reduce, no vocab gather), the ids are broadcast from the last to every pipeline stage
(PP > 1), and the training pass runs on the mixed inputs. With p = 0 that pass is skipped.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import re
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from token_objectives.integrations.megatron import cpu_patches, versions, writer_queue
from token_objectives.integrations.megatron.hook import Objectives, attach_objectives, loss_func
from token_objectives.objectives.components import COMPONENT_NAMES
from token_objectives.scheduled_sampling.mix import ScheduledSampler, sample_indices
from token_objectives.tables.tokenizers import tokenizer_identity
from token_objectives.training import checkpointing, run_stamp
from token_objectives.training.config import RunConfig, padded_vocab_size
from token_objectives.training.gpt_data import (
    MegatronTokenizer,
    Repeated,
    gpt_dataset,
    micro_batches,
)
from token_objectives.training.layer_specs import decoder_block_spec
from token_objectives.training.loop import (
    RunResult,
    SkippedSteps,
    StepRecord,
    check_gradients,
    check_losses,
    format_step,
    run_loop,
)
from token_objectives.training.metrics import MetricsWriter, SummaryWriterSink

StepLog = StepRecord  # values: report name -> sum / count over the global batch
format_log = format_step


def init_distributed() -> None:
    """torchrun's environment -> a default process group (gloo without a GPU)."""
    if dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # CUDA tensors over NCCL; the few CPU flags and counters over gloo.
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))


def transformer_config(cfg: RunConfig, initialize: bool = True):
    from megatron.core.transformer import TransformerConfig

    model, parallel = cfg.model, cfg.parallel
    if model.num_attention_heads % parallel.tensor:
        raise ValueError(
            f"tensor-parallel size {parallel.tensor} does not divide the "
            f"{model.num_attention_heads} attention heads; choose parallel.tensor among the "
            f"divisors of model.num_attention_heads"
        )
    groups = model.num_query_groups or model.num_attention_heads
    if groups % parallel.tensor:
        raise ValueError(
            f"tensor-parallel size {parallel.tensor} does not divide the {groups} query groups"
        )
    if parallel.sequence_parallel and model.seq_length % parallel.tensor:
        raise ValueError(
            f"parallel.sequence_parallel splits model.seq_length {model.seq_length} over "
            f"parallel.tensor {parallel.tensor} ranks, which does not divide it"
        )
    if model.num_layers % parallel.pipeline:
        raise ValueError(
            f"pipeline-parallel size {parallel.pipeline} does not divide {model.num_layers} layers"
        )
    dtype = torch.bfloat16 if model.dtype == "bf16" else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=model.dtype == "bf16",
        sequence_parallel=parallel.sequence_parallel,
        gradient_accumulation_fusion=False,
        # The full weight is drawn on the CPU and then split: the same weights at every TP size.
        use_cpu_initialization=True,
        perform_initialization=initialize,
        calculate_per_token_loss=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,  # its CUDA kernel comes with Apex, not with megatron-core
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        **recompute_options(model.recompute_mode),
    )


def recompute_options(mode: str) -> dict:
    """TransformerConfig options of model.recompute: selective recomputes core attention (the
    [b, a/t, s, s] scores), full recomputes every layer from its input."""
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {"recompute_granularity": None}


def build_model(cfg: RunConfig, vocab_size: int, objectives: Objectives | None,
                initialize: bool = True):
    """One GPTModel chunk for this pipeline stage; the objectives attached on the last stage."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(cfg, initialize)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(cfg.model, config),
        vocab_size=vocab_size,
        max_sequence_length=cfg.model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rotary_base),
        parallel_output=True,
    )
    if initialize:
        layout_independent_init(model, cfg)
    if model.post_process and objectives is not None:
        attach_objectives(model, objectives, fused_head=cfg.model.fused_lm_head)
    return model


_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")


def layout_independent_init(model, cfg: RunConfig) -> None:
    """Redraw every weight matrix from a generator seeded by its GLOBAL name, so that a model
    starts from the same weights at every TP and PP size (megatron-core's own CPU init is
    TP-independent, but draws the layers of each pipeline stage from a different stream).

    Same distributions as megatron-core: N(0, std), and std / sqrt(2 * layers) for the output
    projections (linear_proj, linear_fc2). Norm weights (1-D) keep their ones.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    std = cfg.model.init_method_std
    scaled = std / math.sqrt(2.0 * cfg.model.num_layers)
    offset = get_transformer_layer_offset(model.config)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        if param.dim() != 2:
            continue
        global_name = _LAYER.sub(lambda m: f"{m[1]}{int(m[2]) + offset}{m[3]}", name)
        if global_name == "output_layer.weight" and cfg.model.tie_embeddings:
            global_name = "embedding.word_embeddings.weight"  # the last stage's tied copy
        sigma = scaled if global_name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
        shape = list(param.shape)
        dim = getattr(param, "partition_dim", 0)
        split = getattr(param, "tensor_model_parallel", False) and tp_size > 1
        if split:
            shape[dim] *= tp_size
        seed = int.from_bytes(hashlib.sha256(f"{cfg.train.seed}:{global_name}".encode())
                              .digest()[:8], "little") & (2**63 - 1)
        full = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * sigma
        if split:  # the layout of megatron-core's _initialize_affine_weight_cpu
            stride = getattr(param, "partition_stride", 1)
            pieces = torch.split(full, shape[dim] // (tp_size * stride), dim=dim)
            full = torch.cat(pieces[tp_rank::tp_size], dim=dim)
        with torch.no_grad():
            param.copy_(full.to(param.dtype))


def forward_step(data_iterator, model, reports_per_step: int = 1):
    """reports_per_step: the micro-batches x DP ranks of a step, for loss_func's counts."""
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {key: value.cuda(non_blocking=True) for key, value in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"], reports_per_step=reports_per_step)


def _reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Sum the [sum, count] pairs over micro-batches and DP ranks; value = sum / count."""
    from megatron.core import parallel_state

    if not reports:
        return {}
    names = sorted(reports[0])
    totals = torch.stack([torch.stack([r[name].float() for r in reports]).sum(0) for name in names])
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return report_values(dict(zip(names, totals, strict=True)))


def report_values(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """name -> sum / count from the global [sum, count] pairs; 0.0 where the count is 0.

    loss_func's pairs count only what exists ("ntl" counts number tokens), so a step without
    any number token has "ntl" = [0, 0]: it logs 0, not NaN and not a diluted mean.
    """
    if not totals:
        return {}
    pairs = torch.stack([t.float() for t in totals.values()]).tolist()  # one host sync
    return {name: total / count if count > 0 else 0.0
            for name, (total, count) in zip(totals, pairs, strict=True)}


def _broadcast_from_last_stage(values: dict[str, float], names: list[str]) -> dict[str, float]:
    """Every rank gets the last pipeline stage's logged values (for the logger and tests)."""
    from megatron.core import parallel_state

    last = parallel_state.is_pipeline_last_stage()
    vector = torch.tensor([values.get(n, 0.0) if last else 0.0 for n in names],
                          dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(vector, group=parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(names, vector.tolist(), strict=True))


REPORT_NAMES = list(COMPONENT_NAMES)  # loss_func's report: "lm loss" and the components


def tensorboard_scalars(log: StepRecord) -> list[tuple[str, float]]:
    """The TensorBoard tags of a step: loss/<report name>, sampling/..., train/..."""
    return [*((f"loss/{name}", value) for name, value in log.values.items()),
            *log.sampling.items(), ("train/lr", log.lr), ("train/grad_norm", log.grad_norm),
            ("train/tokens_per_s", log.tokens_per_s), *log.evaluation.items()]


class Trainer:
    """Holds the model chunks, optimizer, scheduler and data of one run; `loop.run_loop` runs it.
    """

    def __init__(self, cfg: RunConfig) -> None:
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg = cfg
        init_distributed()
        if cfg.model.hf_config is not None and dist.get_rank() == 0:
            warnings.warn(f"model.hf_config = {cfg.model.hf_config!r} is not read by the Megatron "
                          f"loop: its GPT is the model section's shape (model.num_layers, ...); "
                          f"hf_config is the DeepSpeed loop's model", stacklevel=2)
        if cpu_patches.needed():
            cpu_patches.apply()
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor,
            pipeline_model_parallel_size=cfg.parallel.pipeline,
        )
        torch.manual_seed(cfg.train.seed)
        if torch.cuda.is_available():
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        mbs = cfg.parallel.micro_batch_size
        global_batch = cfg.parallel.global_batch_size or mbs * self.dp_size
        if global_batch % (mbs * self.dp_size):
            raise ValueError(
                f"global_batch_size {global_batch} is not a multiple of micro_batch_size {mbs} x "
                f"data-parallel size {self.dp_size}"
            )
        self.global_batch = global_batch
        self.num_micro = global_batch // (mbs * self.dp_size)

        if cfg.data.tokenizer is None:
            raise ValueError("data.tokenizer is not set: point it at a local tokenizer")
        self.tokenizer = MegatronTokenizer(cfg.data.tokenizer)
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        self.vocab_size = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                                            cfg.parallel.tensor)
        objectives = Objectives.build(
            cfg.objectives,
            padded_vocab_size=self.vocab_size,
            tokenizer=self.tokenizer._tokenizer,
            number_tokens=cfg.data.number_tokens,
            frequencies_path=cfg.data.frequencies,
        )
        self.sampler = None
        if cfg.scheduled_sampling.enabled:
            self.sampler = ScheduledSampler(cfg.scheduled_sampling, cfg.train.seed,
                                            self.tokenizer.eod,
                                            real_vocab=self.tokenizer.vocab_size,
                                            pad_id=self.tokenizer.pad)
        module = build_model(cfg, self.vocab_size, objectives)
        if torch.cuda.is_available():
            module.cuda(torch.cuda.current_device())  # built on the CPU (use_cpu_initialization)
        config = module.config
        parallel = cfg.parallel
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce,
            overlap_param_gather=parallel.overlap_param_gather,
            use_distributed_optimizer=parallel.use_distributed_optimizer,
            check_for_nan_in_grad=True)
        self.model = DistributedDataParallel(config, ddp_config, module)
        self._reports: list[dict] = []  # this step's loss reports, as the schedule makes them
        self._values: dict[str, float] | None = None

        def finalize(*args, **kwargs) -> None:
            # The loss is checked before megatron-core reduces the gradients, whose own NaN
            # check would otherwise stop the run first without naming the component.
            self._values = self._checked_values()
            try:
                finalize_model_grads(*args, **kwargs)
            except RuntimeError as error:
                # megatron-core's check says "iteration -1 ... found NaN in local grad norm":
                # no step, no cause, no fix. The loss was finite (checked above).
                if "in local grad norm" not in str(error):
                    raise
                losses = ", ".join(f"{name} {value:.4g}" for name, value in self._values.items())
                raise FloatingPointError(
                    f"step {self.step + 1}: a gradient is NaN or inf while the loss is finite "
                    f"({losses}); the update was not applied. The backward pass overflowed "
                    f"(bf16 / a custom op) or the data holds an extreme sample: resume from the "
                    f"last checkpoint with a lower train.lr and train.resume_schedule override"
                ) from error

        config.finalize_model_grads_func = finalize
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=cfg.train.lr, min_lr=cfg.train.min_lr,
                            weight_decay=cfg.train.weight_decay, adam_beta1=cfg.train.adam_beta1,
                            adam_beta2=cfg.train.adam_beta2, clip_grad=cfg.train.clip_grad,
                            bf16=cfg.model.dtype == "bf16", params_dtype=config.params_dtype,
                            use_distributed_optimizer=parallel.use_distributed_optimizer,
                            overlap_param_gather=parallel.overlap_param_gather),
            [self.model],
        )
        steps = cfg.train.steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.train.lr, min_lr=cfg.train.min_lr,
            lr_warmup_steps=cfg.train.warmup_steps * global_batch,
            lr_decay_steps=max(steps, 1) * global_batch, lr_decay_style=cfg.train.lr_decay_style,
            start_wd=cfg.train.weight_decay, end_wd=cfg.train.weight_decay,
            wd_incr_steps=max(steps, 1) * global_batch, wd_incr_style="constant",
        )
        out = Path(cfg.output.dir)
        self.checkpoint_root = out / "checkpoints"
        # One seeded epoch, repeated: the samples of a step do not depend on train.steps.
        self.dataset = Repeated(gpt_dataset(cfg.data.train_prefix, cfg.model.seq_length,
                                            cfg.train.seed, self.tokenizer, None,
                                            out / "data_cache"))
        self.stamp = run_stamp.megatron_stamp(
            cfg, self.vocab_size, global_batch,
            # The table hashed the vocabulary already; hashing 128k entries again costs start-up.
            objectives.numbers.tokenizer_identity if objectives.numbers is not None
            else tokenizer_identity(self.tokenizer._tokenizer),
            self.dp_size)
        self.step = 0
        self.skipped = SkippedSteps(cfg.train.max_skipped_steps, "train.max_skipped_steps")
        logging = self._is_logging_rank()
        sink = None
        if cfg.output.tensorboard and logging:
            sink = SummaryWriterSink(out / "tensorboard")
        self.metrics = MetricsWriter(out / "metrics.jsonl", logging, sink, tensorboard_scalars)
        self.device = torch.device("cpu")  # the signal flag goes over gloo
        self.print_rank = dist.get_world_size() - 1
        self.eval_problems = None
        if cfg.train.eval_interval:
            from token_objectives.evaluation.problems import read_problems

            self.eval_problems = read_problems(cfg.data.eval_data)  # a bad file fails now

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Collective over the run (PP = 1): greedy answers to data.eval_data, scored.

        Each DP replica answers its share of the problems (every `dp_size`-th one); the TP
        ranks of a replica answer the same ones together (a TP all-reduce per new token). The
        answers are gathered over DP, so every rank returns the same "eval/<metric>" values;
        the logging rank also writes the full report to output.dir/eval/step_N.json.
        """
        from megatron.core import parallel_state

        from token_objectives.evaluation.generate import MegatronGenerator
        from token_objectives.evaluation.metrics import METRICS
        from token_objectives.evaluation.report import build_report, write_report

        cfg, problems = self.cfg, self.eval_problems
        if cfg.parallel.overlap_param_gather:  # the last update's gather would come later
            self.model.start_param_sync(force_sync=True)
        tp_group = (parallel_state.get_tensor_model_parallel_group()
                    if parallel_state.get_tensor_model_parallel_world_size() > 1 else None)
        generator = MegatronGenerator(self.model.module, self.tokenizer._tokenizer,
                                      self.tokenizer.eod, self.tokenizer.vocab_size,
                                      cfg.model.seq_length, tp_group)
        mine = list(range(self.dp_rank, len(problems), self.dp_size))
        texts = generator.generate([problems[i].prompt for i in mine],
                                   cfg.train.eval_max_new_tokens, cfg.train.eval_batch_size)
        shares: list = [None] * self.dp_size
        dist.all_gather_object(shares, (mine, texts),
                               group=parallel_state.get_data_parallel_group())
        generations = [""] * len(problems)
        for indices, answers in shares:
            for index, text in zip(indices, answers, strict=True):
                generations[index] = text
        report = build_report(problems, generations, {"data": cfg.data.eval_data,
                                                      "step": self.step})
        if self._is_logging_rank():
            out = Path(cfg.output.dir) / "eval"
            out.mkdir(parents=True, exist_ok=True)
            write_report(out / f"step_{self.step:07d}.json", report)
        return {f"eval/{name}": report["metrics"][name] for name in METRICS}

    @staticmethod
    def _is_logging_rank() -> bool:
        from megatron.core import parallel_state

        return (parallel_state.is_pipeline_last_stage()
                and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)

    # ------------------------------------------------------------------ checkpoints
    def _sharded_state(self, is_loading: bool = False) -> dict:
        model_state = self.model.module.sharded_state_dict()
        return {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                           **self._optimizer_state_options()),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def _optimizer_state_options(self) -> dict:
        """The distributed optimizer saves each rank's own shard of its buffers
        ('dp_reshardable': no gather, no copy; a resume may change DP but not TP or PP)."""
        if not self.cfg.parallel.use_distributed_optimizer:
            return {}
        return {"metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}

    def save(self) -> Path:
        writer_queue.keep_writer_queue_through_signals()  # before the first save starts it
        if self.cfg.parallel.overlap_param_gather:
            # The last update's all-gather would wait for the next forward: the saved weights
            # would be the previous step's outside this rank's shard.
            self.model.start_param_sync(force_sync=True)
        return checkpointing.save(self._sharded_state(), self.checkpoint_root, self.step,
                                  keep=self.cfg.train.keep_checkpoints,
                                  extra_files=run_stamp.stamp_files(self.stamp))

    def resume(self) -> int | None:
        """Load the latest complete checkpoint whose files match its manifest, if there is one;
        returns its step. A corrupt one is reported and skipped (train.on_corrupt_checkpoint
        "fallback") or stops the run ("stop")."""
        policy = self.cfg.train.on_corrupt_checkpoint
        checkpointing.check_policy(policy)
        below = None
        while True:
            latest = checkpointing.latest_complete_step(self.checkpoint_root, below=below)
            found = torch.tensor([-1 if latest is None else latest])
            dist.all_reduce(found, op=dist.ReduceOp.MIN)  # every rank must see the same one
            if found.item() < 0:
                return None
            step = int(found.item())
            directory = checkpointing.step_dir(self.checkpoint_root, step)
            problem = checkpointing.agreed_problem(directory)
            if problem is None:
                break
            earlier = checkpointing.latest_complete_step(self.checkpoint_root, below=step)
            checkpointing.handle_corrupt(
                directory, problem, policy,
                None if earlier is None else checkpointing.step_dir(self.checkpoint_root, earlier),
                "Move it aside to resume from the previous complete checkpoint, or set "
                "train.on_corrupt_checkpoint=fallback to do so automatically")
            below = step
        train = self.cfg.train
        found = run_stamp.check_resume(directory, self.stamp, train.resume_schedule,
                                       train.resume_objectives, "train.resume_schedule",
                                       "train.resume_objectives")
        override = found is not None and bool(found.schedule) and \
            train.resume_schedule == "override"
        if found is not None:
            self.stamp = found.effective(self.stamp, train.resume_schedule)
        state = checkpointing.load(self._sharded_state(is_loading=True), self.checkpoint_root,
                                   step)
        self.model.module.load_state_dict(state["model"])
        saved_schedule = found.saved["schedule"] if found is not None and found.schedule else None
        versions.load_optimizer_state(
            self.optimizer, state["optimizer"],
            None if saved_schedule is None else (saved_schedule["train.lr"],
                                                 saved_schedule["train.min_lr"]))
        if override:  # the groups came back with the checkpoint's betas and per-group lr range
            for group in self.optimizer.param_groups:
                group["betas"] = (train.adam_beta1, train.adam_beta2)
                group.update({key: value for key, value in (("max_lr", train.lr),
                                                            ("min_lr", train.min_lr))
                              if key in group})
        # megatron-core takes max/min lr, warm-up and decay from the checkpoint unless told to
        # override them (use_checkpoint_opt_param_scheduler is its default).
        self.scheduler.override_opt_param_scheduler = override
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        return self.step

    # ------------------------------------------------------------------ scheduled sampling
    def scheduled_inputs(self, batches: list[dict]) -> tuple[list[dict], dict[str, float]]:
        """This step's micro-batches with scheduled-sampling inputs, and the values to log.

        p = 0 (warm-up, max_p 0): the batches come back untouched and no pass runs.
        Collectives when p > 0: those of a forward-only pass, one TP all-reduce per
        micro-batch on the last stage, one PP broadcast (PP > 1), one DP all-reduce (counts).
        """
        from megatron.core import parallel_state

        ids = sample_indices(self.step, self.cfg.parallel.micro_batch_size, self.dp_rank,
                             self.dp_size, self.num_micro)
        return self.sampler.mix_step(batches, self.step, list(ids), self._predict,
                                     parallel_state.get_data_parallel_group())

    def _predict(self, batches: list[dict], ids: torch.Tensor) -> list[torch.Tensor]:
        """Predicted ids [mbs, s] per micro-batch, on every pipeline stage."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        tp_group = (parallel_state.get_tensor_model_parallel_group()
                    if parallel_state.get_tensor_model_parallel_world_size() > 1 else None)
        step = self.step

        def predict_step(data_iterator, model):
            batch, sample_ids = next(data_iterator)
            if torch.cuda.is_available():
                batch = {key: value.cuda(non_blocking=True) for key, value in batch.items()}
            # Without labels the model returns the logits [b, s, V/tp] (last stage) or the
            # hidden states (other stages); the fused LM head is bypassed then.
            output = model(batch["tokens"], batch["position_ids"], None)

            def choose(logits, non_loss_data=True):
                return self.sampler.predict(logits, tp_group, step, sample_ids)

            return output, choose

        cfg = self.cfg
        # eval(): the prediction is the model's inference behaviour (no dropout). The configs
        # here have no dropout, so the choice only matters for models that do.
        self.model.eval()
        try:
            with torch.no_grad():
                chosen = get_forward_backward_func()(
                    forward_step_func=predict_step,
                    data_iterator=iter(list(zip(batches, ids, strict=True))),
                    model=[self.model],
                    num_microbatches=self.num_micro,
                    seq_length=cfg.model.seq_length,
                    micro_batch_size=cfg.parallel.micro_batch_size,
                    forward_only=True,
                    collect_non_loss_data=True,
                )
        finally:
            self.model.train()
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return chosen
        shape = (self.num_micro, cfg.parallel.micro_batch_size, cfg.model.seq_length)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        stacked = (torch.stack(chosen) if parallel_state.is_pipeline_last_stage()
                   else torch.empty(shape, dtype=torch.int64, device=device))
        dist.broadcast(stacked, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return list(stacked.unbind(0))

    # ------------------------------------------------------------------ training
    def _forward_step(self, data_iterator, model):
        """forward_step, with each micro-batch's loss report kept for `_checked_values`."""
        output, loss = forward_step(data_iterator, model, self.num_micro * self.dp_size)

        def recorded(output_tensor):
            result = loss(output_tensor)
            self._reports.append(result[2])
            return result

        return output, recorded

    def _checked_values(self) -> dict[str, float]:
        """Collective (DP all-reduce, PP all-reduce, one host sync): the step's logged values
        from the kept reports; raises FloatingPointError on every rank when one is not finite,
        before the gradients are reduced and the optimizer steps."""
        reports, self._reports = self._reports, []
        values = _broadcast_from_last_stage(_reduce_reports(reports) if reports else {},
                                            REPORT_NAMES)
        check_losses(self.step + 1, values, "a lower train.lr")
        return values

    def train_step(self) -> StepRecord:
        """One optimizer step over the global batch. Raises FloatingPointError, the update not
        applied, when a loss component or the gradient norm is not finite, and after
        train.max_skipped_steps updates in a row that the optimizer skipped."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.cfg
        start = time.perf_counter()
        batches = micro_batches(self.dataset, self.step, cfg.parallel.micro_batch_size,
                                self.dp_rank, self.dp_size, self.num_micro)
        sampling = {}
        if self.sampler is not None:
            batches, sampling = self.scheduled_inputs(list(batches))
            batches = iter(batches)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._reports, self._values = [], None
        get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=batches,
            model=[self.model],
            num_microbatches=self.num_micro,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.parallel.micro_batch_size,
            forward_only=False,
        )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        # Checked before the gradients are reduced (in finalize), so that a NaN loss stops every
        # rank with the optimizer untouched, whether the gradients are finite or not.
        values = self._values if self._values is not None else self._checked_values()
        applied, grad_norm, _ = self.optimizer.step()
        check_gradients(self.step + 1, grad_norm is None or math.isfinite(grad_norm),
                        f"the gradient norm is {grad_norm}", "a lower train.lr or clip_grad")
        self.skipped.record(self.step + 1, bool(applied))
        self.scheduler.step(increment=self.global_batch)
        elapsed = time.perf_counter() - start
        self.step += 1
        tokens = self.global_batch * cfg.model.seq_length
        record = StepRecord(self.step, values, lr, float(grad_norm or 0.0), tokens / elapsed,
                            sampling)
        if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
            record.evaluation = self.evaluate()
        return record

    def close(self) -> None:
        self.metrics.close()


def count_parameters(cfg: RunConfig) -> int:
    """Parameters of the model `cfg` describes, built on the meta device (nothing allocated).

    Needs an initialised default process group; sets up TP = PP = 1 model parallelism.
    """
    from megatron.core import parallel_state

    if cpu_patches.needed():
        cpu_patches.apply()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    one_rank = RunConfig(model=cfg.model, parallel=type(cfg.parallel)(tensor=1, pipeline=1))
    vocab = padded_vocab_size(cfg.model.vocab_size or 0, cfg.model.make_vocab_size_divisible_by, 1)
    with torch.device("meta"):
        model = build_model(one_rank, vocab, None, initialize=False)
    parallel_state.destroy_model_parallel()
    return sum(p.numel() for p in model.parameters())


def run(cfg: RunConfig, stop_after: int | None = None, printer=print) -> RunResult:
    """Train to cfg.train.steps (or `stop_after` more steps), resuming from the latest complete
    checkpoint; saves every save_interval steps, at the end, and on SIGUSR1/SIGTERM."""
    train = cfg.train
    return run_loop(lambda: Trainer(cfg), train.steps, train.save_interval, train.log_interval,
                    stop_after, train.exit_interval, printer)
