"""Relax lowerings of the low-bit and sparse ops (nnforge/ir/ops_lowbit.py), registered into tvm_lower.LOWERINGS.

Weights stay in their stored form (int8 codes, or uint8 bytes holding two 4-bit codes), in the bundle
and in memory at run time. A weight-only ``qlinear`` is one TE kernel (``_qmatmul``): a dequantize block
(unpack, subtract the zero point, multiply the group scale) feeding the matmul's reduction; bias and
activation fuse after it as for a float linear, and the CPU matmul schedule dequantizes one K x NR panel
of the weight per column tile (tvm_schedule._dequantize_per_panel). W8A8 runs int8 dot products
(tvm_vnni) where the CPU has VNNI, elsewhere the same kernel on the int8 codes (see _w8a8).
``sparse_linear`` runs the CSR kernel (tvm_sparse) where few weights are stored. ``qconv2d``, ``qgather``
and denser ``sparse_linear`` still write the dequantize (densify) as Relax ops on the weights alone,
which LiftTransformParams moves into ``transform_params``: run once at load, so their ``main`` reads
float weights.
"""
from __future__ import annotations

import functools
import operator

import numpy as np
from tvm import te, tirx
from tvm.relax import op as R

from ..ir.ops_lowbit import DEFAULT_ZERO
from . import tvm_sparse, tvm_vnni
from .tvm_lower import ACTIVATIONS, CHECKS, Ctx, conv2d, lowering


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
        y, bias = _w8a8(c, x, qw, scales, bias)
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


def _activation_range(c: Ctx, x):
    """(scale, zero point, lowest code) of the quantized activations, codes = clip(round(x / scale) + zero
    point, lowest, 255): per-token int8 (dynamic: symmetric, shifted by 128 into 1..255), per-tensor uint8
    (dynamic_tensor: range at run time; static: calibrated). The scale is [..., 1] per token or a scalar,
    the zero point a float32 scalar."""
    mode = c.attr("act_quant")
    if mode == "dynamic":  # as ops_lowbit.quantize_per_token
        amax = c.emit(R.max(R.abs(x), axis=[-1], keepdims=True))
        xs = c.emit(R.where(R.greater(amax, c.const(0, "float32")), R.divide(amax, c.const(127, "float32")),
                            c.const(1, "float32")))
        return xs, c.const(128, "float32"), 1
    if mode == "dynamic_tensor":  # as ops_lowbit.quantize_per_tensor
        # per row first (rows in parallel), then over the rows: one whole-tensor reduction runs on one core
        zero = c.const(0, "float32")
        lo = c.emit(R.minimum(R.min(c.emit(R.min(x, axis=[-1]))), zero))
        hi = c.emit(R.maximum(R.max(c.emit(R.max(x, axis=[-1]))), zero))
        xs = c.emit(R.where(R.greater(hi, lo), R.divide(R.subtract(hi, lo), c.const(255, "float32")),
                            c.const(1, "float32")))
        return xs, c.emit(R.clip(R.round(R.divide(R.negative(lo), xs)), 0, 255)), 0
    return c.const(np.float32(c.attr("x_scale")), "float32"), c.const(c.attr("x_zero_point"), "float32"), 0


def _w8a8(c: Ctx, x, qw, scales, bias):
    """Quantized activations times int8 weights, rescaled to float; returns (y, bias not yet added).

    With VNNI (tvm_vnni): the int8 dot-product kernel quantizes the activations itself and adds the bias.
    Elsewhere the integer matmul runs as _qmatmul on the codes held as float32: products of two 8-bit
    codes and their sums are exact in float32 while below 2^24 (K * 128 * 127 in the worst case, far
    above what real activations reach), so this equals the int32 product, with the float matmul kernel
    and the weights kept int8 in memory."""
    xs, zp, qmin = _activation_range(c, x)
    n, k = c.node.inputs[1].shape
    w_scale = c.emit(R.squeeze(scales, [1]))
    if tvm_vnni.available(c.target, n, k):
        lead = c.dims.shape(c.node.inputs[0].shape[:-1])
        per_token = c.attr("act_quant") == "dynamic"
        y = tvm_vnni.qmatmul(c.bb, c.emit(R.reshape(x, [-1, k])), qw, n, k,
                             c.emit(R.reshape(xs, [-1, 1])) if per_token else xs, zp, qmin, w_scale, bias)
        return c.emit(R.reshape(y, [*lead, n])), None
    codes = c.emit(R.clip(R.add(R.round(R.divide(x, xs)), zp), qmin, 255))
    acc = c.bb.emit_te(_qmatmul, c.emit(R.subtract(codes, zp)), qw, None, None, 8, 1, primfunc_name_hint="qmatmul")
    return c.emit(R.multiply(c.emit(R.multiply(acc, xs)), w_scale)), bias


@lowering("qconv2d")
def _qconv2d(c: Ctx, x, qw, scales, zeros=None, bias=None):
    """The float weight, dequantized once at load (a convolution reads each weight for every output
    pixel: dequantizing per call would cost more than it saves), into the float convolution's lowering."""
    kh, kw = c.attr("kernel")
    w = _weight(c, qw, scales, zeros)
    rows, k = c.node.inputs[2].shape[0], c.node.inputs[2].shape[1] * c.attr("group_size")
    shape = [rows, k // (kh * kw), kh, kw]
    return conv2d(c, x, c.emit(R.reshape(w, shape)), bias, weight_shape=shape)


@lowering("qgather")
def _qgather(c: Ctx, qw, scales, zeros, idx):
    table = _weight(c, qw, scales, zeros, scales_at=1)
    return R.take(table, idx, 0, mode="wrap")


@lowering("sparse_linear")
def _sparse_linear(c: Ctx, x, values, cols, row_ptr, bias=None):
    """The CSR kernel (tvm_sparse) where few weights are stored; otherwise a dense weight scattered from
    CSR (weights only, so lifted out of main and run once at load): the row of value i is the number of
    row starts at or before i (a cumulative sum of marks)."""
    rows, k = c.node.inputs[3].shape[0] - 1, c.attr("in_features")
    nnz = c.node.inputs[1].shape[0]
    if tvm_sparse.worth_it(c.target, nnz, rows, k):
        lead = c.dims.shape(c.node.inputs[0].shape[:-1])
        m = functools.reduce(operator.mul, lead, tirx.IntImm("int64", 1))
        x2d = c.emit(R.reshape(x, [m, k]))
        y = c.emit(R.reshape(tvm_sparse.matmul(c.bb, x2d, m, values, cols, row_ptr, rows, k, nnz), [*lead, rows]))
        if bias is not None:
            y = c.emit(R.add(y, bias))
        return ACTIVATIONS[c.attr("act")](c, y)
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
