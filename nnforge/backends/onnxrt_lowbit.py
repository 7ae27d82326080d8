"""ONNX lowerings of the low-bit and sparse ops (nnforge/ir/ops_lowbit.py), registered into onnxrt.LOWERINGS.

- ``qlinear`` weight-only: ONNX Runtime's MatMulNBits (com.microsoft) where contrib ops are allowed
  (cpu/cuda); 8-bit codes are shifted by +128 (MatMulNBits codes are unsigned, zero point 128).
  Per-channel scales are repeated over power-of-two blocks, which changes nothing numerically.
  Elsewhere (wasm, portable files) the packed weight is unpacked with standard ops reading only
  initializers, which ONNX Runtime folds into a float weight when the session starts: the file
  stays small and the run is a plain MatMul.
- ``qlinear`` W8A8: per-token int8 quantization written out (ReduceMax/Div/Round/Clip/Cast), then
  MatMulInteger (int32) and a float rescale; static activations use QuantizeLinear (uint8) and
  MatMulInteger's zero point; per-tensor dynamic ones are ONNX Runtime's DynamicQuantizeMatMul.
- ``qconv2d`` / ``qgather``: dequantize the weight (conv) or the gathered rows (embedding), then Conv / nothing.
- ``sparse_linear``: the CSR weight is scattered into a dense matrix from initializers (folded at
  session start), so the file keeps the compressed form.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..ir.ops_lowbit import DEFAULT_ZERO, pack_int4
from .onnxrt import _ACTS, CHECKS, LOWERINGS


def _i64(cx, values) -> str:
    return cx.const(list(values), "int64", "i")


def _block_size(k: int, group: int) -> int | None:
    """A MatMulNBits block (power of two, 16..256) that divides the group, or None."""
    b = 256
    while b >= 16:
        if group % b == 0 and k % b == 0:
            return b
        b //= 2
    return None


def _finish(cx, n, y: str, with_bias: bool = False) -> None:
    """Bias (unless ``y`` has it already) and the fused activation, writing the node's output."""
    if not with_bias and len(n.inputs) > 4 and n.inputs[4] is not None:
        y = cx.emit("Add", [y, cx.value(n.inputs[4])])
    _ACTS[n.attrs.get("act", "none")](cx, y, n.output.name)


def _arrays(cx, n):
    """(codes as stored, scales, zeros or None) of a quantized-weight node."""
    g = cx.graph
    zeros = n.inputs[3] if len(n.inputs) > 3 else None
    return g.constant(n.inputs[1]), g.constant(n.inputs[2]), None if zeros is None else g.constant(zeros)


# ---------------------------------------------------------------------------------------
# weight-only
# ---------------------------------------------------------------------------------------

