"""Edge runtimes: make arm and wasm bundles self-contained, and run them here under emulation.

arm   A small C++ runner (``runtime/arm_runner.cc``), cross-compiled with aarch64-linux-gnu-g++ against
      the aarch64 ``libtvm_runtime.so`` / ``libtvm_ffi.so`` (from the aarch64 wheels, unpacked by
      ``scripts/install_toolchains.sh`` into ``.cache/aarch64``), loads ``model.so`` with the Relax VM.
      ``write_arm_runtime`` puts the runner and both libraries into the bundle; ``run_arm`` runs it
      with ``qemu-aarch64 -L /usr/aarch64-linux-gnu``.
wasm  ``runtime/nnforge-loader.mjs`` (for web pages and Node) runs ``model.onnx`` with onnxruntime-web's
      wasm backend; ``runtime/nnforge-tvm.mjs`` runs a TVM bundle's ``model.wasm`` (backends/tvm_wasm.py);
      ``runtime/wasm_runner.mjs`` is the Node command line for both. ``write_wasm_runtime`` puts them, a
      README and a package.json into the bundle; ``run_wasm`` runs the bundle with ``node`` (and the
      repository's ``node_modules/onnxruntime-web`` for ONNX bundles).

Both runners take .npy inputs and write ``out<i>.npy`` per output; the output count comes from the
bundle's ``manifest.json``. Locations can be overridden with ``NNFORGE_AARCH64_DIR`` (the unpacked
aarch64 runtime) and ``NNFORGE_NODE_MODULES`` (a node_modules folder holding onnxruntime-web).
No TVM or ONNX Runtime import happens here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import NnforgeError

RUNTIME_DIR = Path(__file__).resolve().parent
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, for an editable install

ARM_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
ARM_SYSROOT = Path("/usr/aarch64-linux-gnu")
ARM_RUNNER = "nnforge-arm-runner"
ARM_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
ARM_FLAGS = ("-std=c++17", "-O2", "-s")
WASM_FILES = ("nnforge-loader.mjs", "nnforge-tvm.mjs", "wasm_runner.mjs")
ORT_WEB_VERSION = "1.30.0"  # keep equal to the root package.json
INSTALL = "run scripts/install_toolchains.sh"

# tool -> how to get it
HINTS = {
    ARM_CXX: f"{INSTALL} or apt-get install g++-aarch64-linux-gnu",
    QEMU: f"{INSTALL} or apt-get install qemu-user",
    "aarch64-sysroot": f"{INSTALL} or apt-get install gcc-aarch64-linux-gnu (it brings libc6-arm64-cross)",
    "aarch64-tvm-runtime": f"{INSTALL} (it unpacks the aarch64 wheels of apache-tvm and apache-tvm-ffi "
    "into .cache/aarch64), or set NNFORGE_AARCH64_DIR",
    "node": "install Node.js 20 (apt-get install nodejs)",
    "onnxruntime-web": f"{INSTALL} or `npm install --ignore-scripts` in the repository root, "
    "or set NNFORGE_NODE_MODULES",
    "wasm-ld": f"{INSTALL} or apt-get install lld (it links TVM's wasm32 kernels)",
}
TOOLS = tuple(HINTS)


# ---------------------------------------------------------------------------------------------
# where things are
# ---------------------------------------------------------------------------------------------


def aarch64_dir() -> Path:
    """The unpacked aarch64 TVM runtime: lib/ (the .so files), include/ (tvm-ffi headers), build/."""
    env = os.environ.get("NNFORGE_AARCH64_DIR")
    if env:
        return Path(env)
    repo = REPO_ROOT / ".cache" / "aarch64"
    if repo.is_dir() or (REPO_ROOT / "scripts" / "install_toolchains.sh").is_file():
        return repo
    return Path.home() / ".cache" / "nnforge" / "aarch64"


def node_modules() -> Path:
    env = os.environ.get("NNFORGE_NODE_MODULES")
    return Path(env) if env else REPO_ROOT / "node_modules"


def _find(tool: str) -> str | None:
    if tool == "aarch64-sysroot":
        p = ARM_SYSROOT / "lib" / "ld-linux-aarch64.so.1"
        return str(ARM_SYSROOT) if p.exists() else None
    if tool == "aarch64-tvm-runtime":
        d = aarch64_dir()
        ok = (
            all((d / "lib" / n).is_file() for n in ARM_LIBS)
            and (d / "include" / "tvm" / "ffi" / "function.h").is_file()
        )
        return str(d) if ok else None
    if tool == "onnxruntime-web":
        p = node_modules() / "onnxruntime-web"
        return str(p) if (p / "package.json").is_file() else None
    return shutil.which(tool)


def toolchain_status() -> dict[str, str | None]:
    """Each edge tool -> where it was found, or None when missing."""
    return {tool: _find(tool) for tool in TOOLS}


def require(tool: str) -> str:
    """The tool's path; NnforgeError naming the tool and how to install it when it is missing."""
    if tool not in HINTS:
        raise NnforgeError(f"unknown edge tool {tool!r}; known: {', '.join(TOOLS)}")
    found = _find(tool)
    if found is None:
        raise NnforgeError(f"{tool} not found: {HINTS[tool]}")
    return found


