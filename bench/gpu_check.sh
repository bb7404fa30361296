#!/usr/bin/env bash
# The GPU path, measured: one prepared script for one GPU machine, under 10 minutes.
#
#   bash bench/gpu_wheels.sh          # here (with pip): the wheels the GPU image lacks, into .whl/
#   bash bench/gpu_check.sh           # there: writes every step's log under $OUT (default /tmp/gpu_check)
#
# Steps, each under its own time limit (a step that overruns is cut and the next one runs):
#   1. cuda_tests  — the suite's CUDA-marked tests (tests/test_cuda.py: CPU agreement, row blocks
#                    on CUDA equal to the whole tensor, LoRA ΔW merge);
#   2. real_scale  — a Llama-3-8B-shaped TIES merge (4 real layers, base + 3 experts) on CUDA,
#                    inputs streamed host → device through pinned buffers (bench/real_scale.py);
#   3. lora27      — the 27 predibase-shaped adapters TIES-merged in ΔW space on CUDA
#                    (bench/lora_merge.py --quick --device cuda);
#   4. eval_speed  — a random Mistral-7B-shaped model (bf16) on a generated mix of the test
#                    file's shape: batched against one row at a time, tokens/s (bench/eval_speed.py);
#   5. plan        — `mergelab plan --calibrate` for step 2's merge, beside step 2's measured time.
# The image holds torch, transformers, peft, safetensors, accelerate, typer, rich, psutil, pyyaml;
# pydantic and a few small packages come as wheels (bench/gpu_wheels.sh).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD/src:$PWD/bench:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s -m mergelab "$@"\n' "$PY" > /tmp/bin/mergelab && chmod +x /tmp/bin/mergelab
export PATH=/tmp/bin:$PATH

step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name rc=$rc after $((SECONDS - t0)) s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } | tee "$OUT/device.txt"

step cuda_tests 150 $PY -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
step real_scale 200 $PY bench/real_scale.py --arch llama3-8b --layers 4 --experts 3 --skip-mergekit \
  --device cuda --workdir /tmp/rs --json "$OUT/real_scale.json"
step lora27 100 $PY bench/lora_merge.py --quick --device cuda
step eval_speed 150 $PY - <<'PY'
import subprocess, sys, tempfile, torch, transformers as tf
d = tempfile.mkdtemp()
cfg = tf.MistralConfig(torch_dtype="bfloat16")          # Mistral-7B's shapes (32 layers, 4096, GQA 8)
with torch.device("cuda"):
    m = tf.MistralForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(d)
from mergelab.testing import make_tokenizer
make_tokenizer(d, vocab_size=cfg.vocab_size)
del m
sys.exit(subprocess.call([sys.executable, "bench/eval_speed.py", "--model", d, "--device", "cuda",
                          "--rows", "200", "--batch-size", "32"]))
PY
step plan 90 $PY -m mergelab plan /tmp/rs/llama3-8b/ties-3.yml --calibrate --json
echo "figures: $OUT (real_scale.json, one log per step)"
