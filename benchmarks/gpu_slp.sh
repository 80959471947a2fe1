#!/bin/bash
# The GPU measurements of docs/slp.md, as run on the device machine (one H100, 16 cores):
#   bash benchmarks/gpu_slp.sh OUTDIR
# Builds the kernels, runs the SLP tests with their CUDA cases, then `refmoe bench prefill` on
# the demo model (2 layers x 256 experts: DeepSeek-V3's per-layer shapes) with a trace, and
# the CPU kernel benchmark on the host CPU. SIMDe headers come from .carry/ when pip can't
# fetch simde-py (no network there).
set -o pipefail
out=${1:-/tmp/slp-out}; mkdir -p "$out"
export PYTHONPATH=$PWD/.carry:$PWD PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1
step() { echo "== $*"; }
step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max \
  --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)"
step build
python3 setup.py build_ext --inplace -j 16 > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python3 -m refmoe.cli info
step tests
timeout 240 python3 -m pytest -q -x tests/test_slp.py 2>&1 | tail -15
step bench prefill
timeout ${PREFILL_TIMEOUT:-420} python3 -m refmoe.cli bench prefill --layers ${LAYERS:-2} \
  --experts ${EXPERTS:-256} --dir /tmp/demo --prompt-tokens ${TOKENS:-1024,4096,8192,16384} \
  --trace "$out/slp-trace.json" --json > "$out/prefill.json" && \
  python3 -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))]" "$out/prefill.json"
step bench prefill, ring of 8 slots
timeout 150 python3 -m refmoe.cli bench prefill --layers ${LAYERS:-2} --experts ${EXPERTS:-256} \
  --dir /tmp/demo --prompt-tokens 8192,16384 --ring 8 --json > "$out/prefill-ring8.json" && \
  python3 -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))]" "$out/prefill-ring8.json"
step bench prefill with the CPU path beside
timeout 200 python3 -m refmoe.cli bench prefill --layers ${LAYERS:-2} --experts ${EXPERTS:-256} \
  --dir /tmp/demo --prompt-tokens 128,512 --cpu
step bench kernels
timeout 200 python3 -m refmoe.cli bench kernels --reps 3 --no-torch | tee "$out/kernels.txt"
