"""Indexing by tensors, scans and selection: index (multi-tensor advanced indexing), gather_elements,
scatter_elements, cumsum, topk (sort is a topk of the whole axis).

``gather`` (numpy.take, one index tensor on one axis) lives in the shape family; ``index`` is the general
``x[i, :, j]`` of several index tensors that broadcast together.
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop
from .common import LazyModule, R, broadcast_shapes, norm_axis, torch
from .elementwise import onnx_dtype

relax = LazyModule("tvm.relax")
_INDEX_DTYPES = ("int64", "int32")


def _index_dtype(t, op: str) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise OpError(f"{op}: indices must be int64/int32, got {t.dtype}")


# -- index: x[..., i, ..., j, ...] -----------------------------------------------------------------


def _contiguous(axes) -> bool:
    return list(axes) == list(range(axes[0], axes[0] + len(axes)))


def _index_infer(ts, attrs):
    x, idx = ts[0], ts[1:]
    axes = [norm_axis(a, x.rank, "index") for a in attrs["axes"]]
    if len(axes) != len(idx) or not idx:
        raise OpError(f"index: {len(idx)} index tensor(s) for axes {attrs['axes']}")
    if sorted(set(axes)) != axes:
        raise OpError(f"index: axes {attrs['axes']} must be distinct and increasing")
    for t in idx:
        _index_dtype(t, "index")
    b = broadcast_shapes(*[t.shape for t in idx]) if len(idx) > 1 else idx[0].shape
    rest = [d for i, d in enumerate(x.shape) if i not in axes]
    if _contiguous(axes):  # numpy and torch: the indexed dims are replaced in place
        shape = x.shape[: axes[0]] + tuple(b) + x.shape[axes[-1] + 1 :]
    else:  # indexed axes apart: the broadcast index dims go first
        shape = tuple(b) + tuple(rest)
    return [TensorType(tuple(shape), x.dtype)]


@defop("index", _index_infer, attrs={"axes": ("ints", REQUIRED)}, num_inputs=(2, -1), kind="shape")
def index(x, *idx, axes):
    """numpy/torch advanced indexing ``x[i0, :, i1]``: index tensor k indexes axis ``axes[k]``; the index
    tensors broadcast together; the other axes are kept whole (negative indices count from the end)."""
    key = [slice(None)] * x.ndim
    for a, i in zip(axes, idx):
        key[a] = i
    return x[tuple(key)]


@index.torch
def _(cx, x, *idx, axes):
    key = [slice(None)] * x.dim()
    for a, i in zip(axes, idx):
        key[a] = i.long()
    return x[tuple(key)]


def _index_plan(node):
    """(axes, broadcast index shape, permutation that brings the indexed axes first, final permutation or None)."""
    x = node.inputs[0].type
    axes = [a % x.rank for a in node.attrs["axes"]]
    others = [i for i in range(x.rank) if i not in axes]
    b = node.outputs[0].shape
    nb = len(b) - len(others)
    b = b[axes[0] : axes[0] + nb] if _contiguous(axes) else b[:nb]
    final = None
    if _contiguous(axes) and axes[0] > 0:  # gather_nd puts the index dims first; move them back in place
        lead = list(range(nb, nb + axes[0]))
        final = lead + list(range(nb)) + list(range(nb + axes[0], nb + len(others)))
    return axes, list(b), axes + others, final


@index.onnxrt
def _(cx, x, *idx, axes):
    x_t = cx.node.inputs[0].type
    axes, b, perm, final = _index_plan(cx.node)
    if perm != list(range(x_t.rank)):
        x = cx.emit("Transpose", [x], perm=perm)
    parts = []
    for a, i, v in zip(axes, idx, cx.node.inputs[1:]):
        if v.dtype != "int64":
            i = cx.emit("Cast", [i], to=onnx_dtype("int64"))
        i = cx.emit("Mod", [i, cx.dim(x_t.shape[a])], fmod=0)  # wraps negative indices (Python modulo)
        parts.append(cx.emit("Unsqueeze", [cx.emit("Expand", [i, cx.dims(b)]), cx.const([-1], "int64", "axes")]))
    ind = parts[0] if len(parts) == 1 else cx.emit("Concat", parts, axis=-1)
    y = cx.emit("GatherND", [x, ind])
    return cx.emit("Transpose", [y], perm=final) if final else y


@index.tvm
def _(c, x, *idx, axes):
    x_t = c.in_type(0)
    axes, b, perm, final = _index_plan(c.node)
    if perm != list(range(x_t.rank)):
        x = c.emit(R.permute_dims(x, perm))
    shape, parts = c.dims.shape(b), []
    for a, i, v in zip(axes, idx, c.node.inputs[1:]):
        if v.dtype != "int64":
            i = c.emit(R.astype(i, "int64"))
        i = _tvm_from_end(c, i, x_t.shape[a])
        parts.append(c.emit(R.expand_dims(c.emit(R.broadcast_to(i, shape)), -1)))
    ind = parts[0] if len(parts) == 1 else c.emit(R.concat(parts, -1))
    y = c.emit(R.gather_nd(x, ind))
    return R.permute_dims(y, final) if final else y


# -- gather_elements, scatter_elements -------------------------------------------------------------


def _gather_elements_infer(ts, attrs):
    x, idx = ts
    _index_dtype(idx, "gather_elements")
    norm_axis(attrs["axis"], x.rank, "gather_elements")
    if idx.rank != x.rank:
        raise OpError(f"gather_elements: indices rank {idx.rank} != data rank {x.rank}")
    return [TensorType(idx.shape, x.dtype)]


@defop("gather_elements", _gather_elements_infer, attrs={"axis": ("int", 0)}, num_inputs=(2, 2), kind="shape")
def gather_elements(x, idx, axis=0):
    """torch.gather / numpy.take_along_axis: out[i][j] = x[idx[i][j]][j] (for axis 0)."""
    return np.take_along_axis(x, idx.astype(np.int64), axis=axis)


@gather_elements.torch
def _(cx, x, idx, axis=0):
    return torch.gather(x, axis, _torch_from_end(idx, x.shape[axis]))


@gather_elements.onnxrt
def _(cx, x, idx, axis=0):
    return cx.emit("GatherElements", [x, idx], axis=axis)


def _tvm_from_end(c, i, d, dtype: str = "int64"):
    """Indices ``i`` (of ``dtype``) into an axis of size ``d`` with negative ones counted from the end."""
    n = c.const(d, dtype) if isinstance(d, int) else c.emit(R.shape_to_tensor(relax.ShapeExpr([c.dims(d)])))
    if not isinstance(d, int) and dtype != "int64":
        n = c.emit(R.astype(n, dtype))
    return c.emit(R.where(c.emit(R.less(i, c.const(0, dtype))), c.emit(R.add(i, n)), i))


def _torch_from_end(idx, size: int):
    return torch.where(idx < 0, idx + size, idx).long()  # torch's gather/scatter refuse negative indices


@gather_elements.tvm
def _(c, x, idx, axis=0):
    ax = axis % c.in_type(0).rank
    return R.gather_elements(x, _tvm_from_end(c, idx, c.in_type(0).shape[ax], c.in_type(1).dtype), ax)


def _scatter_infer(ts, attrs):
    x, idx, src = ts
    _index_dtype(idx, "scatter_elements")
    norm_axis(attrs["axis"], x.rank, "scatter_elements")
    if attrs["reduction"] not in ("none", "add"):
        raise OpError(f"scatter_elements: reduction {attrs['reduction']!r} is not 'none' or 'add'")
    if idx.rank != x.rank or tuple(src.shape) != tuple(idx.shape) or src.dtype != x.dtype:
        raise OpError(f"scatter_elements: updates {src} must have the indices' shape {idx.shape} and dtype {x.dtype}")
    return [x]


@defop(
    "scatter_elements",
    _scatter_infer,
    attrs={"axis": ("int", 0), "reduction": ("str", "none")},
    num_inputs=(3, 3),
    kind="shape",
)
def scatter_elements(x, idx, src, axis=0, reduction="none"):
    """torch.scatter / scatter_add: a copy of x with out[idx[i][j]][j] = src[i][j] (axis 0), or += for 'add'."""
    out = x.copy()
    key = list(np.indices(idx.shape, sparse=True))
    key[axis] = idx.astype(np.int64)
    if reduction == "add":
        np.add.at(out, tuple(key), src)
    else:
        out[tuple(key)] = src
    return out


@scatter_elements.torch
def _(cx, x, idx, src, axis=0, reduction="none"):
    idx = _torch_from_end(idx, x.shape[axis])
    if reduction == "add":
        return torch.scatter_add(x, axis, idx, src)
    return torch.scatter(x, axis, idx, src)


@scatter_elements.onnxrt
def _(cx, x, idx, src, axis=0, reduction="none"):
    return cx.emit("ScatterElements", [x, idx, src], axis=axis, reduction=reduction)


@scatter_elements.tvm
def _(c, x, idx, src, axis=0, reduction="none"):
    ax = axis % c.in_type(0).rank
    idx = _tvm_from_end(c, idx, c.in_type(0).shape[ax], c.in_type(1).dtype)
    return R.scatter_elements(x, idx, src, ax, "add" if reduction == "add" else "update")


# -- cumsum ----------------------------------------------------------------------------------------


def _cumsum_infer(ts, attrs):
    norm_axis(attrs["axis"], ts[0].rank, "cumsum")
    if ts[0].dtype == "bool":
        raise OpError("cumsum: bool input (cast it to an integer type first)")
    return [ts[0]]


@defop("cumsum", _cumsum_infer, attrs={"axis": ("int", REQUIRED)})
def cumsum(x, axis):
    """Running sum along ``axis`` (dtype kept)."""
    return np.cumsum(x, axis=axis, dtype=x.dtype)


@cumsum.torch
def _(cx, x, axis):
    return torch.cumsum(x, axis, dtype=x.dtype)


@cumsum.onnxrt
def _(cx, x, axis):
    return cx.emit("CumSum", [x, cx.const(axis, "int64", "axis")])


@cumsum.tvm
def _(c, x, axis):
    return R.cumsum(x, axis, c.in_type(0).dtype)


# -- topk (and sort) --------------------------------------------------------------------------------


def _topk_infer(ts, attrs):
    x = ts[0]
    ax = norm_axis(attrs["axis"], x.rank, "topk")
    n, k = x.shape[ax], attrs["k"]
    if k < 0 or (isinstance(n, int) and k > n):
        raise OpError(f"topk: k={k} out of range for an axis of size {n}")
    shape = list(x.shape)
    shape[ax] = k
    return [TensorType(tuple(shape), x.dtype), TensorType(tuple(shape), "int64")]


@defop(
    "topk",
    _topk_infer,
    attrs={"k": ("int", REQUIRED), "axis": ("int", -1), "largest": ("bool", True)},
    kind="compute",
)
def topk(x, k, axis=-1, largest=True):
    """The k largest (or smallest) values along ``axis``, sorted, and their indices (int64); equal values
    keep their order. ``torch.sort`` is a topk of the whole axis."""
    key = -x if largest and x.dtype != np.bool_ else x
    order = np.argsort(key, axis=axis, kind="stable")
    order = np.take(order, np.arange(k), axis=axis)
    return [np.take_along_axis(x, order, axis=axis), order.astype(np.int64)]


@topk.torch
def _(cx, x, k, axis=-1, largest=True):
    if k == x.shape[axis]:  # a sort: stable, so equal values keep their order as the reference does
        values, idx = torch.sort(x, dim=axis, descending=largest, stable=True)
    else:
        values, idx = torch.topk(x, k, dim=axis, largest=largest, sorted=True)
    return [values, idx]


@topk.onnxrt
def _(cx, x, k, axis=-1, largest=True):
    return cx.emit_multi("TopK", [x, cx.const([k], "int64", "k")], 2, axis=axis, largest=int(largest), sorted=1)


@topk.tvm
def _(c, x, k, axis=-1, largest=True):
    both = c.emit(R.topk(x, k, axis, "both", largest, "int64"))
    return [relax.TupleGetItem(both, 0), relax.TupleGetItem(both, 1)]
