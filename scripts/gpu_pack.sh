#!/usr/bin/env bash
# Makes .gpu/ for scripts/gpu_check.sh: what a GPU machine with PyTorch (Python 3.12) but no TVM needs.
#   - the apache-tvm-ffi wheel for its Python (3.12)
#   - TVM's Python package and runtime libraries, from this machine's install (pure Python + .so, any Python)
#   - TVM's compiler library, xz-compressed and split in two (each part fits one transfer)
#   - the tiny zoo families built here for CUDA sm_90 (python -m nnforge.bench.cuda build)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(.venv/bin/python -c "import tvm, pathlib; print(pathlib.Path(tvm.__file__).parents[1])")
FFI=$(.venv/bin/python -c "from importlib.metadata import version; print(version('apache-tvm-ffi'))")
mkdir -p .gpu
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu "apache-tvm-ffi==$FFI"
tar -C "$SITE" --exclude='tvm/lib/libtvm_compiler.so' --exclude='tvm/3rdparty' --exclude='__pycache__' \
  --exclude='tvm/web' -cf - tvm | xz -T2 -6 > .gpu/tvm-runtime.tar.xz
xz -T2 -9 -c "$SITE/tvm/lib/libtvm_compiler.so" | split -b 30000000 - .gpu/compiler.xz.part-
.venv/bin/python -m nnforge.bench.cuda build .gpu/bundles-tiny --size tiny --batch 2 --arch sm_90
du -sh .gpu/*
