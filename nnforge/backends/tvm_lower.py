"""IR -> Relax: one small lowering function per registry op, looked up by op name.

``lower_graph(graph)`` returns a Relax IRModule whose ``main`` takes the graph inputs followed by the
large constants (weights) as parameters (attribute ``num_input`` marks where the weights start), so
that ``LiftTransformParams`` can pre-compute weight-only work (transposes, batch-norm folding) once
at load time and the compiled library stays small. Small constants become ``relax.const``.

Symbolic dims ("batch", "batch*seq", "floor(seq/2)") become ``tirx.Var``/PrimExpr by walking the
sympy tree from ``nnforge.ir.symbols.to_sympy`` (never eval). After each node the Relax type is
checked against the IR's (dtype, rank) and, where Relax cannot prove a symbolic dim the IR knows,
pinned to it with a match_cast (checked at run time).

Choices made for speed or exactness:
- conv2d is im2col (one gather kernel, padding inlined) + a matmul written as one TE reduction into
  NCHW, so it gets the CPU matmul schedule and its bias/batch-norm/activation fuse into it; 3x3
  stride-1 convolutions on CPU targets are Winograd F(2x2, 3x3) instead (tvm_winograd.py);
- max pooling propagates NaN like numpy and torch (TVM's max would drop it), as the elementwise ops and
  reductions in nnforge/ops do.

Used only by ``nnforge.backends.tvm``; all TVM API use stays in the backend's modules.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import sympy
import tvm
import tvm.sym
from tvm import relax, tirx
from tvm.relax import op as R

from ..errors import NnforgeError
from ..ir import Graph
from ..ir import symbols as S
from ..ir.graph import Node, TensorType, Value
from ..ir.registry import call_impl, get_op
from . import tvm_winograd
from .tvm_artifact import first_line
from ..ops.elementwise import ACTIVATIONS as _ACTIVATION_TABLE, is_float as _is_float
from ..ops.reduce import tvm_nan_if_any as _nan_if_any
from .tvm_schedule import pick_gemv_nr, vector_lanes

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


Lowering = Callable[..., "relax.Expr"]
LOWERINGS: dict[str, Lowering] = {}
# Optional per-op checks: fn(node, target_name) -> reason string when the node cannot be lowered.
CHECKS: dict[str, Callable[[Node, str], str | None]] = {}


def lowering(*names: str):
    def deco(fn):
        for n in names:
            LOWERINGS[n] = fn
        return fn

    return deco


def _ndim(x) -> int:
    return x.ty.ndim


# ---- linear algebra ----------------------------------------------------------------------------

@lowering("matmul")
def _matmul(c: Ctx, a, b):
    return R.matmul(a, b)


@lowering("linear")
def _linear(c: Ctx, x, w, b=None):
    wt = c.emit(R.permute_dims(w, [1, 0]))
    panel = _gemv_panel(c)
    if panel:
        y = _gemv_packed(c, x, wt, panel)
    else:
        y = c.emit(R.matmul(x, wt))
    return R.add(y, b) if b is not None else y


def _gemv_panel(c: Ctx) -> int | None:
    """Columns per weight panel when a linear layer has 1-4 static rows (batch 1: a matrix-vector
    product, bound by reading the weight) on a CPU: the column tile the CPU matmul schedule takes."""
    xt, (n, k) = c.in_type(0), c.in_type(1).shape
    rows = xt.shape[0] if len(xt.shape) == 2 else None
    if c.target is None or c.target.kind.name != "llvm" or not isinstance(rows, int) or not 1 <= rows <= 4 \
            or not (isinstance(n, int) and isinstance(k, int)) or xt.dtype != "float32":
        return None
    nr = pick_gemv_nr(n, vector_lanes(c.target, 32), rows)
    return nr if nr and nr < n else None


def _gemv_packed(c: Ctx, x, wt, nr: int):
    """x [M, K] @ wt [K, N] with wt packed once, at load, as panels [N/nr, K, nr]: each thread then
    streams its panels from memory front to back. (Read in place, a panel is nr columns of every row,
    1 kB runs 8 kB apart for a 2048-wide layer, and the hardware prefetcher stops at each page;
    ONNX Runtime packs its weights the same way.)"""
    from tvm import te

    k, n = c.in_type(1).shape[1], c.in_type(1).shape[0]
    packed = c.emit(R.permute_dims(c.emit(R.reshape(wt, [k, n // nr, nr])), [1, 0, 2]))

    def gemv(a, p):
        r = te.reduce_axis((0, k), name="k")
        return te.compute((a.shape[0], n), lambda i, j: te.sum(a[i, r] * p[j // nr, r, j % nr], axis=r),
                          name="matmul")

    return c.bb.emit_te(gemv, x, packed, primfunc_name_hint="matmul")


# activations of the fused ops: fn(c, y) (legacy view of nnforge.ops.elementwise.ACTIVATIONS, until linear_act moves)
ACTIVATIONS: dict[str, Callable] = {name: act.tvm for name, act in _ACTIVATION_TABLE.items()}


@lowering("linear_act")
def _linear_act(c: Ctx, x, w, b=None):
    return ACTIVATIONS[c.attr("act")](c, c.emit(_linear(c, x, w, b)))


CHECKS["linear_act"] = lambda node, target: (None if node.attrs.get("act") in ACTIVATIONS
                                             else f"activation {node.attrs.get('act')!r} has no TVM lowering")


def _pair(v):
    return list(v) if len(v) == 2 else [v[0], v[0]]


@lowering("conv2d")
def conv2d(c: Ctx, x, w, b=None, weight_shape=None):
    """Convolution as im2col + matmul: [G, O/G, C/G*kh*kw] @ [N, G, C/G*kh*kw, OH*OW].

    TVM has no untuned schedule for direct convolution on CPUs (naive loops, ~10x slower than
    ONNX Runtime); as a matmul it gets the register-blocked matmul schedule (and dlight's GPU
    matmul rule on CUDA). The patches come from one gather kernel with the zero padding inlined;
    a 1x1 stride-1 convolution reads its input as it is. ``weight_shape``: [O, C/G, kh, kw] when the
    node's weight input is not that tensor (qconv2d's codes).
    """
    xt, ot = c.in_type(0), c.out_type()
    o, cg, kh, kw = weight_shape or c.in_type(1).shape
    if not (isinstance(kh, int) and isinstance(kw, int) and isinstance(xt.shape[1], int)):
        return _conv2d_direct(c, x, w, b)
    n, cin, h, wd = xt.shape
    g = c.attr("groups")
    s, p, d = _pair(c.attr("stride")), _pair(c.attr("padding")), _pair(c.attr("dilation"))
    oh, ow = ot.shape[2], ot.shape[3]
    dims = c.dims
    if weight_shape is None and tvm_winograd.applies(c.target, xt, (kh, kw), s, p, d, g):
        return tvm_winograd.conv2d_3x3(c, x, w, b, p)
    if kh == kw == 1 and s == [1, 1] and not any(p):
        cols = x  # a 1x1 convolution reads the input as it is
    else:
        cols = c.bb.emit_te(_im2col, x, kh, kw, s, p, d, dims(oh), dims(ow), primfunc_name_hint="im2col")
    pix = dims(symbols_mul(oh, ow))
    if g == 1:
        # one TE reduction writing NCHW directly: the bias, batch norm and activation that follow
        # are elementwise on its output and fuse into the same kernel (a reshape in between would
        # stop Relax's FuseOps)
        cols = c.emit(R.reshape(cols, [dims(n), cg * kh * kw, pix]))
        wm = c.emit(R.reshape(w, [o, cg * kh * kw]))
        y = c.bb.emit_te(_conv_as_matmul, wm, cols, dims(ow), primfunc_name_hint="conv2d_mm")
        if b is not None:
            y = c.emit(R.add(y, c.emit(R.reshape(b, [1, o, 1, 1]))))
        return y
    cols = c.emit(R.reshape(cols, [dims(n), g, cg * kh * kw, pix]))
    wm = c.emit(R.reshape(w, [g, o // g, cg * kh * kw]))
    y = c.emit(R.matmul(wm, cols))  # [N, G, O/G, OH*OW]
    if b is not None:
        y = c.emit(R.add(y, c.emit(R.reshape(b, [g, o // g, 1]))))
    return R.reshape(y, c.out_shape())


def _im2col(x, kh, kw, s, p, d, oh, ow):
    """[N, C, H, W] -> [N, C, kh, kw, OH, OW] patches, zero outside the input (padding inlined)."""
    from tvm import te

    n, cin, h, w = x.shape

    def f(b, ch, i, j, y, xx):
        r = y * s[0] + i * d[0] - p[0]
        q = xx * s[1] + j * d[1] - p[1]
        if not any(p):
            return x[b, ch, r, q]
        inside = tirx.all(r >= 0, r < h, q >= 0, q < w)
        return tirx.if_then_else(inside, x[b, ch, tirx.max(r, 0), tirx.max(q, 0)], tirx.const(0, x.dtype))

    return te.compute((n, cin, kh, kw, oh, ow), f, name="im2col")


def _conv_as_matmul(wm, cols, ow):
    """out[n, o, y, x] = sum_k wm[o, k] * cols[n, k, y * OW + x] (a matmul over im2col columns)."""
    from tvm import te

    n, ck, pix = cols.shape
    o = wm.shape[0]
    k = te.reduce_axis((0, ck), name="k")
    return te.compute((n, o, tirx.floordiv(pix, ow), ow),
                      lambda b, oc, y, x: te.sum(wm[oc, k] * cols[b, k, y * ow + x], axis=k), name="conv2d_mm")


def symbols_mul(a, k):
    return S.mul(a, k)


def _conv2d_direct(c: Ctx, x, w, b=None):
    y = R.nn.conv2d(x, w, strides=_pair(c.attr("stride")), padding=_pair(c.attr("padding")),
                    dilation=_pair(c.attr("dilation")), groups=c.attr("groups"))
    if b is None:
        return y
    return R.add(c.emit(y), c.emit(R.reshape(b, [1, -1, 1, 1])))


def _pool_padding(c: Ctx, k, s, p, d):
    """(top, left, bottom, right) padding that realises ceil_mode exactly as the IR (torch) does."""
    xt, ot = c.in_type(0), c.out_type()
    pads = [p[0], p[1], p[0], p[1]]
    if not c.attr("ceil_mode"):
        return pads, [0, 0]
    extra = []
    for ax in (0, 1):
        size, out = xt.shape[2 + ax], ot.shape[2 + ax]
        if not (isinstance(size, int) and isinstance(out, int)):
            return None, None
        extra.append(max(0, (out - 1) * s[ax] + d[ax] * (k[ax] - 1) + 1 - (size + 2 * p[ax])))
    return [p[0], p[1], p[0] + extra[0], p[1] + extra[1]], extra


@lowering("max_pool2d")
def _max_pool2d(c: Ctx, x):
    k, s, p, d = (_pair(c.attr(a)) for a in ("kernel", "stride", "padding", "dilation"))
    pads, _ = _pool_padding(c, k, s, p, d)
    if pads is None:  # symbolic spatial dims: trust TVM's ceil_mode
        pool = lambda t: R.nn.max_pool2d(t, k, s, p, d, ceil_mode=True)  # noqa: E731
        return _nan_if_any(c, x, c.emit(pool(x)), pool)
    if not _is_float(c.in_type(0).dtype):
        return R.nn.max_pool2d(x, k, s, pads, d, ceil_mode=False)
    _, _, oh, ow = c.out_shape()
    return c.bb.emit_te(_max_pool_nan, x, k, s, pads[:2], d, oh, ow, primfunc_name_hint="max_pool2d")


def _max_pool_nan(x, k, s, top_left, d, oh, ow):
    """Max pool whose window maximum is NaN when the window holds one (torch's), in one kernel. The
    window is written out term by term, without a reduction axis, so the kernel is elementwise: the
    loop along the output row is innermost and vectorises. (TVM's max would drop a NaN; a second pool
    over isnan flags cost two more kernels, 0.2 ms on ResNet-18's stem.)"""
    from tvm import te

    n, ch, h, w = x.shape

    def window_max(b, cc, i, j):
        values = []
        for u in range(k[0]):
            for v in range(k[1]):
                r, q = i * s[0] + u * d[0] - top_left[0], j * s[1] + v * d[1] - top_left[1]
                inside = tirx.all(r >= 0, r < h, q >= 0, q < w)
                values.append(tirx.if_then_else(inside, x[b, cc, tirx.max(r, 0), tirx.max(q, 0)],
                                                tirx.min_value(x.dtype)))
        return tirx.Select(tirx.any(*[tirx.isnan(v) for v in values]), tirx.const(np.nan, x.dtype),
                           functools.reduce(tirx.max, values))

    return te.compute((n, ch, oh, ow), window_max, name="max_pool2d")


@lowering("avg_pool2d")
def _avg_pool2d(c: Ctx, x):
    k, s, p = (_pair(c.attr(a)) for a in ("kernel", "stride", "padding"))
    incl = c.attr("count_include_pad")
    pads, extra = _pool_padding(c, k, s, p, [1, 1])
    if pads is None:
        return R.nn.avg_pool2d(x, k, s, p, ceil_mode=True, count_include_pad=incl)
    if incl and any(extra) and any(p):
        # the divisor counts the explicit padding but never the ceil-mode overhang: pad first, then
        # pool without counting what lies outside the padded input
        x = c.emit(R.nn.pad(x, [0, 0, 0, 0, p[0], p[0], p[1], p[1]], pad_value=0.0))
        return R.nn.avg_pool2d(x, k, s, [0, 0, extra[0], extra[1]], count_include_pad=False)
    return R.nn.avg_pool2d(x, k, s, pads, count_include_pad=incl and not any(extra))


@lowering("adaptive_avg_pool2d")
def _adaptive_avg_pool2d(c: Ctx, x):
    return R.nn.adaptive_avg_pool2d(x, _pair(c.attr("output_size")))


# ---- attention ------------------------------------------------------------------------------------

def _attend(c: Ctx, q, k, v, mask, *, rank: int, dtype: str, head_dim, lq, lk, scale, is_causal: bool, mask_dtype):
    """softmax(q @ k^T * scale [+ causal] [+ mask]) @ v on [..., L, D] tensors."""
    if scale is None:
        if not isinstance(head_dim, int):
            raise LoweringError("attention: head dimension must be static when scale is not given")
        scale = 1.0 / math.sqrt(head_dim)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    s = c.emit(R.matmul(q, c.emit(R.permute_dims(k, perm))))
    s = c.emit(R.multiply(s, c.const(scale, dtype)))
    neg_inf = c.const(-np.inf, dtype)
    if is_causal:
        allowed = c.emit(R.tril(c.emit(R.ones([c.dims(lq), c.dims(lk)], "bool"))))
        s = c.emit(R.where(allowed, s, neg_inf))
    if mask is not None:
        s = c.emit(R.where(mask, s, neg_inf) if mask_dtype == "bool" else R.add(s, mask))
    p = c.emit(R.nn.softmax(s, -1))
    return R.matmul(p, v)


@lowering("sdpa")
def _sdpa(c: Ctx, q, k, v, mask=None):
    qt = c.in_type(0)
    return _attend(c, q, k, v, mask, rank=qt.rank, dtype=qt.dtype, head_dim=qt.shape[-1], lq=qt.shape[-2],
                   lk=c.in_type(1).shape[-2], scale=c.attr("scale"), is_causal=c.attr("is_causal"),
                   mask_dtype=c.in_type(3).dtype if mask is not None else None)


@lowering("attention")
def _attention(c: Ctx, q, k, v, mask=None):
    """Multi-head attention on [batch, seq, heads*dim]: split heads, attend, merge heads."""
    h = c.attr("num_heads")

    def heads(x, i):
        b, sq, e = c.in_type(i).shape
        x = c.emit(R.reshape(x, c.dims.shape([b, sq, h, e // h])))
        return c.emit(R.permute_dims(x, [0, 2, 1, 3]))

    qt = c.in_type(0)
    o = c.emit(_attend(c, heads(q, 0), heads(k, 1), heads(v, 2), mask, rank=4, dtype=qt.dtype,
                       head_dim=qt.shape[-1] // h, lq=qt.shape[1], lk=c.in_type(1).shape[1], scale=c.attr("scale"),
                       is_causal=c.attr("is_causal"), mask_dtype=c.in_type(3).dtype if mask is not None else None))
    o = c.emit(R.permute_dims(o, [0, 2, 1, 3]))
    return R.reshape(o, c.out_shape())


# ---------------------------------------------------------------------------------------------
# whole graph
# ---------------------------------------------------------------------------------------------

def node_problem(node: Node, target_name: str) -> str | None:
    """Why ``node`` cannot be lowered for ``target_name``, or None."""
    opdef = get_op(node.op)
    if node.op not in LOWERINGS and "tvm" not in opdef.impls:
        return opdef.problem("tvm", node, target_name)
    for v in list(node.inputs) + list(node.outputs):
        if v is not None and v.dtype in UNSUPPORTED_DTYPES:
            return UNSUPPORTED_DTYPES[v.dtype]
    if "tvm" in opdef.impls:
        return opdef.problem("tvm", node, target_name)
    check = CHECKS.get(node.op)  # (legacy table, while ops move to nnforge/ops)
    return check(node, target_name) if check else None


def lower_node(c: Ctx, node: Node, args: list) -> list:
    """``node``'s lowering on Relax values ``args`` (the registry's ``fn(cx, *inputs, **attrs)``); its outputs."""
    outer, c.node = c.node, node
    try:
        if broadcasts(node.op):
            args = _align_broadcast(c.bb, c.dims, node, args)
        if "tvm" in get_op(node.op).impls:
            return call_impl("tvm", c, node, args)
        fn = LOWERINGS.get(node.op)  # (legacy table, while ops move to nnforge/ops)
        if fn is None:
            raise LoweringError("no TVM lowering for this op")
        while args and args[-1] is None:
            args = args[:-1]
        outs = fn(c, *args)
        return list(outs) if isinstance(outs, (list, tuple)) else [outs]  # multi-output ops: a list
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


def lower_graph(graph: Graph, *, embed_params: bool = False, func_name: str = "main",
                target: "tvm.target.Target | None" = None) -> Lowered:
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

