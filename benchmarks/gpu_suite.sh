#!/usr/bin/env bash
# Every GPU figure the project reports, and its CUDA tests, in ONE call on the lent GPU machine.
#
#   here, first:   bash benchmarks/gpu_carry.sh            # .gpu/: open_clip wheels + SmolLM2's tokenizer
#   on the GPU:    run(command="bash benchmarks/gpu_suite.sh", carry=[".gpu"], timeout_s=600)
#
# That machine has torch, transformers and triton but no Beam, Dagster or vLLM, and a session gets about
# 15 minutes of it in all, starting included. So each section runs under its own time limit (a slow or
# hanging one cannot eat the rest; 480 s of limits together, 520 s with each one's 10 s kill grace, inside the
# call's 10), writes its full output to $OUT/<section>.txt, and the summary table of the headline lines
# comes last, where the reply shows it. The one-shot matters: a second start would not fit the session.
# tests/benchmarks/test_device_suite.py checks on CPU that all of it imports without the missing packages.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
py=${PYTHON:-python3}
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .gpu/wheels/*.whl \
        && export PYTHONPATH=$PWD:/tmp/gpu-site
fi
tokenizer=()
[ -f .gpu/tokenizer/tokenizer.json ] && tokenizer=(--tokenizer .gpu/tokenizer)
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    || exit 1

section() {  # name, time limit in seconds, then the python arguments
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$py" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after ${SECONDS}s of the suite" | tee -a "$out/$name.txt"
}

section optim 70 benchmarks/bench_optim.py --steps 20            # Stable-SPAM foreach/fused/8-bit, SPAM vs fused AdamW
section rewrite 170 benchmarks/bench_rewrite.py --skip_cpu "${tokenizer[@]}"   # SmolLM2-135M, then 1B Llama shape, 160+64 tokens
section train 140 benchmarks/bench_train.py --compile            # ViT-B/32 bf16 batch 256: eager, compiled, shards, open_clip
# The CUDA tests: the Triton kernels compiled (not interpreted) against the foreach path, no host sync, bf16 steps.
section tests 100 -m pytest -q -rs -p no:cacheprovider -m "gpu or fused" tests/training

# The lines the summary keeps: each script's headline figures (tests/benchmarks/test_device_suite.py runs
# bench_optim through it), and how each section ended.
SUMMARY="ratio|target|samples/s|tokens/s|bytes/param|ms/step|[0-9]x$|x faster$|-bit states:|passed|failed|error|exit [0-9]"
echo
echo "== summary (full outputs in $out/)"
grep -h -E "$SUMMARY" "$out"/*.txt | cut -c1-160
