"""Bundles: a directory holding a built model, its IR and a manifest with a content hash.

``manifest.json`` lists the inputs, outputs, target, backend, versions and the sha256 of every
file; its own ``hash`` covers all of that. Loading refuses a bundle whose files or manifest were
changed, one of a newer format, or one whose files escape the directory. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from .errors import BundleError, ModelLoadError
from .ir import Graph, load_graph, save_graph
from .ir.serialize import GRAPH_FILE, WEIGHTS_FILE
from .targets import get_target

FORMAT = "nnforge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def versions(backend: str) -> dict:
    from . import __version__  # not metadata: nnforge may run from a checkout on PYTHONPATH, never installed

    out = {"nnforge": __version__, "python": platform.python_version()}
    dists = {"onnxrt": ["onnxruntime", "onnx"], "tvm": ["apache-tvm"], "torch": ["torch"]}
    for dist in [d for b in backend.split("+") for d in dists.get(b, [])]:  # "onnxrt+torch": partitioned
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def io_spec(graph: Graph) -> tuple[list, list]:
    def spec(v):
        return {"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype}

    return [spec(v) for v in graph.inputs], [spec(v) for v in graph.outputs]


def write_bundle(
    artifact, directory, extra: dict | None = None, extra_files: list[str] = (), with_graph: bool = True
) -> Path:
    """Write artifact files + IR + manifest into ``directory`` (created if needed); ``extra_files``: files the
    caller already wrote there (a tokenizer) that the manifest hashes too. ``with_graph=False``: no IR and
    weights (a second build of a model whose bundle holds them: the reader passes the graph to read_bundle)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = list(artifact.save_files(d)) + list(extra_files)
    files += _edge_runtime(artifact.target.name, d)
    if with_graph:
        save_graph(artifact.graph, d)
        files += [GRAPH_FILE, WEIGHTS_FILE]
    inputs, outputs = io_spec(artifact.graph)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target": artifact.target.name,
        "backend": artifact.backend,
        "inputs": inputs,
        "outputs": outputs,
        "versions": versions(artifact.backend),
        "files": {name: _sha256(d / name) for name in sorted(set(files))},
        **getattr(artifact, "manifest_fields", dict)(),  # e.g. the partition plan
        **(extra or {}),
    }
    manifest["hash"] = _manifest_hash(manifest)
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return d


def _edge_runtime(target: str, directory: Path) -> list[str]:
    """arm and wasm bundles carry their runner and runtime so they are self-contained on the device."""
    from .runtime import edge

    if target == "arm":
        return edge.write_arm_runtime(directory)
    if target == "wasm":
        return edge.write_wasm_runtime(directory)
    return []


def read_manifest(directory) -> dict:
    """Read and check a bundle's manifest and files; raise BundleError naming what is wrong."""
    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise BundleError(f"{d} is not an nnforge bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{d / MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{d / MANIFEST} is not an nnforge bundle manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version!r} is newer than this nnforge reads ({FORMAT_VERSION}); upgrade nnforge"
        )
    if manifest.get("hash") != _manifest_hash(manifest):
        raise BundleError(f"{d / MANIFEST} was modified: its hash does not match its content")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{d / MANIFEST} has no file list")
    root = d.resolve()
    for name, digest in files.items():
        path = (d / name).resolve()
        if "/" in name or "\\" in name or name.startswith(".") or root not in path.parents:
            raise BundleError(f"bundle file name {name!r} is not a plain file name in the bundle")
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing")
        if _sha256(path) != digest:
            raise BundleError(f"bundle file {name} was modified: its sha256 does not match the manifest")
    return manifest


def read_bundle(directory, expect_target: str | None = None, graph: Graph | None = None):
    """Load a bundle into an Artifact of its backend (``graph``: for a bundle written without its IR, the graph
    it was built from; its inputs must be the manifest's)."""
    from .backends.base import artifact_class

    d = Path(directory)
    manifest = read_manifest(d)
    if graph is not None and list(io_spec(graph)[0]) != list(manifest.get("inputs", [])):
        raise BundleError(f"{d}: the bundle was not built from this graph (its inputs differ)")
    try:
        target = get_target(manifest.get("target", ""))
    except Exception as e:
        raise BundleError(f"bundle target: {e}") from None
    if expect_target is not None and target.name != get_target(expect_target).name:
        raise BundleError(f"bundle is for target {target.name!r}, not {expect_target!r}")
    try:
        graph = load_graph(d) if graph is None else graph
    except ModelLoadError as e:
        raise BundleError(f"bundle IR: {e}") from None
    if "partitions" in manifest:  # partitions of several backends, run in the recorded plan's order
        from .partition import PartitionedArtifact

        return PartitionedArtifact.load_files(d, graph, target, manifest), manifest
    try:
        cls = artifact_class(str(manifest.get("backend")))
    except Exception as e:
        raise BundleError(f"bundle backend: {e}") from None
    artifact = cls.load_files(d, graph, target, manifest)
    artifact.bundle_dir = d
    return artifact, manifest
