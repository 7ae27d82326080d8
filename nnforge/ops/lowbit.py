"""Low-bit and sparse ops, created by the quantize and sparsity passes: qlinear, qconv2d, qgather, sparse_linear.

Weight storage (the contract between the passes, the interpreter and the backends):

- ``qweight`` holds a weight matrix ``W[N, K]`` (N outputs, K inputs; conv weights flattened to
  ``[O, C/groups*kh*kw]``) as integers ``q``; ``W ~= (q - zero) * scale`` group by group.
- ``bits=8``: ``qweight`` is int8 ``[N, K]``, symmetric (no zeros input: zero = 0).
- ``bits=4``: ``qweight`` is uint8 ``[N, K/2]``, two 4-bit values per byte, values 0..15.
  Nibble order: element ``2i`` of a row is the LOW nibble of byte ``i``, element ``2i+1`` the
  HIGH nibble (the order of ONNX Runtime's MatMulNBits, so the bytes lower unchanged).
  Without a zeros input the zero point is 8.
- ``scales``: float32 ``[N, K/group_size]``; ``group_size == K`` means one scale per output channel.
- ``zeros``: uint8 ``[N, K/group_size]`` (or float32 for int4 RTN with ``zero_point="float"``), one zero point per byte (unpacked: they are 1/group_size
  of the weight bytes, and unpacked they read plainly).

The references dequantize and run the float op, except W8A8 (``act_quant`` dynamic/static),
which quantizes the activations and multiplies integers exactly (see ``int_matmul``). The torch
executor runs the references too (exactly what it ran before these ops had a torch entry).

ONNX:

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

TVM: weights stay in their stored form (int8 codes, or uint8 bytes holding two 4-bit codes), in the bundle
and in memory at run time. A weight-only ``qlinear`` is one TE kernel (``_qmatmul``): a dequantize block
(unpack, subtract the zero point, multiply the group scale) feeding the matmul's reduction; bias and
activation fuse after it as for a float linear, and the CPU matmul schedule dequantizes one K x NR panel
of the weight per column tile (tvm_schedule._dequantize_per_panel). W8A8 runs int8 dot products
(tvm_vnni) where the CPU has VNNI, elsewhere the same kernel on the int8 codes (see _tvm_w8a8).
``sparse_linear`` runs the CSR kernel (tvm_sparse) where few weights are stored. ``qconv2d``, ``qgather``
and denser ``sparse_linear`` still write the dequantize (densify) as Relax ops on the weights alone,
which LiftTransformParams moves into ``transform_params``: run once at load, so their ``main`` reads
float weights.
"""

from __future__ import annotations

import functools
import operator

import numpy as np

from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop, implement
from .common import LazyModule, R
from .conv import conv2d, conv2d_tvm
from .elementwise import ACTIVATIONS


def _has_act(backend: str, act: str) -> bool:
    """Whether ``backend`` ("onnxrt" or "tvm") has a lowering of activation ``act`` (every activation of the
    table has one on every backend)."""
    return act in ACTIVATIONS


def _onnx_act(cx, act: str, y: str) -> str:
    """ONNX value name of activation ``act`` applied to ``y``."""
    return ACTIVATIONS[act].onnx(cx, y)


def _tvm_act(c, act: str, y):
    """Relax activation ``act`` applied to ``y``."""
    return ACTIVATIONS[act].tvm(c, y)


_tvm_sparse = LazyModule("nnforge.backends.tvm_sparse")  # the CSR kernel
_tvm_vnni = LazyModule("nnforge.backends.tvm_vnni")  # int8 dot products
_tvm_gemv = LazyModule("nnforge.backends.tvm_gemv")  # few-row low-bit kernel (decode)

BITS = {8: "int8", 4: "uint8"}  # bits -> qweight dtype
DEFAULT_ZERO = {8: 0, 4: 8}
ACT_QUANT = ("none", "dynamic", "dynamic_tensor", "static", "block_int8")


# ---------------------------------------------------------------------------------------
# storage helpers (used by the passes and the backends too)
# ---------------------------------------------------------------------------------------


def pack_int4(q: np.ndarray) -> np.ndarray:
    """[..., K] values 0..15 -> uint8 [..., K/2]; element 2i in the low nibble, 2i+1 in the high."""
    q = np.asarray(q)
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last axis ({q.shape[-1]}) must be even")
    if q.size and (q.min() < 0 or q.max() > 15):
        raise ValueError("pack_int4: values must lie in 0..15")
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., K/2] -> uint8 [..., K] values 0..15 (inverse of pack_int4)."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def unpacked_weight(qweight: np.ndarray, bits: int) -> np.ndarray:
    """The integer values of a qweight, one per element, as int32 [N, K]."""
    return (unpack_int4(qweight) if bits == 4 else qweight).astype(np.int32)


def dequantize(qweight, scales, zeros=None, bits: int = 8, group_size: int | None = None) -> np.ndarray:
    """(q - zero) * scale per group -> float32 [N, K]."""
    q = unpacked_weight(qweight, bits)
    n, k = q.shape
    group_size = group_size or k
    if zeros is not None and zeros.dtype == np.float32:  # float zero points (int4 RTN zero_point="float")
        z = np.repeat(zeros, group_size, axis=1)
        return ((q.astype(np.float32) - z) * np.repeat(scales.astype(np.float32), group_size, axis=1)).astype(
            np.float32
        )
    z = DEFAULT_ZERO[bits] if zeros is None else np.repeat(zeros.astype(np.int32), group_size, axis=1)
    s = np.repeat(scales.astype(np.float32), group_size, axis=1)
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def quantize_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x with each run of ``block`` values along the last axis rounded to symmetric int8 (amax / 127), dequantized."""
    shape = x.shape
    xb = x.reshape(shape[:-1] + (shape[-1] // block, block)).astype(np.float32)
    scale = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    q = np.clip(np.round(xb / np.where(scale == 0, 1, scale)), -127, 127)
    return (q * scale).reshape(shape).astype(x.dtype)


def quantize_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per row of the last axis: x ~= q * scale (scale [..., 1])."""
    amax = np.max(np.abs(x), axis=-1, keepdims=True).astype(np.float32)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.round(x / scale), -127, 127).astype(np.int8)  # round half to even, as ONNX
    return q, scale


