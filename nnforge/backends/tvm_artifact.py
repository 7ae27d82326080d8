"""A built TVM model: load, run and save it with the TVM *runtime* alone.

This module imports no part of TVM's compiler (Relax, TIR, LLVM), so a bundle built elsewhere runs
where only the runtime libraries are installed (``libtvm_runtime``; TVM falls back to runtime-only
mode when ``libtvm_compiler`` is absent): a GPU server or a board that never compiles. Building is
``nnforge/backends/tvm.py``.

CPU threads: TVM's pool defaults to half the logical CPUs on x86 (it assumes hyper-threading), one
thread on a 2-core machine; this module sets TVM_NUM_THREADS to every CPU the process may use unless
it is already set. TVM reads it once, when its pool starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import NnforgeError
from ..ir import Graph
from ..ir.interpret import bind_symbols
from ..targets import Target
from . import tvm_log
from .base import Artifact

if "TVM_NUM_THREADS" not in os.environ:
    os.environ["TVM_NUM_THREADS"] = str(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )

import tvm  # noqa: E402  (the apache-tvm package)
from tvm.runtime.vm import VirtualMachine  # noqa: E402

LIB_NAME = "model.so"
CUDA_SOURCE_NAME = "model.cu"
META_NAME = "tvm.json"
ARM_CXX = "aarch64-linux-gnu-g++"
FORMAT_VERSION = 1
TUNING_FILES = ("tuning_workloads.json", "tuning_records.json")  # = tvm_tune's (imported only when tuning)


def num_threads() -> int:
    """Threads the TVM CPU runtime uses."""
    return int(tvm.get_global_func("runtime.NumThreads")())


def load_cuda_runtime() -> None:
    """Load TVM's CUDA runtime library (it registers the loader of CUDA modules). A full TVM install loads it
    at import; in runtime-only mode nothing does, so a CUDA bundle asks for it here."""
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        try:
            _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
            )
        except (OSError, RuntimeError) as e:
            raise NnforgeError(
                f"this TVM bundle targets CUDA, but TVM's CUDA runtime does not load here "
                f"(it needs a CUDA driver, libcuda): {first_line(e)}"
            ) from None


def first_line(e: Exception) -> str:
    """The message of a (TVM) exception without its C++/Python traceback, kept short."""
    lines = [ln.rstrip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    # TVM puts the traceback first and "xxxError: message" (plus an offending call) last
    for k in range(len(lines) - 1, -1, -1):
        head = lines[k].lstrip()
        if ("Error:" in head.split(" ")[0] or head.startswith("Check failed")) and not head.startswith("File "):
            return " ".join(ln.strip() for ln in lines[k : k + 4])[:600]
    return " ".join(ln.strip() for ln in lines[-3:])[:600]


class TVMArtifact(Artifact):
    backend = "tvm"
    lib_bytes: bytes | None = None  # the library file a loaded artifact came from: what saving it writes back

    def __init__(
        self,
        graph: Graph,
        target: Target,
        lib,
        meta: dict,
        cuda_source: str | None = None,
        tuning_files: dict | None = None,
    ):
        super().__init__(graph, target)
        self.tuning_files = tuning_files or {}  # tuning database files (name -> JSON lines) shipped in the bundle
        self.lib = lib  # relax VMExecutable (fresh build) or runtime.Module (loaded)
        self.meta = meta
        self.cuda_source = cuda_source
        self._vm = None
        self._main = None
        self._params = None
        self._dev = None

    # -- running ---------------------------------------------------------------------------
    def _device(self):
        if self.target.name == "arm":
            raise NnforgeError(
                "an arm (aarch64) TVM library cannot be loaded into this process; "
                "run() runs its bundle under qemu-aarch64 instead"
            )
        if self.target.name == "cuda":
            dev = tvm.cuda(0)
            if not dev.exist:
                raise NnforgeError(
                    "this TVM artifact targets CUDA but no CUDA device is available here; "
                    "it can still be saved (model.so + model.cu) and run on a GPU machine"
                )
            return dev
        return tvm.cpu(0)

    def prepare(self) -> None:
        """Load the library and transform the weights now; the first run does it otherwise (for a decoder
        about a second, which the first generated tokens would pay)."""
        if self._vm is not None:
            return
        self._dev = self._device()
        vm = VirtualMachine(self.lib, self._dev)
        consts = []
        for name in self.meta["params"]:
            if name not in self.graph.constants:
                raise NnforgeError(f"TVM artifact needs weight {name!r}, which its graph does not hold")
            consts.append(tvm.runtime.tensor(np.require(self.graph.constants[name], requirements="C"), self._dev))
        if self.meta.get("transform_params"):
            params = list(vm[self.meta["func"] + "_transform_params"](consts))
        else:
            params = consts
        self._vm, self._params = vm, params
        self._main = vm[self.meta["func"]]  # looking the function up costs ~50 us per call

    def run(self, inputs: Sequence[np.ndarray], raw: bool = False) -> list:
        """Outputs as numpy arrays (``raw``: as TVM tensors, for a caller that converts only some of them)."""
        arrays = [np.asarray(a) for a in inputs]
        try:
            bind_symbols(self.graph, arrays)
        except ValueError as e:
            raise NnforgeError(f"TVM artifact ({self.target.name}): {e}") from None
        if self.target.name == "arm":  # an aarch64 library: run its bundle under qemu-aarch64
            return self.run_emulated(arrays)
        self.prepare()
        args = [self._to_device(a) for a in arrays]
        try:
            out = self._main(*args, *self._params)
        except Exception as e:  # a shape check inside the VM (e.g. broadcasting two symbols that differ)
            raise NnforgeError(f"TVM artifact ({self.target.name}) failed to run: {first_line(e)}") from e
        outs = [out] if len(self.graph.outputs) == 1 else list(out)
        return outs if raw else [o.numpy() for o in outs]

    __call__ = run

    def device_runner(self, inputs: Sequence[np.ndarray]):
        """A zero-argument callable running the model on ``inputs`` already copied to the device and waiting for
        it to finish: what the kernels cost, without the copies ``run`` makes (for benchmarks)."""
        arrays = [np.asarray(a) for a in inputs]
        bind_symbols(self.graph, arrays)
        if self.target.name == "arm":
            raise NnforgeError("an arm (aarch64) library runs only under qemu; it has no device runner here")
        self.prepare()
        args = [tvm.runtime.tensor(np.require(a, requirements="C"), self._dev) for a in arrays]

        def call():
            self._main(*args, *self._params)
            self._dev.sync()

        return call

    def _to_device(self, a: np.ndarray):
        # on the CPU an aligned C-contiguous array is passed without a copy (DLPack); TVM's kernels
        # assume 64-byte aligned data, so anything else is copied into a fresh tensor
        if (
            self.target.name == "cpu"
            and a.flags.c_contiguous
            and a.flags.writeable
            and a.ctypes.data % 64 == 0
            and a.dtype != np.bool_
            and a.size
        ):
            return tvm.runtime.from_dlpack(a)
        return tvm.runtime.tensor(np.require(a, requirements="C"), self._dev)

    # -- files -----------------------------------------------------------------------------
    def save_files(self, directory: Path) -> list[str]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = [LIB_NAME, META_NAME]
        lib_path = str(directory / LIB_NAME)
        # written beside and renamed over: a loaded artifact may have the old library mapped (overwriting a
        # loaded shared library in place crashes the process that runs it)
        tmp = directory / ("tmp-" + LIB_NAME)
        try:
            if self.lib_bytes is not None:  # a loaded library cannot be exported again (or, for arm, loaded here)
                tmp.write_bytes(self.lib_bytes)
            else:
                linker = {"cc": _arm_cxx()} if self.target.name == "arm" else {}
                with tvm_log.quiet():  # saving an executable logs a warning per memory scope
                    self.lib.export_library(str(tmp), **linker)
            os.replace(tmp, lib_path)
        except NnforgeError:
            raise
        except Exception as e:
            raise NnforgeError(f"TVM could not write {lib_path}: {first_line(e)}") from e
        if self.cuda_source is not None:
            (directory / CUDA_SOURCE_NAME).write_text(self.cuda_source)
            names.append(CUDA_SOURCE_NAME)
        (directory / META_NAME).write_text(json.dumps(self.meta, indent=1))
        for name, text in self.tuning_files.items():
            (directory / name).write_text(text)
            names.append(name)
        return names

    @classmethod
    def load_files(cls, directory: Path, graph: Graph, target: Target, manifest: dict) -> "TVMArtifact":
        directory = Path(directory)
        if target.name == "wasm":
            from .tvm_wasm import TVMWasmArtifact

            return TVMWasmArtifact.load_files(directory, graph, target, manifest)
        meta_path, lib_path = directory / META_NAME, directory / LIB_NAME
        for p in (meta_path, lib_path):
            if not p.is_file():
                raise NnforgeError(f"TVM bundle {directory} lacks {p.name}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise NnforgeError(f"TVM bundle {directory}: {META_NAME} is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise NnforgeError(
                f"TVM bundle {directory}: {META_NAME} has format {meta.get('format') if isinstance(meta, dict) else meta!r}, expected {FORMAT_VERSION}"
            )
        if meta.get("target") != target.name:
            raise NnforgeError(f"TVM bundle {directory} was built for {meta.get('target')!r}, not {target.name!r}")
        if meta.get("inputs") != [v.name for v in graph.inputs]:
            raise NnforgeError(
                f"TVM bundle {directory}: library inputs {meta.get('inputs')} do not match the graph's "
                f"{[v.name for v in graph.inputs]}"
            )
        cuda_src = directory / CUDA_SOURCE_NAME
        if target.name == "arm":
            lib = None  # an aarch64 library cannot be loaded into this process
        else:
            if target.name == "cuda":
                load_cuda_runtime()
            try:
                lib = tvm.runtime.load_module(str(lib_path))
            except Exception as e:
                raise NnforgeError(f"TVM could not load {lib_path}: {first_line(e)}") from e
        tuning = {n: (directory / n).read_text() for n in TUNING_FILES if (directory / n).is_file()}
        art = cls(graph, target, lib, meta, cuda_src.read_text() if cuda_src.is_file() else None, tuning)
        art.lib_path, art.bundle_dir = lib_path, directory
        art.lib_bytes = lib_path.read_bytes()  # saving it again (an export of a cached model) writes these
        return art


def _arm_cxx() -> str:
    import shutil

    if shutil.which(ARM_CXX) is None:
        raise NnforgeError(
            f"cross-compiling for arm needs {ARM_CXX}: install it with "
            "`apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu`"
        )
    return ARM_CXX
