"""Shape and data movement: reshape, permute, expand, concat, slice, gather, squeeze, unsqueeze, full_like, arange.

``BIG`` ("to the end" for slice ends) and ``slice_len`` (a slice's length, symbolic or not) are used by the
frontends and tests too.
"""

from __future__ import annotations

import math

import numpy as np

from ..ir import symbols
from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop, implement
from ..ir.symbols import Dim
from .common import BIG, LazyModule, R, norm_axis, same_dtype, torch

_onnxrt = LazyModule("nnforge.backends.onnxrt")  # the ONNX backend's constants (INT64_MAX, ONNX_DTYPES)
_torch_dtypes = LazyModule("nnforge.ir.torch_dtypes")  # (imports torch)


# -- reshape -------------------------------------------------------------------------------------


def _reshape_infer(ts, attrs):
    x = ts[0]
    shape = list(attrs["shape"])
    if sum(1 for d in shape if d == -1) > 1:
        raise OpError(f"reshape: more than one -1 in {shape}")
    known = [d for d in shape if d != -1]
    if -1 in shape:
        shape[shape.index(-1)] = symbols.div(x.numel(), symbols.mul(*known) if known else 1)
    elif x.is_static and all(isinstance(d, int) for d in shape) and math.prod(shape) != math.prod(x.shape):
        raise OpError(f"reshape: cannot reshape {x.shape} to {tuple(shape)}")
    return [TensorType(tuple(shape), x.dtype)]


@defop("reshape", _reshape_infer, attrs={"shape": ("dims", REQUIRED)}, kind="shape")
def reshape(x, shape):
    """numpy.reshape; one -1 takes what is left."""
    return np.reshape(x, shape)


@reshape.torch
def _(cx, x, shape):
    return x.reshape(shape)


@reshape.onnxrt
def _(cx, x, shape):
    # allowzero=1: an IR 0 means an empty axis, never "copy the input dim"
    return cx.emit("Reshape", [x, cx.dims(shape)], allowzero=1)


# -- permute -------------------------------------------------------------------------------------


def _permute_infer(ts, attrs):
    x, perm = ts[0], attrs["perm"]
    if sorted(perm) != list(range(x.rank)):
        raise OpError(f"permute: {perm} is not a permutation of rank {x.rank}")
    return [TensorType(tuple(x.shape[p] for p in perm), x.dtype)]


@defop("permute", _permute_infer, attrs={"perm": ("ints", REQUIRED)}, kind="shape")
def permute(x, perm):
    """numpy.transpose by ``perm``."""
    return np.transpose(x, perm)


@permute.torch
def _(cx, x, perm):
    return x.permute(perm)


@permute.onnxrt
def _(cx, x, perm):
    return cx.emit("Transpose", [x], perm=list(perm))


@permute.tvm
def _(c, x, perm):
    return R.permute_dims(x, perm)


# -- expand --------------------------------------------------------------------------------------


def _expand_infer(ts, attrs):
    x, shape = ts[0], list(attrs["shape"])
    if len(shape) < x.rank:
        raise OpError(f"expand: target rank {len(shape)} < input rank {x.rank}")
    off = len(shape) - x.rank
    out = []
    for i, d in enumerate(shape):
        src = x.shape[i - off] if i >= off else 1
        if d == -1:
            out.append(src)
        elif src == 1 or symbols.dims_equal(src, d):
            out.append(d)
        elif isinstance(src, int) and isinstance(d, int):
            raise OpError(f"expand: cannot expand {x.shape} to {tuple(shape)}")
        else:
            out.append(d)
    return [TensorType(tuple(out), x.dtype)]


@defop("expand", _expand_infer, attrs={"shape": ("dims", REQUIRED)}, kind="shape")
def expand(x, shape):
    """Broadcast to ``shape``; -1 keeps the input's dim."""
    off = len(shape) - x.ndim
    target = [x.shape[i - off] if d == -1 else d for i, d in enumerate(shape)]
    return np.broadcast_to(x, target).copy()


@expand.torch
def _(cx, x, shape):
    off = len(shape) - x.dim()
    target = [x.shape[i - off] if d == -1 else d for i, d in enumerate(shape)]
    return x.expand(target)


@expand.onnxrt
def _(cx, x, shape):
    # ONNX Expand broadcasts both ways, so 1 keeps the source dim where the IR says -1
    shape = [1 if d == -1 else d for d in shape]
    return cx.emit("Expand", [x, cx.dims(shape)])


@expand.tvm
def _(c, x, shape):
    return R.broadcast_to(x, c.out_shape())


# -- concat --------------------------------------------------------------------------------------


def _concat_infer(ts, attrs):
    dt = same_dtype(ts, "concat")
    r = ts[0].rank
    if any(t.rank != r for t in ts):
        raise OpError("concat: inputs differ in rank")
    ax = norm_axis(attrs["axis"], r, "concat")
    shape = list(ts[0].shape)
    shape[ax] = symbols.from_sympy(sum(symbols.to_sympy(t.shape[ax]) for t in ts))
    return [TensorType(tuple(shape), dt)]