def quantize_static(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Asymmetric uint8 with calibrated per-tensor scale and zero point (ONNX QuantizeLinear)."""
    return np.clip(np.round(x / np.float32(scale)) + zero_point, 0, 255).astype(np.uint8)


def quantize_per_tensor(x: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """Asymmetric uint8 with one scale and zero point for the whole tensor, computed from its range
    (ONNX DynamicQuantizeLinear; the range always includes 0, so 0 is exact)."""
    lo, hi = min(float(np.min(x, initial=0.0)), 0.0), max(float(np.max(x, initial=0.0)), 0.0)
    scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255)) if hi > lo else np.float32(1)
    zero_point = int(np.clip(np.round(np.float32(-lo) / scale), 0, 255))
    return quantize_static(x, scale, zero_point), scale, zero_point


def int_matmul(a: np.ndarray, b_t: np.ndarray) -> np.ndarray:
    """Exact integer a @ b_t.T. Done in float64 BLAS: every product and partial sum of 8-bit values
    stays far below 2**53, so the result equals int32 accumulation."""
    return np.matmul(a.astype(np.float64), b_t.astype(np.float64).T)


# ---------------------------------------------------------------------------------------
# shared type checks
# ---------------------------------------------------------------------------------------


def _weight_dims(qw: TensorType, scales: TensorType, zeros: TensorType | None, attrs: dict, op: str) -> tuple[int, int]:
    """Check the (qweight, scales, zeros) triple; returns (N, K)."""
    bits, gs = attrs["bits"], attrs["group_size"]
    if bits not in BITS:
        raise OpError(f"{op}: bits must be 8 or 4, got {bits}")
    if qw.rank != 2 or qw.dtype != BITS[bits] or not qw.is_static:
        raise OpError(f"{op}: {bits}-bit qweight must be a static 2-D {BITS[bits]} tensor, got {qw}")
    n, k = qw.shape[0], qw.shape[1] * (2 if bits == 4 else 1)
    if gs <= 0 or k % gs:
        raise OpError(f"{op}: group_size {gs} does not divide the {k} input features")
    want = (n, k // gs)
    if scales.dtype != "float32" or tuple(scales.shape) != want:
        raise OpError(f"{op}: scales must be f32[{want[0]},{want[1]}], got {scales}")
    if zeros is not None:
        if bits == 8:
            raise OpError(f"{op}: int8 weights are symmetric: no zeros input")
        if zeros.dtype not in ("uint8", "float32") or tuple(zeros.shape) != want:
            raise OpError(f"{op}: zeros must be u8 or f32 [{want[0]},{want[1]}], got {zeros}")
    return n, k


def _opt(ts, i):
    return ts[i] if len(ts) > i else None


def _check_bias(bias: TensorType | None, n: int, op: str) -> None:
    if bias is not None and (bias.rank != 1 or bias.shape[0] != n):
        raise OpError(f"{op}: bias must be [{n}], got {bias}")


# ---------------------------------------------------------------------------------------
# qlinear: linear layer with quantized weights (optionally quantized activations)
# ---------------------------------------------------------------------------------------

_QLINEAR_ATTRS = {
    "bits": ("int", REQUIRED),
    "group_size": ("int", REQUIRED),
    "act": ("str", "none"),
    # none: weight-only | dynamic: int8 per token | dynamic_tensor: uint8 per tensor, range at run time
    # | static: calibrated uint8 per tensor | block_int8: symmetric int8 per weight group at run time
    # (ONNX Runtime's MatMulNBits with accuracy_level 4: int8 dot products, the fast CPU path for LLM decode)
    "act_quant": ("str", "none"),
    "x_scale": ("float", 1.0),
    "x_zero_point": ("int", 0),  # static only
}


def _qlinear_infer(ts, attrs):
    x, qw, scales, zeros, bias = ts[0], ts[1], ts[2], _opt(ts, 3), _opt(ts, 4)
    n, k = _weight_dims(qw, scales, zeros, attrs, "qlinear")
    _check_bias(bias, n, "qlinear")
    if x.dtype != "float32":
        raise OpError(f"qlinear: input must be float32, got {x.dtype}")
    if isinstance(x.shape[-1], int) and x.shape[-1] != k:
        raise OpError(f"qlinear: input features {x.shape[-1]} != weight in-features {k}")
    if attrs["act"] not in ACTIVATIONS:
        raise OpError(f"qlinear: unknown activation {attrs['act']!r}; choose from {sorted(ACTIVATIONS)}")
    if attrs["act_quant"] not in ACT_QUANT:
        raise OpError(f"qlinear: act_quant must be one of {ACT_QUANT}, got {attrs['act_quant']!r}")
    if attrs["act_quant"] not in ("none", "block_int8") and (attrs["bits"] != 8 or attrs["group_size"] != k):
        raise OpError("qlinear: quantized activations need int8 weights with one scale per output channel")
    if attrs["act_quant"] == "static" and not (attrs["x_scale"] > 0 and 0 <= attrs["x_zero_point"] <= 255):
        raise OpError(
            f"qlinear: static x_scale must be > 0 and x_zero_point in 0..255, "
            f"got {attrs['x_scale']}, {attrs['x_zero_point']}"
        )
    return [TensorType(x.shape[:-1] + (n,), x.dtype)]


def _w8a8(x, qweight, scales, act_quant, x_scale, x_zero_point):
    """Integer matmul of quantized activations and int8 weights, rescaled to float."""
    if act_quant == "dynamic":
        xq, xs = quantize_per_token(x)
        acc = int_matmul(xq.reshape(-1, xq.shape[-1]), qweight).reshape(x.shape[:-1] + (-1,))
        return acc * xs.astype(np.float64) * scales[:, 0].astype(np.float64)
    if act_quant == "dynamic_tensor":
        xq, x_scale, x_zero_point = quantize_per_tensor(x)
    else:
        xq = quantize_static(x, x_scale, x_zero_point)
    xq = xq.astype(np.int32) - x_zero_point
    acc = int_matmul(xq.reshape(-1, xq.shape[-1]), qweight).reshape(x.shape[:-1] + (-1,))
    return acc * np.float64(np.float32(x_scale)) * scales[:, 0].astype(np.float64)


@defop(
    "qlinear",
    _qlinear_infer,
    num_inputs=(3, 5),
    attrs=_QLINEAR_ATTRS,
    kind="fused",
    doc="act(x @ dequant(qweight).T + b); qweight int8 [N,K] or packed int4 [N,K/2], see nnforge/ops/lowbit.py",
)
def qlinear(
    x,
    qweight,
    scales,
    zeros=None,
    bias=None,
    bits=8,
    group_size=0,
    act="none",
    act_quant="none",
    x_scale=1.0,
    x_zero_point=0,
):
    if act_quant == "none":
        y = np.matmul(x, dequantize(qweight, scales, zeros, bits, group_size).T)
    elif act_quant == "block_int8":
        block = _block_size(x.shape[-1], group_size) or group_size  # MatMulNBits' block: activations share it
        if zeros is not None and zeros.dtype == np.float32:  # int8 products with zero point 8, float correction
            y = np.matmul(quantize_blocks(x, block), dequantize(qweight, scales, None, bits, group_size).T)
            sums = x.reshape(x.shape[:-1] + (scales.shape[1], group_size)).sum(-1)
            y = y + np.matmul(sums, ((DEFAULT_ZERO[4] - zeros) * scales).T.astype(np.float32))
        else:
            y = np.matmul(quantize_blocks(x, block), dequantize(qweight, scales, zeros, bits, group_size).T)
    else:
        y = _w8a8(x, qweight, scales, act_quant, x_scale, x_zero_point)
    y = y.astype(x.dtype)
    if bias is not None:
        y = y + bias
    return ACTIVATIONS[act](y).astype(x.dtype)


# ---------------------------------------------------------------------------------------
# qconv2d: conv2d with quantized weights (weight-only)
# ---------------------------------------------------------------------------------------

_QCONV_ATTRS = {
    "bits": ("int", REQUIRED),
    "group_size": ("int", REQUIRED),
    "kernel": ("ints", REQUIRED),
    "stride": ("ints", [1, 1]),
    "padding": ("ints", [0, 0]),
    "dilation": ("ints", [1, 1]),
    "groups": ("int", 1),
}


def _qconv_infer(ts, attrs):
    x, qw, scales, zeros, bias = ts[0], ts[1], ts[2], _opt(ts, 3), _opt(ts, 4)
    n, k = _weight_dims(qw, scales, zeros, attrs, "qconv2d")
    kernel = attrs["kernel"]  # [kh, kw]
    if len(kernel) != 2 or k % (kernel[0] * kernel[1]):
        raise OpError(f"qconv2d: kernel {kernel} does not divide the {k} weights per output channel")
    _check_bias(bias, n, "qconv2d")
    w = TensorType((n, k // (kernel[0] * kernel[1]), kernel[0], kernel[1]), x.dtype)
    conv_attrs = {key: attrs[key] for key in ("stride", "padding", "dilation", "groups")}
    return conv2d.infer([x, w], conv_attrs)


@defop(
    "qconv2d",
    _qconv_infer,
    num_inputs=(3, 5),
    attrs=_QCONV_ATTRS,
    kind="fused",
    doc="conv2d with a quantized weight flattened to [O, C/groups*kh*kw]",
)
def qconv2d(
    x,
    qweight,
    scales,
    zeros=None,
    bias=None,
    bits=8,
    group_size=0,
    kernel=(1, 1),
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups=1,
):
    w = dequantize(qweight, scales, zeros, bits, group_size)
    w = w.reshape(w.shape[0], -1, kernel[0], kernel[1])
    return conv2d.ref(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


# ---------------------------------------------------------------------------------------
# qgather: embedding lookup in a quantized table (rows are the "output channels")
# ---------------------------------------------------------------------------------------


def _qgather_infer(ts, attrs):
    qw, scales, zeros, idx = ts
    _, d = _weight_dims(qw, scales, zeros, attrs, "qgather")
    if idx.dtype not in ("int64", "int32"):
        raise OpError(f"qgather: indices must be int64/int32, got {idx.dtype}")
    return [TensorType(idx.shape + (d,), "float32")]


@defop(
    "qgather",
    _qgather_infer,
    num_inputs=(4, 4),
    attrs={"bits": ("int", REQUIRED), "group_size": ("int", REQUIRED)},
    kind="compute",
    doc="dequant(qweight)[indices]: an embedding table quantized row by row (zeros may be none)",
)
def qgather(qweight, scales, zeros, indices, bits=8, group_size=0):
    rows = np.asarray(indices).reshape(-1)
    sub = dequantize(qweight[rows], scales[rows], None if zeros is None else zeros[rows], bits, group_size)
    return sub.reshape(np.shape(indices) + (sub.shape[-1],))


# ---------------------------------------------------------------------------------------
# sparse_linear: a linear layer whose weight is stored compressed (CSR)
# ---------------------------------------------------------------------------------------


def csr_from_dense(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense [N, K] -> (values [nnz] of w's dtype, column indices [nnz] int16/int32, row_ptr [N+1] int32)."""
    rows, cols = np.nonzero(w)
    idx_dtype = np.int16 if w.shape[1] <= np.iinfo(np.int16).max else np.int32  # half the index bytes when K fits
    row_ptr = np.zeros(w.shape[0] + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=w.shape[0]), out=row_ptr[1:])
    return np.ascontiguousarray(w[rows, cols]), cols.astype(idx_dtype), row_ptr


