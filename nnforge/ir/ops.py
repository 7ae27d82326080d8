"""The op registry: per op, its attribute schema, shape/dtype inference and a numpy reference.

Adding an op is one ``@register`` block here plus one lowering per backend. The numpy
reference implementations are the oracle every pass and backend is checked against, so
they favour obviousness over speed.
"""
from __future__ import annotations

import importlib
import math
from typing import Sequence

import numpy as np

from . import symbols
from .graph import TensorType
from .registry import REGISTRY, REQUIRED, OpDef, OpError, defop, get_op, infer_types  # noqa: F401
from .shapes import broadcast_shapes, conv_out as _conv_out, float_only as _float_only  # noqa: F401
from .shapes import norm_axis as _norm_axis, pair as _pair, same_dtype as _same_dtype  # noqa: F401



def register(name: str, infer, attrs=None, num_inputs=(1, 1), kind="compute", doc=""):
    """(legacy form of ``registry.defop``, while ops move to nnforge/ops: a decorator that returns the reference)"""
    def deco(ref):
        defop(name, infer, attrs, num_inputs, kind, doc, ref=ref)
        return ref

    return deco


# elementwise ops and reductions live in nnforge/ops (elementwise.py, reduce.py); the ops still here use
# their softmax reference and the one activation table, reached on first use (nnforge.ops imports this module)

def _family(name: str):
    return importlib.import_module(f"nnforge.ops.{name}")


def _softmax(x, axis=-1):
    return _family("reduce").softmax_ref(x, axis)


def __getattr__(name: str):
    """``ACTIVATIONS`` (legacy name): the one activation table, in nnforge/ops/elementwise.py."""
    if name == "ACTIVATIONS":
        return _family("elementwise").ACTIVATIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------
# linear algebra
# ---------------------------------------------------------------------------------------

def _matmul_infer(ts, attrs):
    a, b = ts
    dt = _same_dtype(ts, "matmul")
    if a.rank < 1 or b.rank < 1:
        raise OpError("matmul: scalars are not allowed")
    ash = a.shape if a.rank > 1 else (1,) + a.shape
    bsh = b.shape if b.rank > 1 else b.shape + (1,)
    if not symbols.dims_equal(ash[-1], bsh[-2]) and isinstance(ash[-1], int) and isinstance(bsh[-2], int):
        raise OpError(f"matmul: inner dimensions differ: {a.shape} @ {b.shape}")
    batch = broadcast_shapes(ash[:-2], bsh[:-2], "matmul")
    out = batch + ((ash[-2],) if a.rank > 1 else ()) + ((bsh[-1],) if b.rank > 1 else ())
    return [TensorType(out, dt)]


@register("matmul", _matmul_infer, num_inputs=(2, 2))
def _matmul(a, b):
    return np.matmul(a, b)


def _linear_infer(ts, attrs):
    x, w = ts[0], ts[1]
    b = ts[2] if len(ts) > 2 else None
    _same_dtype([x, w, b], "linear")
    if w.rank != 2:
        raise OpError(f"linear: weight must be 2-D [out, in], got {w.shape}")
    if isinstance(x.shape[-1], int) and isinstance(w.shape[1], int) and x.shape[-1] != w.shape[1]:
        raise OpError(f"linear: input features {x.shape[-1]} != weight in-features {w.shape[1]}")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


@register("linear", _linear_infer, num_inputs=(2, 3), doc="y = x @ w.T + b, w is [out, in]")
def _linear(x, w, b=None):
    y = np.matmul(x, w.T)
    return y + b if b is not None else y


def _conv_infer(ts, attrs):
    x, w = ts[0], ts[1]
    _same_dtype(ts, "conv2d")
    if x.rank != 4 or w.rank != 4:
        raise OpError(f"conv2d: expects NCHW input and OIHW weight, got {x.shape} and {w.shape}")
    g = attrs["groups"]
    if isinstance(x.shape[1], int) and x.shape[1] != w.shape[1] * g:
        raise OpError(f"conv2d: input channels {x.shape[1]} != weight channels {w.shape[1]} x groups {g}")
    s, p, d = _pair(attrs["stride"]), _pair(attrs["padding"]), _pair(attrs["dilation"])
    h = _conv_out(x.shape[2], w.shape[2], s[0], p[0], d[0])
    wd = _conv_out(x.shape[3], w.shape[3], s[1], p[1], d[1])
    return [TensorType((x.shape[0], w.shape[0], h, wd), x.dtype)]


