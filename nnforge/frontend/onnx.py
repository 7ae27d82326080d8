"""ONNX frontend: a .onnx file (path, bytes or ModelProto) -> nnforge IR.

Loading is defensive: a missing, empty, truncated or malformed file, external data outside the
model's folder, an unknown opset or operator domain, or a model that fails onnx.checker / strict
shape inference gets a ModelLoadError naming the file and the problem.

Conversion is table-driven (``CONVERTERS``: ONNX op type -> small function). Shape arithmetic
that exporters emit (Shape -> Gather/Slice -> Concat -> Reshape) is evaluated at import time on
``Sym`` values: small int tensors whose entries are ints or IR symbol strings ("batch"), so a
dynamic reshape becomes ``reshape {shape=[batch, seq, 4, 8]}``. Ops whose inputs are all
constants are folded with the IR's own reference implementations.
"""

from __future__ import annotations

import keyword
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.inliner
import onnx.version_converter
import sympy
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from ..backends.onnxrt import ONNX_DTYPES
from ..errors import ModelLoadError, UnsupportedOpError
from ..ir import Graph, TensorType, Value, symbols, verify
from ..ir.graph import CARRIED_DTYPES
from ..ir.interpret import run_node
from ..ir.registry import REGISTRY, OpError
from ..ir.shapes import broadcast_shapes
from ..ops import onnx_node
from ..ops.shape import BIG

__all__ = ["import_onnx", "CONVERTERS", "MIN_OPSET"]

MIN_OPSET = 13  # Squeeze/Unsqueeze/ReduceSum/Split take axes as inputs from here on
OLDEST_OPSET = 1  # older models (opsets 1..12) are converted to MIN_OPSET with onnx.version_converter
# constants computed at import (ConstantOfShape, Range, folded ops) may not exceed this many elements:
# a tiny file must not make the importer allocate gigabytes
MAX_IMPORT_ELEMENTS = 1 << 26
MAX_RUNTIME_FILL = 1 << 30  # a constant filled at run time (ConstantOfShape above the import limit): 4 GB of fp32
MAX_INPUT_ELEMENTS = 1 << 34  # a declared input larger than this is a broken or hostile file, not a model

DTYPES = {onnx_type: ir for ir, onnx_type in ONNX_DTYPES.items()}  # ONNX element type -> IR dtype (one table)


# ---------------------------------------------------------------------------------------
# reading and validating the file
# ---------------------------------------------------------------------------------------


def _read(src) -> tuple[onnx.ModelProto, str, Path | None]:
    """Parse without touching external data; returns (model, name for messages, folder of the file)."""
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)  # loading external data and inlining must not change the caller's proto
        return model, "<ModelProto>", None
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _parse(bytes(src), "<bytes>"), "<bytes>", None
    if not isinstance(src, (str, os.PathLike)):
        raise ModelLoadError(f"import_onnx takes a path, bytes or onnx.ModelProto, not {type(src).__name__}")
    path = Path(src)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror or e}") from None
    return _parse(data, str(path)), str(path), path.resolve().parent


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{where}: file is empty (0 bytes)")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"{where}: not a valid ONNX protobuf ({len(data)} bytes; truncated, or not an ONNX file): {e}"
        ) from None
    # protobuf accepts many byte strings as an empty or odd message; an ONNX model has these
    if not model.ir_version or not model.HasField("graph") or not model.opset_import:
        raise ModelLoadError(
            f"{where}: not an ONNX model (no ir_version, graph or opset_import after parsing "
            f"{len(data)} bytes; truncated or not an ONNX file)"
        )
    return model


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto that may hold external data: initializers, Constant attributes, subgraphs, functions."""

    def from_graph(g):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for n in g.node:
            yield from from_nodes([n])

    def from_nodes(nodes):
        for n in nodes:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("g"):
                    yield from from_graph(a.g)
                for sub in a.graphs:
                    yield from from_graph(sub)

    yield from from_graph(model.graph)
    for f in model.functions:
        yield from from_nodes(f.node)


def _check_external_data(model: onnx.ModelProto, where: str, folder: Path | None) -> None:
    """Refuse external data outside the model's folder before any of it is opened."""
    for t in _all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc:
            raise ModelLoadError(f"{where}: tensor {t.name!r} says its data is external but names no location")
        if folder is None:
            raise ModelLoadError(
                f"{where}: tensor {t.name!r} keeps its data in external file {loc!r}; "
                "load the model from its file path so the data can be found"
            )
        if os.path.isabs(loc) or Path(loc).is_absolute() or re.match(r"^([a-zA-Z]:)?[\\/]", loc):
            raise ModelLoadError(
                f"{where}: tensor {t.name!r}: external data location {loc!r} is an absolute path; "
                "only files inside the model's folder are allowed"
            )
        if ".." in re.split(r"[\\/]", loc):
            raise ModelLoadError(
                f"{where}: tensor {t.name!r}: external data location {loc!r} leaves the model's "
                "folder ('..'); only files inside it are allowed"
            )
        target = (folder / loc).resolve()
        if folder not in target.parents:  # e.g. a symlink pointing out of the folder
            raise ModelLoadError(
                f"{where}: tensor {t.name!r}: external data {loc!r} resolves outside the model's folder"
            )
        if not target.is_file():
            raise ModelLoadError(f"{where}: tensor {t.name!r}: external data file {loc!r} is missing")
        size = target.stat().st_size
        offset, length = int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0)
        if offset + length > size:
            raise ModelLoadError(
                f"{where}: tensor {t.name!r}: external data {loc!r} is {size} bytes, "
                f"but offset {offset} + length {length} go past its end (truncated?)"
            )


def _load_external(model: onnx.ModelProto, where: str, folder: Path | None) -> None:
    if folder is None or not any(t.data_location == TensorProto.EXTERNAL for t in _all_tensors(model)):
        return
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as e:  # onnx raises several types here (OSError, ValueError, its own checker errors)
        raise ModelLoadError(f"{where}: cannot load external data: {e}") from None


def _first_lines(e: Exception, n: int = 6) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return "\n  ".join(lines[:n]) + ("\n  ..." if len(lines) > n else "")


