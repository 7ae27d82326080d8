"""IR -> Relax: one small lowering function per registry op, looked up by op name.

``lower_graph(graph)`` returns a Relax IRModule whose ``main`` takes the graph inputs followed by the
large constants (weights) as parameters (attribute ``num_input`` marks where the weights start), so
that ``LiftTransformParams`` can pre-compute weight-only work (transposes, batch-norm folding) once
at load time and the compiled library stays small. Small constants become ``relax.const``.

Symbolic dims ("batch", "batch*seq", "floor(seq/2)") become ``tirx.Var``/PrimExpr by walking the
sympy tree from ``nnforge.ir.symbols.to_sympy`` (never eval). After each node the Relax type is
checked against the IR's (dtype, rank) and, where Relax cannot prove a symbolic dim the IR knows,
pinned to it with a match_cast (checked at run time).

The op families in nnforge/ops say their choices for speed or exactness (conv2d as im2col + matmul or
Winograd, batch-1 linear layers on packed weight panels, NaN-propagating max/min and pooling, ...).

Used only by ``nnforge.backends.tvm``; all TVM API use stays in the backend's modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy
import tvm
import tvm.sym
from tvm import relax, tirx

from ..errors import NnforgeError
from ..ir import Graph
from ..ir import symbols as S
from ..ir.graph import Node, TensorType, Value
from ..ir.registry import call_impl, get_op
from .tvm_artifact import first_line

INLINE_CONST_MAX_ELEMS = 64  # constants this small are inlined as relax.const (scalars, tiny masks)
UNSUPPORTED_DTYPES = {"bfloat16": "bfloat16 tensors cannot cross the numpy boundary of the TVM backend yet"}


class LoweringError(NnforgeError):
    """A node could not be lowered to Relax (names the op, the value and the source line)."""


# ---------------------------------------------------------------------------------------------
# symbolic dims -> PrimExpr
# ---------------------------------------------------------------------------------------------


class DimMap:
    """Turns IR dims into ints or TIR PrimExprs over one shared set of int64 tirx.Vars."""

    def __init__(self):
        self.vars: dict[str, tirx.Var] = {}

    def var(self, name: str) -> tirx.Var:
        if name not in self.vars:
            self.vars[name] = tirx.Var(name, "int64")
        return self.vars[name]

    def __call__(self, d):
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
            return int(d)
        return self._walk(S.to_sympy(d), d)

    def shape(self, dims) -> list:
        return [self(d) for d in dims]

    def _walk(self, e, orig):
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            return self.var(e.name)
        if isinstance(e, sympy.Add):
            out = None
            for a in e.args:
                t = self._walk(a, orig)
                out = t if out is None else out + t
            return out
        if isinstance(e, sympy.Mul):
            num, den = sympy.fraction(e)
            if den != 1:  # a rational coefficient outside floor(): only exact when divisible
                raise LoweringError(f"dimension {orig!r} is not an integer expression")
            out = None
            for a in e.args:
                t = self._walk(a, orig)
                out = t if out is None else out * t
            return out
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            base = self._walk(e.base, orig)
            out = base
            for _ in range(int(e.exp) - 1):
                out = out * base
            return out
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            n, d = self._walk(num, orig), self._walk(den, orig)
            n, d = _as_expr(n), _as_expr(d)
            if isinstance(e, sympy.floor):
                return tirx.floordiv(n, d)
            return tirx.floordiv(n + d - 1, d)
        if isinstance(e, sympy.Mod):
            return tirx.floormod(_as_expr(self._walk(e.args[0], orig)), _as_expr(self._walk(e.args[1], orig)))
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = tirx.max if isinstance(e, sympy.Max) else tirx.min
            args = [_as_expr(self._walk(a, orig)) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = fn(out, a)
            return out
        raise LoweringError(f"cannot lower dimension expression {orig!r} ({sympy.srepr(e)})")


def _as_expr(x):
    return tirx.IntImm("int64", x) if isinstance(x, int) else x


# ---------------------------------------------------------------------------------------------
# lowering context and table
# ---------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a lowering function may use: the block builder, dims, the node being lowered."""

    bb: relax.BlockBuilder
    dims: DimMap
    node: Node | None = None
    target: "tvm.target.Target | None" = None  # when known, lowerings may pick target-specific kernels

    def emit(self, expr):
        return self.bb.emit(expr)

    def const(self, value, dtype: str):
        return relax.const(np.asarray(value).astype(dtype), dtype)

    def out_type(self, i: int = 0) -> TensorType:
        return self.node.outputs[i].type

    def out_shape(self, i: int = 0) -> list:
        return self.dims.shape(self.out_type(i).shape)

    def in_type(self, i: int) -> TensorType:
        return self.node.inputs[i].type

    def attr(self, key):
        return self.node.attrs[key]

    def lower(self, node: Node, args: list) -> list:
        """Lower ``node`` (a step of a composite op) on Relax values ``args``; its outputs."""
        return lower_node(self, node, args)


