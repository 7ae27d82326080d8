"""ONNX Runtime backend: IR -> ONNX (standard opset 20) -> onnxruntime.InferenceSession.

``to_onnx`` lowers node by node through each op's ONNX lowering in its family module (nnforge/ops). Symbolic
dims become ``dim_param`` on graph inputs/outputs; attributes that hold symbols ("batch",
"seq*4") are computed at run time from the graph inputs' shapes (one Shape slice per symbol,
cached, expressions built from the sympy tree with integer Add/Mul/Div/Mod).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import sympy
from onnx import TensorProto, helper, numpy_helper

from .. import errors
from ..errors import NnforgeError, UnsupportedOpError
from ..ir import REGISTRY, Graph, Node, Value, bind_symbols, symbols
from ..ir.registry import call_impl
from ..targets import Target, get_target
from .base import Artifact, Backend, Unsupported, register_backend
from .onnxrt_fusions import contrib_fusions

OPSET = 20  # Gelu (20) and LayerNormalization (17) are standard here; ORT >= 1.17 runs it
IR_VERSION = 9  # the ONNX IR version that goes with opset 20
MODEL_FILE = "model.onnx"
INT64_MAX = np.iinfo(np.int64).max

ONNX_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "float64": TensorProto.DOUBLE,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "int16": TensorProto.INT16,
    "int8": TensorProto.INT8,
    "uint64": TensorProto.UINT64,
    "uint32": TensorProto.UINT32,
    "uint16": TensorProto.UINT16,
    "uint8": TensorProto.UINT8,
    "bool": TensorProto.BOOL,
    "float8_e4m3fn": TensorProto.FLOAT8E4M3FN,
    "float8_e4m3fnuz": TensorProto.FLOAT8E4M3FNUZ,
    "float8_e5m2": TensorProto.FLOAT8E5M2,
    "float8_e5m2fnuz": TensorProto.FLOAT8E5M2FNUZ,
    "float8_e8m0fnu": TensorProto.FLOAT8E8M0,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
    "int2": TensorProto.INT2,
    "uint2": TensorProto.UINT2,
    "float4_e2m1fn": TensorProto.FLOAT4E2M1,
    "string": TensorProto.STRING,
}
# sub-byte types ONNX packs several to a byte (low bits first): dtype -> bits per element
PACKED_BITS = {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "int2": 2, "uint2": 2}
# dtypes ONNX Runtime's Python API has no numpy type for: they cross as their raw bits
RAW_BITS = {
    "bfloat16": np.uint16,
    "float8_e4m3fn": np.uint8,
    "float8_e4m3fnuz": np.uint8,
    "float8_e5m2": np.uint8,
    "float8_e5m2fnuz": np.uint8,
    "float8_e8m0fnu": np.uint8,
    **{dt: np.uint8 for dt in PACKED_BITS},
}


# ---------------------------------------------------------------------------------------
# lowering context
# ---------------------------------------------------------------------------------------


class _Lowering:
    """Collects ONNX nodes and initializers while the IR graph is lowered."""

    def __init__(self, graph: Graph, contrib: bool = False, device: str = "cpu"):
        self.graph = graph
        self.contrib = contrib  # may use ONNX Runtime's com.microsoft ops (not portable to other runtimes)
        self.device = device  # the execution provider's device, where kernels' speed differs
        self.domains: set[str] = set()
        self.foreign_opsets: dict[str, int] = {}  # domain -> version that kept (opaque) ONNX nodes need
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.used_names = {v.name for v in graph.all_values()}
        self.counter = 0
        self.const_cache: dict[tuple, str] = {}
        self.sym_cache: dict[str, str] = {}
        self.sym_source = self._symbol_sources(graph)
        self.node: Node | None = None  # the node being lowered
        self.alias: dict[str, str] = {}  # IR value name -> ONNX name, where a lowering returned an existing value

    # -- names and constants ----------------------------------------------------------
    def fresh(self, hint: str) -> str:
        while True:
            self.counter += 1
            name = f"_{hint}_{self.counter}"
            if name not in self.used_names:
                self.used_names.add(name)
                return name

    def value(self, v: Value | None) -> str:
        """ONNX name of an IR value; constants become initializers on first use."""
        if v is None:
            return ""
        if v.name in self.alias:
            return self.alias[v.name]
        if self.graph.is_constant(v) and v.name not in self.inits:
            self.inits[v.name] = _tensor(self.graph.constant(v), v.name)
        return v.name

    def const(self, array, dtype: str | None = None, hint: str = "c") -> str:
        """A small constant initializer, shared between users with equal contents."""
        arr = np.asarray(array, dtype=dtype)
        return self.cached_const((arr.dtype.str, arr.shape, arr.tobytes()), lambda: arr, hint)

    def cached_const(self, key: tuple, make: Callable[[], np.ndarray], hint: str = "c") -> str:
        """The initializer ``make()`` (e.g. a weight pre-transposed), made once per ``key``."""
        if key not in self.const_cache:
            name = self.fresh(hint)
            self.inits[name] = _tensor(make(), name)
            self.const_cache[key] = name
        return self.const_cache[key]

    def emit(self, op_type: str, inputs: Sequence[str], out: str | None = None, domain: str = "", **attrs) -> str:
        out = out or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, domain=domain or None, **attrs))
        if domain:
            self.domains.add(domain)
        return out

    def add_foreign_node(self, node: onnx.NodeProto, opset_imports) -> None:
        """A node kept from a source model as is (an ``onnx_node``), with the opsets it was written for."""
        self.nodes.append(node)
        for o in opset_imports:
            domain = "" if o.domain == "ai.onnx" else o.domain
            self.foreign_opsets[domain] = max(self.foreign_opsets.get(domain, 0), o.version)

    def emit_multi(self, op_type: str, inputs: Sequence[str], n_out: int, domain: str = "", **attrs) -> list[str]:
        """A node with several outputs; returns their names."""
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], domain=domain or None, **attrs))
        if domain:
            self.domains.add(domain)
        return outs

    def lower(self, node: Node, ins: list[str]) -> list[str]:
        """Lower ``node`` through its registry implementation ``fn(cx, *ins, **attrs) -> name(s)``; the names it
        returns become the node's outputs (renamed to the IR names where the lowering made them). Returns the
        ONNX names of the node's outputs."""
        start, outer = len(self.nodes), self.node
        self.node = node
        try:
            outs = call_impl("onnxrt", self, node, ins)
        finally:
            self.node = outer
        if len(outs) != len(node.outputs):
            raise NnforgeError(
                f"onnxrt: lowering of {node.op} gave {len(outs)} outputs, the op has {len(node.outputs)}"
            )
        for v, name in zip(node.outputs, outs):
            self._bind(v.name, name, start)
        return [self.value(v) for v in node.outputs]

    def _bind(self, want: str, have: str, start: int) -> None:
        made = {o for nd in self.nodes[start:] for o in nd.output}
        cached = set(self.sym_cache.values()) | set(self.const_cache.values())
        if have == want:
            return
        if have not in made or have in cached:  # an existing value (an input, a shared constant): alias it
            self.alias[want] = have
            return
        for nd in self.nodes[start:]:
            nd.output[:] = [want if o == have else o for o in nd.output]
            nd.input[:] = [want if i == have else i for i in nd.input]
            if nd.name == have:
                nd.name = want

    # -- symbolic dims ----------------------------------------------------------------
    @staticmethod
    def _symbol_sources(graph: Graph) -> dict[str, tuple[str, int]]:
        """For each symbol, the graph input and axis where it first appears as a plain dim."""
        src: dict[str, tuple[str, int]] = {}
        for v in graph.inputs:
            for axis, d in enumerate(v.shape):
                if isinstance(d, str) and d.isidentifier():
                    src.setdefault(d, (v.name, axis))
        return src

    def symbol(self, name: str) -> str:
        """int64 [1] tensor holding a symbol's value, read once from an input's shape."""
        if name not in self.sym_cache:
            if name not in self.sym_source:
                raise NnforgeError(
                    f"onnxrt: symbol {name!r} is not a plain dimension of any graph input, "
                    f"so its value cannot be read at run time"
                )
            inp, axis = self.sym_source[name]
            self.sym_cache[name] = self.emit("Shape", [inp], out=self.fresh(f"sym_{name}"), start=axis, end=axis + 1)
        return self.sym_cache[name]

    def dim(self, d) -> str:
        """int64 [1] tensor for one dimension (int, symbol or expression)."""
        if isinstance(d, int):
            return self.const([d], "int64", "dim")
        return self._expr(symbols.to_sympy(d))

    def dims(self, ds: Sequence) -> str:
        """int64 [len(ds)] tensor for a shape that may hold symbols; static runs stay one constant."""
        if all(isinstance(d, int) for d in ds):
            return self.const(list(ds), "int64", "shape")
        parts, run = [], []
        for d in ds:
            if isinstance(d, int):
                run.append(d)
                continue
            if run:
                parts.append(self.const(run, "int64", "shape"))
                run = []
            parts.append(self.dim(d))
        if run:
            parts.append(self.const(run, "int64", "shape"))
        return parts[0] if len(parts) == 1 else self.emit("Concat", parts, axis=0)

    def _expr(self, e: sympy.Expr) -> str:
        """Walk a sympy dimension expression into integer ONNX ops (never eval)."""
        if e.is_Integer:
            return self.const([int(e)], "int64", "dim")
        if e.is_Symbol:
            return self.symbol(e.name)
        if isinstance(e, sympy.Add):
            return self._fold("Add", e.args)
        if isinstance(e, sympy.Mul):
            if any(a.is_Rational and not a.is_Integer for a in e.args) or any(
                isinstance(a, sympy.Pow) and a.exp.is_negative for a in e.args
            ):
                raise NnforgeError(f"onnxrt: dimension {e} is not an integer expression")
            return self._fold("Mul", e.args)
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            return self.emit("Div", [self._expr(num), self._expr(den)])  # dims are positive: Div == floor
        if isinstance(e, sympy.Mod):
            return self.emit("Mod", [self._expr(e.args[0]), self._expr(e.args[1])], fmod=0)
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self._fold("Max" if isinstance(e, sympy.Max) else "Min", e.args)
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
            return self._fold("Mul", [e.base] * int(e.exp))
        raise NnforgeError(f"onnxrt: cannot compute dimension expression {e} at run time")

    def _fold(self, op: str, args) -> str:
        out = self._expr(args[0])
        for a in args[1:]:
            out = self.emit(op, [out, self._expr(a)])
        return out

    def scalar_dim(self, d) -> str:
        """int64 scalar (for Range)."""
        if isinstance(d, int):
            return self.const(d, "int64", "n")
        return self.emit("Squeeze", [self.dim(d), self.const([0], "int64", "axes")])