@defop("concat", _concat_infer, attrs={"axis": ("int", 0)}, num_inputs=(1, -1), kind="shape")
def concat(*xs, axis=0):
    """numpy.concatenate along ``axis``."""
    return np.concatenate(xs, axis=axis)


@concat.torch
def _(cx, *xs, axis=0):
    return torch.cat(xs, axis)


@concat.onnxrt
def _(cx, *xs, axis=0):
    return cx.emit("Concat", list(xs), axis=axis)


@concat.tvm
def _(c, *xs, axis=0):
    return R.concat(list(xs), axis)


# -- slice ---------------------------------------------------------------------------------------


def slice_len(dim: Dim, start: int, end: Dim, step: int) -> Dim:
    """The length of ``x[start:end:step]`` along an axis of size ``dim`` (either may be symbolic)."""
    if isinstance(end, str):  # symbolic end (x[:, :seq]): assumed in bounds, as torch.export guards it
        import sympy

        return symbols.from_sympy(sympy.floor((symbols.to_sympy(end) - start + step - 1) / step))
    if isinstance(dim, int):
        return len(range(*slice(start, end, step).indices(dim)))
    import sympy

    d = symbols.to_sympy(dim)
    s = d + start if start < 0 else sympy.Integer(start)
    e = d if end >= BIG // 2 else (d + end if end < 0 else sympy.Integer(end))
    return symbols.from_sympy(sympy.floor((e - s + step - 1) / step))


def _slice_infer(ts, attrs):
    x = ts[0]
    ax = norm_axis(attrs["axis"], x.rank, "slice")
    if attrs["step"] < 1:
        raise OpError("slice: step must be >= 1")
    shape = list(x.shape)
    shape[ax] = slice_len(shape[ax], attrs["start"], attrs["end"], attrs["step"])
    return [TensorType(tuple(shape), x.dtype)]


@defop(
    "slice",
    _slice_infer,
    attrs={"axis": ("int", REQUIRED), "start": ("int", 0), "end": ("dim", BIG), "step": ("int", 1)},
    kind="shape",
)
def slice_(x, axis, start=0, end=BIG, step=1):
    """x[start:end:step] along ``axis`` (end BIG: to the end)."""
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, end, step)
    return x[tuple(idx)]


@slice_.torch
def _(cx, x, axis, start=0, end=2**62, step=1):
    idx = [slice(None)] * x.dim()
    idx[axis] = slice(start, min(end, 2**62), step)
    return x[tuple(idx)]


@slice_.onnxrt
def _(cx, x, axis, start=0, end=BIG, step=1):
    if isinstance(end, int):
        ends = cx.const([_onnxrt.INT64_MAX if end >= BIG // 2 else end], "int64", "end")
    else:
        ends = cx.dim(end)
    return cx.emit(
        "Slice",
        [
            x,
            cx.const([start], "int64", "start"),
            ends,
            cx.const([axis], "int64", "axes"),
            cx.const([step], "int64", "step"),
        ],
    )


@slice_.tvm
def _(c, x, axis, start=0, end=BIG, step=1):
    """Bounds are resolved here exactly as the IR's shape inference does, so Relax may assume them in
    bounds and derives the same (symbolic) length the IR has."""
    xt = c.in_type(0)
    ax = axis % xt.rank
    dim = xt.shape[ax]
    if isinstance(dim, int) and isinstance(end, int):
        b, e, _ = slice(start, end, step).indices(dim)
        begin, stop = b, max(e, b)
    else:
        d = c.dims(dim)
        begin = d + start if start < 0 else start
        if isinstance(end, str):
            stop = c.dims(end)
        elif end >= BIG // 2:
            stop = d
        else:
            stop = d + end if end < 0 else end
    return R.strided_slice(x, [ax], [begin], [stop], [step], assume_inbound=True)


# -- gather --------------------------------------------------------------------------------------


def _gather_infer(ts, attrs):
    data, idx = ts
    if idx.dtype not in ("int64", "int32"):
        raise OpError(f"gather: indices must be int64/int32, got {idx.dtype}")
    ax = norm_axis(attrs["axis"], data.rank, "gather")
    return [TensorType(data.shape[:ax] + idx.shape + data.shape[ax + 1 :], data.dtype)]


@defop(
    "gather",
    _gather_infer,
    attrs={"axis": ("int", 0)},
    num_inputs=(2, 2),
    kind="shape",
    doc="numpy.take: embedding lookup and index select",
)
def gather(data, idx, axis=0):
    return np.take(data, idx, axis=axis)


@gather.torch
def _(cx, data, idx, axis=0):
    axis = axis % data.dim()
    n = data.shape[axis]
    flat = idx.reshape(-1).long()
    if flat.numel() and (flat.min() < -n or flat.max() >= n):
        raise IndexError(f"gather: index out of range for axis of size {n}")
    out = torch.index_select(data, axis, flat % n if n else flat)  # numpy.take wraps negative indices
    return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1 :])


@gather.onnxrt
def _(cx, data, idx, axis=0):
    return cx.emit("Gather", [data, idx], axis=axis)


