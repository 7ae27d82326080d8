"""Targets: where a compiled model runs. Each has aliases, a default backend and the backends it allows."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import NnforgeError


@dataclass(frozen=True)
class Target:
    name: str  # canonical: cpu | cuda | arm | wasm
    default_backend: str
    backends: tuple[str, ...]
    description: str

    def __str__(self) -> str:
        return self.name


TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", "onnxrt", ("onnxrt", "tvm"), "this machine's CPU (host LLVM / ONNX Runtime CPU provider)"),
    "cuda": Target("cuda", "tvm", ("tvm", "onnxrt"), "an NVIDIA GPU (TVM CUDA codegen / ONNX Runtime CUDA provider)"),
    "arm": Target("arm", "tvm", ("tvm",), "aarch64 Linux, cross-compiled; checked under qemu-aarch64"),
    "wasm": Target(
        "wasm",
        "onnxrt",
        ("onnxrt", "tvm"),
        "WebAssembly: onnxruntime-web, or TVM's kernels with nnforge's JS runtime (browser or Node)",
    ),
}
ALIASES = {"gpu": "cuda", "aarch64": "arm", "arm64": "arm", "webassembly": "wasm", "host": "cpu", "llvm": "cpu"}
BACKENDS = ("onnxrt", "tvm")  # the backends a target builds with (the torch executor only takes fallback partitions)
BACKEND_ALIASES = {"onnxruntime": "onnxrt", "ort": "onnxrt"}


def get_target(name: "str | Target") -> Target:
    if isinstance(name, Target):
        return name
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in TARGETS:
        raise NnforgeError(f"unknown target {name!r}; choose from {sorted(TARGETS)} or aliases {sorted(ALIASES)}")
    return TARGETS[key]


def backend_name(name: str) -> str:
    """A backend name or alias ("onnxruntime", "ort") -> its canonical name; NnforgeError listing the names."""
    key = str(name).strip().lower()
    key = BACKEND_ALIASES.get(key, key)
    if key not in BACKENDS:
        raise NnforgeError(
            f"unknown backend {name!r}; choose from {list(BACKENDS)} or aliases {sorted(BACKEND_ALIASES)}"
        )
    return key


def resolve_backend(target: Target, backend: str | None) -> str:
    backend = backend_name(backend) if backend else target.default_backend
    if backend not in target.backends:
        raise NnforgeError(
            f"backend {backend!r} cannot build for target {target.name!r}; it takes {list(target.backends)}"
        )
    return backend
