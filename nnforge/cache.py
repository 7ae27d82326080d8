"""The compile cache: compiled bundles stored under a content-addressed key.

The key is a sha256 over everything that decides the compiled result: the imported graph (its
JSON and a digest of every constant), each pass of the pipeline (name, declared ``version``, its
typed options and a hash of the source file that defines it, so editing a pass invalidates its
entries), and the ``BuildSettings`` the plan-and-build step builds with: the backend (name, its
packages' versions and a hash of its source files), the target, the build options and the
fallback settings. An entry is an ordinary bundle (see ``nnforge.bundle``), so a hit is
loaded with the same checks as ``nnforge.load`` (hashes, no unpickling); a damaged entry is
dropped and compiled again.

Where: ``$NNFORGE_CACHE_DIR``, else ``~/.cache/nnforge``. ``NNFORGE_CACHE=0`` turns the default
off (``compile(cache=True)`` still uses it). ``nnforge cache info`` / ``nnforge cache clear``.
Compiles with lossy settings or passes, a budget or calibration data are not cached (their result
depends on data the key does not cover).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import NnforgeError
from .ir import Graph
from .ir.serialize import graph_to_json

if TYPE_CHECKING:
    from .partition import BuildSettings

KEY_VERSION = "2"  # bump when the key's recipe changes
_PACKAGE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    return Path(os.environ.get("NNFORGE_CACHE_DIR") or Path.home() / ".cache" / "nnforge")


def enabled_by_default() -> bool:
    return os.environ.get("NNFORGE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------------------------------
# the key
# ---------------------------------------------------------------------------------------

_FILE_HASHES: dict[tuple, str] = {}  # (path, mtime, size) -> sha256: source files are hashed once per process


def _file_hash(path: Path) -> str:
    st = path.stat()
    memo_key = (str(path), st.st_mtime_ns, st.st_size)
    if memo_key not in _FILE_HASHES:
        _FILE_HASHES[memo_key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _FILE_HASHES[memo_key]


def graph_digest(graph: Graph) -> str:
    h = hashlib.sha256(json.dumps(graph_to_json(graph), sort_keys=True, default=str).encode())
    for name in sorted(graph.constants):
        a = graph.constants[name]
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8))  # (0-d becomes 1-d: the shape is hashed above)
    return h.hexdigest()


def pass_fingerprint(p) -> dict:
    """A pass's name, declared version, typed options and the hash of the file its class lives in."""
    module = sys.modules.get(type(p).__module__)
    path = getattr(module, "__file__", None)
    options = getattr(p, "options", None)
    if dataclasses.is_dataclass(options):
        options = dataclasses.asdict(options)
    return {
        "name": p.name,
        "version": str(getattr(p, "version", "")),
        "options": json.dumps(options, sort_keys=True, default=repr),
        "source": _file_hash(Path(path)) if path else type(p).__qualname__,
    }


def backend_fingerprint(backend: str) -> dict:
    """Versions of the backend's packages and hashes of the code that lowers and runs it."""
    from .bundle import versions

    module = {"onnxrt": "onnxrt", "tvm": "tvm", "torch": "torch_exec"}.get(backend, backend)
    files = sorted((_PACKAGE / "backends").glob(f"{module}*.py")) + [_PACKAGE / "backends" / "base.py"]
    return {"name": backend, "versions": versions(backend), "files": {f.name: _file_hash(f) for f in files}}


def compile_key(graph: Graph, passes: list, settings: "BuildSettings") -> str:
    """The cache key of compiling ``graph`` (the imported, not yet optimised graph) with ``passes`` and
    building it with ``settings`` (the plan-and-build step's ``partition.BuildSettings``)."""
    fallback_code = ["partition.py", "backends/torch_exec.py", "ops/fallback.py"] if settings.fallback else []
    recipe = {
        "key_version": KEY_VERSION,
        "graph": graph_digest(graph),
        "passes": [pass_fingerprint(p) for p in passes],
        "backend": backend_fingerprint(settings.backend),
        "fallback": [settings.fallback, settings.min_block_size, {f: _file_hash(_PACKAGE / f) for f in fallback_code}],
        "ir": {f.name: _file_hash(f) for f in sorted((_PACKAGE / "ir").glob("*.py"))},
        "ops": {f.name: _file_hash(f) for f in sorted((_PACKAGE / "ops").glob("*.py"))},  # the ops' lowerings
        "bundle": _file_hash(_PACKAGE / "bundle.py"),
        "target": settings.target.name,
        "options": json.dumps(settings.options, sort_keys=True, default=repr),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# entries
# ---------------------------------------------------------------------------------------


def lookup(key: str):
    """The CompiledModel stored under ``key``, or None (a damaged entry is removed)."""
    from .api import load

    entry = cache_dir() / key
    if not (entry / "manifest.json").is_file():
        return None
    try:
        compiled = load(entry)
    except NnforgeError:
        shutil.rmtree(entry, ignore_errors=True)
        return None
    compiled.cache_key, compiled.from_cache = key, True
    return compiled


def store(key: str, compiled) -> Path | None:
    """Save ``compiled`` as the entry for ``key``; written to a temporary folder, then renamed into place."""
    root = cache_dir()
    entry = root / key
    if entry.exists():
        return entry
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        compiled.save(tmp)
        os.replace(tmp, entry)
    except (OSError, NnforgeError) as e:  # a cache that cannot be written must not fail the compile
        print(f"nnforge: could not write the compile cache entry {entry}: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    compiled.cache_key = key
    return entry


@dataclass
class CacheInfo:
    directory: Path
    entries: int
    bytes: int

    def __str__(self) -> str:
        return (
            f"nnforge compile cache: {self.directory}\n  {self.entries} entr{'y' if self.entries == 1 else 'ies'}, "
            f"{self.bytes / 1e6:.1f} MB"
        )


def _entries() -> list[Path]:
    root = cache_dir()
    return [p for p in root.iterdir() if p.is_dir() and len(p.name) == 64] if root.is_dir() else []


def info() -> CacheInfo:
    size = sum(f.stat().st_size for e in _entries() for f in e.rglob("*") if f.is_file())
    return CacheInfo(cache_dir(), len(_entries()), size)


def clear() -> int:
    """Remove every entry (and left-over temporary folders); returns how many entries were removed."""
    entries = _entries()
    for e in entries:
        shutil.rmtree(e, ignore_errors=True)
    root = cache_dir()
    if root.is_dir():
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    return len(entries)
