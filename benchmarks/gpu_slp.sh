#!/bin/bash
# The GPU measurements of docs/slp.md, as run on the device machine (one H100, 16 cores):
#   bash benchmarks/gpu_slp.sh OUTDIR
# Builds the kernels, runs the SLP tests with their CUDA cases, then `refmoe bench prefill` on
# the demo model (2 layers x 256 experts: DeepSeek-V3's per-layer shapes) over a sweep of
# prompt lengths, with a trace of the 4096-token prefill. KERNELS=1 adds the CPU kernel
# benchmark on the host CPU. SIMDe headers come from .carry/ when pip can't fetch simde-py
# (no network there).
set -o pipefail
out=${1:-/tmp/slp-out}; mkdir -p "$out"
export PYTHONPATH=$PWD/.carry:$PWD PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1
demo="--layers ${LAYERS:-2} --experts ${EXPERTS:-256} --dir /tmp/demo"
step() { echo "== $*"; }
step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max \
  --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)"
step build
python3 setup.py build_ext --inplace -j 16 > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python3 -m refmoe.cli info | head -3
step tests
timeout 240 python3 -m pytest -q -x tests/test_slp.py -W ignore::UserWarning 2>&1 | tail -15
step bench prefill: sweep
timeout 300 python3 -m refmoe.cli bench prefill $demo \
  --prompt-tokens ${TOKENS:-512,1024,2048,4096,8192,16384,32768} --json 2>"$out/prefill.err" > "$out/prefill.json"
python3 -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))]" "$out/prefill.json"
step bench prefill: 4096 tokens traced, and the CPU path beside at 512
timeout 150 python3 -m refmoe.cli bench prefill $demo --prompt-tokens 4096 \
  --trace "$out/slp-trace-4096.json"
timeout 150 python3 -m refmoe.cli bench prefill $demo --prompt-tokens 512,4096 --cpu --ring 8
if [ -n "$KERNELS" ]; then
  step bench kernels
  timeout 200 python3 -m refmoe.cli bench kernels --reps 3 --no-torch | tee "$out/kernels.txt"
fi
