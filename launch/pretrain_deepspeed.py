"""Pretrain a Hugging Face Llama under DeepSpeed with CE + NTL + PDL. Start it with torchrun or
the `deepspeed` launcher:

    torchrun --nproc-per-node 2 launch/pretrain_deepspeed.py \
        --deepspeed_config configs/deepspeed/zero2.json \
        --model-config configs/deepspeed/tiny_llama.json \
        --data-prefix data/quickstart/train_text_document --output-dir runs/ds_tiny \
        --steps 50 --ds-set bf16.enabled=false

The objectives are the ds_config's "token_objectives" section; `--ds-set KEY=VALUE` overrides
any ds_config value (dotted key, JSON value).
"""

from __future__ import annotations

import argparse
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex")

from token_objectives.training.deepspeed import TrainArgs, load_ds_config, run  # noqa: E402
from token_objectives.training.loop import finish_distributed  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    import deepspeed

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", required=True, help="LlamaConfig JSON (local)")
    parser.add_argument("--data-prefix", required=True, help="Megatron .bin/.idx path prefix")
    parser.add_argument("--output-dir", required=True,
                        help="checkpoints/, metrics.jsonl and tensorboard/ go here")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in all")
    parser.add_argument("--save-interval", type=int, default=0,
                        help="save every N steps (0: only at the end and on SIGUSR1/SIGTERM)")
    parser.add_argument("--seed", type=int, default=1234, help="weights and data order")
    parser.add_argument("--seq-length", type=int, default=128, help="tokens per sample")
    parser.add_argument("--max-skipped-steps", type=int, default=10,
                        help="stop after N updates in a row that DeepSpeed skipped (fp16 loss "
                        "scale overflows); 0: never")
    parser.add_argument("--on-corrupt-checkpoint", choices=("fallback", "stop"),
                        default="fallback",
                        help="a tag whose files do not match its MANIFEST.json: resume from the "
                        "previous tag (fallback) or stop with the fix (stop)")
    parser.add_argument("--resume-schedule", choices=("refuse", "override", "checkpoint"),
                        default="refuse",
                        help="a resume whose optimizer params, scheduler or --steps differ "
                        "from the checkpoint's: refuse with the changed keys (default), "
                        "override (the ds_config's from the resumed step on; Megatron-LM's "
                        "--override-opt_param-scheduler) or checkpoint (the checkpoint's; "
                        "--use-checkpoint-opt_param-scheduler)")
    parser.add_argument("--resume-objectives", choices=("refuse", "override"),
                        default="refuse",
                        help="a resume with another token_objectives section, tokenizer or "
                        "frequency file than the checkpoint's: refuse (default) or override "
                        "(train on with the new ones)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each decoder layer in backward (activation memory of "
                        "one layer instead of all; the 3B configs need it at sequence 4096)")
    parser.add_argument("--ds-set", dest="ds_overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one ds_config value, e.g. "
                        "bf16.enabled=false or token_objectives.ntl_weight=0.5")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="set by the deepspeed launcher")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (see configs/deepspeed/)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = run(TrainArgs(
        model_config=args.model_config,
        data_prefix=args.data_prefix,
        ds_config=load_ds_config(args.deepspeed_config, args.ds_overrides),
        output_dir=args.output_dir,
        steps=args.steps,
        save_interval=args.save_interval,
        seed=args.seed,
        seq_length=args.seq_length,
        max_skipped_steps=args.max_skipped_steps,
        on_corrupt_checkpoint=args.on_corrupt_checkpoint,
        gradient_checkpointing=args.gradient_checkpointing,
        resume_schedule=args.resume_schedule,
        resume_objectives=args.resume_objectives,
    ))
    finish_distributed()
    return 0 if result.last_step > 0 or result.stopped_by_signal else 1


if __name__ == "__main__":
    raise SystemExit(main())
