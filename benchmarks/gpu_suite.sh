#!/usr/bin/env bash
# Every GPU figure the project reports, in one run on a CUDA machine; each benchmark's output lands in
# $OUT (default gpu_results/). Needs the project's runtime deps; open_clip (for the trainer comparison)
# and vllm (for the rewrite engine) are used when importable and skipped with a message otherwise.
#
#   bash benchmarks/gpu_suite.sh            # about 10 minutes on one H100
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1

bench() {  # name, then the command's arguments
    local name=$1
    shift
    echo "== $name: $*"
    "$py" "$@" 2>&1 | tee "$out/$name.txt"
}

bench optim benchmarks/bench_optim.py --steps 20                 # Stable-SPAM (foreach, fused) vs fused AdamW
bench train benchmarks/bench_train.py                            # ViT-B/32 bf16 batch 256, shards vs synthetic, open_clip
bench train_compiled benchmarks/bench_train.py --compile
bench rewrite benchmarks/bench_rewrite.py --skip_cpu             # SmolLM2-135M and 1B Llama shapes, 160+64 tokens
bench caption benchmarks/bench_caption.py
# The optimizer and trainer tests on CUDA: compiled Triton kernels, no host sync, bf16 steps.
"$py" -m pytest -q -rs tests/training/optim tests/training/test_train.py 2>&1 | tee "$out/gpu_tests.txt"