# ---------------------------------------------------------------------------------------------
# whole graph
# ---------------------------------------------------------------------------------------------


def node_problem(node: Node, target_name: str) -> str | None:
    """Why ``node`` cannot be lowered for ``target_name``, or None."""
    opdef = get_op(node.op)
    if "tvm" not in opdef.impls:
        return opdef.problem("tvm", node, target_name)
    for v in list(node.inputs) + list(node.outputs):
        if v is not None and v.dtype in UNSUPPORTED_DTYPES:
            return UNSUPPORTED_DTYPES[v.dtype]
    return opdef.problem("tvm", node, target_name)


def lower_node(c: Ctx, node: Node, args: list) -> list:
    """``node``'s lowering on Relax values ``args`` (the registry's ``fn(cx, *inputs, **attrs)``); its outputs."""
    outer, c.node = c.node, node
    try:
        if broadcasts(node.op):
            args = _align_broadcast(c.bb, c.dims, node, args)
        if "tvm" not in get_op(node.op).impls:
            raise LoweringError("no TVM lowering for this op")
        return call_impl("tvm", c, node, args)  # multi-output ops return a list
    finally:
        c.node = outer


@dataclass
class Lowered:
    mod: tvm.IRModule
    input_names: list[str]
    param_names: list[str]  # graph constants passed as parameters, in order after the inputs
    symbols: list[str] = field(default_factory=list)


def _is_param(graph: Graph, v: Value, embed: bool) -> bool:
    if embed:
        return False
    return int(np.prod(graph.constants[v.name].shape)) > INLINE_CONST_MAX_ELEMS


def lower_graph(
    graph: Graph, *, embed_params: bool = False, func_name: str = "main", target: "tvm.target.Target | None" = None
) -> Lowered:
    """Build the Relax module for ``graph``. Raises LoweringError naming the node that failed."""
    bb = relax.BlockBuilder()
    dims = DimMap()
    ctx = Ctx(bb, dims, target=target)
    inputs = [relax.Var(v.name, relax.TensorType(dims.shape(v.shape), v.dtype)) for v in graph.inputs]

    used = {i.name for n in graph.nodes for i in n.inputs if i is not None} | {o.name for o in graph.outputs}
    param_vals = [v for name, v in graph.const_values.items() if name in used and _is_param(graph, v, embed_params)]
    params = [relax.Var(v.name, relax.TensorType(list(v.shape), v.dtype)) for v in param_vals]

    env: dict[Value, relax.Expr] = dict(zip(graph.inputs, inputs))
    env.update(zip(param_vals, params))
    for name, v in graph.const_values.items():
        if name in used and v not in env:
            arr = graph.constants[name]
            env[v] = relax.const(arr, v.dtype)

    analyzer = tvm.sym.Analyzer()
    with bb.function(func_name, inputs + params, attrs={"num_input": len(inputs)}):
        with bb.dataflow():
            for node in graph.nodes:
                args = [env[i] if i is not None else None for i in node.inputs]
                try:
                    outs = lower_node(ctx, node, args)
                    if len(outs) != len(node.outputs):
                        raise LoweringError(f"lowering gave {len(outs)} outputs, the op has {len(node.outputs)}")
                    outs = [bb.emit(o) if not isinstance(o, relax.Var) else o for o in outs]
                    for i, (o, v) in enumerate(zip(outs, node.outputs)):
                        env[v] = _settle(bb, dims, analyzer, o, node, i)
                except LoweringError as e:
                    raise LoweringError(f"{_describe(node)}: {e}") from None
                except Exception as e:  # a TVM error deep inside an op constructor: name the node
                    raise LoweringError(f"{_describe(node)}: TVM rejected the lowering: {first_line(e)}") from e
            outs = [env[o] for o in graph.outputs]
            result = outs[0] if len(outs) == 1 else relax.Tuple(outs)
            gv = bb.emit_output(result)
        bb.emit_func_output(gv)
    return Lowered(bb.get(), [v.name for v in graph.inputs], [v.name for v in param_vals], list(dims.vars))


