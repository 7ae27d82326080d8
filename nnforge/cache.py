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

Size: at most ``$NNFORGE_CACHE_MAX_BYTES`` (bytes, or with a unit: ``500MB``, ``2GB``; default 2 GB).
Storing an entry evicts the least recently used ones until the cache fits; an entry's use time is its
folder's mtime, set when it is stored and on every hit. An entry larger than the limit is not kept.
Compiles with lossy settings or passes, a budget or calibration data are not cached (their result
depends on data the key does not cover).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
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


DEFAULT_MAX_BYTES = 2 * 10**9
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """ "2GB", "500 MB", "1.5g", "123456" -> bytes (decimal units; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise NnforgeError(
            f"NNFORGE_CACHE_MAX_BYTES={text!r} is not a size: give bytes, or a number with KB, MB, GB, KiB, MiB or GiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def max_bytes() -> int:
    """The cache's size limit: ``$NNFORGE_CACHE_MAX_BYTES``, else 2 GB."""
    text = os.environ.get("NNFORGE_CACHE_MAX_BYTES", "").strip()
    return parse_size(text) if text else DEFAULT_MAX_BYTES


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


def _touch(entry: Path) -> None:
    """Mark an entry used now (its folder's mtime is its use time, which eviction orders by)."""
    with contextlib.suppress(OSError):  # a read-only cache still serves hits
        os.utime(entry)


def lookup(key: str):
    """The CompiledModel stored under ``key``, or None (a damaged entry is removed). A hit refreshes its use time."""
    from .api import load

    entry = cache_dir() / key
    if not (entry / "manifest.json").is_file():
        return None
    try:
        compiled = load(entry)
    except (NnforgeError, OSError):  # damaged, or removed while we read it (another process evicted it)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    _touch(entry)
    # the model holds its files in memory; it must not run from the entry's folder, which eviction may remove
    compiled.artifact.bundle_dir = None
    compiled.cache_key, compiled.from_cache = key, True
    return compiled


def store(key: str, compiled) -> Path | None:
    """Save ``compiled`` as the entry for ``key`` (written to a temporary folder, then renamed into place), then
    evict the least recently used entries until the cache fits its size limit."""
    root = cache_dir()
    entry = root / key
    if entry.exists():
        _touch(entry)
        return entry
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        limit = max_bytes()
        root.mkdir(parents=True, exist_ok=True)
        compiled.save(tmp)
        size = _size(tmp)
        if size > limit:
            print(
                f"nnforge: not caching a {size / 1e6:.1f} MB model: it exceeds the cache's limit of "
                f"{limit / 1e6:.1f} MB (NNFORGE_CACHE_MAX_BYTES)",
                file=sys.stderr,
            )
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        os.replace(tmp, entry)
        _touch(entry)
    except (OSError, NnforgeError) as e:  # a cache that cannot be written must not fail the compile
        print(f"nnforge: could not write the compile cache entry {entry}: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    compiled.cache_key = key
    evict(limit, keep=key)
    return entry


@dataclass
class Entry:
    key: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch
    label: str  # target and backend, from the manifest


@dataclass
class CacheInfo:
    directory: Path
    entries: int
    bytes: int
    limit: int = DEFAULT_MAX_BYTES
    lru: list[Entry] = field(default_factory=list)  # least recently used first
    shown: int = 10  # how many of the least recently used entries str() lists

    def __str__(self) -> str:
        lines = [
            f"nnforge compile cache: {self.directory}",
            f"  {self.entries} entr{'y' if self.entries == 1 else 'ies'}, {self.bytes / 1e6:.1f} MB "
            f"of {self.limit / 1e6:.1f} MB (NNFORGE_CACHE_MAX_BYTES; least recently used entries are evicted)",
        ]
        if self.lru:
            lines.append("  least recently used first:")
            now = time.time()
            for e in self.lru[: self.shown]:
                lines.append(
                    f"    {e.key[:12]}  {e.bytes / 1e6:8.2f} MB  used {_ago(now - e.last_used):>9s}  {e.label}"
                )
            if len(self.lru) > self.shown:
                lines.append(f"    ... and {len(self.lru) - self.shown} more, used more recently")
        return "\n".join(lines)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _size(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        with contextlib.suppress(OSError):  # removed meanwhile by another process
            total += f.stat().st_size if f.is_file() else 0
    return total


def _label(path: Path) -> str:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return f"{manifest.get('target', '?')} / {manifest.get('backend', '?')}"
    except (OSError, ValueError, AttributeError):
        return "(no readable manifest)"


def _entries() -> list[Path]:
    root = cache_dir()
    return [p for p in root.iterdir() if p.is_dir() and len(p.name) == 64] if root.is_dir() else []


def entries() -> list[Entry]:
    """Every entry, least recently used first."""
    out = []
    for p in _entries():
        with contextlib.suppress(OSError):  # evicted while we looked
            out.append(Entry(p.name, p, _size(p), p.stat().st_mtime, _label(p)))
    return sorted(out, key=lambda e: (e.last_used, e.key))


def info() -> CacheInfo:
    listed = entries()
    return CacheInfo(cache_dir(), len(listed), sum(e.bytes for e in listed), max_bytes(), listed)


def evict(limit: int | None = None, keep: str | None = None) -> list[str]:
    """Remove the least recently used entries (never ``keep``) until the cache holds at most ``limit`` bytes
    (default: ``max_bytes()``); returns the removed keys."""
    limit = max_bytes() if limit is None else limit
    listed = entries()
    total, removed = sum(e.bytes for e in listed), []
    for e in listed:
        if total <= limit:
            break
        if e.key == keep:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        total -= e.bytes
        removed.append(e.key)
    return removed


def clear() -> int:
    """Remove every entry (and left-over temporary folders); returns how many entries were removed."""
    folders = _entries()
    for e in folders:
        shutil.rmtree(e, ignore_errors=True)
    root = cache_dir()
    if root.is_dir():
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    return len(folders)
