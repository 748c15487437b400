"""Pretrain a megatron-core GPT with CE + NTL + PDL. Start it with torchrun (or srun + torchrun):

    torchrun --nproc-per-node 2 launch/pretrain_megatron.py --config configs/tiny.yaml \
        --set parallel.tensor=2 --set train.steps=50

Every setting lives in the YAML config; `--set section.key=value` overrides one. CE only is
`--set objectives.ntl=null --set objectives.pdl_alpha=0`.
"""

from __future__ import annotations

import argparse
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
    from token_objectives.training.loop import finish_distributed
    from token_objectives.training.megatron import run

    result = run(load_config(args.config, args.overrides))
    finish_distributed()
    return 0 if result.last_step > 0 or result.stopped_by_signal else 1


if __name__ == "__main__":
    raise SystemExit(main())
