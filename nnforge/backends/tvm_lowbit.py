"""Relax lowerings of the low-bit and sparse ops (nnforge/ir/ops_lowbit.py), registered into tvm_lower.LOWERINGS.

Weights stay in their stored form (int8 codes, or uint8 bytes holding two 4-bit codes), in the bundle
and in memory at run time. A weight-only ``qlinear`` is one TE kernel (``_qmatmul``): a dequantize block
(unpack, subtract the zero point, multiply the group scale) feeding the matmul's reduction; bias and
activation fuse after it as for a float linear, and the CPU matmul schedule dequantizes one K x NR panel
of the weight per column tile (tvm_schedule._dequantize_per_panel). W8A8 runs the same kernel on the
int8 codes (see _w8a8).
``qconv2d``, ``qgather`` and ``sparse_linear`` still write the dequantize (densify) as Relax ops on the
weights alone, which LiftTransformParams moves into ``transform_params``: run once at load, so their
``main`` reads float weights.
"""
from __future__ import annotations

import numpy as np
from tvm import te, tirx
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
        a = c.node.attrs
        y = c.bb.emit_te(_qmatmul, x, qw, scales, zeros, a["bits"], a["group_size"], primfunc_name_hint="qmatmul")
    if bias is not None:
        y = c.emit(R.add(y, bias))
    return ACTIVATIONS[c.attr("act")](c, y)


def _qmatmul(x, qw, scales, zeros, bits: int, group: int):
    """y[..., j] = sum_k x[..., k] * w[j, k], with w dequantized from its codes inside the same kernel:
    one block unpacks/scales the codes (int8, or two uint8 nibbles), the reduction reads it. The CPU
    matmul schedule (tvm_schedule.CPUMatmul) computes that block per column panel of the output, so the
    weights stay int8/uint8 in memory and no full float copy is made. ``scales`` None: the int8 codes
    themselves (W8A8, whose scales are applied after the sum)."""
    *lead, k_in = x.shape
    rows = qw.shape[0]

    def code(j, k):
        if bits == 4:
            byte = qw[j, tirx.floordiv(k, 2)]
            shift = tirx.Cast("uint8", tirx.floormod(k, 2) * 4)
            return tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, "uint8")).astype("float32")
        return qw[j, k].astype("float32")

    def zero(j, k):
        if zeros is None:
            return tirx.const(float(DEFAULT_ZERO[bits]), "float32")
        return zeros[j, tirx.floordiv(k, group)].astype("float32")

    if scales is None:
        w = te.compute((rows, k_in), code, name="dequantize")
    else:
        w = te.compute((rows, k_in), lambda j, k: (code(j, k) - zero(j, k)) * scales[j, tirx.floordiv(k, group)],
                       name="dequantize")
    r = te.reduce_axis((0, k_in), name="k")
    return te.compute((*lead, rows), lambda *i: te.sum(x[(*i[:-1], r)] * w[i[-1], r], axis=r), name="qmatmul")


def _w8a8(c: Ctx, x, qw, scales):
    """Per-token int8 (dynamic) or calibrated uint8 (static) activations, integer matmul, float rescale.

    The integer matmul runs as _qmatmul on the codes held as float32: products of two int8 codes and
    their sums are exact in float32 while below 2^24 (K * 127 * 127 for the worst case, far above what
    real activations reach), so this equals the int32 product, with the float matmul kernel and the
    weights kept int8 in memory. (An int8 dot-product kernel, VNNI, is not written yet.)"""
    if c.attr("act_quant") == "dynamic":
        amax = c.emit(R.max(R.abs(x), axis=[-1], keepdims=True))
        scale = c.emit(R.where(R.greater(amax, c.const(0, "float32")), R.divide(amax, c.const(127, "float32")),
                               c.const(1, "float32")))
        xq = c.emit(R.clip(R.round(R.divide(x, scale)), -127, 127))
        xs = scale
    else:
        s, zp = c.attr("x_scale"), c.attr("x_zero_point")
        q = R.clip(R.add(R.round(R.divide(x, c.const(s, "float32"))), c.const(zp, "float32")), 0, 255)
        xq = c.emit(R.subtract(q, c.const(zp, "float32")))
        xs = c.const(np.float32(s), "float32")
    acc = c.bb.emit_te(_qmatmul, xq, qw, None, None, 8, 1, primfunc_name_hint="qmatmul")
    y = c.emit(R.multiply(acc, xs))
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