def dense_from_csr(values, col_idx, row_ptr, in_features: int) -> np.ndarray:
    n = row_ptr.shape[0] - 1
    w = np.zeros((n, in_features), values.dtype)
    rows = np.repeat(np.arange(n), np.diff(row_ptr.astype(np.int64)))
    w[rows, col_idx.astype(np.int64)] = values
    return w


def _sparse_linear_infer(ts, attrs):
    x, values, cols, row_ptr, bias = ts[0], ts[1], ts[2], ts[3], _opt(ts, 4)
    if values.rank != 1 or cols.rank != 1 or row_ptr.rank != 1 or values.shape != cols.shape:
        raise OpError(
            f"sparse_linear: values/col_idx must be 1-D of equal length and row_ptr 1-D, "
            f"got {values}, {cols}, {row_ptr}"
        )
    if cols.dtype not in ("int16", "int32") or row_ptr.dtype != "int32" or values.dtype != x.dtype:
        raise OpError(
            f"sparse_linear: col_idx int16/int32, row_ptr int32, values {x.dtype}; "
            f"got {cols.dtype}, {row_ptr.dtype}, {values.dtype}"
        )
    n, k = row_ptr.shape[0] - 1, attrs["in_features"]
    if isinstance(x.shape[-1], int) and x.shape[-1] != k:
        raise OpError(f"sparse_linear: input features {x.shape[-1]} != in_features {k}")
    if attrs["act"] not in ACTIVATIONS:
        raise OpError(f"sparse_linear: unknown activation {attrs['act']!r}")
    _check_bias(bias, n, "sparse_linear")
    return [TensorType(x.shape[:-1] + (n,), x.dtype)]


