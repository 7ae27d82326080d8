"""Linear algebra: matmul, linear (y = x @ w.T + b, w is [out, in]) and linear_act (a linear with its activation fused).

ONNX: a 2-D linear is one Gemm(transB=1); otherwise MatMul with the weight transposed once, at export, as its own
initializer. TVM: a linear on one token per sequence ([batch, 1, K], an LLM's decode step) is tvm_gemv's kernel
(the weight re-laid out at load as [N/T, K, T]: T rows' accumulators in registers); a 2-D linear with 1-4 static
rows on a CPU (batch 1: a matrix-vector product, bound by reading the weight) reads its weight packed into column
panels (``_gemv_panel``, ``_gemv_packed``); otherwise a Relax matmul on the transposed weight, which
LiftTransformParams transposes once at load.
"""

from __future__ import annotations

import numpy as np

from ..ir import symbols
from ..ir.graph import TensorType
from ..ir.registry import OpError, defop
from .common import LazyModule, R, broadcast_shapes, same_dtype, torch
from .elementwise import ACTIVATIONS

_tvm_gemv = LazyModule("nnforge.backends.tvm_gemv")  # few-row kernels
_tvm_schedule = LazyModule("nnforge.backends.tvm_schedule")  # the GEMV column tile


def _act_check(shown: str):
    def check(node, target: str) -> str | None:
        act = node.attrs.get("act")
        return None if act in ACTIVATIONS else f"activation {act!r} has no {shown} lowering"

    return check


# -- matmul ---------------------------------------------------------------------------------------------


def _matmul_infer(ts, attrs):
    a, b = ts
    dt = same_dtype(ts, "matmul")
    if a.rank < 1 or b.rank < 1:
        raise OpError("matmul: scalars are not allowed")
    ash = a.shape if a.rank > 1 else (1,) + a.shape
    bsh = b.shape if b.rank > 1 else b.shape + (1,)
    if not symbols.dims_equal(ash[-1], bsh[-2]) and isinstance(ash[-1], int) and isinstance(bsh[-2], int):
        raise OpError(f"matmul: inner dimensions differ: {a.shape} @ {b.shape}")
    batch = broadcast_shapes(ash[:-2], bsh[:-2], "matmul")
    out = batch + ((ash[-2],) if a.rank > 1 else ()) + ((bsh[-1],) if b.rank > 1 else ())
    return [TensorType(out, dt)]


@defop("matmul", _matmul_infer, num_inputs=(2, 2))
def matmul(a, b):
    """numpy.matmul: batch dims broadcast, a 1-D operand is a vector."""
    return np.matmul(a, b)


@matmul.torch
def _(cx, a, b):
    return torch.matmul(a, b)


@matmul.onnxrt
def _(cx, a, b):
    return cx.emit("MatMul", [a, b])


@matmul.tvm
def _(c, a, b):
    if c.in_type(0).dtype in ("float16", "bfloat16"):  # accumulate in float32, as ONNX Runtime and torch do
        return R.astype(c.emit(R.matmul(a, b, out_dtype="float32")), c.in_type(0).dtype)
    return R.matmul(a, b)


# -- linear ---------------------------------------------------------------------------------------------


def _linear_infer(ts, attrs):
    x, w = ts[0], ts[1]
    b = ts[2] if len(ts) > 2 else None
    same_dtype([x, w, b], "linear")
    if w.rank != 2:
        raise OpError(f"linear: weight must be 2-D [out, in], got {w.shape}")
    if isinstance(x.shape[-1], int) and isinstance(w.shape[1], int) and x.shape[-1] != w.shape[1]:
        raise OpError(f"linear: input features {x.shape[-1]} != weight in-features {w.shape[1]}")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


@defop("linear", _linear_infer, num_inputs=(2, 3), doc="y = x @ w.T + b, w is [out, in]")
def linear(x, w, b=None):
    y = np.matmul(x, w.T)
    return y + b if b is not None else y


@linear.torch
def _linear_torch(cx, x, w, b=None):
    y = torch.matmul(x, w.T)
    return y + b if b is not None else y


def _matmul_wt(cx, x: str, w: str, b: str | None = None) -> str:
    """x @ w.T + b in ONNX, for linear and linear_act (``cx.node``'s inputs 0 and 1 are x and w)."""
    xv, wv = cx.node.inputs[0], cx.node.inputs[1]
    if xv.type.rank == 2:
        return cx.emit("Gemm", [x, w, b] if b else [x, w], transB=1)
    if cx.graph.is_constant(wv):  # pre-transposed weight, once per weight
        wt = cx.cached_const(("wT", wv.name), lambda: cx.graph.constant(wv).T, f"{wv.name}_T")
    else:
        wt = cx.emit("Transpose", [w], perm=[1, 0])
    y = cx.emit("MatMul", [x, wt])
    return cx.emit("Add", [y, b]) if b else y


