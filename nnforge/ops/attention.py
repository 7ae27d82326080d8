"""Attention: sdpa (softmax(q @ k^T * scale + mask) @ v on [..., seq, dim]) and attention (multi-head, on
[batch, seq, heads*dim] tensors, as the fusion passes make it).

ONNX: written out (MatMul, Softmax, MatMul) for portable files; where ONNX Runtime's contrib ops may be used,
attention is its fused MultiHeadAttention kernel, and on the CPU a per-key bias (ToMe's log token sizes) rides
in one more q/k head dim instead of an expanded bias (``_keys_carry_bias``). An attention whose q, k, v are the
three thirds of one linear becomes ORT's Attention with the projection inside (backends/onnxrt_fusions.py).
TVM: Relax matmul / softmax / matmul (``_attend_tvm``).
"""

from __future__ import annotations

import math

import numpy as np

from ..ir import symbols
from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop, get_op
from .common import LazyModule, R, broadcast_shapes, float_only, same_dtype, torch

_tvm_lower = LazyModule("nnforge.backends.tvm_lower")  # LoweringError
INT64_MAX = np.iinfo(np.int64).max


def _default_scale(head_dim) -> float:
    return 1.0 / math.sqrt(head_dim)


# -- sdpa -----------------------------------------------------------------------------------------------


def _sdpa_infer(ts, attrs):
    q, k, v = ts[:3]
    same_dtype([q, k, v], "sdpa")
    float_only(q, "sdpa")
    if q.rank < 2 or k.rank != q.rank or v.rank != q.rank:
        raise OpError(f"sdpa: q, k, v must share a rank >= 2, got {q.shape}, {k.shape}, {v.shape}")
    if len(ts) > 3 and ts[3] is not None and ts[3].dtype not in ("bool", q.dtype):
        raise OpError(f"sdpa: mask must be bool or {q.dtype}, got {ts[3].dtype}")
    batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], "sdpa")
    return [TensorType(batch + (q.shape[-2], v.shape[-1]), q.dtype)]


