#!/usr/bin/env bash
# The CUDA checks, for a machine with an NVIDIA GPU and PyTorch but no TVM (run from the repository root):
#   1. the CUDA bundles built on a CPU machine (.gpu/bundles-tiny) run with the TVM runtime alone and match
#   2. the CUDA tests (tests/test_tvm_runtime.py, the cuda tests of tests/test_backend_tvm.py)
#   3. where TVM's compiler could be restored, the zoo families at bench size are built for sm_90 there and
#      timed against eager PyTorch and torch.compile (nnforge/bench/cuda.py)
# .gpu/ holds what the machine lacks (made by scripts/gpu_pack.sh): the apache-tvm-ffi wheel for its Python,
# TVM's Python package and runtime libraries, and TVM's compiler library (xz, split in two parts; the first
# part is staged by an earlier `gpu_check.sh stage` call when one transfer cannot carry both).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nnforge-gpu-out}
STAGE=/tmp/nnforge-gpu-stage
mkdir -p "$OUT" "$STAGE"
if [ "${1:-}" = stage ]; then cp .gpu/compiler.xz.part-aa "$STAGE/" && echo "staged $(ls -la $STAGE)"; exit 0; fi
export PYTHONUNBUFFERED=1
SITE=/tmp/nnforge-site
mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/apache_tvm_ffi-*.whl || exit 1
# onnx and ml_dtypes for the conformance sample, where the machine lacks them
python3 -c "import onnx, ml_dtypes" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
  --target "$SITE" .gpu/onnx-*.whl .gpu/ml_dtypes-*.whl
tar -xJf .gpu/tvm-runtime.tar.xz -C "$SITE" || exit 1
[ -f .gpu/compiler.xz.part-aa ] && cp .gpu/compiler.xz.part-aa "$STAGE/"
if [ -f "$STAGE/compiler.xz.part-aa" ] && [ -f .gpu/compiler.xz.part-ab ]; then
  cat "$STAGE/compiler.xz.part-aa" .gpu/compiler.xz.part-ab | xz -dc -T0 > "$SITE/tvm/lib/libtvm_compiler.so" \
    && echo "TVM compiler restored" || rm -f "$SITE/tvm/lib/libtvm_compiler.so"
fi
export PYTHONPATH="$SITE:$PWD"
nvidia-smi -L
python3 -c "import tvm, torch, onnxruntime as ort; print('tvm', tvm.__version__, 'runtime only' if tvm.base._RUNTIME_ONLY else 'with compiler', '| tvm sees cuda:', tvm.cuda(0).exist, '| torch', torch.__version__, '| ort', ort.get_available_providers())"
if [ -z "${SKIP_TINY:-}" ]; then
  echo "== 1. prebuilt CUDA bundles (tiny) on the TVM runtime"
  python3 -m nnforge.bench.cuda run .gpu/bundles-tiny --repeat 30 --json "$OUT/cuda_tiny.json" 2>&1 | tee "$OUT/tiny.log"
fi
echo "== 2. CUDA tests"
NNFORGE_CUDA_BUNDLES=.gpu/bundles-tiny python3 -m pytest -q -p no:cacheprovider -rs tests/test_tvm_runtime.py \
  tests/test_backend_tvm.py -k "cuda or runtime" 2>&1 | tee "$OUT/tests.log" | tail -25
if python3 -c "import sys, tvm; sys.exit(1 if tvm.base._RUNTIME_ONLY else 0)"; then
  echo "== 2b. ONNX node tests (every 8th) through nnforge-tvm on cuda, beside ONNX Runtime direct"
  timeout 200 python3 -m nnforge.conformance --backend ort tvm --target cuda --sample 8 --jobs 12 --timeout 120 \
    --out "$OUT/conformance-cuda.json" 2>&1 | grep -v "^$" | tail -20
  echo "== 3. bench-size families built here for sm_90 and timed"
  python3 -m nnforge.bench.cuda build /tmp/nnforge-bench --size bench --batch 8 --arch sm_90 2>&1 | tee "$OUT/build.log" | tail -12
  python3 -m nnforge.bench.cuda run /tmp/nnforge-bench --repeat 30 --json "$OUT/cuda_bench.json" 2>&1 | tee "$OUT/bench.log"
else
  echo "== 3. skipped: TVM's compiler is not here (runtime only)"
fi
