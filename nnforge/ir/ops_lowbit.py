"""Ops created by the low-bit and sparsity passes; registered into nnforge.ir.ops.REGISTRY on import.

Weight storage (the contract between the passes, the interpreter and the backends):

- ``qweight`` holds a weight matrix ``W[N, K]`` (N outputs, K inputs; conv weights flattened to
  ``[O, C/groups*kh*kw]``) as integers ``q``; ``W ~= (q - zero) * scale`` group by group.
- ``bits=8``: ``qweight`` is int8 ``[N, K]``, symmetric (no zeros input: zero = 0).
- ``bits=4``: ``qweight`` is uint8 ``[N, K/2]``, two 4-bit values per byte, values 0..15.
  Nibble order: element ``2i`` of a row is the LOW nibble of byte ``i``, element ``2i+1`` the
  HIGH nibble (the order of ONNX Runtime's MatMulNBits, so the bytes lower unchanged).
  Without a zeros input the zero point is 8.
- ``scales``: float32 ``[N, K/group_size]``; ``group_size == K`` means one scale per output channel.
- ``zeros``: uint8 ``[N, K/group_size]``, one zero point per byte (unpacked: they are 1/group_size
  of the weight bytes, and unpacked they read plainly).

The references dequantize and run the float op, except W8A8 (``act_quant`` dynamic/static),
which quantizes the activations and multiplies integers exactly (see ``int_matmul``).
"""
from __future__ import annotations

import numpy as np

from .graph import TensorType
from .ops import ACTIVATIONS, REQUIRED, OpError, _conv2d, _conv_infer, register  # noqa: F401

BITS = {8: "int8", 4: "uint8"}  # bits -> qweight dtype
DEFAULT_ZERO = {8: 0, 4: 8}
ACT_QUANT = ("none", "dynamic", "dynamic_tensor", "static")


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
    z = DEFAULT_ZERO[bits] if zeros is None else np.repeat(zeros.astype(np.int32), group_size, axis=1)
    s = np.repeat(scales.astype(np.float32), group_size, axis=1)
    return ((q - z).astype(np.float32) * s).astype(np.float32)


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
        if zeros.dtype != "uint8" or tuple(zeros.shape) != want:
            raise OpError(f"{op}: zeros must be u8[{want[0]},{want[1]}], got {zeros}")
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
    "bits": ("int", REQUIRED), "group_size": ("int", REQUIRED), "act": ("str", "none"),
    # none: weight-only | dynamic: int8 per token | dynamic_tensor: uint8 per tensor, range at run time
    # | static: calibrated uint8 per tensor
    "act_quant": ("str", "none"),
    "x_scale": ("float", 1.0), "x_zero_point": ("int", 0),  # static only
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
    if attrs["act_quant"] != "none" and (attrs["bits"] != 8 or attrs["group_size"] != k):
        raise OpError("qlinear: quantized activations need int8 weights with one scale per output channel")
    if attrs["act_quant"] == "static" and not (attrs["x_scale"] > 0 and 0 <= attrs["x_zero_point"] <= 255):
        raise OpError(f"qlinear: static x_scale must be > 0 and x_zero_point in 0..255, "
                      f"got {attrs['x_scale']}, {attrs['x_zero_point']}")
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


@register("qlinear", _qlinear_infer, num_inputs=(3, 5), attrs=_QLINEAR_ATTRS, kind="fused",
          doc="act(x @ dequant(qweight).T + b); qweight int8 [N,K] or packed int4 [N,K/2], see ops_lowbit")
def _qlinear(x, qweight, scales, zeros=None, bias=None, bits=8, group_size=0, act="none", act_quant="none",
             x_scale=1.0, x_zero_point=0):
    if act_quant == "none":
        y = np.matmul(x, dequantize(qweight, scales, zeros, bits, group_size).T)
    else:
        y = _w8a8(x, qweight, scales, act_quant, x_scale, x_zero_point)
    y = y.astype(x.dtype)
    if bias is not None:
        y = y + bias
    return ACTIVATIONS[act](y).astype(x.dtype)


# ---------------------------------------------------------------------------------------
# qconv2d: conv2d with quantized weights (weight-only)
# ---------------------------------------------------------------------------------------