def _tensor(arr: np.ndarray, name: str) -> onnx.TensorProto:
    arr = np.require(np.asarray(arr), requirements="C")  # (np.ascontiguousarray turns 0-d into 1-d)
    if arr.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: store the raw 16-bit patterns
        return helper.make_tensor(name, TensorProto.BFLOAT16, arr.shape, arr.view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(arr, name)


# ---------------------------------------------------------------------------------------
# IR graph -> ONNX model
# ---------------------------------------------------------------------------------------


def _value_info(v: Value, name: str | None = None) -> onnx.ValueInfoProto:
    shape = [d if isinstance(d, int) else str(d) for d in v.shape]
    return helper.make_tensor_value_info(name or v.name, ONNX_DTYPES[v.dtype], shape)


def unsupported_nodes(graph: Graph, device: str = "cpu") -> list[Unsupported]:
    out = []
    sources = _Lowering._symbol_sources(graph)
    for n in graph.nodes:
        opdef = REGISTRY.get(n.op)
        reason = f"unknown op {n.op!r}" if opdef is None else opdef.problem("onnxrt", n, device)
        reason = reason or _symbol_check(n, sources)
        if reason:
            out.append(Unsupported(n.op, n.outputs[0].name if n.outputs else "", n.source, reason))
    return out


def _symbol_check(n: Node, sources: dict) -> str | None:
    """Symbols in dims attributes must be readable from some graph input's shape."""
    for key, (kind, _) in REGISTRY[n.op].attrs.items():
        vals = n.attrs.get(key)
        vals = [vals] if kind == "dim" else (vals or []) if kind == "dims" else []
        for d in vals:
            missing = symbols.symbols_in(d) - set(sources) if isinstance(d, str) else set()
            if missing:
                return f"attribute {key} uses symbol(s) {sorted(missing)} that no graph input has as a plain dim"
    return None


def to_onnx(graph: Graph, contrib: bool = False, device: str = "cpu") -> onnx.ModelProto:
    """Lower an IR graph to an ONNX model (opset 20); raises UnsupportedOpError listing every node it cannot take.

    ``contrib`` lets fused ops use ONNX Runtime's com.microsoft kernels (e.g. MultiHeadAttention): faster on
    ONNX Runtime's CPU and CUDA providers, but not standard ONNX, so off for portable files and wasm.
    ``device`` ("cpu" or "cuda"): the provider the model is for, where a lowering's speed depends on it.
    """
    bad = unsupported_nodes(graph)
    if bad:
        raise UnsupportedOpError(
            [(u.op, f"%{u.node}: {u.reason}" + (f" ({u.source})" if u.source else "")) for u in bad],
            where="the ONNX Runtime backend",
        )
    cx = _Lowering(graph, contrib, device)
    fused, skip = contrib_fusions(graph) if contrib else ({}, set())
    for n in graph.nodes:
        if n in fused:
            fused[n](cx)
        elif n not in skip:
            cx.lower(n, [cx.value(i) for i in n.inputs])
    outputs = []
    taken = {v.name for v in graph.inputs} | set(graph.constants)
    for v in graph.outputs:
        name = cx.value(v)
        if name in taken:  # ONNX outputs must be produced by a node and be distinct
            name = cx.emit("Identity", [name], out=cx.fresh(f"{v.name}_out"))
        taken.add(name)
        outputs.append(_value_info(v, name))
    # lowerings may replace a weight by a pre-transposed copy: ship only initializers something reads
    read = _names_read(cx.nodes) | {o.name for o in outputs}
    g = helper.make_graph(
        cx.nodes,
        graph.name or "graph",
        [_value_info(v) for v in graph.inputs],
        outputs,
        initializer=[t for name, t in cx.inits.items() if name in read],
    )
    # kept ONNX nodes run at the opset they were written for (newer opsets only add to the ops lowered here)
    versions = {"": OPSET, **{d: 1 for d in cx.domains}}
    for d, v in cx.foreign_opsets.items():
        versions[d] = max(versions.get(d, 0), v)
    opsets = [helper.make_opsetid(d, v) for d, v in sorted(versions.items())]
    ir_version = max(IR_VERSION, onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    model = helper.make_model(g, opset_imports=opsets, ir_version=ir_version, producer_name="nnforge")
    return model


def _names_read(nodes) -> set[str]:
    """Every name the nodes read, inside their subgraphs too (kept If/Loop bodies read outer values)."""
    out: set[str] = set()
    for n in nodes:
        out.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out |= _names_read(g.node) | {o.name for o in g.output}
    return out


def check(model: onnx.ModelProto) -> None:
    """onnx.checker with strict shape inference (models over 2 GB get the plain check)."""
    try:
        onnx.checker.check_model(model, full_check=model.ByteSize() < 2**31 - 2**20)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise NnforgeError(f"onnxrt: lowered model does not pass onnx.checker: {e}") from None


# ---------------------------------------------------------------------------------------
# sessions and artifacts
# ---------------------------------------------------------------------------------------


def _providers(target: Target, cpu_ok: bool = False) -> list[str]:
    """``cpu_ok``: a partition of a cuda model may run on the CPU provider where onnxruntime-gpu is missing."""
    import onnxruntime as ort

    if target.name == "cpu":
        return ["CPUExecutionProvider"]
    if target.name == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            if cpu_ok:
                return ["CPUExecutionProvider"]
            raise NnforgeError(
                "onnxrt: target 'cuda' needs onnxruntime-gpu and a CUDA GPU; this onnxruntime offers "
                f"{ort.get_available_providers()} (pip install onnxruntime-gpu, or use target 'cpu')"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise NnforgeError(f"onnxrt: cannot create a session for target {target.name!r} on this host")


_OPT_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "none": "ORT_DISABLE_ALL",
}


def make_session(model_bytes, target: Target, options: dict | None = None):
    """The one place ORT sessions are created, from model bytes or a file path. options: opt_level
    (all|extended|basic|none), threads (int), spinning (False: worker threads sleep when idle, for sessions that
    share the cores with other runtimes)."""
    import onnxruntime as ort

    options = options or {}
    so = ort.SessionOptions()
    level = options.get("opt_level", "all")
    if level not in _OPT_LEVELS:
        raise NnforgeError(f"onnxrt: opt_level {level!r} is not one of {sorted(_OPT_LEVELS)}")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[level])
    if options.get("threads"):
        so.intra_op_num_threads = int(options["threads"])
    if options.get("spinning") is False:  # a partition: idle ORT workers must not spin while torch or TVM runs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's warnings are about its own fusions
    # ORT fuses residual add + LayerNormalization into SkipLayerNormalization, whose CPU kernel is slower
    # than the two ops here (BERT-shaped encoder: 8-14% of the whole run)
    disabled = ["SkipLayerNormFusion"] if target.name == "cpu" else []
    try:
        return ort.InferenceSession(
            model_bytes,
            sess_options=so,
            providers=_providers(target, cpu_ok=options.get("spinning") is False),
            disabled_optimizers=disabled,
        )
    except NnforgeError:
        raise
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise NnforgeError(f"onnxrt: ONNX Runtime could not load the model: {e}") from None


def _to_ort(a: np.ndarray, wrap: bool = False):
    """An input ORT's Python API takes: numpy (an OrtValue with ``wrap``), or an OrtValue over the raw bits of a
    type numpy lacks."""
    import onnxruntime as ort

    if a.dtype.name not in RAW_BITS:
        return ort.OrtValue.ortvalue_from_numpy(np.require(a, requirements="C")) if wrap and a.dtype != object else a

    dt = a.dtype.name
    bits = np.require(a, requirements="C").view(RAW_BITS[dt])
    if dt not in PACKED_BITS:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, ONNX_DTYPES[dt])
    packed = _pack(bits.reshape(-1), PACKED_BITS[dt])
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), ONNX_DTYPES[dt])
    if packed.size:
        ctypes.memmove(value.data_ptr(), packed.ctypes.data, packed.size)
    return value


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Sub-byte codes (one per uint8) packed ONNX's way: element i in bits [bits*(i%per), ...) of byte i//per."""
    per, mask = 8 // bits, (1 << bits) - 1
    codes = np.pad(codes & mask, (0, -len(codes) % per))
    return np.bitwise_or.reduce([codes[k::per] << (bits * k) for k in range(per)], axis=0).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per, mask = 8 // bits, (1 << bits) - 1
    return np.stack([(packed >> (bits * k)) & mask for k in range(per)], axis=1).reshape(-1)[:n]