def _windows(x, kh, kw, s, d):
    """[N,C,H,W] (already padded) -> [N,C,OH,OW,kh,kw] strided view of the sliding windows."""
    v = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1), axis=(2, 3))
    return v[:, :, :: s[0], :: s[1], :: d[0], :: d[1]]


@register("conv2d", _conv_infer, num_inputs=(2, 3),
          attrs={"stride": ("ints", [1, 1]), "padding": ("ints", [0, 0]), "dilation": ("ints", [1, 1]), "groups": ("int", 1)})
def _conv2d(x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    win = _windows(xp, w.shape[2], w.shape[3], s, d)  # N,C,OH,OW,kh,kw
    n, c = x.shape[:2]
    cg, og = c // groups, w.shape[0] // groups
    outs = []
    for gi in range(groups):
        wg = w[gi * og:(gi + 1) * og]
        outs.append(np.einsum("nchwij,ocij->nohw", win[:, gi * cg:(gi + 1) * cg], wg, optimize=True))
    y = np.concatenate(outs, axis=1)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y.astype(x.dtype)


_POOL_ATTRS = {"kernel": ("ints", REQUIRED), "stride": ("ints", REQUIRED), "padding": ("ints", [0, 0]),
               "ceil_mode": ("bool", False)}


def _pool_infer(ts, attrs):
    x = ts[0]
    if x.rank != 4:
        raise OpError(f"pool2d: expects NCHW input, got {x.shape}")
    k, s, p = _pair(attrs["kernel"]), _pair(attrs["stride"]), _pair(attrs["padding"])
    d = _pair(attrs.get("dilation", [1, 1]))
    h = _conv_out(x.shape[2], k[0], s[0], p[0], d[0], attrs["ceil_mode"])
    w = _conv_out(x.shape[3], k[1], s[1], p[1], d[1], attrs["ceil_mode"])
    return [TensorType((x.shape[0], x.shape[1], h, w), x.dtype)]


def _pool_pad(x, k, s, p, d, ceil_mode, value):
    oh = _conv_out(x.shape[2], k[0], s[0], p[0], d[0], ceil_mode)
    ow = _conv_out(x.shape[3], k[1], s[1], p[1], d[1], ceil_mode)
    extra_h = max(0, (oh - 1) * s[0] + d[0] * (k[0] - 1) + 1 - (x.shape[2] + 2 * p[0]))
    extra_w = max(0, (ow - 1) * s[1] + d[1] * (k[1] - 1) + 1 - (x.shape[3] + 2 * p[1]))
    return np.pad(x, ((0, 0), (0, 0), (p[0], p[0] + extra_h), (p[1], p[1] + extra_w)), constant_values=value)


@register("max_pool2d", _pool_infer, attrs={**_POOL_ATTRS, "dilation": ("ints", [1, 1])})
def _max_pool2d(x, kernel, stride, padding=(0, 0), ceil_mode=False, dilation=(1, 1)):
    k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    xp = _pool_pad(x, k, s, p, d, ceil_mode, -np.inf)
    return _windows(xp, k[0], k[1], s, d).max(axis=(-2, -1))


@register("avg_pool2d", _pool_infer, attrs={**_POOL_ATTRS, "count_include_pad": ("bool", True)})
def _avg_pool2d(x, kernel, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True):
    k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), [1, 1]
    xp = _pool_pad(x, k, s, p, d, ceil_mode, 0.0)
    total = _windows(xp, k[0], k[1], s, d).sum(axis=(-2, -1))
    # the divisor counts padding only when asked, and never the ceil-mode overhang (as torch)
    ones = _pool_pad(np.ones((1, 1) + x.shape[2:], x.dtype), k, s, p, d, ceil_mode, 0.0)
    if count_include_pad:
        ones[:, :, : x.shape[2] + 2 * p[0], : x.shape[3] + 2 * p[1]] = 1
    count = _windows(ones, k[0], k[1], s, d).sum(axis=(-2, -1))
    return (total / count).astype(x.dtype)