def _validate(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """Check the model; returns it with ONNX's inferred types (the types of values kept as opaque nodes)."""
    versions = {op.domain or "ai.onnx": op.version for op in model.opset_import}
    version = versions.get("ai.onnx")
    newest = onnx.defs.onnx_opset_version()
    if version is not None and not MIN_OPSET <= version <= newest:
        raise ModelLoadError(
            f"{where}: ONNX opset {version} is not supported; nnforge reads opsets {OLDEST_OPSET}..{newest}"
        )
    local = {(f.domain, f.name) for f in model.functions}
    # other domains' ops are kept as is for ONNX Runtime when ONNX knows their schema (ai.onnx.ml, preview)
    foreign = [
        n
        for n in model.graph.node
        if (n.domain or "ai.onnx") != "ai.onnx"
        and (n.domain, n.op_type) not in local
        and not onnx.defs.has(n.op_type, n.domain)
    ]
    if foreign:
        listed = ", ".join(f"{n.domain}::{n.op_type} (node {n.name or '?'})" for n in foreign[:10])
        raise ModelLoadError(
            f"{where}: uses operators from domain(s) nnforge does not know "
            f"{sorted({n.domain for n in foreign})}: {listed}"
        )
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:  # ValueError: names that are not UTF-8
        raise ModelLoadError(f"{where}: fails onnx.checker:\n  {_first_lines(e)}") from None
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{where}: fails ONNX shape inference:\n  {_first_lines(e)}") from None


def _upgrade(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """Opsets 7..12 -> MIN_OPSET with ONNX's own version converter; a model importing no default opset
    (only ai.onnx.ml, say) gets the newest one, which its nodes do not use."""
    versions = {op.domain or "ai.onnx": op.version for op in model.opset_import}
    version = versions.get("ai.onnx")
    if version is None:
        model.opset_import.append(helper.make_opsetid("", onnx.defs.onnx_opset_version()))
        return model
    if not OLDEST_OPSET <= version < MIN_OPSET:
        return model
    if version < 9 and any(n.op_type == "Scan" for n in model.graph.node):
        # Scan-8 scans a batch axis that Scan-9 dropped; the converter keeps the inputs' ranks, which breaks it
        raise ModelLoadError(f"{where}: Scan at opset {version} (with its batch axis) cannot be converted to opset 9+")
    try:
        return onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # the converter raises RuntimeError/ValidationError/its own adapter errors
        raise ModelLoadError(
            f"{where}: ONNX opset {version} could not be converted to opset {MIN_OPSET} "
            f"(onnx.version_converter: {_first_lines(e, 2)})"
        ) from None


def import_onnx(src, name: str | None = None) -> Graph:
    """Read an ONNX model (path, bytes or ModelProto) into an IR graph.

    Raises ModelLoadError for unreadable or invalid files and UnsupportedOpError listing every
    node nnforge cannot map.
    """
    model, where, folder = _read(src)
    _check_external_data(model, where, folder)
    _load_external(model, where, folder)
    if model.functions:  # torch/onnxscript may emit model-local functions: inline them
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:
            raise ModelLoadError(f"{where}: cannot inline its local functions: {e}") from None
    model = _upgrade(model, where)
    inferred = _validate(model, where)
    graph = _Importer(model, where, inferred).run()
    if name:
        graph.name = name
    return graph


def _value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(
        name, ONNX_DTYPES[t.dtype], [d if isinstance(d, int) else str(d) for d in t.shape]
    )


def _outer_names(n: onnx.NodeProto) -> list[str]:
    """Values a node's subgraphs read from the enclosing scope (If/Loop/Scan bodies), in first-use order."""
    found: list[str] = []

    def walk(g, outer_defined: set) -> None:
        local = {i.name for i in g.input} | {t.name for t in g.initializer} | outer_defined
        for m in g.node:
            for i in m.input:
                if i and i not in local and i not in found:
                    found.append(i)
            for a in m.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(sub, local)
            local |= set(m.output)
        for o in g.output:
            if o.name not in local and o.name not in found:
                found.append(o.name)

    for a in n.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            walk(g, set())
    return found


# ---------------------------------------------------------------------------------------
# import-time values
# ---------------------------------------------------------------------------------------


class Sym:
    """A shape tensor known at import time whose entries may be symbolic dims (ints or IR dim strings)."""

    def __init__(self, arr, dtype: str = "int64"):
        self.arr = np.asarray(arr, dtype=object)
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"Sym({self.arr.tolist()})"


class _Unsupported(Exception):
    """A converter cannot take this node (attribute combination, dynamic data it would need statically)."""


_POISON = object()  # output of a node that could not be converted; its users are skipped silently
_PENDING = object()  # a value inside the opaque region (a sequence, or a type ONNX cannot infer statically)


def _dim_op(fn) -> Callable:
    """Elementwise dim arithmetic for object arrays (ints or symbol strings) through sympy."""

    def one(a, b):
        if isinstance(a, str) or isinstance(b, str):
            return symbols.from_sympy(fn(symbols.to_sympy(a), symbols.to_sympy(b)))
        return int(fn(a, b))

    return np.frompyfunc(one, 2, 1)


def _floordiv(a, b):
    return a // b if isinstance(a, int) and isinstance(b, int) else sympy.floor(a / b)


_SYM_ARITH = {
    "Add": _dim_op(lambda a, b: a + b),
    "Sub": _dim_op(lambda a, b: a - b),
    "Mul": _dim_op(lambda a, b: a * b),
    # ONNX integer Div truncates; dims are positive, where that is floor division
    "Div": _dim_op(_floordiv),
    "Mod": _dim_op(lambda a, b: a % b),
}


def _sanitize_symbol(p: str) -> str:
    s = re.sub(r"\W", "_", p) or "dim"
    return f"d_{s}" if s[0].isdigit() or keyword.iskeyword(s) else s


# ---------------------------------------------------------------------------------------
# the importer
# ---------------------------------------------------------------------------------------


class _Importer:
    def __init__(self, model: onnx.ModelProto, where: str, inferred: onnx.ModelProto | None = None):
        self.model = model
        g = (inferred or model).graph  # ONNX's inferred types, for the outputs of nodes kept opaque
        self.inferred_types = {vi.name: vi.type for vi in [*g.value_info, *g.output, *g.input]}
        self.where = where
        self.g = Graph(_sanitize_symbol(model.graph.name or "onnx_model"))
        self.env: dict[str, Any] = {}  # ONNX name -> Value | Sym | _POISON
        self.failed: list[tuple[str, str]] = []
        self.node = None  # the ONNX node being converted (for names and messages)
        self.region: list[onnx.NodeProto] = []  # nodes kept together as one onnx_node (see _join_region)
        self.symbol_tensors: dict[str, Value] = {}  # symbol -> int64 [1] tensor of its run-time value

    # -- driver -----------------------------------------------------------------------
    def run(self) -> Graph:
        graph = self.model.graph
        if graph.sparse_initializer:
            raise ModelLoadError(f"{self.where}: sparse initializers are not supported")
        inits = set()
        for t in graph.initializer:
            self.env[t.name] = self.g.add_constant(self._array(t), name=t.name)
            inits.add(t.name)
        for vi in graph.input:
            if vi.name not in inits:  # an input with an initializer is a constant with a default
                self.env[vi.name] = self.g.add_input(vi.name, self._input_type(vi))
        for n in graph.node:
            self._convert(n)
        self._flush_region(graph)
        if self.failed:
            raise UnsupportedOpError(self.failed, where=self.where)
        for vi in graph.output:  # a shape as a graph output: computed at run time
            if isinstance(self.env[vi.name], Sym):
                self.node = helper.make_node("Identity", [vi.name], [vi.name], name=f"output {vi.name}")
                try:
                    self.env[vi.name] = self._materialize(self.env[vi.name])
                except _Unsupported as e:
                    raise UnsupportedOpError([("output", f"graph output {vi.name}: {e}")], where=self.where) from None
        self.node = None
        self.g.outputs = [self.env[vi.name] for vi in graph.output]
        self.g.remove_unused_constants()
        self.g.meta.update(
            {
                "frontend": "onnx",
                "source_file": self.where,
                "onnx_opset": max(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")),
            }
        )
        verify(self.g)
        return self.g

    def _convert(self, n: onnx.NodeProto) -> None:
        self.node = n
        args = [self.env[i] if i else None for i in n.input]
        outs = list(n.output)
        if any(a is _POISON for a in args):
            results = [_POISON] * len(outs)
        elif any(a is _PENDING for a in args):
            results = self._join_region(n)
        elif self._carried_types(n, args):  # IR ops do not compute on float8, 4-bit or string values
            results = self._opaque_or_fail(n, args, "it computes on a type only ONNX ops take")
        else:
            mark = self.g.nodes[-1] if self.g.nodes else None
            try:
                if self._is_shape_math(n, args):
                    results = SYM_RULES[n.op_type](self, n, [self.obj(a) if a is not None else None for a in args])
                elif n.op_type in CONVERTERS and (n.domain or "ai.onnx") == "ai.onnx":
                    results = CONVERTERS[n.op_type](self, n, args)
                else:
                    raise _Unsupported("no IR op for it")
            except (_Unsupported, OpError, ValueError, TypeError, IndexError, KeyError) as e:
                # no IR mapping (or not this attribute combination): keep the node as is for ONNX Runtime
                self._drop_nodes_after(mark)
                results = self._opaque_or_fail(
                    n, args, e if isinstance(e, _Unsupported) else f"{type(e).__name__}: {e}"
                )
        results = results if isinstance(results, (list, tuple)) else [results]
        for name, r in zip(outs, results):
            if name:
                self.env[name] = r

    def _opaque_or_fail(self, n: onnx.NodeProto, args: list, reason) -> list:
        try:
            return self.opaque(n, args)
        except _Unsupported as why:
            self.failed.append((n.op_type, f"node {n.name or '?'}: {reason}; kept as is: {why}"))
            return [_POISON] * len(n.output)

    def _carried_types(self, n: onnx.NodeProto, args: list) -> bool:
        if any(isinstance(a, Value) and a.dtype in CARRIED_DTYPES for a in args):
            return True
        types = [self.inferred_types.get(o) for o in n.output if o]
        return any(
            t is not None and t.HasField("tensor_type") and DTYPES.get(t.tensor_type.elem_type) in CARRIED_DTYPES
            for t in types
        )

    def _drop_nodes_after(self, mark) -> None:
        """Undo what a converter emitted before it gave up (its nodes are the graph's last ones)."""
        while self.g.nodes and self.g.nodes[-1] is not mark:
            self.g.remove_node(self.g.nodes[-1])

    def opaque(self, n: onnx.NodeProto, args: list) -> list:
        """Keep ``n`` as an ``onnx_node`` (see nnforge.ops.onnx_node): a one-node model with typed inputs."""
        reads = [i for i in dict.fromkeys(n.input) if i]
        reads += [i for i in _outer_names(n) if i not in reads]
        if any(self.env.get(name) is _PENDING for name in reads):
            return self._join_region(n)
        values = []
        for name in reads:
            v = self.env.get(name)
            if v is None:
                raise _Unsupported(f"reads {name!r}, which is not defined before it")
            if v is _POISON:
                raise _Unsupported(f"reads {name!r}, which could not be imported")
            values.append(self._materialize(v) if isinstance(v, Sym) else v)
        outs = [o for o in n.output if o]
        try:
            out_types = [self._inferred_type(o) for o in outs]
        except _Unsupported:  # a sequence, or a shape only known at run time: keep it with its readers
            return self._join_region(n)
        node = self._emit_fragment([n], reads, values, outs, out_types, f"onnx node {n.name or '?'} ({n.op_type})")
        by_name = dict(zip(outs, node.outputs))
        return [by_name.get(o, _POISON) for o in n.output]

    def _emit_fragment(self, nodes, reads, values, outs, out_types, source: str):
        frag = helper.make_graph(
            nodes,
            "onnx_node",
            [_value_info(name, v.type) for name, v in zip(reads, values)],
            [_value_info(o, t) for o, t in zip(outs, out_types)],
        )
        model = helper.make_model(frag, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        return self.g.add_node(
            "onnx_node",
            values,
            {
                "op_type": "+".join(dict.fromkeys(n.op_type for n in nodes)),
                "model": onnx_node.pack(model),
                "out_types": [{"shape": list(t.shape), "dtype": t.dtype} for t in out_types],
            },
            name=self._hint(),
            source=source + ", kept as is",
        )

    def _join_region(self, n: onnx.NodeProto) -> list:
        """Values IR types cannot hold (sequences, optionals, ranks ONNX infers only at run time) stay inside
        one opaque region with every node that reads them; it becomes one onnx_node at the end of the graph,
        whose outputs are the graph outputs it makes."""
        self.region.append(n)
        for o in n.output:
            if o:
                self.env[o] = _PENDING
        return [_PENDING if o else None for o in n.output]

    def _flush_region(self, graph) -> None:
        if not self.region:
            return
        self.node = self.region[-1]
        made = {o for m in self.region for o in m.output if o}
        reads = []
        for m in self.region:
            for name in [*m.input, *_outer_names(m)]:
                if name and name not in made and name not in reads:
                    reads.append(name)
        values = [self.env.get(name) for name in reads]
        bad = [name for name, v in zip(reads, values) if not isinstance(v, Value)]
        outs = [vi.name for vi in graph.output if vi.name in made]
        ops = ", ".join(dict.fromkeys(m.op_type for m in self.region))
        try:
            if bad:
                raise _Unsupported(f"reads {bad[:3]}, which are not tensors known before it")
            if not outs:
                raise _Unsupported("makes no graph output")
            out_types = [self._inferred_type(o) for o in outs]
        except _Unsupported as e:
            self.failed.append((ops, f"the region of nodes kept as is for ONNX Runtime: {e}"))
            for o in made:
                self.env[o] = _POISON
            return
        node = self._emit_fragment(self.region, reads, values, outs, out_types, f"onnx nodes {ops}")
        self.env.update(zip(outs, node.outputs))

    def _inferred_type(self, name: str) -> TensorType:
        t = self.inferred_types.get(name)
        if t is None or not t.HasField("tensor_type"):
            kind = "unknown" if t is None else t.WhichOneof("value")
            raise _Unsupported(f"its output {name!r} is not a tensor ONNX shape inference types ({kind})")
        tt = t.tensor_type
        if tt.elem_type not in DTYPES:
            raise _Unsupported(f"its output {name!r} has element type {TensorProto.DataType.Name(tt.elem_type)}")
        if not tt.HasField("shape"):
            raise _Unsupported(f"ONNX shape inference does not know the rank of its output {name!r}")
        return TensorType(tuple(self._dim(d, name, i) for i, d in enumerate(tt.shape.dim)), DTYPES[tt.elem_type])

    def _is_shape_math(self, n, args) -> bool:
        """A shape-math rule applies: some input is a symbolic Sym, the others are integer constants."""
        present = [a for a in args if a is not None]
        return (
            n.op_type in SYM_RULES
            and any(isinstance(a, Sym) for a in present)
            and all(
                isinstance(a, Sym) or (self.g.is_constant(a) and a.dtype.startswith(("int", "uint"))) for a in present
            )
        )

    # -- types and constants ----------------------------------------------------------
    def _array(self, t: onnx.TensorProto) -> np.ndarray:
        if t.data_type not in DTYPES:
            raise ModelLoadError(
                f"{self.where}: tensor {t.name!r} has element type "
                f"{TensorProto.DataType.Name(t.data_type)}, which nnforge does not support"
            )
        try:
            return np.asarray(numpy_helper.to_array(t))
        except Exception as e:
            raise ModelLoadError(f"{self.where}: tensor {t.name!r} is malformed: {e}") from None

    def _input_type(self, vi: onnx.ValueInfoProto) -> TensorType:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type not in DTYPES:
            raise ModelLoadError(
                f"{self.where}: graph input {vi.name!r} must be a tensor of one of {sorted(DTYPES.values())}"
            )
        if not tt.HasField("shape"):
            raise ModelLoadError(f"{self.where}: graph input {vi.name!r} has no shape (not even its rank)")
        t = TensorType(tuple(self._dim(d, vi.name, i) for i, d in enumerate(tt.shape.dim)), DTYPES[tt.elem_type])
        known = math.prod(d for d in t.shape if isinstance(d, int))
        if known > MAX_INPUT_ELEMENTS:
            raise ModelLoadError(
                f"{self.where}: graph input {vi.name!r} declares {known:,} elements ({t}); "
                f"nnforge refuses inputs over {MAX_INPUT_ELEMENTS:,} elements"
            )
        return t

    def _dim(self, d, name: str, axis: int):
        if d.HasField("dim_value"):
            if d.dim_value < 0:
                raise ModelLoadError(
                    f"{self.where}: graph input {name!r} declares a negative size {d.dim_value} at axis {axis}"
                )
            return int(d.dim_value)
        if d.dim_param:
            try:
                return symbols.simplify(d.dim_param)  # "batch", "2*seq"
            except ValueError:
                return _sanitize_symbol(d.dim_param)
        return _sanitize_symbol(f"{name}_dim{axis}")  # an unnamed dynamic dim gets its own symbol

    def attrs(self, n: onnx.NodeProto) -> dict:
        out = {}
        for a in n.attribute:
            v = helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        return out

    # -- value access -------------------------------------------------------------------
    def const(self, a) -> np.ndarray | None:
        """The import-time value of an input (constant or static shape), or None if only known at run time."""
        if isinstance(a, Sym):
            return None
        if a is not None and self.g.is_constant(a):
            return self.g.constant(a)
        return None

    def need_const(self, a, what: str) -> np.ndarray:
        c = self.const(a)
        if c is None:
            raise _Unsupported(f"{what} must be a constant (it is computed at run time here)")
        return c

    def ints(self, a, what: str) -> list[int]:
        return [int(v) for v in np.asarray(self.need_const(a, what)).reshape(-1)]

    def dims(self, a, what: str) -> list:
        """A 1-D shape input as IR dims (ints and symbol strings)."""
        if isinstance(a, Sym):
            return list(a.arr.reshape(-1).tolist())
        return self.ints(a, what)

    def obj(self, a) -> np.ndarray:
        """Sym or constant as an object array of Python ints / dim strings (for import-time shape math)."""
        if isinstance(a, Sym):
            return a.arr
        return np.asarray(self.g.constant(a).tolist(), dtype=object)

    def sym(self, arr, dtype: str = "int64"):
        """A shape-math result: a constant when every entry is known, else a Sym."""
        arr = np.asarray(arr, dtype=object)
        if all(isinstance(v, (int, np.integer)) for v in arr.reshape(-1)):
            return self.g.add_constant(np.asarray(arr.tolist(), dtype=dtype).reshape(arr.shape), name=self._hint())
        return Sym(arr, dtype)

    def value(self, a) -> Value:
        """An input as an IR value; a symbolic shape tensor used as data is computed at run time."""
        if isinstance(a, Sym):
            return self._materialize(a)
        return a

    def _materialize(self, s: Sym) -> Value:
        """A shape known only as symbols, as a run-time tensor: each symbol read from the shape of a graph input
        that has it (an ONNX Shape node, kept for ONNX Runtime: the IR has no shape_of op), expressions of them
        built with IR integer ops."""
        parts = [self._dim_tensor(symbols.to_sympy(d)) for d in s.arr.reshape(-1)]
        flat = parts[0] if len(parts) == 1 else self.op("concat", *parts, axis=0)
        if s.arr.shape != (len(parts),):
            flat = self.op("reshape", flat, shape=list(s.arr.shape))
        return flat if s.dtype == "int64" else self.op("cast", flat, dtype=s.dtype)

    def _dim_tensor(self, e) -> Value:
        if e.is_Integer:
            return self.constant(np.array([int(e)], np.int64))
        if e.is_Symbol:
            return self._symbol_tensor(e.name)
        if isinstance(e, (sympy.Add, sympy.Mul)) and all(a.is_Integer or a.free_symbols for a in e.args):
            terms = [self._dim_tensor(a) for a in e.args]
            out = terms[0]
            for t in terms[1:]:
                out = self.op("add" if isinstance(e, sympy.Add) else "mul", out, t)
            return out
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            return self.op("div", self._dim_tensor(num), self._dim_tensor(den))  # positive sizes: floor == trunc
        raise _Unsupported(f"cannot compute the size {e} at run time")

    def _symbol_tensor(self, name: str) -> Value:
        if name not in self.symbol_tensors:
            # a graph input with that size, else a value computed so far (a size only known at run time)
            values = [*self.g.inputs, *(o for n in self.g.nodes for o in n.outputs)]
            where = next(((v, k) for v in values for k, d in enumerate(v.shape) if d == name), None)
            if where is None:
                raise _Unsupported(f"the size {name!r} is not a dimension of any value before it")
            v, axis = where
            shape = helper.make_node("Shape", ["x"], ["n"], start=axis, end=axis + 1)
            node = self._emit_fragment([shape], ["x"], [v], ["n"], [TensorType((1,), "int64")], f"size {name}")
            self.symbol_tensors[name] = node.outputs[0]
        return self.symbol_tensors[name]

    def _hint(self, k: int = 0) -> str:
        return self.node.output[k] if self.node is not None and len(self.node.output) > k else "c"

    # -- emitting IR ----------------------------------------------------------------------
    def op(self, ir_op: str, *inputs, k: int = 0, fold: bool = True, **attrs) -> Value:
        """Append an IR node for output ``k`` of the current ONNX node; fold it when every input is constant
        (unless ``fold`` is off: a tensor too large to make at import, filled at run time)."""
        inputs = [self.value(i) if i is not None else None for i in inputs]
        node = self.g.make_node(
            ir_op, inputs, attrs, name=self._hint(k), source=f"onnx node {self.node.name or '?'} ({self.node.op_type})"
        )
        if fold and self._foldable(node):
            self.check_size(node.outputs[0].type.shape, f"the result of {ir_op}")
            arrays = [self.g.constant(i) if i is not None else None for i in inputs]
            return self.g.add_constant(run_node(node, arrays, {})[0], name=self._hint(k))
        self.g.insert_node(node)
        return node.output

    def _foldable(self, node) -> bool:
        if not all(i is None or self.g.is_constant(i) for i in node.inputs) or len(node.outputs) != 1:
            return False
        for key, (kind, _) in REGISTRY[node.op].attrs.items():  # symbolic attributes need run-time values
            v = node.attrs.get(key)
            if (kind == "dim" and isinstance(v, str)) or (kind == "dims" and any(isinstance(d, str) for d in v)):
                return False
        return True

    def check_size(self, shape, what: str, limit: int = MAX_IMPORT_ELEMENTS) -> None:
        """Refuse an import-time constant of more than ``limit`` elements (before allocating it)."""
        n = 1
        for d in shape:
            n *= int(d)
        if n > limit:
            node = (self.node.name or "?") if self.node is not None else "?"
            raise ModelLoadError(
                f"{self.where}: node {node} ({self.node.op_type if self.node else '?'}): {what} "
                f"would be a constant of {n:,} elements (shape {list(shape)}); nnforge refuses "
                f"constant tensors over {limit:,} elements"
            )

    def constant(self, array, k: int = 0) -> Value:
        return self.g.add_constant(np.asarray(array), name=self._hint(k))


# ---------------------------------------------------------------------------------------
# converters: fn(imp, node, args) -> output(s); args are Values, Syms or None
# ---------------------------------------------------------------------------------------

Converter = Callable[[_Importer, onnx.NodeProto, list], Any]
CONVERTERS: dict[str, Converter] = {}


def _same(ir_op: str) -> Converter:
    """Ops whose IR twin takes the same inputs and no attributes."""

    def conv(imp, n, args):
        return imp.op(ir_op, *args)

    return conv


def _variadic(ir_op: str) -> Converter:
    """Max/Min/Sum take any number of inputs: fold them pairwise."""

    def conv(imp, n, args):
        out = imp.value(args[0])
        for b in args[1:]:
            out = imp.op(ir_op, out, b)
        return out

    return conv


CONVERTERS.update({ox: _variadic(ir) for ox, ir in {"Max": "maximum", "Min": "minimum", "Sum": "add"}.items()})
CONVERTERS.update(
    {
        ox: _same(ir)
        for ox, ir in {
            "Add": "add",
            "Sub": "sub",
            "Mul": "mul",
            "Equal": "eq",
            "Less": "lt",
            "LessOrEqual": "le",
            "Greater": "gt",
            "GreaterOrEqual": "ge",
            "And": "logical_and",
            "Or": "logical_or",
            "Not": "logical_not",
            "Where": "where",
            "MatMul": "matmul",
            "Exp": "exp",
            "Log": "log",
            "Sqrt": "sqrt",
            "Reciprocal": "reciprocal",
            "Tanh": "tanh",
            "Sigmoid": "sigmoid",
            "Erf": "erf",
            "Sin": "sin",
            "Cos": "cos",
            "Floor": "floor",
            "Ceil": "ceil",
            "Neg": "neg",
            "Abs": "abs",
            "Relu": "relu",
        }.items()
    }
)


def _identity(imp, n, args):
    return args[0]


def _dropout(imp, n, args):
    """Inference: the identity, and a mask of all True where it is asked for."""
    x = imp.value(args[0])
    if len(n.output) < 2 or not n.output[1]:
        return x
    return [x, imp.op("expand", imp.constant(np.array(True)), k=1, shape=list(x.shape))]


def _pow(imp, n, args):
    x, y = imp.value(args[0]), imp.value(args[1])
    if y.dtype != x.dtype:  # ONNX allows a differently typed exponent
        y = imp.op("cast", y, dtype=x.dtype)
    return imp.op("pow", x, y)


def _mod(imp, n, args):
    """Integer Mod with Python's sign rule (fmod=0): a - floor(a / b) * b, as the IR's integer div floors."""
    a, b = imp.value(args[0]), imp.value(args[1])
    if imp.attrs(n).get("fmod", 0) or not a.dtype.startswith(("int", "uint")):
        raise _Unsupported("only integer Mod with fmod=0 is supported")
    return imp.op("sub", a, imp.op("mul", imp.op("div", a, b), b))


def _gelu(imp, n, args):
    return imp.op("gelu", args[0], approximate=imp.attrs(n).get("approximate", "none"))


def _softmax(ir_op: str) -> Converter:
    def conv(imp, n, args):
        return imp.op(ir_op, args[0], axis=imp.attrs(n).get("axis", -1))

    return conv


def _cast(imp, n, args):
    to = imp.attrs(n)["to"]
    if to not in DTYPES:
        raise _Unsupported(f"cast to {TensorProto.DataType.Name(to)}")
    return imp.op("cast", args[0], dtype=DTYPES[to])


def _cast_like(imp, n, args):
    return imp.op("cast", args[0], dtype=imp.value(args[1]).dtype)


def _clip(imp, n, args):
    bound = lambda i: float(imp.need_const(args[i], "Clip bounds")) if len(args) > i and args[i] is not None else None
    return imp.op("clamp", args[0], min=bound(1), max=bound(2))


def _gemm(imp, n, args):
    a = imp.attrs(n)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    x, w = imp.value(args[0]), imp.value(args[1])
    c = args[2] if len(args) > 2 else None
    if a.get("transA", 0):
        x = imp.op("permute", x, perm=[1, 0])
    if not a.get("transB", 0):
        w = imp.op("permute", w, perm=[1, 0])  # linear takes [out, in]; folded when w is a weight
    if alpha != 1.0:
        x = imp.op("mul", x, imp.constant(np.asarray(alpha, x.dtype)))
    if c is not None and beta != 1.0:
        c = imp.op("mul", c, imp.constant(np.asarray(beta, x.dtype)))
    if c is not None and imp.value(c).type.rank > 1:  # a 2-D C does not fit linear's bias
        return imp.op("add", imp.op("linear", x, w), c)
    return imp.op("linear", x, w, c) if c is not None else imp.op("linear", x, w)


def _pads2(a: dict, n: onnx.NodeProto) -> list[int]:
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise _Unsupported(f"auto_pad={a['auto_pad']} (export with explicit pads)")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4:
        raise _Unsupported("only 2-D convolutions and pools are supported")
    if pads[:2] != pads[2:]:
        raise _Unsupported(f"asymmetric pads {pads}")
    return pads[:2]


def _spatial2(imp, x: Value, what: str):
    if x.type.rank != 4:
        raise _Unsupported(f"only 2-D (NCHW) {what} is supported, got input rank {x.type.rank}")


def _conv(imp, n, args):
    a = imp.attrs(n)
    x, w = imp.value(args[0]), imp.value(args[1])
    _spatial2(imp, x, "convolution")
    ins = [x, w] + ([args[2]] if len(args) > 2 and args[2] is not None else [])
    return imp.op(
        "conv2d",
        *ins,
        stride=list(a.get("strides", [1, 1])),
        padding=_pads2(a, n),
        dilation=list(a.get("dilations", [1, 1])),
        groups=a.get("group", 1),
    )


def _max_pool(imp, n, args):
    a = imp.attrs(n)
    if len(n.output) > 1 and n.output[1]:
        raise _Unsupported("MaxPool's indices output is not supported")
    _spatial2(imp, imp.value(args[0]), "pooling")
    return imp.op(
        "max_pool2d",
        args[0],
        kernel=list(a["kernel_shape"]),
        stride=list(a.get("strides", [1, 1])),
        padding=_pads2(a, n),
        dilation=list(a.get("dilations", [1, 1])),
        ceil_mode=bool(a.get("ceil_mode", 0)),
    )


def _avg_pool(imp, n, args):
    a = imp.attrs(n)
    _spatial2(imp, imp.value(args[0]), "pooling")
    if list(a.get("dilations", [1, 1])) != [1, 1]:
        raise _Unsupported("dilated average pooling")
    return imp.op(
        "avg_pool2d",
        args[0],
        kernel=list(a["kernel_shape"]),
        stride=list(a.get("strides", [1, 1])),
        padding=_pads2(a, n),
        ceil_mode=bool(a.get("ceil_mode", 0)),
        count_include_pad=bool(a.get("count_include_pad", 0)),
    )


def _global_pool(ir_op: str) -> Converter:
    def conv(imp, n, args):
        x = imp.value(args[0])
        return imp.op(ir_op, x, axes=list(range(2, x.type.rank)), keepdims=True)

    return conv


def _batch_norm(imp, n, args):
    a = imp.attrs(n)
    if a.get("training_mode", 0):
        raise _Unsupported("training_mode=1 (export the model in eval mode)")
    x, scale, bias, mean, var = args[:5]
    return imp.op("batch_norm", x, mean, var, scale, bias, eps=float(a.get("epsilon", 1e-5)))


def _layer_norm(imp, n, args):
    a = imp.attrs(n)
    if any(o for o in n.output[1:]):
        raise _Unsupported("LayerNormalization's mean / inv-std-dev outputs are not supported")
    x = imp.value(args[0])
    axis = a.get("axis", -1) % x.type.rank
    ins = [x] + [v for v in args[1:3]]
    return imp.op("layer_norm", *ins, naxes=x.type.rank - axis, eps=float(a.get("epsilon", 1e-5)))


def _reduce(ir_op: str) -> Converter:
    def conv(imp, n, args):
        a = imp.attrs(n)
        axes = a.get("axes")
        if len(args) > 1 and args[1] is not None:
            axes = imp.ints(args[1], "reduction axes")
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return args[0]
            axes = None
        return imp.op(ir_op, args[0], axes=None if axes is None else list(axes), keepdims=bool(a.get("keepdims", 1)))

    return conv


def _argmax(imp, n, args):
    a = imp.attrs(n)
    if a.get("select_last_index", 0):
        raise _Unsupported("select_last_index=1")
    return imp.op("argmax", args[0], axis=a.get("axis", 0), keepdims=bool(a.get("keepdims", 1)))


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(symbols.dims_equal(x, y) for x, y in zip(a, b))


def _reshape(imp, n, args):
    x = imp.value(args[0])
    shape = imp.dims(args[1], "Reshape's shape")
    if not imp.attrs(n).get("allowzero", 0):  # 0 copies the input's dim
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    if -1 not in shape and _same_shape(shape, x.shape):
        return x
    return imp.op("reshape", x, shape=shape)


def _div(imp, n, args):
    """ONNX's integer Div rounds toward zero; the IR's div floors unless told otherwise."""
    return imp.op("div", *args, rounding="trunc")


def _flatten(imp, n, args):
    x = imp.value(args[0])
    axis = imp.attrs(n).get("axis", 1)
    if not -x.type.rank <= axis <= x.type.rank:
        raise _Unsupported(f"axis {axis} is out of range for rank {x.type.rank}")
    axis = axis + x.type.rank if axis < 0 else axis  # ONNX counts a negative axis from the end (rank + axis)
    return imp.op("reshape", x, shape=[symbols.mul(*x.shape[:axis]) if axis else 1, symbols.mul(*x.shape[axis:])])


def _transpose(imp, n, args):
    x = imp.value(args[0])
    perm = list(imp.attrs(n).get("perm", reversed(range(x.type.rank))))
    return x if perm == list(range(x.type.rank)) else imp.op("permute", x, perm=perm)


def _expand(imp, n, args):
    x = imp.value(args[0])
    out = broadcast_shapes(x.shape, imp.dims(args[1], "Expand's shape"), "Expand")  # ONNX broadcasts both ways
    return x if _same_shape(out, x.shape) else imp.op("expand", x, shape=list(out))


def _concat(imp, n, args):
    ins = [imp.value(a) for a in args if a is not None]
    return ins[0] if len(ins) == 1 else imp.op("concat", *ins, axis=imp.attrs(n)["axis"])


def _split(imp, n, args):
    a = imp.attrs(n)
    x = imp.value(args[0])
    axis = a.get("axis", 0) % x.type.rank
    dim = x.shape[axis]
    if len(args) > 1 and args[1] is not None:
        sizes = imp.ints(args[1], "Split's sizes")
    else:
        parts = a.get("num_outputs", len(n.output))
        if not isinstance(dim, int):
            raise _Unsupported(f"equal split of the symbolic dim {dim!r}")
        chunk = -(-dim // parts)
        sizes = [min(chunk, dim - i * chunk) for i in range(parts)]
    outs, start = [], 0
    for k, size in enumerate(sizes):
        outs.append(imp.op("slice", x, k=k, axis=axis, start=start, end=start + size))
        start += size
    return outs


def _slice_params(starts, ends, axes=None, steps=None) -> list[tuple]:
    """(start, end, axis, step) per sliced axis, with ONNX's defaults."""
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    return list(zip(starts, ends, axes, steps))


def _slice(imp, n, args):
    x = imp.value(args[0])
    opt = lambda i, what: imp.ints(args[i], what) if len(args) > i and args[i] is not None else None
    params = _slice_params(
        imp.dims(args[1], "Slice's starts"),
        imp.dims(args[2], "Slice's ends"),
        opt(3, "Slice's axes"),
        opt(4, "Slice's steps"),
    )
    out = x
    for start, end, axis, step in params:
        if not isinstance(start, int):
            raise _Unsupported(f"a symbolic slice start {start!r}")
        if step < 1:
            raise _Unsupported(f"slice step {step} (only positive steps are supported)")
        if isinstance(end, int) and end >= BIG:
            end = BIG
        if start == 0 and step == 1 and (end == BIG or (x.shape[axis % x.type.rank] == end)):
            continue  # the whole axis
        out = imp.op("slice", out, axis=axis, start=start, end=end, step=step)
    return out


def _gather(imp, n, args):
    return imp.op("gather", args[0], args[1], axis=imp.attrs(n).get("axis", 0))


def _axes(imp, n, args) -> list[int] | None:
    if len(args) > 1 and args[1] is not None:
        return imp.ints(args[1], "axes")
    axes = imp.attrs(n).get("axes")
    return None if axes is None else list(axes)


def _squeeze(imp, n, args):
    x = imp.value(args[0])
    axes = _axes(imp, n, args)
    if axes is None:  # all static 1s
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    return imp.op("squeeze", x, axes=axes) if axes else x


def _unsqueeze(imp, n, args):
    return imp.op("unsqueeze", args[0], axes=_axes(imp, n, args))


def _shape(imp, n, args):
    a = imp.attrs(n)
    shape = list(imp.obj(args[0]).shape) if isinstance(args[0], Sym) else list(imp.value(args[0]).shape)
    rank = len(shape)
    start, end = a.get("start", 0), a.get("end", rank)
    return imp.sym(shape[slice(start, end)])


def _size(imp, n, args):
    return imp.sym(np.asarray(imp.value(args[0]).type.numel(), dtype=object))


def _constant(imp, n, args):
    a = imp.attrs(n)
    if "value" in a:
        return imp.constant(numpy_helper.to_array(a["value"]))
    for key, dtype in (
        ("value_float", "float32"),
        ("value_floats", "float32"),
        ("value_int", "int64"),
        ("value_ints", "int64"),
    ):
        if key in a:
            return imp.constant(np.asarray(a[key], dtype=dtype))
    raise _Unsupported(f"Constant with attribute(s) {sorted(a)}")


def _constant_of_shape(imp, n, args):
    a = imp.attrs(n)
    value = numpy_helper.to_array(a["value"]).reshape(-1) if "value" in a else np.zeros(1, np.float32)
    dims = imp.dims(args[0], "ConstantOfShape's shape")
    if all(isinstance(d, int) for d in dims):
        if any(d < 0 for d in dims):
            raise _Unsupported(f"negative size in shape {dims}")
        if math.prod(dims) <= MAX_IMPORT_ELEMENTS:
            return imp.constant(np.full(dims, value[0], dtype=value.dtype))
        # larger than the import-time limit (a light model's stand-in for a big weight): filled at run time,
        # up to a limit no real weight reaches
        imp.check_size(dims, "ConstantOfShape", MAX_RUNTIME_FILL)
    one = imp.constant(np.full([1] * len(dims), value[0], dtype=value.dtype))
    return imp.op("expand", one, shape=dims, fold=False)


def _scalar_dim(imp, a, what: str):
    """A scalar known at import time: an int/float, or a dim string when symbolic."""
    if isinstance(a, Sym):
        return a.arr.reshape(-1)[0]
    return imp.need_const(a, what).reshape(-1)[0].item()


def _range(imp, n, args):
    start, limit, delta = (_scalar_dim(imp, a, f"Range's {w}") for a, w in zip(args, ("start", "limit", "delta")))
    dtype = args[0].dtype
    if not isinstance(limit, str):  # all known: a constant
        if delta == 0:
            raise _Unsupported("Range with step 0")
        imp.check_size([max(0, math.ceil((limit - start) / delta))], "Range")
        return imp.constant(np.arange(start, limit, delta, dtype=dtype))
    if not all(isinstance(v, (int, float)) and float(v).is_integer() for v in (start, delta)):
        raise _Unsupported(f"a Range up to the symbolic {limit!r} needs integer start and step, got {start}, {delta}")
    return imp.op("arange", start=int(start), end=limit, step=int(delta), dtype=dtype)


def _trilu(imp, n, args):
    """Keep the lower (upper) triangle: where(col - row <= k (>= k), x, 0), rows/cols from arange."""
    x = imp.value(args[0])
    k = int(imp.need_const(args[1], "Trilu's k").reshape(-1)[0]) if len(args) > 1 and args[1] is not None else 0
    rows, cols = x.shape[-2], x.shape[-1]
    diff = imp.op("sub", imp.op("arange", end=cols), imp.op("unsqueeze", imp.op("arange", end=rows), axes=[1]))
    keep = imp.op("ge" if imp.attrs(n).get("upper", 1) else "le", diff, imp.constant(np.asarray(k, np.int64)))
    return imp.op("where", keep, x, imp.constant(np.zeros((), x.dtype)))


def _isnan(imp, n, args):
    return imp.op("isnan", imp.value(args[0]))


CONVERTERS.update(
    {
        "IsNaN": _isnan,
        "Identity": _identity,
        "Dropout": _dropout,
        "Pow": _pow,
        "Mod": _mod,
        "Gelu": _gelu,
        "Softmax": _softmax("softmax"),
        "LogSoftmax": _softmax("log_softmax"),
        "Cast": _cast,
        "CastLike": _cast_like,
        "Clip": _clip,
        "Gemm": _gemm,
        "Conv": _conv,
        "MaxPool": _max_pool,
        "AveragePool": _avg_pool,
        "GlobalAveragePool": _global_pool("reduce_mean"),
        "GlobalMaxPool": _global_pool("reduce_max"),
        "BatchNormalization": _batch_norm,
        "LayerNormalization": _layer_norm,
        "ReduceSum": _reduce("reduce_sum"),
        "ReduceMean": _reduce("reduce_mean"),
        "ReduceMax": _reduce("reduce_max"),
        "ReduceMin": _reduce("reduce_min"),
        "ArgMax": _argmax,
        "Reshape": _reshape,
        "Flatten": _flatten,
        "Div": _div,
        "Transpose": _transpose,
        "Expand": _expand,
        "Concat": _concat,
        "Split": _split,
        "Slice": _slice,
        "Gather": _gather,
        "Squeeze": _squeeze,
        "Unsqueeze": _unsqueeze,
        "Shape": _shape,
        "Size": _size,
        "Constant": _constant,
        "ConstantOfShape": _constant_of_shape,
        "Range": _range,
        "Trilu": _trilu,
    }
)


# ---------------------------------------------------------------------------------------
# import-time shape math: used when an input is a symbolic Sym and the rest are constants
# fn(imp, node, object arrays) -> Value | Sym
# ---------------------------------------------------------------------------------------


def _sym_arith(op: str):
    def rule(imp, n, xs):
        return imp.sym(_SYM_ARITH[op](xs[0], xs[1]))

    return rule


def _sym_gather(imp, n, xs):
    return imp.sym(np.take(xs[0], np.asarray(xs[1].tolist(), dtype=np.int64), axis=imp.attrs(n).get("axis", 0)))


def _sym_slice(imp, n, xs):
    data = xs[0]
    ints = lambda i: [int(v) for v in xs[i].reshape(-1)] if len(xs) > i and xs[i] is not None else None
    idx = [slice(None)] * data.ndim
    for start, end, axis, step in _slice_params(ints(1), ints(2), ints(3), ints(4)):
        idx[axis] = slice(start, end, step)
    return imp.sym(data[tuple(idx)])


def _sym_concat(imp, n, xs):
    return imp.sym(np.concatenate([np.atleast_1d(x) for x in xs if x is not None], axis=imp.attrs(n)["axis"]))


def _sym_squeeze(imp, n, xs):
    axes = (
        [int(a) for a in np.asarray(xs[1]).reshape(-1)]
        if len(xs) > 1 and xs[1] is not None
        else imp.attrs(n).get("axes")
    )
    return imp.sym(np.squeeze(xs[0], axis=None if axes is None else tuple(axes)))


def _sym_unsqueeze(imp, n, xs):
    axes = (
        [int(a) for a in np.asarray(xs[1]).reshape(-1)] if len(xs) > 1 and xs[1] is not None else imp.attrs(n)["axes"]
    )
    r = xs[0].ndim + len(axes)
    return imp.sym(np.expand_dims(xs[0], tuple(sorted(a % r for a in axes))))


def _sym_reshape(imp, n, xs):
    shape = [int(d) for d in np.asarray(xs[1]).reshape(-1)]
    shape = [xs[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return imp.sym(xs[0].reshape(shape))


def _sym_cast(imp, n, xs):
    to = DTYPES.get(imp.attrs(n)["to"])
    if to not in ("int64", "int32"):
        raise _Unsupported(f"casts the symbolic shape {xs[0].tolist()} to {to}")
    return imp.sym(xs[0], to)


SYM_RULES: dict[str, Callable] = {
    **{op: _sym_arith(op) for op in _SYM_ARITH},
    "Gather": _sym_gather,
    "Slice": _sym_slice,
    "Concat": _sym_concat,
    "Squeeze": _sym_squeeze,
    "Unsqueeze": _sym_unsqueeze,
    "Reshape": _sym_reshape,
    "Cast": _sym_cast,
    "Identity": lambda imp, n, xs: imp.sym(xs[0]),
}

from . import onnx_extra  # noqa: E402, F401  (registers more converters into CONVERTERS)