_QCONV_ATTRS = {"bits": ("int", REQUIRED), "group_size": ("int", REQUIRED), "kernel": ("ints", REQUIRED),
                "stride": ("ints", [1, 1]), "padding": ("ints", [0, 0]), "dilation": ("ints", [1, 1]),
                "groups": ("int", 1)}


def _qconv_infer(ts, attrs):
    x, qw, scales, zeros, bias = ts[0], ts[1], ts[2], _opt(ts, 3), _opt(ts, 4)
    n, k = _weight_dims(qw, scales, zeros, attrs, "qconv2d")
    kernel = attrs["kernel"]  # [kh, kw]
    if len(kernel) != 2 or k % (kernel[0] * kernel[1]):
        raise OpError(f"qconv2d: kernel {kernel} does not divide the {k} weights per output channel")
    _check_bias(bias, n, "qconv2d")
    w = TensorType((n, k // (kernel[0] * kernel[1]), kernel[0], kernel[1]), x.dtype)
    conv_attrs = {key: attrs[key] for key in ("stride", "padding", "dilation", "groups")}
    return _conv_infer([x, w], conv_attrs)


@register("qconv2d", _qconv_infer, num_inputs=(3, 5), attrs=_QCONV_ATTRS, kind="fused",
          doc="conv2d with a quantized weight flattened to [O, C/groups*kh*kw]")
def _qconv2d(x, qweight, scales, zeros=None, bias=None, bits=8, group_size=0, kernel=(1, 1), stride=(1, 1),
             padding=(0, 0), dilation=(1, 1), groups=1):
    w = dequantize(qweight, scales, zeros, bits, group_size)
    w = w.reshape(w.shape[0], -1, kernel[0], kernel[1])
    return _conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


# ---------------------------------------------------------------------------------------
# qgather: embedding lookup in a quantized table (rows are the "output channels")
# ---------------------------------------------------------------------------------------

def _qgather_infer(ts, attrs):
    qw, scales, zeros, idx = ts
    _, d = _weight_dims(qw, scales, zeros, attrs, "qgather")
    if idx.dtype not in ("int64", "int32"):
        raise OpError(f"qgather: indices must be int64/int32, got {idx.dtype}")
    return [TensorType(idx.shape + (d,), "float32")]


@register("qgather", _qgather_infer, num_inputs=(4, 4), attrs={"bits": ("int", REQUIRED), "group_size": ("int", REQUIRED)},
          kind="compute", doc="dequant(qweight)[indices]: an embedding table quantized row by row (zeros may be none)")
def _qgather(qweight, scales, zeros, indices, bits=8, group_size=0):
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
        raise OpError(f"sparse_linear: values/col_idx must be 1-D of equal length and row_ptr 1-D, "
                      f"got {values}, {cols}, {row_ptr}")
    if cols.dtype not in ("int16", "int32") or row_ptr.dtype != "int32" or values.dtype != x.dtype:
        raise OpError(f"sparse_linear: col_idx int16/int32, row_ptr int32, values {x.dtype}; "
                      f"got {cols.dtype}, {row_ptr.dtype}, {values.dtype}")
    n, k = row_ptr.shape[0] - 1, attrs["in_features"]
    if isinstance(x.shape[-1], int) and x.shape[-1] != k:
        raise OpError(f"sparse_linear: input features {x.shape[-1]} != in_features {k}")
    if attrs["act"] not in ACTIVATIONS:
        raise OpError(f"sparse_linear: unknown activation {attrs['act']!r}")
    _check_bias(bias, n, "sparse_linear")
    return [TensorType(x.shape[:-1] + (n,), x.dtype)]


@register("sparse_linear", _sparse_linear_infer, num_inputs=(4, 5), kind="fused",
          attrs={"in_features": ("int", REQUIRED), "act": ("str", "none")},
          doc="act(x @ W.T + b) with W [N, in_features] stored as CSR (values, col_idx, row_ptr)")
def _sparse_linear(x, values, col_idx, row_ptr, bias=None, in_features=0, act="none"):
    y = np.matmul(x, dense_from_csr(values, col_idx, row_ptr, in_features).T)
    if bias is not None:
        y = y + bias
    return ACTIVATIONS[act](y).astype(x.dtype)
