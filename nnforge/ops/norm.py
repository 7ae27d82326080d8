"""Normalisations: layer_norm, rms_norm, batch_norm (inference, running statistics)."""

from __future__ import annotations

import numpy as np

from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop
from .common import R, float_only, torch


def _norm_infer(ts, attrs):
    float_only(ts[0], "norm")
    return [ts[0]]


def _last_axes(rank: int, naxes: int) -> list[int]:
    return list(range(rank - naxes, rank))


# -- layer_norm ----------------------------------------------------------------------------------


@defop("layer_norm", _norm_infer, attrs={"naxes": ("int", 1), "eps": ("float", 1e-5)}, num_inputs=(1, 3))
def layer_norm(x, w=None, b=None, naxes=1, eps=1e-5):
    """Normalise over the last ``naxes`` axes, then scale by w and shift by b."""
    axes = tuple(range(x.ndim - naxes, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


@layer_norm.torch
def _(cx, x, w=None, b=None, naxes=1, eps=1e-5):
    axes = _last_axes(x.dim(), naxes)
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    y = y * w if w is not None else y
    return y + b if b is not None else y


def _layer_norm_onnx_check(node, target: str) -> str | None:
    if (len(node.inputs) < 2 or node.inputs[1] is None) and not node.inputs[0].type.is_static:
        return "layer_norm without a weight needs static normalized dims"
    return None


@layer_norm.onnxrt(check=_layer_norm_onnx_check)
def _(cx, x, w=None, b=None, naxes=1, eps=1e-5):
    t = cx.node.inputs[0].type
    scale = w or cx.const(np.ones(t.shape[t.rank - naxes :], t.dtype), hint="ln_scale")
    return cx.emit("LayerNormalization", [x, scale] + ([b] if b else []), axis=-naxes, epsilon=float(eps))


@layer_norm.tvm
def _(c, x, w=None, b=None, naxes=1, eps=1e-5):
    t = c.in_type(0)
    axes = _last_axes(t.rank, naxes)
    nshape = [t.shape[a] for a in axes]
    if all(isinstance(d, int) for d in nshape):
        gamma = w if w is not None else c.const(np.ones(nshape), t.dtype)
        beta = b if b is not None else c.const(np.zeros(nshape), t.dtype)
        return R.nn.layer_norm(x, gamma, beta, axes, eps)
    mean = c.emit(R.mean(x, axes, keepdims=True))
    d = c.emit(R.subtract(x, mean))
    var = c.emit(R.mean(c.emit(R.multiply(d, d)), axes, keepdims=True))
    y = c.emit(R.multiply(d, c.emit(R.rsqrt(c.emit(R.add(var, c.const(eps, t.dtype)))))))
    if w is not None:
        y = c.emit(R.multiply(y, w))
    return R.add(y, b) if b is not None else y


# -- rms_norm ------------------------------------------------------------------------------------


@defop("rms_norm", _norm_infer, attrs={"naxes": ("int", 1), "eps": ("float", 1e-6)}, num_inputs=(1, 2))
def rms_norm(x, w=None, naxes=1, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) * w over the last ``naxes`` axes."""
    axes = tuple(range(x.ndim - naxes, x.ndim))
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    return y * w if w is not None else y


@rms_norm.torch
def _(cx, x, w=None, naxes=1, eps=1e-6):
    y = x / torch.sqrt((x * x).mean(_last_axes(x.dim(), naxes), keepdim=True) + eps)
    return y * w if w is not None else y


@rms_norm.onnxrt
def _(cx, x, w=None, naxes=1, eps=1e-6):
    # RMSNormalization is opset 23; spell it out: x / sqrt(mean(x^2) + eps) * w
    t = cx.node.inputs[0].type
    axes = cx.const(_last_axes(t.rank, naxes), "int64", "axes")
    ms = cx.emit("ReduceMean", [cx.emit("Mul", [x, x]), axes], keepdims=1)
    inv = cx.emit("Reciprocal", [cx.emit("Sqrt", [cx.emit("Add", [ms, cx.const(eps, t.dtype, "eps")])])])
    y = cx.emit("Mul", [x, inv])
    return cx.emit("Mul", [y, w]) if w else y


@rms_norm.tvm
def _(c, x, w=None, naxes=1, eps=1e-6):
    t = c.in_type(0)
    ms = c.emit(R.mean(c.emit(R.multiply(x, x)), _last_axes(t.rank, naxes), keepdims=True))
    y = c.emit(R.multiply(x, c.emit(R.rsqrt(c.emit(R.add(ms, c.const(eps, t.dtype)))))))
    return R.multiply(y, w) if w is not None else y


# -- batch_norm ----------------------------------------------------------------------------------


def _bn_infer(ts, attrs):
    x = ts[0]
    if x.rank < 2:
        raise OpError("batch_norm: input must have a channel axis (rank >= 2)")
    return [TensorType(x.shape, x.dtype)]


@defop("batch_norm", _bn_infer, attrs={"eps": ("float", 1e-5)}, num_inputs=(3, 5))
def batch_norm(x, mean, var, w=None, b=None, eps=1e-5):
    """Inference batch norm over axis 1 with running statistics."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y


@batch_norm.torch
def _(cx, x, mean, var, w=None, b=None, eps=1e-5):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    y = y * w.reshape(shape) if w is not None else y
    return y + b.reshape(shape) if b is not None else y


@batch_norm.onnxrt
def _(cx, x, mean, var, w=None, b=None, eps=1e-5):
    t, c = cx.node.inputs[0].type, cx.node.inputs[1].shape[0]
    scale = w or cx.const(np.ones([c], t.dtype), hint="bn_scale")
    bias = b or cx.const(np.zeros([c], t.dtype), hint="bn_bias")
    return cx.emit("BatchNormalization", [x, scale, bias, mean, var], epsilon=float(eps))


@batch_norm.tvm
def _(c, x, mean, var, w=None, b=None, eps=1e-5):
    """x * scale + shift: scale/shift depend on weights only, so they are lifted out to load time."""
    t = c.in_type(0)
    scale = c.emit(R.rsqrt(c.emit(R.add(var, c.const(eps, t.dtype)))))
    if w is not None:
        scale = c.emit(R.multiply(scale, w))
    shift = c.emit(R.negative(c.emit(R.multiply(mean, scale))))
    if b is not None:
        shift = c.emit(R.add(shift, b))
    bshape = [1, -1] + [1] * (t.rank - 2)
    return R.add(c.emit(R.multiply(x, c.emit(R.reshape(scale, bshape)))), c.emit(R.reshape(shift, bshape)))


# -- group_norm ----------------------------------------------------------------------------------


def _group_norm_infer(ts, attrs):
    x, g = ts[0], attrs["num_groups"]
    float_only(x, "group_norm")
    if x.rank < 2 or not isinstance(x.shape[1], int) or g < 1 or x.shape[1] % g:
        raise OpError(f"group_norm: {g} groups do not divide the channel axis of {x.shape}")
    return [x]


@defop(
    "group_norm", _group_norm_infer, attrs={"num_groups": ("int", REQUIRED), "eps": ("float", 1e-5)}, num_inputs=(1, 3)
)
def group_norm(x, w=None, b=None, num_groups=1, eps=1e-5):
    """Normalise each group of channels (axis 1) over its channels and spatial axes, then scale and shift
    per channel (torch.nn.GroupNorm)."""
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    mean = g.mean(axis=-1, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=-1, keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y.astype(x.dtype)


@group_norm.torch
def _(cx, x, w=None, b=None, num_groups=1, eps=1e-5):
    return torch.nn.functional.group_norm(x, num_groups, w, b, eps)


@group_norm.onnxrt
def _(cx, x, w=None, b=None, num_groups=1, eps=1e-5):
    # opset 20 has no per-channel GroupNormalization (21 has): instance-normalise [N, groups, rest], then affine
    t = cx.node.inputs[0].type
    grouped = cx.emit("Reshape", [x, cx.const([0, num_groups, -1], "int64", "groups")])
    ones, zeros = (cx.const(np.full([num_groups], v, t.dtype), hint="gn") for v in (1, 0))
    y = cx.emit(
        "Reshape", [cx.emit("InstanceNormalization", [grouped, ones, zeros], epsilon=float(eps)), cx.emit("Shape", [x])]
    )
    per_channel = cx.const([-1] + [1] * (t.rank - 2), "int64", "channel_shape")
    if w:
        y = cx.emit("Mul", [y, cx.emit("Reshape", [w, per_channel])])
    return cx.emit("Add", [y, cx.emit("Reshape", [b, per_channel])]) if b else y


@group_norm.tvm
def _(c, x, w=None, b=None, num_groups=1, eps=1e-5):
    t = c.in_type(0)
    ch = t.shape[1]
    gamma = w if w is not None else c.const(np.ones([ch]), t.dtype)
    beta = b if b is not None else c.const(np.zeros([ch]), t.dtype)
    return R.nn.group_norm(x, gamma, beta, num_groups, 1, list(range(2, t.rank)), eps)
