#!/usr/bin/env bash
# The GPU measurement of the fused kernels in one command, at most ~9.5 minutes on an H100/H200:
#
#   bash scripts/gpu_check.sh          # JSON and logs in $OUT, or in docs/results/gpu/ when OUT is unset
#
# Steps, each under its own time limit (a step that fails or runs out is logged and the next one runs):
#   1. kernel_tests  (60 s): the kernel tests natively (no interpreter), those at bf16 and at the benchmark shapes
#   2. bare_gemm     (70 s): our Triton GEMM vs cuBLAS at the LoRA shapes, values (parity check) and time
#   3. bench_kernels (160 s) and bench_adapter (40 s): LoRA fused / cuBLAS-backed / dispatch / HF PEFT, and the
#      bottleneck adapter, against their floors (torch.compile rows left out for time)
#   4. bench_e2e     (140 s): 1.1B Llama, LoRA r=16 on all linear layers: floor, HF PEFT, ours, ours on the addmm path
#   5. kernel_configs (75 s): every autotune config of every kernel launched explicitly, natively in bf16
#      (tests/test_kernels_configs.py; last, as the lowest priority: its junit XML says how far it got)
# Runs from a checkout without install (PYTHONPATH is the checkout). PYTHON names the interpreter (default:
# .venv/bin/python when present, else python3). Exit status 0 when every step passed. Writes gpu_check.json
# (each step's status and seconds) beside the step logs and the benchmarks' JSON.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${OUT:-$REPO/docs/results/gpu}"
mkdir -p "$DEST"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
: >"$DEST/gpu_check.log"
STEPS=""
STATUS=0

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$DEST/gpu_check.log"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$DEST/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$DEST/gpu_check.log"
  tail -n 30 "$DEST/$name.log"
  [ "$rc" -eq 0 ] || STATUS=1
  STEPS="${STEPS:+$STEPS, }{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - t0)), \"log\": \"$name.log\"}"
}

"$PY" -c 'import json, platform, torch
def version(name):
    try:
        return __import__(name).__version__  # also for builds named otherwise (pytorch-triton)
    except Exception:
        return None
print(json.dumps(dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      capability=torch.cuda.get_device_capability() if torch.cuda.is_available() else None,
                      torch=torch.__version__, python=platform.python_version(),
                      **{name: version(name) for name in ("triton", "transformers", "peft", "lightning")})))' >"$DEST/env.json" 2>>"$DEST/gpu_check.log"
cat "$DEST/env.json"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False with $PY)" | tee -a "$DEST/gpu_check.log"
  exit 2
fi

step kernel_tests 60 "$PY" -m pytest -q -p no:cacheprovider -k "bf16 or benchmark_shapes or masters" \
  tests/test_kernels_lora.py tests/test_kernels_bottleneck.py tests/test_kernels_addmm.py tests/test_kernels_masters.py \
  --junitxml "$DEST/kernel_tests.xml"
step bare_gemm 70 "$PY" scripts/bench_kernels.py --only gemm --rep 100 --out "$DEST/bench_gemm.json"
step bench_kernels 160 "$PY" scripts/bench_kernels.py --only lora --skip-compile --rep 100 --out "$DEST/bench_kernels_lora.json"
step bench_adapter 40 "$PY" scripts/bench_kernels.py --only adapter --skip-compile --rep 100 --out "$DEST/bench_kernels_adapter.json"
step bench_e2e 140 "$PY" scripts/bench_e2e.py --steps 5 --modes floor,hf_peft,ours,ours_addmm --out "$DEST/bench_e2e.json"

step kernel_configs 75 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_configs.py --junitxml "$DEST/kernel_configs.xml"

echo "{\"status\": $STATUS, \"env\": $(cat "$DEST/env.json"), \"steps\": [$STEPS]}" >"$DEST/gpu_check.json"
echo "wrote $DEST (gpu_check.json, *.log, bench_*.json); status $STATUS"
exit "$STATUS"
