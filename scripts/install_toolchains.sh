#!/usr/bin/env bash
# Installs the arm (aarch64 cross compiler + qemu) and wasm (onnxruntime-web) toolchains when missing.
# Safe to run repeatedly; prints what it skips. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need_apt=()
command -v aarch64-linux-gnu-g++ >/dev/null || need_apt+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ -f package.json ] && [ ! -d node_modules/onnxruntime-web ]; then
  echo "installing onnxruntime-web"
  npm install --ignore-scripts --no-audit --no-fund --silent
fi
echo "toolchains ready"