@linear.onnxrt
def _(cx, x, w, b=None):
    return _matmul_wt(cx, x, w, b)


@linear.tvm
def _linear_tvm(c, x, w, b=None):
    xt, (n, k) = c.in_type(0), c.in_type(1).shape
    if _decode_rows(c) and _tvm_gemv.available(c.target, n, k, 32, k):
        lead = c.dims.shape(xt.shape[:-1])
        y = _tvm_gemv.matmul(c.bb, c.emit(R.reshape(x, [-1, k])), w, n, k)
        y = c.emit(R.reshape(y, [*lead, n]))
        return R.add(y, b) if b is not None else y
    wt = c.emit(R.permute_dims(w, [1, 0]))
    panel = _gemv_panel(c)
    y = _gemv_packed(c, x, wt, panel) if panel else c.emit(R.matmul(x, wt))
    return R.add(y, b) if b is not None else y


def _decode_rows(c) -> bool:
    """A float32 linear on a step of one token per sequence ([batch, 1, K]: an LLM's decode build)."""
    xt = c.in_type(0)
    return xt.dtype == "float32" and xt.rank >= 3 and xt.shape[-2] == 1 and isinstance(c.in_type(1).shape[1], int)


def _gemv_panel(c) -> int | None:
    """Columns per weight panel when a linear layer has 1-4 static rows (batch 1: a matrix-vector
    product, bound by reading the weight) on a CPU: the column tile the CPU matmul schedule takes."""
    xt, (n, k) = c.in_type(0), c.in_type(1).shape
    rows = xt.shape[0] if len(xt.shape) == 2 else None
    if (
        c.target is None
        or c.target.kind.name != "llvm"
        or not isinstance(rows, int)
        or not 1 <= rows <= 4
        or not (isinstance(n, int) and isinstance(k, int))
        or xt.dtype != "float32"
    ):
        return None
    nr = _tvm_schedule.pick_gemv_nr(n, _tvm_schedule.vector_lanes(c.target, 32), rows)
    return nr if nr and nr < n else None


def _gemv_packed(c, x, wt, nr: int):
    """x [M, K] @ wt [K, N] with wt packed once, at load, as panels [N/nr, K, nr]: each thread then
    streams its panels from memory front to back. (Read in place, a panel is nr columns of every row,
    1 kB runs 8 kB apart for a 2048-wide layer, and the hardware prefetcher stops at each page;
    ONNX Runtime packs its weights the same way.)"""
    from tvm import te

    k, n = c.in_type(1).shape[1], c.in_type(1).shape[0]
    packed = c.emit(R.permute_dims(c.emit(R.reshape(wt, [k, n // nr, nr])), [1, 0, 2]))

    def gemv(a, p):
        r = te.reduce_axis((0, k), name="k")
        return te.compute((a.shape[0], n), lambda i, j: te.sum(a[i, r] * p[j // nr, r, j % nr], axis=r), name="matmul")

    return c.bb.emit_te(gemv, x, packed, primfunc_name_hint="matmul")


# -- linear_act -----------------------------------------------------------------------------------------


def _linear_act_infer(ts, attrs):
    if attrs["act"] not in ACTIVATIONS:
        raise OpError(f"unknown activation {attrs['act']!r}; choose from {sorted(ACTIVATIONS)}")
    return _linear_infer(ts, attrs)


@defop(
    "linear_act",
    _linear_act_infer,
    num_inputs=(2, 3),
    attrs={"act": ("str", "none")},
    kind="fused",
    doc="act(x @ w.T + b): a linear layer with its bias and activation fused",
)
def linear_act(x, w, b=None, act="none"):
    return ACTIVATIONS[act].ref(linear.ref(x, w, b))


@linear_act.torch
def _(cx, x, w, b=None, act="none"):
    return ACTIVATIONS[act].torch(_linear_torch(cx, x, w, b))


@linear_act.onnxrt(check=_act_check("ONNX"))
def _(cx, x, w, b=None, act="none"):
    return ACTIVATIONS[act].onnx(cx, _matmul_wt(cx, x, w, b))


@linear_act.tvm(check=_act_check("TVM"))
def _(c, x, w, b=None, act="none"):
    return ACTIVATIONS[act].tvm(c, c.emit(_linear_tvm(c, x, w, b)))
