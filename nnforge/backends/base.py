"""The backend interface: supports() lists what a backend cannot take, build() makes an Artifact.

An Artifact runs numpy inputs and knows how to write its files into a bundle directory and to
come back from one. Bundles (manifest, hash) are handled once, in ``nnforge.bundle``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..ir import Graph, Node
from ..targets import Target


def few_outer_axes(node: Node, most: int = 8) -> list[int] | None:
    """The sorted axes of a float reduce_sum / reduce_mean over at most ``most`` elements of static axes
    that are not the innermost (ToMe's keys averaged over heads: [b, n, 4, 16] over the 4), else None.
    A reduction kernel reads those few elements with a stride per output; both backends write the sum
    out term by term instead."""
    x, axes = node.inputs[0], node.attrs["axes"]
    if not axes or x.dtype not in ("float32", "float16", "bfloat16", "float64"):
        return None
    axes = sorted(a % x.type.rank for a in axes)
    if axes[-1] == x.type.rank - 1 or not all(isinstance(x.shape[a], int) for a in axes):
        return None
    return axes if math.prod(x.shape[a] for a in axes) <= most else None


@dataclass
class Unsupported:
    op: str
    node: str  # output value name
    source: str  # model source line if known
    reason: str

    def __str__(self) -> str:
        return f"{self.op} (%{self.node}){' at ' + self.source if self.source else ''}: {self.reason}"


class Artifact:
    """A built model. Subclasses implement run/save_files/load_files.

    ``thread_safe``: whether ``run`` may be called from several threads at once. Callers go through
    ``run_artifact``, which serializes the calls of an artifact that does not say so.
    """

    backend: str = ""
    thread_safe: bool = False

    def __init__(self, graph: Graph, target: Target):
        self.graph = graph  # the IR it was built from: input/output names and types live here
        self.target = target

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def save_files(self, directory: Path) -> list[str]:
        """Write the backend's files into ``directory``; return their names (relative)."""
        raise NotImplementedError

    bundle_dir: Path | None = None  # where this artifact's bundle lies (set by loading, or by run_emulated)

    def run_emulated(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run an arm or wasm artifact from this host: its bundle under qemu-aarch64 or in Node.

        An artifact that was not saved yet is written to a temporary bundle once."""
        import tempfile

        from ..bundle import write_bundle
        from ..runtime import edge

        runners = {"arm": edge.run_arm, "wasm": edge.run_wasm}
        if self.target.name not in runners:
            raise NotImplementedError(f"no emulated runner for target {self.target.name!r}")
        if self.bundle_dir is None:
            self.bundle_dir = write_bundle(self, tempfile.mkdtemp(prefix=f"nnforge-{self.target.name}-"))
        return runners[self.target.name](self.bundle_dir, [np.asarray(a) for a in inputs])

    def manifest_fields(self) -> dict:
        """Extra manifest entries the artifact needs to come back (e.g. a partition plan); called after save_files."""
        return {}

    @classmethod
    def load_files(cls, directory: Path, graph: Graph, target: Target, manifest: dict) -> "Artifact":
        raise NotImplementedError


def run_artifact(artifact: Artifact, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``artifact.run(inputs)``, one call at a time unless the artifact is thread-safe."""
    if getattr(artifact, "thread_safe", False):
        return artifact.run(inputs)
    lock = artifact.__dict__.setdefault("_run_lock", threading.Lock())  # setdefault: one lock even when racing
    with lock:
        return artifact.run(inputs)


class Backend:
    name: str = ""

    def supports(self, graph: Graph, target: Target) -> list[Unsupported]:
        """Nodes this backend cannot take for ``target`` (empty list: all supported)."""
        raise NotImplementedError

    def build(self, graph: Graph, target: Target, options: dict | None = None) -> Artifact:
        raise NotImplementedError

    artifact_class: type = Artifact


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


# where each backend's artifact class lives: loading a bundle imports only that (for TVM, the runtime alone)
_ARTIFACTS = {
    "onnxrt": ("onnxrt", "OnnxRuntimeArtifact"),
    "tvm": ("tvm_artifact", "TVMArtifact"),
    "torch": ("torch_exec", "TorchArtifact"),
}


def artifact_class(name: str) -> type:
    """The class that loads and runs ``name``'s saved artifacts, without importing the backend's compiler."""
    import importlib

    from ..errors import NnforgeError

    if name not in _ARTIFACTS:
        raise NnforgeError(f"unknown backend {name!r}; choose from {', '.join(_ARTIFACTS)}")
    module, cls = _ARTIFACTS[name]
    return getattr(importlib.import_module(f"nnforge.backends.{module}"), cls)


def get_backend(name: str) -> Backend:
    from ..errors import NnforgeError

    if name not in _BACKENDS:
        # backends register on import; import lazily so a missing optional dependency only hurts its users
        import importlib

        module = {"onnxrt": "onnxrt", "tvm": "tvm", "torch": "torch_exec"}.get(name)
        if module is None:
            raise NnforgeError(f"unknown backend {name!r}; choose from onnxrt, tvm, torch")
        importlib.import_module(f"nnforge.backends.{module}")
    return _BACKENDS[name]
