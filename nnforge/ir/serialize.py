"""Save and load graphs as JSON (structure) + safetensors (constants). Never pickle.

Loading validates every field and then runs the verifier, so a hostile or corrupt file gets a
ModelLoadError naming the problem instead of executing anything or crashing later.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..errors import ModelLoadError, VerificationError
from .graph import Graph, Node, TensorType, Value
from .verify import verify

FORMAT = "nnforge-ir"
VERSION = 1
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"


def graph_to_json(g: Graph) -> dict:
    def vt(v: Value) -> dict:
        return {"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype}

    return {
        "format": FORMAT,
        "version": VERSION,
        "name": g.name,
        "inputs": [vt(v) for v in g.inputs],
        "constants": [vt(g.const_values[k]) for k in g.constants],
        "nodes": [
            {
                "op": n.op,
                "inputs": [i.name if i is not None else None for i in n.inputs],
                "outputs": [vt(o) for o in n.outputs],
                "attrs": n.attrs,
                "source": n.source,
            }
            for n in g.nodes
        ],
        "outputs": [v.name for v in g.outputs],
        "meta": {k: v for k, v in g.meta.items() if _jsonable(v)},
    }


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def save_graph(g: Graph, directory: str | os.PathLike) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / GRAPH_FILE).write_text(json.dumps(graph_to_json(g), indent=1))
    # safetensors wants contiguous, writable arrays; empty dict is fine
    # (np.asarray(order="C"), not ascontiguousarray: that turns 0-d scalars into shape (1,))
    # written beside and renamed over: a loaded model may map the old file (map_weights), which must not change
    tmp = d / (WEIGHTS_FILE + ".tmp")
    save_file({k: np.asarray(a, order="C") for k, a in g.constants.items()}, str(tmp))
    os.replace(tmp, d / WEIGHTS_FILE)


_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}  # fmt: skip


def map_weights(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as read-only maps of the file: a loaded model's weights are read from disk
    only where something reads them (a runtime copying them in), not held a second time in memory.
    safetensors checks the header first (dtypes, shapes, offsets inside the file, no overlaps)."""
    with safe_open(str(path), framework="numpy") as f:
        names = list(f.keys())
    whole = np.memmap(path, np.uint8, mode="r").view(np.ndarray)  # one map; every weight is a view of it
    size = int(whole[:8].view("<u8")[0])
    header = json.loads(whole[8 : 8 + size].tobytes())
    out = {}
    for name in names:
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise ModelLoadError(f"{path}: weight {name!r} has dtype {info['dtype']}, which nnforge does not use")
        begin, end = (8 + size + o for o in info["data_offsets"])
        out[name] = whole[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _type(obj, where) -> TensorType:
    if not isinstance(obj, dict) or not isinstance(obj.get("shape"), list) or not isinstance(obj.get("dtype"), str):
        raise ModelLoadError(f"{where}: expected {{name, shape, dtype}}, got {str(obj)[:80]}")
    try:
        return TensorType(tuple(obj["shape"]), obj["dtype"])
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{where}: {e}") from None


def graph_from_json(doc: dict, constants: dict[str, np.ndarray]) -> Graph:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelLoadError(
            f"not an nnforge IR file (format field is {doc.get('format') if isinstance(doc, dict) else None!r})"
        )
    if doc.get("version") != VERSION:
        raise ModelLoadError(
            f"IR format version {doc.get('version')!r} is not supported (this nnforge reads {VERSION})"
        )
    g = Graph(str(doc.get("name", "graph")))
    by_name: dict[str, Value] = {}

    def define(v: Value):
        if v.name in by_name:
            raise ModelLoadError(f"value {v.name!r} defined twice")
        by_name[v.name] = v
        g._names.add(v.name)

    for i, obj in enumerate(doc.get("inputs", [])):
        v = Value(str(obj.get("name")), _type(obj, f"input #{i}"))
        define(v)
        g.inputs.append(v)
    for obj in doc.get("constants", []):
        name = str(obj.get("name"))
        if name not in constants:
            raise ModelLoadError(f"constant {name!r} is missing from the weights file")
        arr = constants[name]
        declared = _type(obj, f"constant {name!r}")
        if TensorType.of(arr) != declared:
            raise ModelLoadError(
                f"constant {name!r}: weights file holds {TensorType.of(arr)}, graph declares {declared}"
            )
        v = Value(name, declared)
        define(v)
        g.constants[name] = arr
        g.const_values[name] = v
    for k, obj in enumerate(doc.get("nodes", [])):
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("op"), str)
            or not isinstance(obj.get("attrs", {}), dict)
        ):
            raise ModelLoadError(f"node #{k} is malformed")
        ins = []
        for name in obj.get("inputs", []):
            if name is not None and name not in by_name:
                raise ModelLoadError(f"node #{k} ({obj['op']}): input {name!r} is not defined before use")
            ins.append(by_name[name] if name is not None else None)
        outs = [Value(str(o.get("name")), _type(o, f"node #{k} output")) for o in obj.get("outputs", [])]
        attrs = {a: (list(v) if isinstance(v, list) else v) for a, v in obj.get("attrs", {}).items()}
        Node(obj["op"], ins, outs, attrs, name=outs[0].name if outs else "", source=str(obj.get("source", "")))
        g.insert_node(outs[0].producer if outs else Node(obj["op"], ins, [], attrs))
        for o in outs:
            define(o)
    for name in doc.get("outputs", []):
        if name not in by_name:
            raise ModelLoadError(f"graph output {name!r} is not defined")
        g.outputs.append(by_name[name])
    g.meta = dict(doc.get("meta", {})) if isinstance(doc.get("meta", {}), dict) else {}
    try:
        verify(g)
    except VerificationError as e:
        raise ModelLoadError(f"graph does not verify: {e}") from None
    return g


def load_graph(directory: str | os.PathLike) -> Graph:
    d = Path(directory)
    try:
        doc = json.loads((d / GRAPH_FILE).read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{d / GRAPH_FILE} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{d / GRAPH_FILE} is not valid JSON: {e}") from None
    try:
        constants = map_weights(d / WEIGHTS_FILE)
    except FileNotFoundError:
        raise ModelLoadError(f"{d / WEIGHTS_FILE} does not exist") from None
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"{d / WEIGHTS_FILE} is not a valid safetensors file: {e}") from None
    return graph_from_json(doc, constants)