def _settle(bb, dims: DimMap, analyzer, var, node: Node, index: int = 0):
    """Check the lowered value against the IR's type; pin its shape to the IR's where Relax lost track.

    Relax cannot always prove what the IR knows (a slice ``pos[:, :seq]`` of a 64-row table is
    ``min(seq, 64)`` to Relax but ``seq`` to the IR, as torch.export guarded it): a match_cast
    states the IR's shape, checked at run time.
    """
    want_t = node.outputs[index].type
    ty = var.ty
    if not isinstance(ty, relax.TensorType):
        raise LoweringError(f"{_describe(node)}: lowering produced {ty}, not a tensor")
    if str(ty.dtype) != want_t.dtype:
        raise LoweringError(f"{_describe(node)}: lowering produced dtype {ty.dtype}, the IR says {want_t.dtype}")
    if ty.ndim != -1 and ty.ndim != want_t.rank:
        raise LoweringError(f"{_describe(node)}: lowering produced rank {ty.ndim}, the IR says {want_t.rank}")
    want = dims.shape(want_t.shape)
    have = ty.shape
    if have is not None and all(analyzer.can_prove_equal(a, _as_expr(b)) for a, b in zip(have.values, want)):
        return var
    return _cast_shape(bb, var, want, want_t.dtype, node.outputs[index].name)


def _cast_shape(bb, var, shape, dtype, hint):
    # two steps: first to fresh variables, then to the wanted shape. A single match_cast from a shape
    # holding min(...) straight to existing variables crashes TVM 0.27 at build time (segfault).
    fresh = [tirx.Var(f"{hint}_d{i}", "int64") for i in range(len(shape))]
    var = bb.match_cast(var, relax.TensorType(fresh, dtype))
    return bb.match_cast(var, relax.TensorType(shape, dtype))


def broadcasts(op: str) -> bool:
    """Whether ``op``'s inputs broadcast to its output: an elementwise op with more than one input."""
    opdef = get_op(op)
    return opdef.kind == "elementwise" and opdef.num_inputs[1] != 1


def _align_broadcast(bb, dims: DimMap, node: Node, args: list) -> list:
    """Where an input dim is a symbol the IR matched to a different output symbol ("n" with "m"),
    state that they are equal (Relax cannot broadcast two unrelated symbols)."""
    out = node.outputs[0].type.shape
    args = list(args)
    for i, (v, a) in enumerate(zip(node.inputs, args)):
        if v is None or a is None:
            continue
        shape, off = list(v.type.shape), len(out) - v.type.rank
        changed = False
        for j, d in enumerate(shape):
            o = out[off + j]
            if isinstance(d, str) and d != o and not S.dims_equal(d, o):
                shape[j], changed = o, True
        if changed:
            args[i] = _cast_shape(bb, a, dims.shape(shape), v.dtype, f"{v.name}_b")
    return args


def _describe(node: Node) -> str:
    ins = ", ".join(f"{i.name}:{i.type}" if i is not None else "None" for i in node.inputs)
    return f"{node.op} (%{node.outputs[0].name} from {ins}){' at ' + node.source if node.source else ''}"