@defop(
    "sparse_linear",
    _sparse_linear_infer,
    num_inputs=(4, 5),
    kind="fused",
    attrs={"in_features": ("int", REQUIRED), "act": ("str", "none")},
    doc="act(x @ W.T + b) with W [N, in_features] stored as CSR (values, col_idx, row_ptr)",
)
def sparse_linear(x, values, col_idx, row_ptr, bias=None, in_features=0, act="none"):
    y = np.matmul(x, dense_from_csr(values, col_idx, row_ptr, in_features).T)
    if bias is not None:
        y = y + bias
    return ACTIVATIONS[act](y).astype(x.dtype)


# ---------------------------------------------------------------------------------------
# torch executor: the numpy references (W8A8 must stay exact integer arithmetic)
# ---------------------------------------------------------------------------------------


@implement("torch", "qlinear", "qconv2d", "qgather", "sparse_linear")
def _(cx, *inputs, **attrs):
    return cx.reference(*inputs, **attrs)


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------


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


def _finish(cx, n, y: str, with_bias: bool = False) -> str:
    """Bias (unless ``y`` has it already) and the fused activation: the node's output."""
    if not with_bias and len(n.inputs) > 4 and n.inputs[4] is not None:
        y = cx.emit("Add", [y, cx.value(n.inputs[4])])
    return _onnx_act(cx, n.attrs.get("act", "none"), y)


def _arrays(cx, n):
    """(codes as stored, scales, zeros or None) of a quantized-weight node."""
    g = cx.graph
    zeros = n.inputs[3] if len(n.inputs) > 3 else None
    return g.constant(n.inputs[1]), g.constant(n.inputs[2]), None if zeros is None else g.constant(zeros)


def _onnx_act_check(node, target: str) -> str | None:
    if not _has_act("onnxrt", node.attrs["act"]):
        return f"activation {node.attrs['act']!r} has no ONNX lowering"
    if node.attrs.get("act_quant") == "block_int8":
        k = node.inputs[2].shape[1] * node.attrs["group_size"]
        if target not in ("cpu", "cuda") or _block_size(k, node.attrs["group_size"]) is None:
            return "block_int8 activations need ONNX Runtime's MatMulNBits (cpu/cuda, group size 16..256)"
    return None


# -- weight-only --


def _block_int8(cx, n, ins) -> str:
    return _matmul_nbits(cx, n, ins, accuracy_level=4)


def _matmul_nbits(cx, n, ins, accuracy_level: int = 0) -> str | None:
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
    float_zero = zeros is not None and zeros.dtype == np.float32
    if float_zero:  # MatMulNBits' float zero points have no fast kernel: zero point 8 here, the rest added below
        pass
    elif zeros is not None:
        z = np.repeat(zeros, rep, axis=1)
        if z.shape[1] % 2:
            z = np.concatenate([z, np.full((rows, 1), DEFAULT_ZERO[4], np.uint8)], axis=1)
        args.append(cx.const(pack_int4(z), "uint8", "nbits_zeros"))
    level = {"accuracy_level": accuracy_level} if accuracy_level else {}
    y = cx.emit("MatMulNBits", args, domain="com.microsoft", K=k, N=rows, bits=bits, block_size=block, **level)
    return cx.emit("Add", [y, _zero_correction(cx, n, ins[0], zeros, scales)]) if float_zero else y


