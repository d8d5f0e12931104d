#!/usr/bin/env bash
# Every GPU figure in one command (make gpu-report), on a bare CUDA machine that already has torch,
# triton and peft and no network.  Each step is capped at 10 minutes and a failing step does not
# stop the others; everything lands in $REPORT (default benchmarks/results/gpu_report/, to be committed): one JSON per benchmark,
# each step's log, and summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REPORT=${REPORT:-benchmarks/results/gpu_report}
CAP=${CAP:-600}
mkdir -p "$REPORT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c "import loradafast" 2>/dev/null || "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
"$PY" - > "$REPORT/machine.txt" 2>&1 <<'PYEOF'
import torch, triton, platform
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "python", platform.python_version())
PYEOF

step() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  timeout "$CAP" "$@" > "$REPORT/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc | $((SECONDS - start)) s |" >> "$REPORT/steps.md"
  echo "$name: exit $rc after $((SECONDS - start)) s"
}

echo "| step | exit | time |" > "$REPORT/steps.md"
echo "|---|---|---|" >> "$REPORT/steps.md"
step native "$PY" -c "from loradafast.linalg import native; native.load(verbose=True)"
step pytest "$PY" -m pytest -q -p no:cacheprovider tests
step kernels "$PY" benchmarks/bench_kernels.py --out "$REPORT/kernels.json"
step eigen "$PY" benchmarks/bench_eigen.py --no-lobpcg --out "$REPORT/eigen.json"
step scale "$PY" benchmarks/bench_scale.py --device cuda --scales 0.5,1 --dtypes float64,float32 --out "$REPORT/scale.json"
step solve "$PY" benchmarks/bench_solve.py --out "$REPORT/solve.json"
step overhead "$PY" benchmarks/overhead.py --gpu --timeout 500 --out "$REPORT/overhead.json"
step loraga "$PY" benchmarks/bench_loraga.py --gpu --repeats 2 --timeout 250 --out "$REPORT/loraga.json"

{
  echo "# GPU report"; echo; cat "$REPORT/machine.txt"; echo; cat "$REPORT/steps.md"; echo
  echo "pytest: $(tail -n 1 "$REPORT/pytest.log")"
  grep -h "×\|ratio\|wrote" "$REPORT"/scale.log "$REPORT"/kernels.log 2>/dev/null | head -40
} > "$REPORT/summary.md"
cat "$REPORT/summary.md"