def _adaptive_infer(ts, attrs):
    x = ts[0]
    if x.rank != 4:
        raise OpError(f"adaptive_avg_pool2d: expects NCHW input, got {x.shape}")
    oh, ow = _pair(attrs["output_size"])
    return [TensorType((x.shape[0], x.shape[1], oh, ow), x.dtype)]


@register("adaptive_avg_pool2d", _adaptive_infer, attrs={"output_size": ("ints", REQUIRED)})
def _adaptive_avg_pool2d(x, output_size):
    oh, ow = _pair(output_size)
    h, w = x.shape[2:]
    out = np.empty(x.shape[:2] + (oh, ow), x.dtype)
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------

def _sdpa_infer(ts, attrs):
    q, k, v = ts[:3]
    _same_dtype([q, k, v], "sdpa")
    _float_only(q, "sdpa")
    if q.rank < 2 or k.rank != q.rank or v.rank != q.rank:
        raise OpError(f"sdpa: q, k, v must share a rank >= 2, got {q.shape}, {k.shape}, {v.shape}")
    if len(ts) > 3 and ts[3] is not None and ts[3].dtype not in ("bool", q.dtype):
        raise OpError(f"sdpa: mask must be bool or {q.dtype}, got {ts[3].dtype}")
    batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], "sdpa")
    return [TensorType(batch + (q.shape[-2], v.shape[-1]), q.dtype)]


@register("sdpa", _sdpa_infer, num_inputs=(3, 4), attrs={"is_causal": ("bool", False), "scale": ("optional_float", None)},
          doc="softmax(q @ k^T * scale + mask) @ v; a bool mask is True where attention is allowed")
def _sdpa(q, k, v, mask=None, is_causal=False, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * np.asarray(scale, q.dtype)
    if is_causal:
        lq, lk = s.shape[-2:]
        s = np.where(np.tril(np.ones((lq, lk), bool)), s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    return np.matmul(_softmax(s, -1), v)


# ---------------------------------------------------------------------------------------
# fused ops that passes create
# ---------------------------------------------------------------------------------------

def _linear_act_infer(ts, attrs):
    acts = _family("elementwise").ACTIVATIONS
    if attrs["act"] not in acts:
        raise OpError(f"unknown activation {attrs['act']!r}; choose from {sorted(acts)}")
    return _linear_infer(ts, attrs)


@register("linear_act", _linear_act_infer, num_inputs=(2, 3), attrs={"act": ("str", "none")}, kind="fused",
          doc="act(x @ w.T + b): a linear layer with its bias and activation fused")
def _linear_act(x, w, b=None, act="none"):
    return _family("elementwise").ACTIVATIONS[act](_linear(x, w, b))


def _attention_infer(ts, attrs):
    q, k, v = ts[:3]
    _same_dtype([q, k, v], "attention")
    _float_only(q, "attention")
    h = attrs["num_heads"]
    if q.rank != 3 or k.rank != 3 or v.rank != 3:
        raise OpError(f"attention: q, k, v must be [batch, seq, heads*dim], got {q.shape}, {k.shape}, {v.shape}")
    for t in (q, k, v):
        if not isinstance(t.shape[-1], int) or t.shape[-1] % h:
            raise OpError(f"attention: hidden size {t.shape[-1]} is not a multiple of num_heads={h}")
    if len(ts) > 3 and ts[3] is not None and ts[3].dtype not in ("bool", q.dtype):
        raise OpError(f"attention: mask must be bool or {q.dtype}, got {ts[3].dtype}")
    return [TensorType(q.shape[:2] + (v.shape[-1],), q.dtype)]


@register("attention", _attention_infer, num_inputs=(3, 4), kind="fused",
          attrs={"num_heads": ("int", REQUIRED), "scale": ("optional_float", None), "is_causal": ("bool", False)},
          doc="multi-head attention on [batch, seq, heads*dim] tensors; the mask broadcasts to [batch, heads, q, k]")
def _attention(q, k, v, mask=None, num_heads=1, scale=None, is_causal=False):
    def heads(t):
        b, s, e = t.shape
        return t.reshape(b, s, num_heads, e // num_heads).transpose(0, 2, 1, 3)

    o = _sdpa(heads(q), heads(k), heads(v), mask, is_causal=is_causal, scale=scale)
    b, h, s, d = o.shape
    return o.transpose(0, 2, 1, 3).reshape(b, s, h * d)