def _zero_correction(cx, n, x: str, zeros: np.ndarray, scales: np.ndarray) -> str:
    """W = (q - z) * s = (q - 8) * s + (8 - z) * s: with float zero points z, x @ W^T is MatMulNBits with its
    default zero point 8 plus (x summed per group) @ ((8 - z) * s)^T, a [G, N] float matmul (G = K / group)."""
    rank, gs = n.inputs[0].type.rank, n.attrs["group_size"]
    groups = scales.shape[1]
    shape = _i64(cx, [0] * (rank - 1) + [groups, gs])  # 0 copies the leading dims
    sums = cx.emit("ReduceSum", [cx.emit("Reshape", [x, shape]), _i64(cx, [-1])], keepdims=0)
    offset = np.ascontiguousarray(((DEFAULT_ZERO[4] - zeros) * scales).T.astype(np.float32))
    return cx.emit("MatMul", [sums, cx.const(offset, "float32", "nbits_zero_offset")])


def dequantized_weight(cx, n) -> str:
    """float [N, K] from the stored codes with standard ops on initializers only (folded by ORT)."""
    bits, gs = n.attrs["bits"], n.attrs["group_size"]
    q, scales, zeros = _arrays(cx, n)
    rows, groups = scales.shape
    codes = cx.value(n.inputs[1])
    if bits == 4:
        lo = cx.emit("BitwiseAnd", [codes, cx.const(np.uint8(0x0F), "uint8", "nib")])
        hi = cx.emit("BitShift", [codes, cx.const(np.uint8(4), "uint8", "four")], direction="RIGHT")
        pair = cx.emit(
            "Concat", [cx.emit("Unsqueeze", [lo, _i64(cx, [-1])]), cx.emit("Unsqueeze", [hi, _i64(cx, [-1])])], axis=-1
        )
        codes = pair  # [N, K/2, 2]: even element first, as packed
    w = cx.emit("Reshape", [cx.emit("Cast", [codes], to=1), _i64(cx, [rows, groups, gs])])
    zero = (
        cx.emit("Cast", [cx.value(n.inputs[3])], to=1)
        if zeros is not None
        else cx.const(np.float32(DEFAULT_ZERO[bits]), "float32", "zp")
    )
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


# -- W8A8 --


def _weight_t_int8(cx, n) -> str:
    q = cx.graph.constant(n.inputs[1])
    return cx.const(np.ascontiguousarray(q.T), "int8", "w_t")


def _dynamic(cx, n, ins) -> str:
    """Per-token symmetric int8, as quantize_per_token. The tokens become rows of a 2-D matrix
    so one QuantizeLinear (per-axis scale, Round half-to-even like numpy) quantizes all of them; the codes
    are uint8 shifted by 128 with zero point 128: the same products, on ONNX Runtime's fast u8 x s8
    kernels (s8 x s8 takes a slow path on x86). |x / scale| <= 127, so the shift never saturates."""
    x, rank = ins[0], n.inputs[0].type.rank
    k = n.inputs[0].shape[-1]
    rows = x if rank == 2 else cx.emit("Reshape", [x, _i64(cx, [-1, k])])
    amax = cx.emit("ReduceMax", [cx.emit("Abs", [rows]), _i64(cx, [-1])], keepdims=0)
    scale = cx.emit(
        "Where",
        [
            cx.emit("Greater", [amax, cx.const(np.float32(0), "float32", "zero")]),
            cx.emit("Div", [amax, cx.const(np.float32(127), "float32", "q127")]),
            cx.const(np.float32(1), "float32", "one"),
        ],
    )
    zp = cx.emit("Expand", [cx.const(np.uint8(128), "uint8", "zp128"), cx.emit("Shape", [scale])])
    xq = cx.emit("QuantizeLinear", [rows, scale, zp], axis=0)
    acc = cx.emit("MatMulInteger", [xq, _weight_t_int8(cx, n), cx.const(np.uint8(128), "uint8", "x_zp")])
    wscale = cx.graph.constant(n.inputs[2])[:, 0].astype(np.float32)
    y = cx.emit(
        "Mul",
        [
            cx.emit("Mul", [cx.emit("Cast", [acc], to=1), cx.emit("Unsqueeze", [scale, _i64(cx, [-1])])]),
            cx.const(wscale, "float32", "w_scale"),
        ],
    )
    if rank == 2:
        return y
    shape = cx.emit("Concat", [cx.emit("Shape", [x], start=0, end=rank - 1), _i64(cx, [len(wscale)])], axis=0)
    return cx.emit("Reshape", [y, shape])


def _dynamic_tensor(cx, n, ins) -> str:
    """One uint8 range per tensor at run time (ONNX DynamicQuantizeLinear), as quantize_per_tensor.
    With contrib ops: ONNX Runtime's DynamicQuantizeMatMul, one kernel that quantizes, multiplies on its
    u8 x s8 path, rescales and adds the bias. Elsewhere the standard ops it is fused from."""
    wscale = cx.const(cx.graph.constant(n.inputs[2])[:, 0].astype(np.float32), "float32", "w_scale")
    if cx.contrib:
        bias = [cx.value(n.inputs[4])] if len(n.inputs) > 4 and n.inputs[4] is not None else []
        return cx.emit(
            "DynamicQuantizeMatMul", [ins[0], _weight_t_int8(cx, n), wscale, "", *bias], domain="com.microsoft"
        )
    xq, xs, xzp = cx.emit_multi("DynamicQuantizeLinear", [ins[0]], 3)
    acc = cx.emit("Cast", [cx.emit("MatMulInteger", [xq, _weight_t_int8(cx, n), xzp])], to=1)
    return cx.emit("Mul", [acc, cx.emit("Mul", [xs, wscale])])


