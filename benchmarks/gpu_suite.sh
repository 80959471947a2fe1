#!/bin/bash
# Everything only a GPU machine can show, in one run of under 8 minutes (one H100/H200 with a
# 16-core host, as the device tool lends them):
#   bash benchmarks/gpu_suite.sh OUTDIR
# Writes to OUTDIR (at most 8 files, as the device tool brings back):
#   suite.log          everything printed, with the machine, the build and the CUDA tests
#   device_matmul.json device expert matmul per format (bf16, FP8 dequant / scaled_mm,
#                      MXFP4 and NVFP4 decoded on the device, FP4 tensor cores where offered)
#   prefill.json       {"prefill": SLP at 4K-32K tokens against the PCIe bound measured in
#                      the same run, "prefill_cpu": the CPU-expert path beside it at 4K}
#   slp-trace.json     Chrome trace of the longest SLP prefill (opens in Perfetto)
#   serve.json         {"interference", "dual_batch", "agent"}: decode under a concurrent SLP
#                      prefill (interference), dual-batch two-over-one, with attention on the
#                      GPU; agents (conversations resending their history: prefix cache)
#   decode.json        hybrid decode: attention and dense layers on the GPU, routed experts on
#                      the host's CPU kernels, against the host's read bound
#   kernels.json       the host's kernels (native AVX-512 where it has it) against its read
# The demo model is DeepSeek-V3's per-layer shapes, LAYERS x EXPERTS (default 1 x 256: one
# V3 MoE layer, 11.3 GB; LAYERS=2 is the 22.6 GB model of docs/slp.md's first H100 run).
# SIMDe headers (to build the emulated variants) come from .carry/ (no network there):
#   pip install --no-deps --target .carry simde-py
# The agent step serves over HTTP, and the GPU machine's Python (3.12) has no uvicorn or
# fastapi: carry them in .carry_serve/ (wheels for its Python, unzipped; about 30 MB):
#   pip download -d W --python-version 3.12 --only-binary=:all: --no-deps \
#     --platform manylinux2014_x86_64 uvicorn fastapi starlette httpx httpcore anyio h11 \
#     sniffio click prometheus_client pydantic pydantic_core annotated_types \
#     typing_inspection idna certifi typing_extensions tokenizers jinja2 markupsafe \
#     opentelemetry-api importlib_metadata zipp   (fastapi 0.165 imports opentelemetry)
#   for w in W/*.whl; do python -m zipfile -e $w .carry_serve/; done
# Each step has its own timeout, so one that hangs costs its slot, not the run.
set -o pipefail
out=${1:-/tmp/gpu-suite}; mkdir -p "$out"
exec > >(tee -a "$out/suite.log") 2>&1
export PYTHONPATH=$PWD/.carry:$PWD/.carry_serve:$PWD PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1
demo="--layers ${LAYERS:-1} --experts ${EXPERTS:-256} --dir ${DEMO_DIR:-/tmp/demo}"
t0=$SECONDS
# STEPS=build,demo,agent (say) runs only those steps (names below); default: all of them
want() { [ -z "${STEPS:-}" ] || [[ ",$STEPS," == *",$1,"* ]]; }
step() { want "$1" || return 1; echo; echo "== [$((SECONDS - t0)) s] ${*:2}"; }

if step machine machine; then
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max \
  --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)"
echo "AVX-512 flags: $(grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
free -g | head -2; cat /proc/loadavg
fi

if step build build; then
python3 setup.py build_ext --inplace -j 16 > "$out/build.log" 2>&1 \
  || { tail -30 "$out/build.log"; exit 1; }
rm -f "$out/build.log"
python3 -m refmoe.cli info
fi

if step matmul device matmul per format; then
timeout 90 python3 benchmarks/device_matmul.py --json "$out/device_matmul.json" ${SMALL:+--small}
fi

if step demo demo model: build once; then
timeout 150 python3 -c "
import sys; from pathlib import Path; from refmoe import demo
demo.build(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))" \
  "${DEMO_DIR:-/tmp/demo}" "${LAYERS:-1}" "${EXPERTS:-256}" || exit 1
du -sh "${DEMO_DIR:-/tmp/demo}"
fi

if step prefill "SLP prefill at 4K-32K (trace of the longest), CPU experts beside at 4K"; then
timeout 150 python3 -m refmoe.cli bench prefill $demo \
  --prompt-tokens ${TOKENS:-4096,8192,16384,32768} --trace "$out/slp-trace.json" --json \
  > "$out/prefill.json"
python3 -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))]" "$out/prefill.json"
timeout 60 python3 -m refmoe.cli bench prefill $demo --prompt-tokens ${CPU_TOKENS:-4096} --cpu \
  --json > "$out/prefill_cpu.json" \
  && python3 -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))]" \
       "$out/prefill_cpu.json"
fi

if step serve "serving: decode under a concurrent SLP prefill; dual-batch two over one"; then
timeout 60 python3 -m refmoe.cli bench serve $demo --scenario interference --prefill slp \
  --prefill-tokens ${PREFILL_TOKENS:-8192} --json > "$out/interference.json"
cat "$out/interference.json"; echo
timeout 60 python3 -m refmoe.cli bench serve $demo --scenario dual-batch --json \
  > "$out/dual_batch.json"
cat "$out/dual_batch.json"; echo
fi

if step agent "agents: conversations resending their history (prefix cache, TTFT by turn)"; then
timeout 240 python3 -m refmoe.cli bench serve $demo --scenario agent --prefill auto \
  --conversations ${AGENTS:-4} --turns 3 --context ${AGENT_CONTEXT:-8192} \
  --new-tokens 200-400 --output-len 32-64 --think-s 0.5-2 --json > "$out/agent.json"
python3 -c "
import json, sys
d = json.load(open(sys.argv[1]))
print({k: d[k] for k in ('mean_ttft_ms_by_turn', 'later_over_first_ttft', 'prefix_hit_rate',
      'itl_during_other_prefill_ms', 'itl_otherwise_ms', 'itl_during_prefill_ratio')})
for t in d['turns']:
    print(t)" "$out/agent.json"
fi

if step decode "hybrid decode: attention on the GPU, routed experts on the host CPU"; then
timeout 60 python3 -m refmoe.cli bench decode $demo --reps 2 --device auto --json > "$out/decode.json"
cat "$out/decode.json"; echo
fi

if step kernels "host CPU kernels (native variant) against the host's read"; then
timeout 80 python3 -m refmoe.cli bench kernels --reps 3 --no-torch --json > "$out/kernels.json"
python3 -c "
import json,sys
for r in json.load(open(sys.argv[1])):
    print(r['op'], r['dtype'], r.get('m'), r['threads'], r['variant'],
          round(r['gbps'], 1), round(r.get('ratio', 0), 2))" "$out/kernels.json"
fi

if step tests "CUDA tests (SLP on the device against the plain path)"; then
timeout ${TEST_S:-90} python3 -m pytest -q -x tests/test_slp.py -k cuda -p no:cacheprovider \
  -W ignore::UserWarning 2>&1 | tail -8
fi

# fold the small JSON files into one, so the run's files stay within what comes back
python3 - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def fold(target, names):
    got = {}
    for name in names:
        p = out / f"{name}.json"
        if p.exists() and p.stat().st_size:
            got[name] = json.loads(p.read_text())
        p.unlink(missing_ok=True)
    (out / target).write_text(json.dumps(got, indent=1))
fold("serve.json", ["interference", "dual_batch", "agent"])
fold("prefill.json", ["prefill", "prefill_cpu"])
EOF
echo; echo "== [$((SECONDS - t0)) s] done"
ls -la "$out"
