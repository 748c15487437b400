#!/usr/bin/env bash
# One prepared GPU run, under 8 minutes on one GPU, no network. Run it from the repository root
# after the install (pip install -e ".[megatron]" with a CUDA torch), on a lent GPU:
#   bash scripts/gpu_check.sh [OUT_DIR]          # figures land in OUT_DIR (default runs/gpu_check)
# Steps (each logged to OUT_DIR/<step>.log; the script exits non-zero when one fails):
#   1. check-kernels for this GPU's architecture (registers, spills, SASS per element)
#   2. the kernels against the torch stages and float64 at T = 8k-64k, V = 32k-128k, bf16, real
#      widths not a multiple of 16, a 2^31+ element logits, and no host sync
#      (python -m token_objectives.bench.gpu_check)
#   3. bench: time against Megatron's CE and fused CE, GB/s and its share of the peak, with NTL
#      (ours) and CE alone (megatron*), fused vs unfused head
#   4. a few Megatron-loop steps of a 2-layer model of the 3B shape, Triton kernels and torch
#      stages, the same losses
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "${OUT}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${OUT}/triton_cache}
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== ${name} (limit ${limit} s)"
    local start=${SECONDS}
    if timeout "${limit}" "$@" >"${OUT}/${name}.log" 2>&1; then
        echo "   ok in $(( SECONDS - start )) s"
    else
        echo "   FAILED (status $?) in $(( SECONDS - start )) s; the end of ${OUT}/${name}.log:"
        tail -n 20 "${OUT}/${name}.log" | sed 's/^/   | /'
        failed+=("${name}")
    fi
    grep -E "^(PASS|FAIL|gpu_check:|ntl/ce|total per GPU)" "${OUT}/${name}.log" | sed 's/^/   /' || true
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "${OUT}/gpu.txt"
ARCH=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'sm_{m}{n}')")

step check_kernels 120 token-objectives check-kernels --arch "${ARCH}"
step correctness 150 python3 -m token_objectives.bench.gpu_check
step bench 150 token-objectives bench --device cuda --tp 1 --tokens 8192 65536 \
    --vocab 32768 131072 --dtypes bf16 --hidden 3072 --repeats 5

DATA=${OUT}/data
[[ -f ${DATA}/manifest.json ]] || python3 -m token_objectives.quickstart.build_data --output-dir "${DATA}" \
    >"${OUT}/data.log" 2>&1
for kernel in triton torch; do
    TOKEN_OBJECTIVES_KERNEL=${kernel} step "megatron_${kernel}" 120 \
        python3 -m token_objectives.training.torchrun --nproc-per-node 1 \
        launch/pretrain_megatron.py --config configs/llama3.2-3b.yaml \
        --set model.num_layers=2 --set model.seq_length=1024 --set train.steps=3 \
        --set train.warmup_steps=0 --set train.log_interval=1 --set train.save_interval=0 \
        --set parallel.tensor=1 --set parallel.sequence_parallel=false \
        --set parallel.global_batch_size=4 --set output.tensorboard=false \
        --set data.tokenizer="${DATA}/tokenizer.model" \
        --set data.train_prefix="${DATA}/train_text_document" \
        --set data.frequencies="${DATA}/frequencies.safetensors" \
        --set output.dir="${OUT}/megatron_${kernel}"
done
python3 - "${OUT}" <<'PY' || failed+=("megatron_same_losses")
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {k: [json.loads(l) for l in (out / f"megatron_{k}" / "metrics.jsonl").read_text().splitlines()
            if l] for k in ("triton", "torch")}
for a, b in zip(runs["triton"], runs["torch"], strict=True):
    for key in ("lm loss", "ce", "ntl"):
        if abs(a[key] - b[key]) > 2e-2 * max(1.0, abs(b[key])):
            sys.exit(f"step {a['step']}: {key} triton {a[key]} vs torch {b[key]}")
print("megatron loop: triton and torch stages give the same losses",
      [round(r["lm loss"], 4) for r in runs["triton"]])
PY

# Megatron-LM's own loop (megatron.training.pretrain; megatron-core 0.19 with megatron.training)
# through the CPU test's entry point, unpatched here: TP=1 over NCCL, 3 iterations, the
# objectives' entries in Megatron's log lines.
CUDA_DEVICE_MAX_CONNECTIONS=1 step megatron_lm 240 python3 -m torch.distributed.run \
    --nproc-per-node 1 tests/megatron_lm/pretrain_gpt.py --tensor-model-parallel-size 1 \
    --num-layers 2 --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 4 \
    --group-query-attention --num-query-groups 2 --seq-length 256 --max-position-embeddings 256 \
    --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope \
    --hidden-dropout 0 --attention-dropout 0 --micro-batch-size 4 --global-batch-size 8 \
    --train-iters 3 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --adam-beta2 0.95 \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "${DATA}/tokenizer.model" \
    --data-path "${DATA}/train_text_document" --split 100,0,0 --num-workers 0 \
    --eval-iters 0 --eval-interval 1000 --log-interval 1 --data-cache-path "${OUT}/megatron_lm" \
    --calculate-per-token-loss --ntl was --ntl-weight 0.3 --pdl-alpha 0.2 \
    --pdl-frequencies "${DATA}/frequencies.safetensors" \
    --objective-tokenizer "${DATA}/tokenizer.model" --transformer-impl local \
    --no-masked-softmax-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion \
    --no-persist-layer-norm --no-gradient-accumulation-fusion --no-rope-fusion
grep -q "iteration  *3/  *3 .*| ntl part: " "${OUT}/megatron_lm.log" \
    || failed+=("megatron_lm_entries")

if (( ${#failed[@]} )); then
    echo "gpu_check: FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all steps passed; logs in ${OUT}"