def _static(cx, n, ins) -> str:
    xs, zp = np.float32(n.attrs["x_scale"]), np.uint8(n.attrs["x_zero_point"])
    xq = cx.emit("QuantizeLinear", [ins[0], cx.const(xs, "float32", "x_scale"), cx.const(zp, "uint8", "x_zp")])
    acc = cx.emit("Cast", [cx.emit("MatMulInteger", [xq, _weight_t_int8(cx, n), cx.const(zp, "uint8", "x_zp")])], to=1)
    wscale = (cx.graph.constant(n.inputs[2])[:, 0].astype(np.float64) * np.float64(xs)).astype(np.float32)
    return cx.emit("Mul", [acc, cx.const(wscale, "float32", "xw_scale")])


_ONNX_ACT_QUANT = {
    "none": _weight_only,
    "dynamic": _dynamic,
    "dynamic_tensor": _dynamic_tensor,
    "static": _static,
    "block_int8": _block_int8,
}


@qlinear.onnxrt(check=_onnx_act_check)
def _(cx, *ins, act_quant="none", **attrs):
    n = cx.node
    fused_bias = cx.contrib and act_quant == "dynamic_tensor"
    return _finish(cx, n, _ONNX_ACT_QUANT[act_quant](cx, n, list(ins)), with_bias=fused_bias)


# -- conv, embedding, sparse --


@qconv2d.onnxrt
def _(cx, *ins, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, **attrs):
    n = cx.node
    w = dequantized_weight(cx, n)
    rows = cx.graph.constant(n.inputs[2]).shape[0]
    w4 = cx.emit("Reshape", [w, _i64(cx, [rows, -1, *kernel])])
    args = [ins[0], w4] + ([ins[4]] if len(ins) > 4 and ins[4] else [])
    p = padding
    return cx.emit("Conv", args, strides=stride, pads=[p[0], p[1], p[0], p[1]], dilations=dilation, group=groups)


@qgather.onnxrt
def _(cx, *ins, bits=8, group_size=0):
    """Gather the code rows first, then dequantize only them (the table stays compressed in memory)."""
    n, gs = cx.node, group_size
    scales = cx.graph.constant(n.inputs[1])
    groups = scales.shape[1]
    idx = ins[3]
    rank = n.inputs[3].type.rank
    rows = cx.emit("Gather", [ins[0], idx], axis=0)
    if bits == 4:
        lo = cx.emit("BitwiseAnd", [rows, cx.const(np.uint8(0x0F), "uint8", "nib")])
        hi = cx.emit("BitShift", [rows, cx.const(np.uint8(4), "uint8", "four")], direction="RIGHT")
        rows = cx.emit(
            "Concat", [cx.emit("Unsqueeze", [lo, _i64(cx, [-1])]), cx.emit("Unsqueeze", [hi, _i64(cx, [-1])])], axis=-1
        )
    keep = [0] * rank  # Reshape's 0 copies the index dims
    w = cx.emit("Reshape", [cx.emit("Cast", [rows], to=1), _i64(cx, keep + [groups, gs])])
    if n.inputs[2] is not None:
        zero = cx.emit("Unsqueeze", [cx.emit("Cast", [cx.emit("Gather", [ins[2], idx], axis=0)], to=1), _i64(cx, [-1])])
    else:
        zero = cx.const(np.float32(DEFAULT_ZERO[bits]), "float32", "zp")
    scale = cx.emit("Unsqueeze", [cx.emit("Gather", [ins[1], idx], axis=0), _i64(cx, [-1])])
    w = cx.emit("Mul", [cx.emit("Sub", [w, zero]), scale])
    return cx.emit("Reshape", [w, _i64(cx, keep + [groups * gs])])


@sparse_linear.onnxrt(check=_onnx_act_check)
def _(cx, *ins, in_features=0, act="none"):
    """Dense weight = ScatterND(zeros, (row, col) of each value, values); the row of value i is the number
    of row starts at or before i, counted by a CumSum over marks at row_ptr[1:N] (all initializers)."""
    from onnx import TensorProto, helper

    row_ptr = cx.graph.constant(cx.node.inputs[3])
    rows, k = row_ptr.shape[0] - 1, in_features
    nnz = int(row_ptr[-1])
    if nnz == 0:
        dense = cx.emit("ConstantOfShape", [_i64(cx, [rows, k])])
    else:
        zeros = cx.emit(
            "ConstantOfShape", [_i64(cx, [nnz + 1])], value=helper.make_tensor("zero", TensorProto.INT64, [1], [0])
        )
        marks = cx.emit(
            "ScatterElements",
            [
                zeros,
                cx.emit("Cast", [cx.emit("Slice", [ins[3], _i64(cx, [1]), _i64(cx, [rows])])], to=7),
                cx.const(np.ones(max(rows - 1, 0), np.int64), "int64", "ones"),
            ],
            axis=0,
            reduction="add",
        )
        row_of = cx.emit(
            "Slice",
            [cx.emit("CumSum", [marks, cx.const(np.int64(0), "int64", "axis0")]), _i64(cx, [0]), _i64(cx, [nnz])],
        )
        idx = cx.emit(
            "Concat",
            [
                cx.emit("Unsqueeze", [row_of, _i64(cx, [-1])]),
                cx.emit("Unsqueeze", [cx.emit("Cast", [ins[2]], to=7), _i64(cx, [-1])]),
            ],
            axis=-1,
        )
        dense = cx.emit("ScatterND", [cx.emit("ConstantOfShape", [_i64(cx, [rows, k])]), idx, ins[1]])
    y = cx.emit("MatMul", [ins[0], cx.emit("Transpose", [dense], perm=[1, 0])])
    if len(ins) > 4 and ins[4]:
        y = cx.emit("Add", [y, ins[4]])
    return _onnx_act(cx, act, y)