def _from_ort(value, dtype: str) -> np.ndarray:
    """An output as numpy; types numpy lacks are read as raw bits and viewed as ml_dtypes' types."""
    if dtype not in RAW_BITS:
        return value.numpy()
    import ml_dtypes

    raw, shape = RAW_BITS[dtype], tuple(value.shape())
    n, size = int(np.prod(shape)), value.tensor_size_in_bytes()
    data = np.frombuffer((ctypes.c_uint8 * size).from_address(value.data_ptr()), dtype=np.uint8).copy()
    if dtype in PACKED_BITS:
        codes = _unpack(data, PACKED_BITS[dtype], n)
        if dtype in ("int4", "int2"):  # sign-extend the code, then convert the value
            half = 1 << (PACKED_BITS[dtype] - 1)
            return (
                np.where(codes >= half, codes.astype(np.int16) - 2 * half, codes)
                .astype(getattr(ml_dtypes, dtype))
                .reshape(shape)
            )
        return codes.view(getattr(ml_dtypes, dtype)).reshape(shape)
    return data.view(raw)[:n].reshape(shape).view(getattr(ml_dtypes, dtype))


def run_onnx_directly(model, inputs: Sequence, threads: int = 0) -> list:
    """An ONNX model (ModelProto, bytes or path) run by ONNX Runtime alone, as a user would without nnforge, with
    the same numpy boundary (raw bits for bfloat16, float8 and packed 4/2-bit types): the differential check's
    reference for ONNX files, and the conformance runs' "ORT direct"."""
    import onnxruntime as ort

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    kinds = [o.type.tensor_type.elem_type for o in model.graph.output]
    dtypes = [np.dtype(helper.tensor_dtype_to_np_dtype(k)).name if k else "" for k in kinds]
    feed = {n: a if isinstance(a, (list, dict)) else np.asarray(a) for n, a in zip(names, inputs)}
    return run_session(sess, None, feed, dtypes)


