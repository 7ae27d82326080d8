"""Reductions: reduce_sum, reduce_mean, reduce_max, reduce_min, argmax; softmax and log_softmax.

Max-style reductions propagate NaN like numpy and torch on every backend (ONNX Runtime's ReduceMax and
ArgMax skip NaN, TVM's max drops it): ``tvm_nan_if_any`` and ``onnx_nan_mask`` / ``onnx_nan_where`` put
it back, and the pooling ops use them too. A sum or mean over a few elements of outer axes (ToMe's keys
averaged over heads) is written out term by term on both backends (``backends.base.few_outer_axes``).
TVM schedules softmax-like kernels row by row (``CPURowwise`` in backends/tvm_schedule.py).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, defop, implement
from .common import LazyModule, R, float_only, norm_axis, torch
from .elementwise import is_float, onnx_dtype

_base = LazyModule("nnforge.backends.base")  # few_outer_axes, shared by the ONNX and TVM lowerings


# ---------------------------------------------------------------------------------------------------
# reduce_sum, reduce_mean, reduce_max, reduce_min
# ---------------------------------------------------------------------------------------------------


def _reduce_infer(ts, attrs, dtype=None):
    t = ts[0]
    axes = attrs["axes"]
    axes = list(range(t.rank)) if axes is None else [norm_axis(a, t.rank, "reduce") for a in axes]
    if attrs["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape))
    else:
        shape = tuple(d for i, d in enumerate(t.shape) if i not in axes)
    return [TensorType(shape, dtype or t.dtype)]


@dataclass(frozen=True)
class _Reduction:
    ref: Callable  # numpy: fn(x, axis=, keepdims=)
    torch: Callable  # fn(x, axes, keepdims)
    onnx: str
    doc: str


_REDUCTIONS = {
    "reduce_sum": _Reduction(
        np.sum,
        lambda x, ax, k: torch.sum(x, ax, keepdim=k, dtype=x.dtype),
        "ReduceSum",
        "sum over ``axes`` (all when None); keepdims keeps them as size 1",
    ),
    "reduce_mean": _Reduction(
        np.mean,
        lambda x, ax, k: torch.mean(x if x.is_floating_point() else x.double(), ax, keepdim=k),
        "ReduceMean",
        "mean over ``axes`` (all when None); keepdims keeps them as size 1",
    ),
    "reduce_max": _Reduction(
        np.max,
        lambda x, ax, k: torch.amax(x, ax, keepdim=k),
        "ReduceMax",
        "max over ``axes`` (all when None); NaN where the reduced values hold one",
    ),
    "reduce_min": _Reduction(
        np.min,
        lambda x, ax, k: torch.amin(x, ax, keepdim=k),
        "ReduceMin",
        "min over ``axes`` (all when None); NaN where the reduced values hold one",
    ),
}
_REDUCE_ATTRS = {"axes": ("optional_ints", None), "keepdims": ("bool", False)}

for _name, _r in _REDUCTIONS.items():
    defop(
        _name,
        _reduce_infer,
        attrs=_REDUCE_ATTRS,
        kind="reduce",
        doc=_r.doc,
        ref=lambda x, axes=None, keepdims=False, _fn=_r.ref: _fn(
            x, axis=None if axes is None else tuple(axes), keepdims=keepdims
        ),
    )


@implement("torch", *_REDUCTIONS)
def _(cx, x, axes=None, keepdims=False):
    if x.dim() == 0:
        return x
    axes = list(range(x.dim())) if axes is None else [a % max(x.dim(), 1) for a in axes]
    return _REDUCTIONS[cx.node.op].torch(x, axes, keepdims)


# -- ONNX --------------------------------------------------------------------------------------------
# ONNX Runtime's max/min kernels (ReduceMax, ArgMax, MaxPool) skip NaN; eager torch (and the IR) propagate
# it. These lowerings add a NaN mask computed the same way and put NaN back where a NaN was seen.


def onnx_nan_mask(cx, x: str) -> str:
    """float32 1 where ``x`` is NaN, else 0 (reduce or pool it like the value it guards)."""
    return cx.emit("Cast", [cx.emit("IsNaN", [x])], to=onnx_dtype("float32"))


def onnx_nan_where(cx, hits: str, y: str, dtype: str, out: str | None = None) -> str:
    """``y``, or NaN where ``hits`` (a NaN mask reduced like y) is positive."""
    nan = cx.const(np.nan, dtype, "nan")
    return cx.emit("Where", [cx.emit("Greater", [hits, cx.const(0.0, "float32", "zero")]), nan, y], out=out)


@implement("onnxrt", *_REDUCTIONS)
def _(cx, x, axes=None, keepdims=False):
    op, t = _REDUCTIONS[cx.node.op].onnx, cx.node.inputs[0]
    args = [x] + ([] if axes is None else [cx.const(list(axes), "int64", "axes")])
    if op in ("ReduceMax", "ReduceMin") and is_float(t.dtype):
        y = cx.emit(op, args, keepdims=int(keepdims))
        hits = cx.emit("ReduceMax", [onnx_nan_mask(cx, x)] + args[1:], keepdims=int(keepdims))
        return onnx_nan_where(cx, hits, y, cx.node.output.dtype)
    if op in ("ReduceSum", "ReduceMean"):
        total = _onnx_sum_of_slices(cx, x, op == "ReduceMean")
        if total is not None:
            return total
    return cx.emit(op, args, keepdims=int(keepdims))


def _onnx_sum_of_slices(cx, x: str, mean: bool) -> str | None:
    """A sum or mean over a few (<= 8) elements of consecutive outer axes (ToMe's keys averaged over heads:
    [b, n, 4, 16] over the 4) as Split + Sum: ONNX Runtime's ReduceMean over a middle axis took 1.1 ms at
    that size and batch 256, Split + Sum 0.46. (A MatMul with a 0/1 matrix took 0.17 but turns one inf
    into NaN across the row.) None where it does not apply."""
    n = cx.node
    axes = _base.few_outer_axes(n)
    if axes is None or axes != list(range(axes[0], axes[-1] + 1)):  # Split takes consecutive axes
        return None
    first, count = axes[0], math.prod(n.inputs[0].shape[a] for a in axes)
    grouped = cx.emit("Reshape", [x, cx.const([0] * first + [count, -1], "int64", "shape")])
    parts = cx.emit_multi("Split", [grouped, cx.const([1] * count, "int64", "split")], count, axis=first)
    total = cx.emit("Sum", parts)
    if mean:
        total = cx.emit("Div", [total, cx.const(float(count), n.inputs[0].dtype, "count")])
    return cx.emit("Reshape", [total, cx.dims(n.output.shape)], allowzero=1)


# -- TVM ---------------------------------------------------------------------------------------------


@implement("tvm", "reduce_sum", "reduce_mean")
def _(c, x, axes=None, keepdims=False):
    few = _base.few_outer_axes(c.node)
    if few is not None:
        return c.bb.emit_te(_sum_few, x, few, keepdims, c.node.op == "reduce_mean", primfunc_name_hint=c.node.op)
    return (R.sum if c.node.op == "reduce_sum" else R.mean)(x, axes, keepdims)


def _sum_few(x, axes: list, keepdims: bool, mean: bool):
    """A sum (or mean) over a few elements of outer axes (ToMe's keys averaged over heads: [b, n, 4, d]
    over the 4), written out term by term: an elementwise kernel, vectorised along the innermost axis
    and fused with its neighbours. (A reduction kernel reads those few elements with a stride per output.)"""
    from tvm import te, tirx

    terms = list(itertools.product(*[range(int(x.shape[a])) for a in axes]))
    out_shape = [1 if a in axes else d for a, d in enumerate(x.shape) if keepdims or a not in axes]

    def value(*idx):
        idx = list(idx)
        rest = [idx[a] for a in range(len(x.shape)) if a not in axes] if keepdims else idx
        total = None
        for term in terms:
            at, it = dict(zip(axes, term)), iter(rest)
            full = [at[a] if a in at else next(it) for a in range(len(x.shape))]
            total = x[tuple(full)] if total is None else total + x[tuple(full)]
        return total / tirx.const(len(terms), x.dtype) if mean else total

    return te.compute(out_shape, value, name="reduce")


def tvm_nan_if_any(c, x, y, reduce):
    """``y`` (a max/min-style reduction of ``x``, the node's input 0), NaN wherever the reduced window
    held a NaN; ``reduce`` reduces a tensor shaped like x the way y was."""
    dt = c.in_type(0).dtype
    if not is_float(dt):
        return y
    flags = c.emit(reduce(c.emit(R.astype(c.emit(R.isnan(x)), dt))))
    return R.where(c.emit(R.greater(flags, c.const(0, dt))), c.const(np.nan, dt), y)


@implement("tvm", "reduce_max", "reduce_min")
def _(c, x, axes=None, keepdims=False):
    is_max = c.node.op == "reduce_max"
    y = c.emit((R.max if is_max else R.min)(x, axes, keepdims))
    dt = c.in_type(0).dtype
    if is_float(dt):
        # TVM starts a max at the lowest finite value (a min at the highest), so a window of only -inf (+inf)
        # gives that value instead of the infinity: ONNX's "every key masked" test (max == -inf) then fails
        inf = c.const(-np.inf if is_max else np.inf, dt)
        others = c.emit(R.max(c.emit(R.astype(c.emit(R.not_equal(x, inf)), dt)), axes, keepdims))
        y = c.emit(R.where(c.emit(R.equal(others, c.const(0, dt))), inf, y))
    return tvm_nan_if_any(c, x, y, lambda t: R.max(t, axes, keepdims))


# ---------------------------------------------------------------------------------------------------
# argmax
# ---------------------------------------------------------------------------------------------------


@defop(
    "argmax",
    lambda ts, a: _reduce_infer(ts, {"axes": [a["axis"]], "keepdims": a["keepdims"]}, "int64"),
    attrs={"axis": ("int", REQUIRED), "keepdims": ("bool", False)},
    kind="reduce",
)
def argmax(x, axis, keepdims=False):
    """Index of the largest value along ``axis`` (int64); the first one wins, and a NaN counts as largest."""
    return np.argmax(x, axis=axis, keepdims=keepdims)


@argmax.torch
def _(cx, x, axis, keepdims=False):
    return torch.argmax(x, axis, keepdim=keepdims)


@argmax.onnxrt
def _(cx, x, axis, keepdims=False):
    a = {"axis": axis, "keepdims": int(keepdims)}
    if not is_float(cx.node.inputs[0].dtype):
        return cx.emit("ArgMax", [x], **a)
    mask = onnx_nan_mask(cx, x)  # torch: a NaN is the maximum, the first one wins
    has_nan = cx.emit("ReduceMax", [mask, cx.const([axis], "int64", "axes")], keepdims=a["keepdims"])
    return cx.emit(
        "Where",
        [
            cx.emit("Greater", [has_nan, cx.const(0.0, "float32", "zero")]),
            cx.emit("ArgMax", [mask], **a),
            cx.emit("ArgMax", [x], **a),
        ],
    )


@argmax.tvm
def _(c, x, axis, keepdims=False):
    return R.argmax(x, axis, keepdims)


# ---------------------------------------------------------------------------------------------------
# softmax, log_softmax
# ---------------------------------------------------------------------------------------------------


def _softmax_infer(ts, attrs):
    float_only(ts[0], "softmax")
    norm_axis(attrs["axis"], ts[0].rank, "softmax")
    return [ts[0]]


def softmax_ref(x, axis=-1):
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the max so large values do not overflow."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


softmax = defop("softmax", _softmax_infer, attrs={"axis": ("int", -1)}, ref=softmax_ref)


@defop("log_softmax", _softmax_infer, attrs={"axis": ("int", -1)})
def log_softmax(x, axis=-1):
    """log(softmax(x)) along ``axis``, computed as x - max - log(sum(exp(x - max)))."""
    m = x - np.max(x, axis=axis, keepdims=True)
    return m - np.log(np.sum(np.exp(m), axis=axis, keepdims=True))


@softmax.torch
def _(cx, x, axis=-1):
    return torch.softmax(x, axis)


@log_softmax.torch
def _(cx, x, axis=-1):
    return torch.log_softmax(x, axis)


@softmax.onnxrt
def _(cx, x, axis=-1):
    return cx.emit("Softmax", [x], axis=axis)


@log_softmax.onnxrt
def _(cx, x, axis=-1):
    return cx.emit("LogSoftmax", [x], axis=axis)


def _in_float32(c, x, fn):
    """``fn`` computed in float32 for half-precision inputs (ONNX Runtime and torch do; fp16 sums drift)."""
    dt = c.in_type(0).dtype
    if dt not in ("float16", "bfloat16"):
        return fn(x)
    return R.astype(c.emit(fn(c.emit(R.astype(x, "float32")))), dt)


@softmax.tvm
def _(c, x, axis=-1):
    return _in_float32(c, x, lambda v: R.nn.softmax(v, axis))


@log_softmax.tvm
def _(c, x, axis=-1):
    return _in_float32(c, x, lambda v: R.nn.log_softmax(v, axis))
