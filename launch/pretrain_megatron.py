"""Pretrain a megatron-core GPT with CE + NTL + PDL. Start it with torchrun (or srun + torchrun):

    torchrun --nproc-per-node 2 launch/pretrain_megatron.py --config configs/tiny.yaml \
        --set parallel.tensor=2 --set train.steps=50

Every setting lives in the YAML config; `--set section.key=value` overrides one. CE only is
`--set objectives.ntl=null --set objectives.pdl_alpha=0`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value")
    args = parser.parse_args(argv)
    # Imported here, not at the top: the checkpoint writer's helper process (spawned, so it
    # re-reads this file) then starts without torch and megatron-core.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
    from token_objectives.training.config import load_config

    try:  # a bad config: one line naming the key, before torch and the process group
        config = load_config(args.config, args.overrides)
    except (ValueError, OSError) as error:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    from token_objectives.training.loop import finish_distributed
    from token_objectives.training.megatron import run

    result = run(config)
    finish_distributed()
    return 0 if result.last_step > 0 or result.stopped_by_signal else 1


if __name__ == "__main__":
    raise SystemExit(main())