def run_session(sess, output_names, inputs: dict, dtypes: Sequence[str]) -> list:
    """``sess.run`` across the numpy boundary: types ORT's Python API has no numpy type for (``RAW_BITS``) go in
    and come out as raw bits; when an output is one of them, every input must be an OrtValue."""
    raw = any(dt in RAW_BITS for dt in dtypes)
    feed = {n: _to_ort(a, raw) if isinstance(a, np.ndarray) else a for n, a in inputs.items()}
    if not raw:
        return sess.run(output_names, feed)
    return [_from_ort(v, dt) for v, dt in zip(sess.run_with_ort_values(output_names, feed), dtypes)]


class OnnxRuntimeArtifact(Artifact):
    backend = "onnxrt"
    thread_safe = True  # InferenceSession.run may be called concurrently

    def __init__(self, graph: Graph, target: Target, model_bytes, options: dict | None = None, path=None):
        """``model_bytes``: the ONNX model's bytes, or a read-only map of ``path`` (a loaded bundle's model.onnx,
        from which ORT then reads the model itself: the bytes are not held in memory beside the session)."""
        super().__init__(graph, target)
        self._model_bytes = model_bytes
        self.options = dict(options or {})
        # wasm runs in onnxruntime-web (Node), not here; the artifact still carries the model
        source = str(path) if path is not None else model_bytes
        self.session = None if target.name == "wasm" else make_session(source, target, self.options)
        if self.session is not None:  # parsing a large model again only for its output names costs its size
            self.output_names = [o.name for o in self.session.get_outputs()]
        else:
            self.output_names = [o.name for o in onnx.load_model_from_string(self.model_bytes).graph.output]
        self.output_dtypes = [v.dtype for v in graph.outputs]

    @property
    def model_bytes(self) -> bytes:
        b = self._model_bytes
        return b if isinstance(b, bytes) else bytes(b)

    @property
    def model(self) -> onnx.ModelProto:
        return onnx.load_model_from_string(self.model_bytes)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.session is None:  # wasm: run the bundle's model.onnx with onnxruntime-web in Node
            return self.run_emulated(inputs)
        arrays = [np.asarray(a) for a in inputs]
        try:
            bind_symbols(self.graph, arrays)  # a wrong count/dtype/shape gets the IR's clear message
        except ValueError as e:
            raise NnforgeError(f"onnxrt: bad input: {e}") from None
        feed = {v.name: a for v, a in zip(self.graph.inputs, arrays)}
        try:
            return run_session(self.session, self.output_names, feed, self.output_dtypes)
        except Exception as e:
            raise NnforgeError(f"onnxrt: ONNX Runtime failed while running {self.graph.name!r}: {e}") from None

    def __call__(self, *inputs):
        return self.run(list(inputs))

    def save_files(self, directory: Path) -> list[str]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (MODEL_FILE + ".tmp")  # renamed over: a loaded artifact may map the old file
        tmp.write_bytes(self.model_bytes)
        os.replace(tmp, directory / MODEL_FILE)
        return [MODEL_FILE]

    @classmethod
    def load_files(cls, directory: Path, graph: Graph, target: Target, manifest: dict) -> "OnnxRuntimeArtifact":
        path = Path(directory) / MODEL_FILE
        try:
            data = np.memmap(path, np.uint8, mode="r") if path.stat().st_size else b""
        except OSError as e:
            raise errors.BundleError(f"onnxrt: cannot read {path}: {e.strerror or e}") from None
        return cls(graph, get_target(target), data, (manifest or {}).get("options"), path=path if len(data) else None)


class OnnxRuntimeBackend(Backend):
    name = "onnxrt"
    artifact_class = OnnxRuntimeArtifact

    def supports(self, graph: Graph, target: Target) -> list[Unsupported]:
        target = get_target(target)
        if "onnxrt" not in target.backends:
            return [
                Unsupported(
                    n.op,
                    n.outputs[0].name if n.outputs else "",
                    n.source,
                    f"onnxrt does not build for target {target.name!r}",
                )
                for n in graph.nodes
            ]
        return unsupported_nodes(graph)

    def build(self, graph: Graph, target: Target, options: dict | None = None) -> OnnxRuntimeArtifact:
        target = get_target(target)
        if "onnxrt" not in target.backends:
            raise NnforgeError(f"onnxrt: cannot build for target {target.name!r}; it builds for cpu, cuda and wasm")
        model = to_onnx(graph, contrib=target.name in ("cpu", "cuda"), device=target.name)
        check(model)
        return OnnxRuntimeArtifact(graph, target, model.SerializeToString(), options)


register_backend(OnnxRuntimeBackend())