# ---------------------------------------------------------------------------------------------
# arm
# ---------------------------------------------------------------------------------------------


def arm_runner() -> Path:
    """The cross-compiled runner, built once per (source, runtime version) and cached."""
    rt = Path(require("aarch64-tvm-runtime"))
    source = RUNTIME_DIR / "arm_runner.cc"
    stamp = (rt / "VERSION").read_text() if (rt / "VERSION").is_file() else ""
    key = hashlib.sha256(source.read_bytes() + (stamp + " ".join(ARM_FLAGS)).encode()).hexdigest()[:16]
    out = rt / "build" / f"{ARM_RUNNER}-{key}"
    if out.is_file():
        return out
    cxx = require(ARM_CXX)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    # --no-as-needed: the runner calls only tvm-ffi, but libtvm_runtime must load to register the VM
    cmd = [
        cxx,
        *ARM_FLAGS,
        f"-I{rt / 'include'}",
        str(source),
        "-o",
        str(tmp),
        f"-L{rt / 'lib'}",
        "-Wl,--no-as-needed",
        "-ltvm_runtime",
        "-ltvm_ffi",
        "-Wl,-rpath,$ORIGIN",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise NnforgeError(
            f"building the arm runner failed ({' '.join(cmd[:1])} exit {proc.returncode}):\n{_tail(proc.stderr)}"
        )
    os.replace(tmp, out)  # atomic: parallel builders agree on the result
    return out


def write_arm_runtime(bundle_dir) -> list[str]:
    """Put the arm runner, the aarch64 TVM runtime libraries and a README into ``bundle_dir``.

    Returns the file names written (for the manifest). The bundle then runs on an aarch64 Linux
    device with nothing else installed than libstdc++: ``./nnforge-arm-runner model.so out in0.npy``.
    """
    d = Path(bundle_dir)
    d.mkdir(parents=True, exist_ok=True)
    runner = arm_runner()
    shutil.copyfile(runner, d / ARM_RUNNER)
    os.chmod(d / ARM_RUNNER, 0o755)
    lib = Path(require("aarch64-tvm-runtime")) / "lib"
    for name in ARM_LIBS:
        shutil.copyfile(lib / name, d / name)
        os.chmod(d / name, 0o755)
    shutil.copyfile(RUNTIME_DIR / "README-arm.md", d / "README.md")
    return [ARM_RUNNER, *ARM_LIBS, "README.md"]


def run_arm(bundle_dir, inputs: Sequence[np.ndarray], lib: str = "model.so", timeout: float = 600) -> list[np.ndarray]:
    """Run ``bundle_dir/lib`` under qemu-aarch64 with the bundle's runner (or the cached one).

    ``tvm.json`` and ``weights.safetensors`` beside the library supply the function name and the
    weights, as nnforge's TVM backend writes them.
    """
    d = Path(bundle_dir).resolve()
    qemu = require(QEMU)
    sysroot = require("aarch64-sysroot")
    if not (d / lib).is_file():
        raise NnforgeError(f"arm bundle {d} lacks {lib}")
    runner = d / ARM_RUNNER
    libdirs = [str(d)]
    if not runner.is_file():  # a bundle saved without its runtime: use the cached build and libraries
        runner = arm_runner()
        libdirs.append(str(Path(require("aarch64-tvm-runtime")) / "lib"))
    _check_inputs(d, inputs)
    with tempfile.TemporaryDirectory(prefix="nnforge-arm-") as tmp:
        paths = _write_inputs(Path(tmp), inputs)
        cmd = [
            qemu,
            "-L",
            sysroot,
            "-E",
            "LD_LIBRARY_PATH=" + ":".join(libdirs),
            str(runner),
            str(d / lib),
            tmp,
            *paths,
        ]
        _run(cmd, "arm runner (qemu-aarch64)", d, timeout)
        return _read_outputs(Path(tmp), d)


# ---------------------------------------------------------------------------------------------
# wasm
# ---------------------------------------------------------------------------------------------


def write_wasm_runtime(bundle_dir) -> list[str]:
    """Put the JS loader, the Node runner, a README and a package.json into ``bundle_dir``."""
    d = Path(bundle_dir)
    d.mkdir(parents=True, exist_ok=True)
    for name in WASM_FILES:
        shutil.copyfile(RUNTIME_DIR / name, d / name)
    shutil.copyfile(RUNTIME_DIR / "README-wasm.md", d / "README.md")
    package = {
        "name": "nnforge-wasm-bundle",
        "private": True,
        "type": "module",
        "description": "An nnforge model for WebAssembly: model.onnx run by onnxruntime-web (see README.md)",
        "scripts": {"run-model": "node wasm_runner.mjs ."},
        "dependencies": {"onnxruntime-web": ORT_WEB_VERSION},
    }
    (d / "package.json").write_text(json.dumps(package, indent=1) + "\n")
    return [*WASM_FILES, "README.md", "package.json"]


def run_wasm(bundle_dir, inputs: Sequence[np.ndarray], timeout: float = 600) -> list[np.ndarray]:
    """Run a wasm bundle in Node: ``model.onnx`` with onnxruntime-web's wasm backend, or a TVM bundle's
    ``model.wasm`` with nnforge's own runtime (``runtime/nnforge-tvm.mjs``)."""
    d = Path(bundle_dir).resolve()
    node = require("node")
    if not (d / "manifest.json").is_file():
        raise NnforgeError(f"wasm bundle {d} lacks manifest.json (the runner takes input/output specs from it)")
    tvm = json.loads((d / "manifest.json").read_text()).get("backend") == "tvm"
    model = "model.wasm" if tvm else "model.onnx"
    if not (d / model).is_file():
        raise NnforgeError(f"wasm bundle {d} lacks {model}")
    runner = d / "wasm_runner.mjs"
    if not all((d / name).is_file() for name in WASM_FILES):
        runner = RUNTIME_DIR / "wasm_runner.mjs"
    _check_inputs(d, inputs)
    env = dict(os.environ)
    if not tvm:
        env["NNFORGE_NODE_MODULES"] = str(Path(require("onnxruntime-web")).parent)
    what = "wasm runner (node + nnforge-tvm.mjs)" if tvm else "wasm runner (node + onnxruntime-web)"
    with tempfile.TemporaryDirectory(prefix="nnforge-wasm-") as tmp:
        paths = _write_inputs(Path(tmp), inputs)
        _run([node, str(runner), str(d), tmp, *paths], what, d, timeout, env)
        return _read_outputs(Path(tmp), d)


# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------

_NUMPY_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")


def _check_inputs(bundle: Path, inputs: Sequence[np.ndarray]) -> None:
    """Count and dtypes against manifest.json (when there is one): a clear error before emulation."""
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return
    specs = json.loads(manifest.read_text()).get("inputs", [])
    if len(specs) != len(inputs):
        names = ", ".join(str(s.get("name")) for s in specs)
        raise NnforgeError(f"bundle {bundle}: the model takes {len(specs)} input(s) ({names}), got {len(inputs)}")
    for spec, x in zip(specs, inputs):
        dtype = np.asarray(x).dtype
        if spec.get("dtype") in _NUMPY_DTYPES and dtype != np.dtype(spec["dtype"]):
            raise NnforgeError(f"bundle {bundle}: input {spec.get('name')!r} must be {spec['dtype']}, got {dtype}")


def _write_inputs(tmp: Path, inputs: Sequence[np.ndarray]) -> list[str]:
    paths = []
    for i, x in enumerate(inputs):
        a = np.asarray(x)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        p = tmp / f"in{i}.npy"
        np.save(p, np.require(a, requirements="C"), allow_pickle=False)
        paths.append(str(p))
    return paths


def _read_outputs(tmp: Path, bundle: Path) -> list[np.ndarray]:
    found = []
    while (tmp / f"out{len(found)}.npy").is_file():
        found.append(np.load(tmp / f"out{len(found)}.npy", allow_pickle=False))
    manifest = bundle / "manifest.json"
    if manifest.is_file():
        expected = len(json.loads(manifest.read_text()).get("outputs", []))
        if expected != len(found):
            raise NnforgeError(
                f"bundle {bundle}: the model produced {len(found)} output(s), manifest.json lists {expected}"
            )
    return found


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: list[str], what: str, bundle: Path, timeout: float, env: dict | None = None) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise NnforgeError(f"{what} on {bundle} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        tail = _tail(proc.stderr) or _tail(proc.stdout) or "(no output)"
        raise NnforgeError(f"{what} failed on {bundle} ({how}):\n{tail}")
