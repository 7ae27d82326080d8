#!/usr/bin/env bash
# Installs the arm and wasm toolchains when missing; safe to run repeatedly (prints what it does).
#   arm:  aarch64 cross compiler + qemu-user (apt), and the aarch64 TVM runtime libraries + headers
#         from the aarch64 wheels of apache-tvm / apache-tvm-ffi, unpacked into .cache/aarch64/
#         (nnforge/edge.py links the arm runner against them and copies them into arm bundles)
#   wasm: onnxruntime-web from package.json into node_modules/ (npm, --ignore-scripts), and wasm-ld
#         (apt: lld) to link TVM's wasm32 kernels
# Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

need_apt=()
command -v aarch64-linux-gnu-g++ >/dev/null || need_apt+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
command -v node >/dev/null || need_apt+=(nodejs npm)
command -v wasm-ld >/dev/null || need_apt+=(lld)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# aarch64 TVM runtime: the same versions as the host's TVM (the one that builds model.so)
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))" 2>/dev/null || echo "$2"; }
TVM_VERSION=$(version apache-tvm 0.27.0.post1)
FFI_VERSION=$(version apache-tvm-ffi 0.1.14.post1)
AARCH64=.cache/aarch64
STAMP="$AARCH64/VERSION"
WANT="apache-tvm==$TVM_VERSION apache-tvm-ffi==$FFI_VERSION"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || [ ! -f "$AARCH64/lib/libtvm_runtime.so" ] \
   || [ ! -f "$AARCH64/lib/libtvm_ffi.so" ] || [ ! -f "$AARCH64/include/tvm/ffi/function.h" ]; then
  echo "fetching aarch64 wheels: $WANT"
  rm -rf "$AARCH64"
  mkdir -p "$AARCH64/wheels"
  # the wheels are manylinux_2_28: '--platform manylinux2014_aarch64' alone finds none of them
  "$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.11 \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    -d "$AARCH64/wheels" "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION"
  # unpack only the runtime libraries and the tvm-ffi headers (include/tvm/ffi, include/dlpack)
  "$PY" - "$AARCH64" <<'EOF'
import pathlib, shutil, sys, zipfile
root = pathlib.Path(sys.argv[1])
wanted = {"tvm/lib/libtvm_runtime.so": "lib", "tvm_ffi/lib/libtvm_ffi.so": "lib"}
for wheel in sorted((root / "wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name in wanted:
                dest = root / wanted[name] / pathlib.PurePosixPath(name).name
            elif name.startswith("tvm_ffi/include/") and not name.endswith("/"):
                dest = root / "include" / name[len("tvm_ffi/include/"):]
            else:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
for f in (root / "lib").iterdir():
    f.chmod(0o755)
EOF
  rm -rf "$AARCH64/wheels"
  echo "$WANT" > "$STAMP"
fi

if [ -f package.json ] && [ ! -f node_modules/onnxruntime-web/package.json ]; then
  echo "installing onnxruntime-web"
  npm install --ignore-scripts --no-audit --no-fund --silent
fi
echo "toolchains ready"
