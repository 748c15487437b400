"""Pretrain a Hugging Face Llama under DeepSpeed with CE + NTL + PDL. Start it with torchrun or
the `deepspeed` launcher:

    torchrun --nproc-per-node 2 launch/pretrain_deepspeed.py --config configs/deepspeed/tiny.yaml \
        --deepspeed_config configs/deepspeed/zero2.json --ds-set bf16.enabled=false \
        --set train.steps=50

The YAML run config is the Megatron loop's (steps, intervals, data, output, objectives, and
model.hf_config for the Llama); `--set section.key=value` overrides one. The ds_config holds what
DeepSpeed's engine reads (ZeRO, batch sizes, optimizer, bf16, AutoTP); `--ds-set KEY=VALUE`
overrides one (dotted key, JSON value). A setting made in both files is an error naming both.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one run-config value")
    parser.add_argument("--ds-set", dest="ds_overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override one ds_config value, e.g. "
                        "bf16.enabled=false")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="set by the deepspeed launcher")
    import deepspeed

    args = deepspeed.add_config_arguments(parser).parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (see configs/deepspeed/)")
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
    from token_objectives.training.config import load_config
    from token_objectives.training.deepspeed import (
        CHECKPOINTS,
        check_run_config,
        load_ds_config,
        run,
    )

    try:  # a bad config or two files that disagree: one line, before the process group
        config = load_config(args.config, args.overrides)
        ds_config = load_ds_config(args.deepspeed_config, args.ds_overrides)
        resuming = (Path(config.output.dir) / CHECKPOINTS / "latest").is_file()
        check_run_config(config, ds_config, resuming=resuming)
    except (ValueError, OSError) as error:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    from token_objectives.training.loop import finish_distributed

    result = run(config, ds_config)
    finish_distributed()
    return 0 if result.last_step > 0 or result.stopped_by_signal else 1


if __name__ == "__main__":
    raise SystemExit(main())
