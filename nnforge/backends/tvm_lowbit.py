"""Relax lowerings of the low-bit and sparse ops (nnforge/ir/ops_lowbit.py), registered into tvm_lower.LOWERINGS.

Weights stay in their stored form (int8 codes, or uint8 bytes holding two 4-bit codes); the lowering
writes the dequantization (unpack, subtract the zero point, multiply the group scale) in front of
the matmul. Codes and scales are weights, so LiftTransformParams moves that work into
``transform_params``: it runs once at load and ``main`` multiplies float matrices (the bundle keeps the
compressed weights). A dequantize fused into the matmul kernel, and a sparse kernel for
``sparse_linear`` (densified at load the same way), are still to come.
"""
from __future__ import annotations

import numpy as np
from tvm.relax import op as R

from ..ir.ops_lowbit import DEFAULT_ZERO
from .tvm_lower import ACTIVATIONS, CHECKS, Ctx, lowering


def _dequantize(c: Ctx, qw, scales, zeros, bits: int, group: int, rows, k: int):
    """float32 [rows, k] from codes [rows, k | k/2], scales [rows, G] and zeros [rows, G] (or the default)."""
    if bits == 4:
        lo = c.emit(R.bitwise_and(qw, c.const(15, "uint8")))
        hi = c.emit(R.right_shift(qw, c.const(4, "uint8")))
        qw = c.emit(R.concat([c.emit(R.expand_dims(lo, -1)), c.emit(R.expand_dims(hi, -1))], axis=-1))
    groups = k // group
    w = c.emit(R.reshape(c.emit(R.astype(qw, "float32")), [rows, groups, group]))
    zero = c.const(DEFAULT_ZERO[bits], "float32") if zeros is None else c.emit(R.expand_dims(R.astype(zeros, "float32"), -1))
    w = c.emit(R.multiply(c.emit(R.subtract(w, zero)), c.emit(R.expand_dims(scales, -1))))
    return c.emit(R.reshape(w, [rows, k]))


def _weight(c: Ctx, qw, scales, zeros, scales_at: int = 2):
    n = c.node
    rows, groups = n.inputs[scales_at].shape
    k = groups * n.attrs["group_size"]
    return _dequantize(c, qw, scales, zeros, n.attrs["bits"], n.attrs["group_size"], rows, k)


@lowering("qlinear")
def _qlinear(c: Ctx, x, qw, scales, zeros=None, bias=None):
    if c.attr("act_quant") != "none":
        y = _w8a8(c, x, qw, scales)
    else:
        y = c.emit(R.matmul(x, c.emit(R.permute_dims(_weight(c, qw, scales, zeros), [1, 0]))))
    if bias is not None:
        y = c.emit(R.add(y, bias))
    return ACTIVATIONS[c.attr("act")](c, y)


def _w8a8(c: Ctx, x, qw, scales):
    """Per-token int8 (dynamic) or calibrated uint8 (static) activations, int32 matmul, float rescale."""
    if c.attr("act_quant") == "dynamic":
        amax = c.emit(R.max(R.abs(x), axis=[-1], keepdims=True))
        scale = c.emit(R.where(R.greater(amax, c.const(0, "float32")), R.divide(amax, c.const(127, "float32")),
                               c.const(1, "float32")))
        xq = c.emit(R.astype(R.clip(R.round(R.divide(x, scale)), -127, 127), "int32"))
        xs = scale
    else:
        s, zp = c.attr("x_scale"), c.attr("x_zero_point")
        q = R.clip(R.add(R.round(R.divide(x, c.const(s, "float32"))), c.const(zp, "float32")), 0, 255)
        xq = c.emit(R.astype(R.subtract(q, c.const(zp, "float32")), "int32"))
        xs = c.const(np.float32(s), "float32")
    acc = c.emit(R.matmul(xq, c.emit(R.permute_dims(R.astype(qw, "int32"), [1, 0])), out_dtype="int32"))
    y = c.emit(R.multiply(R.astype(acc, "float32"), xs))
    return c.emit(R.multiply(y, R.squeeze(scales, [1])))


@lowering("qconv2d")
def _qconv2d(c: Ctx, x, qw, scales, zeros=None, bias=None):
    a = c.node.attrs
    w = _weight(c, qw, scales, zeros)
    rows = c.node.inputs[2].shape[0]
    w4 = c.emit(R.reshape(w, [rows, -1, *a["kernel"]]))
    p = a["padding"]
    y = c.emit(R.nn.conv2d(x, w4, strides=a["stride"], padding=[p[0], p[1], p[0], p[1]], dilation=a["dilation"],
                           groups=a["groups"]))
    return R.add(y, R.reshape(bias, [1, -1, 1, 1])) if bias is not None else y


@lowering("qgather")
def _qgather(c: Ctx, qw, scales, zeros, idx):
    table = _weight(c, qw, scales, zeros, scales_at=1)
    return R.take(table, idx, 0, mode="wrap")


@lowering("sparse_linear")
def _sparse_linear(c: Ctx, x, values, cols, row_ptr, bias=None):
    """Dense weight scattered from CSR (weights only, so lifted out of main and run once at load);
    the row of value i is the number of row starts at or before i (a cumulative sum of marks)."""
    rows, k = c.node.inputs[3].shape[0] - 1, c.attr("in_features")
    nnz = c.node.inputs[1].shape[0]
    starts = c.emit(R.astype(R.strided_slice(row_ptr, [0], [1], [rows]), "int64"))
    marks = c.emit(R.scatter_elements(R.zeros([nnz + 1], "int64"), starts, R.ones([rows - 1], "int64"), axis=0,
                                      reduction="add"))
    row_of = c.emit(R.strided_slice(R.cumsum(marks, axis=0), [0], [0], [nnz]))
    idx = c.emit(R.concat([R.expand_dims(row_of, -1), R.expand_dims(R.astype(cols, "int64"), -1)], axis=-1))
    dense = c.emit(R.scatter_nd(R.zeros([rows, k], "float32"), idx, values))
    y = c.emit(R.matmul(x, c.emit(R.permute_dims(dense, [1, 0]))))
    if bias is not None:
        y = c.emit(R.add(y, bias))
    return ACTIVATIONS[c.attr("act")](c, y)


CHECKS["qlinear"] = lambda node, target: (None if node.attrs.get("act") in ACTIVATIONS
                                          else f"activation {node.attrs.get('act')!r} has no TVM lowering")