# ---------------------------------------------------------------------------------------
# TVM
# ---------------------------------------------------------------------------------------


def _dequantize(c, qw, scales, zeros, bits: int, group: int, rows, k: int):
    """float32 [rows, k] from codes [rows, k | k/2], scales [rows, G] and zeros [rows, G] (or the default)."""
    if bits == 4:
        lo = c.emit(R.bitwise_and(qw, c.const(15, "uint8")))
        hi = c.emit(R.right_shift(qw, c.const(4, "uint8")))
        qw = c.emit(R.concat([c.emit(R.expand_dims(lo, -1)), c.emit(R.expand_dims(hi, -1))], axis=-1))
    groups = k // group
    w = c.emit(R.reshape(c.emit(R.astype(qw, "float32")), [rows, groups, group]))
    zero = (
        c.const(DEFAULT_ZERO[bits], "float32")
        if zeros is None
        else c.emit(R.expand_dims(R.astype(zeros, "float32"), -1))
    )
    w = c.emit(R.multiply(c.emit(R.subtract(w, zero)), c.emit(R.expand_dims(scales, -1))))
    return c.emit(R.reshape(w, [rows, k]))


def _weight(c, qw, scales, zeros, scales_at: int = 2):
    n = c.node
    rows, groups = n.inputs[scales_at].shape
    k = groups * n.attrs["group_size"]
    return _dequantize(c, qw, scales, zeros, n.attrs["bits"], n.attrs["group_size"], rows, k)


def _tvm_act_check(node, target: str) -> str | None:
    if node.attrs.get("act_quant") == "block_int8":
        return "block_int8 activations are ONNX Runtime's MatMulNBits kernel"
    return (
        None if _has_act("tvm", node.attrs.get("act")) else f"activation {node.attrs.get('act')!r} has no TVM lowering"
    )


@qlinear.tvm(check=_tvm_act_check)
def _(c, x, qw, scales, zeros=None, bias=None, **attrs):
    if c.attr("act_quant") != "none":
        y, bias = _tvm_w8a8(c, x, qw, scales, bias)
    elif _decode_rows(c.node) and _tvm_gemv.available(c.target, *c.node.inputs[1].shape[:1], *_in_features(c.node)):
        y = _gemv(c, x, qw, scales, zeros)
    else:
        a = c.node.attrs
        y = c.bb.emit_te(_qmatmul, x, qw, scales, zeros, a["bits"], a["group_size"], primfunc_name_hint="qmatmul")
    if bias is not None:
        y = c.emit(R.add(y, bias))
    return _tvm_act(c, c.attr("act"), y)


def _decode_rows(node) -> bool:
    """Few rows: a step of one token per sequence (sequence axis 1), or at most 8 rows in all."""
    lead = node.inputs[0].shape[:-1]
    if len(lead) >= 2 and lead[-1] == 1:
        return True
    return all(isinstance(d, int) for d in lead) and int(np.prod(lead, dtype=np.int64)) <= 8


def _in_features(node) -> tuple[int, int, int]:
    """(K, bits, group size) of a weight-only qlinear."""
    a = node.attrs
    return node.inputs[2].shape[1] * a["group_size"], a["bits"], a["group_size"]


def _gemv(c, x, qw, scales, zeros):
    """The decode kernel (tvm_gemv): codes unpacked in registers, one row of x at a time."""
    n = c.node.inputs[1].shape[0]
    k, bits, group = _in_features(c.node)
    lead = c.dims.shape(c.node.inputs[0].shape[:-1])
    x2d = c.emit(R.reshape(x, [-1, k]))
    y = _tvm_gemv.qmatmul(c.bb, x2d, qw, scales, zeros, n, k, bits, group, DEFAULT_ZERO[bits])
    return c.emit(R.reshape(y, [*lead, n]))


def _qmatmul(x, qw, scales, zeros, bits: int, group: int):
    """y[..., j] = sum_k x[..., k] * w[j, k], with w dequantized from its codes inside the same kernel:
    one block unpacks/scales the codes (int8, or two uint8 nibbles), the reduction reads it. The CPU
    matmul schedule (tvm_schedule.CPUMatmul) computes that block per column panel of the output, so the
    weights stay int8/uint8 in memory and no full float copy is made. ``scales`` None: the int8 codes
    themselves (W8A8, whose scales are applied after the sum)."""
    from tvm import te, tirx

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
        w = te.compute(
            (rows, k_in), lambda j, k: (code(j, k) - zero(j, k)) * scales[j, tirx.floordiv(k, group)], name="dequantize"
        )
    r = te.reduce_axis((0, k_in), name="k")
    return te.compute((*lead, rows), lambda *i: te.sum(x[(*i[:-1], r)] * w[i[-1], r], axis=r), name="qmatmul")


