#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 8 minutes (the steps' time bounds add up
# to 475 s), from the project root:
#   1. build the extension with CUDA for this card only (e.g. sm_90a on an H100 / H200);
#   2. the CUDA tests, -x and time-bounded: the grouped-LoRA kernels
#      (test_grouped_lora_cuda.py), then the engine on CUDA (test_engine_cuda.py);
#   3. compute-sanitizer memcheck on a few grouped-LoRA calls and a few engine steps;
#   4. the op benchmark (benchmarks/ops.py --device cuda) and the engine's
#      (benchmarks/throughput.py --device cuda --quick, base and mixed experts).
# Logs, JSON and a summary go to the folder given as $1.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# It downloads nothing and installs nothing outside /tmp. It works against whatever CUDA
# torch the machine has (2.11 with CUDA 13, for one): the build uses the installed torch.
# Build-only dependencies that machine lacks go in ./.whl as wheels (nlohmann-json, which
# the build needs for its headers); they are unpacked into /tmp/moa-site first. .whl is
# git-ignored; with the device tool: run(command="bash benchmarks/gpu_check.sh $OUT/gpu",
# carry=[".whl"]).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
t0=$(date +%s)
say() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a "$out/summary.txt"; }
step() { # step NAME SECONDS CMD...: runs CMD with a time bound, its output in $out/NAME.log
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  say "$name: rc=$rc$([ $rc -eq 124 ] && echo " (timed out after $limit s)")"
  tail -n 6 "$out/$name.log"
  return $rc
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/moa-site .whl/*.whl &&
    export PYTHONPATH=/tmp/moa-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" |
  tee "$out/env.txt"
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MOA_ENGINE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
say "building for sm ${TORCH_CUDA_ARCH_LIST} with $MAX_JOBS jobs"
# In place (no pip resolution at all), then the checkout on the path.
step build 210 python3 setup.py build_ext --inplace -j "$MAX_JOBS" || {
  grep -m 5 -i "error" "$out/build.log"
  exit 1
}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import moa_engine; assert moa_engine.built_with_cuda(), 'built without CUDA'" || exit 1

pytest_args=(-x -q -p no:cacheprovider)
step test_grouped_lora_cuda 75 python3 -m pytest python_tests/test_grouped_lora_cuda.py "${pytest_args[@]}"
step test_engine_cuda 60 python3 -m pytest python_tests/test_engine_cuda.py "${pytest_args[@]}"

if command -v compute-sanitizer >/dev/null; then
  step memcheck 40 compute-sanitizer --tool memcheck --error-exitcode 9 python3 - <<'EOF'
import tempfile
from pathlib import Path

import torch
import transformers

import moa_engine
from moa_engine.ops import grouped_lora

for T, E, i, o, r in [(1, 1, 64, 64, 1), (37, 5, 576, 1536, 16), (300, 64, 1000, 333, 8)]:
    kw = dict(device="cuda", dtype=torch.bfloat16)
    x, a, b = torch.randn(T, i, **kw), torch.randn(E, r, i, **kw), torch.randn(E, o, r, **kw)
    grouped_lora(x, a, b, torch.randint(-1, E, (T,), device="cuda"), torch.rand(E, device="cuda"))
torch.cuda.synchronize()
print("grouped_lora cases ran")
# A few engine steps: prefill, decode (one and two split-K chunks) on a tiny random llama.
cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
folder = Path(tempfile.mkdtemp()) / "tiny"
transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
engine = moa_engine.Engine(folder, device="cuda", max_batch=2, max_seq_len=700)
engine.generate([[i % 300 for i in range(1, 600)], [5, 6, 7]], max_new_tokens=4, ignore_eos=True)
torch.cuda.synchronize()
print("engine steps ran")
EOF
else
  say "memcheck: compute-sanitizer not on PATH, skipped"
fi

step ops_bench 40 python3 benchmarks/ops.py --device cuda --quick --out "$out/ops-cuda.json"
step throughput_bench 50 python3 benchmarks/throughput.py --device cuda --quick --mode base moa \
  --out "$out/throughput-cuda.json"
say "done"
