"""Spatial resizing: constant ``pad`` (negative pads crop) and ``upsample2d`` (nearest, bilinear) on NCHW."""

from __future__ import annotations

import numpy as np

from ..ir import symbols
from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop
from .common import F, R

# -- pad -------------------------------------------------------------------------------------------


def _pad_infer(ts, attrs):
    x, pads = ts[0], attrs["pads"]
    if len(pads) != 2 * x.rank:
        raise OpError(f"pad: {len(pads)} pads for rank {x.rank} (give begin pads, then end pads: 2 per axis)")
    shape = []
    for d, b, e in zip(x.shape, pads[: x.rank], pads[x.rank :]):
        n = d + b + e if isinstance(d, int) else symbols.from_sympy(symbols.to_sympy(d) + b + e)
        if isinstance(n, int) and n < 0:
            raise OpError(f"pad: pads {pads} crop more than the axis of size {d}")
        shape.append(n)
    return [TensorType(tuple(shape), x.dtype)]


def _crop_and_pad(pads, rank):
    """(crop slices, non-negative numpy pad widths) for ONNX-style ``pads`` that may be negative."""
    begin, end = pads[:rank], pads[rank:]
    crop = tuple(slice(max(-b, 0), (e if e < 0 else None)) for b, e in zip(begin, end))
    return crop, [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]


@defop("pad", _pad_infer, attrs={"pads": ("ints", REQUIRED), "value": ("float", 0.0)}, kind="shape")
def pad(x, pads, value=0.0):
    """Constant padding: ``pads`` are ONNX's [begin_0, ..., begin_n-1, end_0, ..., end_n-1]; a negative pad crops."""
    crop, widths = _crop_and_pad(pads, x.ndim)
    return np.pad(x[crop], widths, mode="constant", constant_values=np.asarray(value).astype(x.dtype))


@pad.torch
def _(cx, x, pads, value=0.0):
    r = x.dim()
    torch_pads = [p for a in reversed(range(r)) for p in (pads[a], pads[r + a])]  # torch: last axis first
    return F.pad(x, torch_pads, value=value)


@pad.onnxrt
def _(cx, x, pads, value=0.0):
    dt = cx.node.inputs[0].dtype
    return cx.emit("Pad", [x, cx.const(list(pads), "int64", "pads"), cx.const(value, dt, "pad_value")], mode="constant")


@pad.tvm
def _(c, x, pads, value=0.0):
    t = c.in_type(0)
    r = t.rank
    begin, end = pads[:r], pads[r:]
    crop = [(a, -b, (e if e < 0 else None)) for a, (b, e) in enumerate(zip(begin, end)) if b < 0 or e < 0]
    if crop:
        shape = c.dims.shape(t.shape)
        axes = [a for a, _, _ in crop]
        starts = [max(s, 0) for _, s, _ in crop]
        stops = [shape[a] + e if e is not None else shape[a] for a, _, e in crop]
        x = c.emit(R.strided_slice(x, axes, starts, stops, assume_inbound=True))
    widths = [w for b, e in zip(begin, end) for w in (max(b, 0), max(e, 0))]
    return R.nn.pad(x, widths, "constant", float(value)) if any(widths) else x


# -- upsample2d ------------------------------------------------------------------------------------


def _upsample_infer(ts, attrs):
    x = ts[0]
    if x.rank != 4:
        raise OpError(f"upsample2d: input must be NCHW (rank 4), got rank {x.rank}")
    if attrs["mode"] not in ("nearest", "linear"):
        raise OpError(f"upsample2d: mode {attrs['mode']!r} is not 'nearest' or 'linear'")
    if attrs["mode"] == "linear" and x.dtype not in ("float32", "float64", "float16"):
        raise OpError(f"upsample2d: linear mode needs a float input, got {x.dtype}")
    if not all(isinstance(d, int) for d in x.shape[2:]):
        raise OpError("upsample2d: the input's height and width must be static")
    h, w = attrs["size"]
    return [TensorType((x.shape[0], x.shape[1], h, w), x.dtype)]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch's upsample_nearest: source = floor(dst * in / out)."""
    return np.minimum((np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _linear_weights(n_in: int, n_out: int, align_corners: bool):
    """(i0, i1, weight of i1) per output position, as torch's upsample_bilinear2d."""
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
        src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


@defop(
    "upsample2d",
    _upsample_infer,
    attrs={"size": ("ints", REQUIRED), "mode": ("str", "nearest"), "align_corners": ("bool", False)},
)
def upsample2d(x, size, mode="nearest", align_corners=False):
    """Resize an NCHW tensor's height and width to ``size``: 'nearest' (torch's upsample_nearest2d) or
    'linear' (bilinear, torch's upsample_bilinear2d with or without align_corners)."""
    (h_in, w_in), (h, w) = x.shape[2:], size
    if mode == "nearest":
        return x[:, :, _nearest_index(h_in, h)][:, :, :, _nearest_index(w_in, w)]
    y = x.astype(np.float64)
    i0, i1, a = _linear_weights(h_in, h, align_corners)
    y = y[:, :, i0] * (1 - a)[:, None] + y[:, :, i1] * a[:, None]
    i0, i1, a = _linear_weights(w_in, w, align_corners)
    y = y[:, :, :, i0] * (1 - a) + y[:, :, :, i1] * a
    return y.astype(x.dtype)


@upsample2d.torch
def _(cx, x, size, mode="nearest", align_corners=False):
    if mode == "nearest":
        return F.interpolate(x, size=list(size), mode="nearest")
    return F.interpolate(x, size=list(size), mode="bilinear", align_corners=align_corners)


@upsample2d.onnxrt
def _(cx, x, size, mode="nearest", align_corners=False):
    sizes = cx.const(list(size), "int64", "sizes")
    if mode == "nearest":
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    else:
        attrs = dict(mode="linear", coordinate_transformation_mode="align_corners" if align_corners else "half_pixel")
    return cx.emit("Resize", [x, "", "", sizes], axes=[2, 3], **attrs)


@upsample2d.tvm
def _(c, x, size, mode="nearest", align_corners=False):
    if mode == "nearest":
        return R.image.resize2d(
            x,
            tuple(size),
            method="nearest_neighbor",
            coordinate_transformation_mode="asymmetric",
            rounding_method="floor",
        )
    ctm = "align_corners" if align_corners else "half_pixel"
    return R.image.resize2d(x, tuple(size), method="linear", coordinate_transformation_mode=ctm)