@defop(
    "sdpa",
    _sdpa_infer,
    num_inputs=(3, 4),
    attrs={"is_causal": ("bool", False), "scale": ("optional_float", None)},
    doc="softmax(q @ k^T * scale + mask) @ v; a bool mask is True where attention is allowed",
)
def sdpa(q, k, v, mask=None, is_causal=False, scale=None):
    scale = _default_scale(q.shape[-1]) if scale is None else scale
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * np.asarray(scale, q.dtype)
    if is_causal:
        lq, lk = s.shape[-2:]
        s = np.where(np.tril(np.ones((lq, lk), bool)), s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    return np.matmul(get_op("softmax").ref(s, axis=-1), v)


@sdpa.torch
def _sdpa_torch(cx, q, k, v, mask=None, is_causal=False, scale=None):
    scale = _default_scale(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * torch.tensor(scale, dtype=q.dtype)
    if is_causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    return torch.matmul(torch.softmax(s, -1), v)


def _sdpa_check(node, target: str) -> str | None:
    if node.attrs["scale"] is None and not isinstance(node.inputs[0].shape[-1], int):
        return "default scale needs a static head dim"
    return None


def _attend_onnx(
    cx,
    q: str,
    k: str,
    v: str,
    mask: str | None,
    mask_bool: bool,
    *,
    rank: int,
    dtype: str,
    scale: float,
    is_causal: bool,
) -> str:
    """softmax(q @ k^T * scale [+ causal / mask]) @ v on [..., seq, dim] tensors."""
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    s = cx.emit("MatMul", [q, cx.emit("Transpose", [k], perm=perm)])
    s = cx.emit("Mul", [s, cx.const(scale, dtype, "scale")])
    neg_inf = cx.const(-np.inf, dtype, "neg_inf")
    if is_causal:  # allowed where key index <= query index (top-left aligned, as torch)
        shape = cx.emit("Shape", [s])
        axes0 = cx.const([0], "int64", "axes")
        lq = cx.emit("Squeeze", [cx.emit("Slice", [shape, cx.const([-2], "int64"), cx.const([-1], "int64")]), axes0])
        lk = cx.emit(
            "Squeeze", [cx.emit("Slice", [shape, cx.const([-1], "int64"), cx.const([INT64_MAX], "int64")]), axes0]
        )
        zero, one = cx.const(0, "int64"), cx.const(1, "int64")
        rows = cx.emit("Unsqueeze", [cx.emit("Range", [zero, lq, one]), cx.const([1], "int64", "axes")])
        cols = cx.emit("Range", [zero, lk, one])
        s = cx.emit("Where", [cx.emit("LessOrEqual", [cols, rows]), s, neg_inf])
    if mask:
        s = cx.emit("Where", [mask, s, neg_inf]) if mask_bool else cx.emit("Add", [s, mask])
    return cx.emit("MatMul", [cx.emit("Softmax", [s], axis=-1), v])


def _mask_is_bool(cx, mask) -> bool:
    return bool(mask) and cx.node.inputs[3].dtype == "bool"


@sdpa.onnxrt(check=_sdpa_check)
def _(cx, q, k, v, mask=None, is_causal=False, scale=None):
    qt = cx.node.inputs[0].type
    scale = _default_scale(qt.shape[-1]) if scale is None else scale
    return _attend_onnx(
        cx, q, k, v, mask, _mask_is_bool(cx, mask), rank=qt.rank, dtype=qt.dtype, scale=scale, is_causal=is_causal
    )


def _attend_tvm(c, q, k, v, mask, *, rank: int, dtype: str, head_dim, lq, lk, scale, is_causal: bool, mask_dtype):
    """softmax(q @ k^T * scale [+ causal] [+ mask]) @ v on [..., L, D] tensors."""
    if scale is None:
        if not isinstance(head_dim, int):
            raise _tvm_lower.LoweringError("attention: head dimension must be static when scale is not given")
        scale = _default_scale(head_dim)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    s = c.emit(R.matmul(q, c.emit(R.permute_dims(k, perm))))
    s = c.emit(R.multiply(s, c.const(scale, dtype)))
    neg_inf = c.const(-np.inf, dtype)
    if is_causal:
        allowed = c.emit(R.tril(c.emit(R.ones([c.dims(lq), c.dims(lk)], "bool"))))
        s = c.emit(R.where(allowed, s, neg_inf))
    if mask is not None:
        s = c.emit(R.where(mask, s, neg_inf) if mask_dtype == "bool" else R.add(s, mask))
    p = c.emit(R.nn.softmax(s, -1))
    return R.matmul(p, v)


@sdpa.tvm
def _(c, q, k, v, mask=None, is_causal=False, scale=None):
    qt = c.in_type(0)
    return _attend_tvm(
        c,
        q,
        k,
        v,
        mask,
        rank=qt.rank,
        dtype=qt.dtype,
        head_dim=qt.shape[-1],
        lq=qt.shape[-2],
        lk=c.in_type(1).shape[-2],
        scale=scale,
        is_causal=is_causal,
        mask_dtype=c.in_type(3).dtype if mask is not None else None,
    )


# -- attention ------------------------------------------------------------------------------------------


def _attention_infer(ts, attrs):
    q, k, v = ts[:3]
    same_dtype([q, k, v], "attention")
    float_only(q, "attention")
    h = attrs["num_heads"]
    if q.rank != 3 or k.rank != 3 or v.rank != 3:
        raise OpError(f"attention: q, k, v must be [batch, seq, heads*dim], got {q.shape}, {k.shape}, {v.shape}")
    for t in (q, k, v):
        if not isinstance(t.shape[-1], int) or t.shape[-1] % h:
            raise OpError(f"attention: hidden size {t.shape[-1]} is not a multiple of num_heads={h}")
    if len(ts) > 3 and ts[3] is not None and ts[3].dtype not in ("bool", q.dtype):
        raise OpError(f"attention: mask must be bool or {q.dtype}, got {ts[3].dtype}")
    return [TensorType(q.shape[:2] + (v.shape[-1],), q.dtype)]


@defop(
    "attention",
    _attention_infer,
    num_inputs=(3, 4),
    kind="fused",
    attrs={"num_heads": ("int", REQUIRED), "scale": ("optional_float", None), "is_causal": ("bool", False)},
    doc="multi-head attention on [batch, seq, heads*dim] tensors; the mask broadcasts to [batch, heads, q, k]",
)
def attention(q, k, v, mask=None, num_heads=1, scale=None, is_causal=False):
    def heads(t):
        b, s, e = t.shape
        return t.reshape(b, s, num_heads, e // num_heads).transpose(0, 2, 1, 3)

    o = sdpa.ref(heads(q), heads(k), heads(v), mask, is_causal=is_causal, scale=scale)
    b, h, s, d = o.shape
    return o.transpose(0, 2, 1, 3).reshape(b, s, h * d)


@attention.torch
def _(cx, q, k, v, mask=None, num_heads=1, scale=None, is_causal=False):
    def heads(t):
        b, s, e = t.shape
        return t.reshape(b, s, num_heads, e // num_heads).transpose(1, 2)

    o = _sdpa_torch(cx, heads(q), heads(k), heads(v), mask, is_causal=is_causal, scale=scale)
    b, h, s, d = o.shape
    return o.transpose(1, 2).reshape(b, s, h * d)


@attention.onnxrt
def _(cx, q, k, v, mask=None, num_heads=1, scale=None, is_causal=False):
    """[batch, seq, heads*dim] in and out: split heads with Reshape(0, 0, h, -1) + Transpose, attend, merge."""
    qv, h = cx.node.inputs[0], num_heads
    scale = _default_scale(qv.shape[-1] // h) if scale is None else scale
    # ORT's causal masking is only known to match torch's (top-left) when query and key lengths agree
    same_length = symbols.dims_equal(qv.shape[1], cx.node.inputs[1].shape[1])
    if cx.contrib and (same_length or not is_causal):
        return _attention_contrib(cx, q, k, v, mask, h, scale, is_causal)
    split = cx.const([0, 0, h, -1], "int64", "heads")
    heads = [cx.emit("Transpose", [cx.emit("Reshape", [x, split])], perm=[0, 2, 1, 3]) for x in (q, k, v)]
    o = _attend_onnx(
        cx, *heads, mask, _mask_is_bool(cx, mask), rank=4, dtype=qv.dtype, scale=scale, is_causal=is_causal
    )
    merged = cx.emit("Transpose", [o], perm=[0, 2, 1, 3])
    return cx.emit("Reshape", [merged, cx.const([0, 0, -1], "int64", "merge")])


def _attention_contrib(cx, q, k, v, mask, heads: int, scale: float, is_causal: bool) -> str:
    """ONNX Runtime's fused MultiHeadAttention kernel; a mask becomes an additive [B|1, H|1, S, L] bias."""
    dtype = cx.node.inputs[0].dtype
    args = [q, k, v]
    if mask and cx.device == "cpu" and _per_key_bias(cx.node.inputs[3]):
        args[:2] = _keys_carry_bias(cx, q, k, mask, heads, scale, dtype)
    elif mask:
        mt = cx.node.inputs[3].type
        bias = mask
        if mt.dtype == "bool":
            bias = cx.emit("Where", [bias, cx.const(0.0, dtype, "zero"), cx.const(-np.inf, dtype, "neg_inf")])
        if mt.rank < 4:
            bias = cx.emit("Unsqueeze", [bias, cx.const(list(range(4 - mt.rank)), "int64", "axes")])
        seq = cx.emit("Shape", [q], start=1, end=2)
        kv_seq = cx.emit("Shape", [k], start=1, end=2)
        bias = cx.emit("Expand", [bias, cx.emit("Concat", [cx.const([1, 1], "int64", "ones"), seq, kv_seq], axis=0)])
        args += ["", "", bias]  # (bias, key_padding_mask) unused
    return cx.emit(
        "MultiHeadAttention",
        args,
        domain="com.microsoft",
        num_heads=heads,
        scale=float(scale),
        unidirectional=int(is_causal),
    )


def _per_key_bias(mask) -> bool:
    """An additive float mask [batch|1, 1, 1, keys]: one bias per key (ToMe's log sizes)."""
    return mask.dtype != "bool" and mask.type.rank == 4 and mask.shape[1] == 1 and mask.shape[2] == 1


def _keys_carry_bias(cx, q: str, k: str, bias: str, heads: int, scale: float, dtype: str) -> list[str]:
    """q' = [q_h, 1] and k' = [k_h, bias / scale] per head, so that scale * q'.k' = scale * q.k + bias. A
    [batch, 1, 1, keys] bias handed to MultiHeadAttention must be expanded over the queries, and the CPU
    kernel adding it took 40% longer (8.0 against 5.7 ms at 57 tokens, batch 256); one more head dim costs
    ~2%. CPU only: CUDA's fused attention kernels want head sizes that are multiples of 8."""
    split = cx.const([0, 0, heads, -1], "int64", "heads")
    qh, kh = (cx.emit("Reshape", [t, split]) for t in (q, k))

    def column(t: str, values: str) -> str:  # values broadcast to [batch, seq of t, heads, 1]
        shape = cx.emit(
            "Concat", [cx.emit("Shape", [t], start=0, end=2), cx.const([heads, 1], "int64", "shape")], axis=0
        )
        return cx.emit("Expand", [values, shape])

    ones = column(q, cx.const(np.ones((1, 1, 1, 1)), dtype, "one"))
    per_key = cx.emit(
        "Transpose", [cx.emit("Mul", [bias, cx.const(1.0 / scale, dtype, "inv_scale")])], perm=[0, 3, 1, 2]
    )
    key_col = column(k, per_key)
    flat = cx.const([0, 0, -1], "int64", "merge")
    return [
        cx.emit("Reshape", [cx.emit("Concat", [t, extra], axis=3), flat]) for t, extra in ((qh, ones), (kh, key_col))
    ]


@attention.tvm
def _(c, q, k, v, mask=None, num_heads=1, scale=None, is_causal=False):
    """Multi-head attention on [batch, seq, heads*dim]: split heads, attend, merge heads."""
    h = num_heads

    def heads(x, i):
        b, sq, e = c.in_type(i).shape
        x = c.emit(R.reshape(x, c.dims.shape([b, sq, h, e // h])))
        return c.emit(R.permute_dims(x, [0, 2, 1, 3]))

    qt = c.in_type(0)
    o = c.emit(
        _attend_tvm(
            c,
            heads(q, 0),
            heads(k, 1),
            heads(v, 2),
            mask,
            rank=4,
            dtype=qt.dtype,
            head_dim=qt.shape[-1] // h,
            lq=qt.shape[1],
            lk=c.in_type(1).shape[1],
            scale=scale,
            is_causal=is_causal,
            mask_dtype=c.in_type(3).dtype if mask is not None else None,
        )
    )
    o = c.emit(R.permute_dims(o, [0, 2, 1, 3]))
    return R.reshape(o, c.out_shape())