def _activation_range(c, x):
    """(scale, zero point, lowest code) of the quantized activations, codes = clip(round(x / scale) + zero
    point, lowest, 255): per-token int8 (dynamic: symmetric, shifted by 128 into 1..255), per-tensor uint8
    (dynamic_tensor: range at run time; static: calibrated). The scale is [..., 1] per token or a scalar,
    the zero point a float32 scalar."""
    mode = c.attr("act_quant")
    if mode == "dynamic":  # as quantize_per_token
        amax = c.emit(R.max(R.abs(x), axis=[-1], keepdims=True))
        xs = c.emit(
            R.where(
                R.greater(amax, c.const(0, "float32")), R.divide(amax, c.const(127, "float32")), c.const(1, "float32")
            )
        )
        return xs, c.const(128, "float32"), 1
    if mode == "dynamic_tensor":  # as quantize_per_tensor
        # per row first (rows in parallel), then over the rows: one whole-tensor reduction runs on one core
        zero = c.const(0, "float32")
        lo = c.emit(R.minimum(R.min(c.emit(R.min(x, axis=[-1]))), zero))
        hi = c.emit(R.maximum(R.max(c.emit(R.max(x, axis=[-1]))), zero))
        xs = c.emit(
            R.where(R.greater(hi, lo), R.divide(R.subtract(hi, lo), c.const(255, "float32")), c.const(1, "float32"))
        )
        return xs, c.emit(R.clip(R.round(R.divide(R.negative(lo), xs)), 0, 255)), 0
    return c.const(np.float32(c.attr("x_scale")), "float32"), c.const(c.attr("x_zero_point"), "float32"), 0


def _tvm_w8a8(c, x, qw, scales, bias):
    """Quantized activations times int8 weights, rescaled to float; returns (y, bias not yet added).

    With VNNI (tvm_vnni): the int8 dot-product kernel quantizes the activations itself and adds the bias.
    Elsewhere the integer matmul runs as _qmatmul on the codes held as float32: products of two 8-bit
    codes and their sums are exact in float32 while below 2^24 (K * 128 * 127 in the worst case, far
    above what real activations reach), so this equals the int32 product, with the float matmul kernel
    and the weights kept int8 in memory."""
    xs, zp, qmin = _activation_range(c, x)
    n, k = c.node.inputs[1].shape
    w_scale = c.emit(R.squeeze(scales, [1]))
    if _tvm_vnni.available(c.target, n, k):
        lead = c.dims.shape(c.node.inputs[0].shape[:-1])
        per_token = c.attr("act_quant") == "dynamic"
        y = _tvm_vnni.qmatmul(
            c.bb,
            c.emit(R.reshape(x, [-1, k])),
            qw,
            n,
            k,
            c.emit(R.reshape(xs, [-1, 1])) if per_token else xs,
            zp,
            qmin,
            w_scale,
            bias,
        )
        return c.emit(R.reshape(y, [*lead, n])), None
    codes = c.emit(R.clip(R.add(R.round(R.divide(x, xs)), zp), qmin, 255))
    acc = c.bb.emit_te(_qmatmul, c.emit(R.subtract(codes, zp)), qw, None, None, 8, 1, primfunc_name_hint="qmatmul")
    return c.emit(R.multiply(c.emit(R.multiply(acc, xs)), w_scale)), bias


@qconv2d.tvm
def _(c, x, qw, scales, zeros=None, bias=None, **attrs):
    """The float weight, dequantized once at load (a convolution reads each weight for every output
    pixel: dequantizing per call would cost more than it saves), into the float convolution's lowering."""
    kh, kw = c.attr("kernel")
    w = _weight(c, qw, scales, zeros)
    rows, k = c.node.inputs[2].shape[0], c.node.inputs[2].shape[1] * c.attr("group_size")
    shape = [rows, k // (kh * kw), kh, kw]
    conv = {a: attrs[a] for a in ("stride", "padding", "dilation", "groups")}
    return conv2d_tvm(c, x, c.emit(R.reshape(w, shape)), bias, weight_shape=shape, **conv)


@qgather.tvm
def _(c, qw, scales, zeros, idx, **attrs):
    table = _weight(c, qw, scales, zeros, scales_at=1)
    return R.take(table, idx, 0, mode="wrap")


@sparse_linear.tvm
def _(c, x, values, cols, row_ptr, bias=None, **attrs):
    """The CSR kernel (tvm_sparse) where few weights are stored; otherwise a dense weight scattered from
    CSR (weights only, so lifted out of main and run once at load): the row of value i is the number of
    row starts at or before i (a cumulative sum of marks)."""
    from tvm import tirx

    rows, k = c.node.inputs[3].shape[0] - 1, c.attr("in_features")
    nnz = c.node.inputs[1].shape[0]
    if _tvm_sparse.worth_it(c.target, nnz, rows, k):
        lead = c.dims.shape(c.node.inputs[0].shape[:-1])
        m = functools.reduce(operator.mul, lead, tirx.IntImm("int64", 1))
        x2d = c.emit(R.reshape(x, [m, k]))
        y = c.emit(R.reshape(_tvm_sparse.matmul(c.bb, x2d, m, values, cols, row_ptr, rows, k, nnz), [*lead, rows]))
        if bias is not None:
            y = c.emit(R.add(y, bias))
        return _tvm_act(c, c.attr("act"), y)
    starts = c.emit(R.astype(R.strided_slice(row_ptr, [0], [1], [rows]), "int64"))
    marks = c.emit(
        R.scatter_elements(R.zeros([nnz + 1], "int64"), starts, R.ones([rows - 1], "int64"), axis=0, reduction="add")
    )
    row_of = c.emit(R.strided_slice(R.cumsum(marks, axis=0), [0], [0], [nnz]))
    idx = c.emit(R.concat([R.expand_dims(row_of, -1), R.expand_dims(R.astype(cols, "int64"), -1)], axis=-1))
    dense = c.emit(R.scatter_nd(R.zeros([rows, k], "float32"), idx, values))
    y = c.emit(R.matmul(x, c.emit(R.permute_dims(dense, [1, 0]))))
    if bias is not None:
        y = c.emit(R.add(y, bias))
    return _tvm_act(c, c.attr("act"), y)
