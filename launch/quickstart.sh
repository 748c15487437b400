#!/usr/bin/env bash
# The quickstart: install, build a number-rich corpus + tokenizer + token-frequency table locally,
# then pretrain the tiny GPT at TP=2 on CPU (gloo) with CE + NTL + PDL, logging to TensorBoard.
# Extra arguments go to the training script, e.g. --set train.steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_torch.sh
python3 -m pip install --quiet -e ".[megatron]"
python3 -m token_objectives.quickstart.build_data --output-dir data/quickstart
run_dir="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
torchrun --nproc-per-node 2 --master-port "${MASTER_PORT:-29517}" launch/pretrain_megatron.py \
    --config configs/tiny.yaml --set output.dir="$run_dir" "$@"
python3 -m token_objectives.training.metrics_summary "$run_dir/metrics.jsonl"
echo "TensorBoard: tensorboard --logdir $run_dir/tensorboard"