def _matmul_nbits(cx, n, ins) -> str | None:
    bits, gs = n.attrs["bits"], n.attrs["group_size"]
    q, scales, zeros = _arrays(cx, n)
    rows, k = scales.shape[0], scales.shape[1] * gs
    block = _block_size(k, gs)
    if block is None:
        return None
    rep = gs // block  # blocks per group: scales and zero points repeat
    codes = q if bits == 4 else (q.astype(np.int16) + 128).astype(np.uint8)  # unsigned codes, zero point 128
    blob = block * bits // 8
    b = cx.const(codes.reshape(rows, k // block, blob), "uint8", "nbits_w")
    s = cx.const(np.repeat(scales, rep, axis=1).astype(np.float32), "float32", "nbits_scales")
    args = [ins[0], b, s]
    if zeros is not None:
        z = np.repeat(zeros, rep, axis=1)
        if z.shape[1] % 2:
            z = np.concatenate([z, np.full((rows, 1), DEFAULT_ZERO[4], np.uint8)], axis=1)
        args.append(cx.const(pack_int4(z), "uint8", "nbits_zeros"))
    return cx.emit("MatMulNBits", args, domain="com.microsoft", K=k, N=rows, bits=bits, block_size=block)


def dequantized_weight(cx, n) -> str:
    """float [N, K] from the stored codes with standard ops on initializers only (folded by ORT)."""
    bits, gs = n.attrs["bits"], n.attrs["group_size"]
    q, scales, zeros = _arrays(cx, n)
    rows, groups = scales.shape
    codes = cx.value(n.inputs[1])
    if bits == 4:
        lo = cx.emit("BitwiseAnd", [codes, cx.const(np.uint8(0x0F), "uint8", "nib")])
        hi = cx.emit("BitShift", [codes, cx.const(np.uint8(4), "uint8", "four")], direction="RIGHT")
        pair = cx.emit("Concat", [cx.emit("Unsqueeze", [lo, _i64(cx, [-1])]), cx.emit("Unsqueeze", [hi, _i64(cx, [-1])])],
                       axis=-1)
        codes = pair  # [N, K/2, 2]: even element first, as packed
    w = cx.emit("Reshape", [cx.emit("Cast", [codes], to=1), _i64(cx, [rows, groups, gs])])
    zero = cx.emit("Cast", [cx.value(n.inputs[3])], to=1) if zeros is not None else cx.const(
        np.float32(DEFAULT_ZERO[bits]), "float32", "zp")
    if zeros is not None:
        zero = cx.emit("Unsqueeze", [zero, _i64(cx, [-1])])
    scale = cx.emit("Unsqueeze", [cx.value(n.inputs[2]), _i64(cx, [-1])])
    w = cx.emit("Mul", [cx.emit("Sub", [w, zero]), scale])
    return cx.emit("Reshape", [w, _i64(cx, [rows, groups * gs])])


def _weight_only(cx, n, ins) -> str:
    if cx.contrib:
        y = _matmul_nbits(cx, n, ins)
        if y is not None:
            return y
    wt = cx.emit("Transpose", [dequantized_weight(cx, n)], perm=[1, 0])
    return cx.emit("MatMul", [ins[0], wt])


# ---------------------------------------------------------------------------------------
# W8A8
# ---------------------------------------------------------------------------------------

def _weight_t_int8(cx, n) -> str:
    q = cx.graph.constant(n.inputs[1])
    return cx.const(np.ascontiguousarray(q.T), "int8", "w_t")


def _dynamic(cx, n, ins) -> str:
    """Per-token symmetric int8, as ops_lowbit.quantize_per_token. The tokens become rows of a 2-D matrix
    so one QuantizeLinear (per-axis scale, Round half-to-even like numpy) quantizes all of them; the codes
    are uint8 shifted by 128 with zero point 128: the same products, on ONNX Runtime's fast u8 x s8
    kernels (s8 x s8 takes a slow path on x86). |x / scale| <= 127, so the shift never saturates."""
    x, rank = ins[0], n.inputs[0].type.rank
    k = n.inputs[0].shape[-1]
    rows = x if rank == 2 else cx.emit("Reshape", [x, _i64(cx, [-1, k])])
    amax = cx.emit("ReduceMax", [cx.emit("Abs", [rows]), _i64(cx, [-1])], keepdims=0)
    scale = cx.emit("Where", [cx.emit("Greater", [amax, cx.const(np.float32(0), "float32", "zero")]),
                              cx.emit("Div", [amax, cx.const(np.float32(127), "float32", "q127")]),
                              cx.const(np.float32(1), "float32", "one")])
    zp = cx.emit("Expand", [cx.const(np.uint8(128), "uint8", "zp128"), cx.emit("Shape", [scale])])
    xq = cx.emit("QuantizeLinear", [rows, scale, zp], axis=0)
    acc = cx.emit("MatMulInteger", [xq, _weight_t_int8(cx, n), cx.const(np.uint8(128), "uint8", "x_zp")])
    wscale = cx.graph.constant(n.inputs[2])[:, 0].astype(np.float32)
    y = cx.emit("Mul", [cx.emit("Mul", [cx.emit("Cast", [acc], to=1), cx.emit("Unsqueeze", [scale, _i64(cx, [-1])])]),
                        cx.const(wscale, "float32", "w_scale")])
    if rank == 2:
        return y
    shape = cx.emit("Concat", [cx.emit("Shape", [x], start=0, end=rank - 1), _i64(cx, [len(wscale)])], axis=0)
    return cx.emit("Reshape", [y, shape])


def _dynamic_tensor(cx, n, ins) -> str:
    """One uint8 range per tensor at run time (ONNX DynamicQuantizeLinear), as ops_lowbit.quantize_per_tensor.
    With contrib ops: ONNX Runtime's DynamicQuantizeMatMul, one kernel that quantizes, multiplies on its
    u8 x s8 path, rescales and adds the bias. Elsewhere the standard ops it is fused from."""
    wscale = cx.const(cx.graph.constant(n.inputs[2])[:, 0].astype(np.float32), "float32", "w_scale")
    if cx.contrib:
        bias = [cx.value(n.inputs[4])] if len(n.inputs) > 4 and n.inputs[4] is not None else []
        return cx.emit("DynamicQuantizeMatMul", [ins[0], _weight_t_int8(cx, n), wscale, "", *bias],
                       domain="com.microsoft")
    xq, xs, xzp = cx.emit_multi("DynamicQuantizeLinear", [ins[0]], 3)
    acc = cx.emit("Cast", [cx.emit("MatMulInteger", [xq, _weight_t_int8(cx, n), xzp])], to=1)
    return cx.emit("Mul", [acc, cx.emit("Mul", [xs, wscale])])


def _static(cx, n, ins) -> str:
    xs, zp = np.float32(n.attrs["x_scale"]), np.uint8(n.attrs["x_zero_point"])
    xq = cx.emit("QuantizeLinear", [ins[0], cx.const(xs, "float32", "x_scale"), cx.const(zp, "uint8", "x_zp")])
    acc = cx.emit("Cast", [cx.emit("MatMulInteger", [xq, _weight_t_int8(cx, n), cx.const(zp, "uint8", "x_zp")])], to=1)
    wscale = (cx.graph.constant(n.inputs[2])[:, 0].astype(np.float64) * np.float64(xs)).astype(np.float32)
    return cx.emit("Mul", [acc, cx.const(wscale, "float32", "xw_scale")])


_ACT_QUANT = {"none": _weight_only, "dynamic": _dynamic, "dynamic_tensor": _dynamic_tensor, "static": _static}


def _qlinear(cx, n, ins):
    fused_bias = cx.contrib and n.attrs["act_quant"] == "dynamic_tensor"
    _finish(cx, n, _ACT_QUANT[n.attrs["act_quant"]](cx, n, ins), with_bias=fused_bias)


def _qlinear_check(n) -> str | None:
    if n.attrs["act"] not in _ACTS:
        return f"activation {n.attrs['act']!r} has no ONNX lowering"
    return None


# ---------------------------------------------------------------------------------------
# conv, embedding, sparse
# ---------------------------------------------------------------------------------------

def _qconv2d(cx, n, ins):
    a = n.attrs
    w = dequantized_weight(cx, n)
    rows = cx.graph.constant(n.inputs[2]).shape[0]
    w4 = cx.emit("Reshape", [w, _i64(cx, [rows, -1, *a["kernel"]])])
    args = [ins[0], w4] + ([ins[4]] if len(ins) > 4 and ins[4] else [])
    p = a["padding"]
    cx.emit("Conv", args, out=n.output.name, strides=a["stride"], pads=[p[0], p[1], p[0], p[1]],
            dilations=a["dilation"], group=a["groups"])


def _qgather(cx, n, ins):
    """Gather the code rows first, then dequantize only them (the table stays compressed in memory)."""
    bits, gs = n.attrs["bits"], n.attrs["group_size"]
    scales = cx.graph.constant(n.inputs[1])
    groups = scales.shape[1]
    idx = ins[3]
    rank = n.inputs[3].type.rank
    rows = cx.emit("Gather", [ins[0], idx], axis=0)
    if bits == 4:
        lo = cx.emit("BitwiseAnd", [rows, cx.const(np.uint8(0x0F), "uint8", "nib")])
        hi = cx.emit("BitShift", [rows, cx.const(np.uint8(4), "uint8", "four")], direction="RIGHT")
        rows = cx.emit("Concat", [cx.emit("Unsqueeze", [lo, _i64(cx, [-1])]), cx.emit("Unsqueeze", [hi, _i64(cx, [-1])])],
                       axis=-1)
    keep = [0] * rank  # Reshape's 0 copies the index dims
    w = cx.emit("Reshape", [cx.emit("Cast", [rows], to=1), _i64(cx, keep + [groups, gs])])
    if n.inputs[2] is not None:
        zero = cx.emit("Unsqueeze", [cx.emit("Cast", [cx.emit("Gather", [ins[2], idx], axis=0)], to=1), _i64(cx, [-1])])
    else:
        zero = cx.const(np.float32(DEFAULT_ZERO[bits]), "float32", "zp")
    scale = cx.emit("Unsqueeze", [cx.emit("Gather", [ins[1], idx], axis=0), _i64(cx, [-1])])
    w = cx.emit("Mul", [cx.emit("Sub", [w, zero]), scale])
    cx.emit("Reshape", [w, _i64(cx, keep + [groups * gs])], out=n.output.name)


def _sparse_linear(cx, n, ins):
    """Dense weight = ScatterND(zeros, (row, col) of each value, values); the row of value i is the number
    of row starts at or before i, counted by a CumSum over marks at row_ptr[1:N] (all initializers)."""
    row_ptr = cx.graph.constant(n.inputs[3])
    rows, k = row_ptr.shape[0] - 1, n.attrs["in_features"]
    nnz = int(row_ptr[-1])
    if nnz == 0:
        dense = cx.emit("ConstantOfShape", [_i64(cx, [rows, k])])
    else:
        zeros = cx.emit("ConstantOfShape", [_i64(cx, [nnz + 1])], value=helper.make_tensor("zero", TensorProto.INT64, [1], [0]))
        marks = cx.emit("ScatterElements", [zeros,
                                            cx.emit("Cast", [cx.emit("Slice", [ins[3], _i64(cx, [1]), _i64(cx, [rows])])], to=7),
                                            cx.const(np.ones(max(rows - 1, 0), np.int64), "int64", "ones")],
                        axis=0, reduction="add")
        row_of = cx.emit("Slice", [cx.emit("CumSum", [marks, cx.const(np.int64(0), "int64", "axis0")]),
                                   _i64(cx, [0]), _i64(cx, [nnz])])
        idx = cx.emit("Concat", [cx.emit("Unsqueeze", [row_of, _i64(cx, [-1])]),
                                 cx.emit("Unsqueeze", [cx.emit("Cast", [ins[2]], to=7), _i64(cx, [-1])])], axis=-1)
        dense = cx.emit("ScatterND", [cx.emit("ConstantOfShape", [_i64(cx, [rows, k])]), idx, ins[1]])
    y = cx.emit("MatMul", [ins[0], cx.emit("Transpose", [dense], perm=[1, 0])])
    if len(ins) > 4 and ins[4]:
        y = cx.emit("Add", [y, ins[4]])
    _ACTS[n.attrs["act"]](cx, y, n.output.name)


LOWERINGS.update({"qlinear": _qlinear, "qconv2d": _qconv2d, "qgather": _qgather, "sparse_linear": _sparse_linear})
CHECKS.update({"qlinear": _qlinear_check, "sparse_linear": _qlinear_check})