@gather.tvm
def _(c, data, idx, axis=0):
    # wraps negative indices like numpy (indices past the end are not checked)
    return R.take(data, idx, axis, mode="wrap")


# -- squeeze, unsqueeze --------------------------------------------------------------------------


def _squeeze_infer(ts, attrs):
    x = ts[0]
    axes = [norm_axis(a, x.rank, "squeeze") for a in attrs["axes"]]
    for a in axes:
        if isinstance(x.shape[a], int) and x.shape[a] != 1:
            raise OpError(f"squeeze: axis {a} of {x.shape} is not 1")
    return [TensorType(tuple(d for i, d in enumerate(x.shape) if i not in axes), x.dtype)]


@defop("squeeze", _squeeze_infer, attrs={"axes": ("ints", REQUIRED)}, kind="shape")
def squeeze(x, axes):
    """Drop the size-1 ``axes``."""
    return np.squeeze(x, axis=tuple(axes))


@squeeze.torch
def _(cx, x, axes):
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


@squeeze.onnxrt
def _(cx, x, axes):
    return cx.emit("Squeeze", [x, cx.const(list(axes), "int64", "axes")])


def _unsqueeze_infer(ts, attrs):
    x = ts[0]
    r = x.rank + len(attrs["axes"])
    axes = sorted(norm_axis(a, r, "unsqueeze") for a in attrs["axes"])
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return [TensorType(tuple(shape), x.dtype)]


@defop("unsqueeze", _unsqueeze_infer, attrs={"axes": ("ints", REQUIRED)}, kind="shape")
def unsqueeze(x, axes):
    """Insert size-1 ``axes`` (positions in the output)."""
    r = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(a % r for a in axes)))


@unsqueeze.torch
def _(cx, x, axes):
    r = x.dim() + len(axes)
    for a in sorted(a % r for a in axes):
        x = x.unsqueeze(a)
    return x


@unsqueeze.onnxrt
def _(cx, x, axes):
    return cx.emit("Unsqueeze", [x, cx.const(list(axes), "int64", "axes")])


@implement("tvm", "reshape", "squeeze", "unsqueeze")
def _(c, x, **attrs):
    return R.reshape(x, c.out_shape())


# -- full_like, arange ---------------------------------------------------------------------------


def _full_like_infer(ts, attrs):
    return [TensorType(ts[0].shape, attrs["dtype"] or ts[0].dtype)]


@defop("full_like", _full_like_infer, attrs={"value": ("float", REQUIRED), "dtype": ("any", None)})
def full_like(x, value, dtype=None):
    """A tensor of x's shape filled with ``value`` (dtype: x's unless given)."""
    return np.full(x.shape, value, dtype=dtype or x.dtype)


@full_like.torch
def _(cx, x, value, dtype=None):
    return torch.full(x.shape, value, dtype=_torch_dtypes.TORCH_DTYPES[dtype] if dtype else x.dtype)


@full_like.onnxrt
def _(cx, x, value, dtype=None):
    dt = dtype or cx.node.inputs[0].dtype
    return cx.emit("Expand", [cx.const(value, dt, "fill"), cx.emit("Shape", [x])])


@full_like.tvm
def _(c, x, value, dtype=None):
    dt = c.out_type().dtype
    return R.full(c.out_shape(), c.const(value, dt), dt)


def _arange_infer(ts, attrs):
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    if isinstance(end, int):
        n = len(range(start, end, step))
    else:
        import sympy

        n = symbols.from_sympy(sympy.floor((symbols.to_sympy(end) - start + step - 1) / step))
    return [TensorType((n,), attrs["dtype"])]


@defop(
    "arange",
    _arange_infer,
    attrs={"start": ("int", 0), "end": ("dim", REQUIRED), "step": ("int", 1), "dtype": ("dtype", "int64")},
    num_inputs=(0, 0),
    kind="shape",
)
def arange(start=0, end=1, step=1, dtype="int64"):
    """numpy.arange(start, end, step); ``end`` may be a symbol."""
    return np.arange(start, end, step, dtype=dtype)


@arange.torch
def _(cx, start=0, end=1, step=1, dtype="int64"):
    return torch.arange(start, end, step, dtype=_torch_dtypes.TORCH_DTYPES[dtype])


@arange.onnxrt
def _(cx, start=0, end=1, step=1, dtype="int64"):
    dt = dtype
    # Range takes int32/int64/float/double; other dtypes count in int64 and cast
    rdt = dt if dt in ("int32", "int64", "float32", "float64") else "int64"
    start, step = cx.const(start, rdt), cx.const(step, rdt)
    end = cx.scalar_dim(end)
    if rdt != "int64":
        end = cx.emit("Cast", [end], to=_onnxrt.ONNX_DTYPES[rdt])
    if rdt == dt:
        return cx.emit("Range", [start, end, step])
    return cx.emit("Cast", [cx.emit("Range", [start, end, step])], to=_onnxrt.ONNX_DTYPES[dt])


@arange.tvm
def _(c, start=0, end=1, step=1, dtype="int64"):
    return R.arange(start, c.dims(end), step, dtype)
