"""ONNX converters for the indexing, padding, resizing and normalisation ops of the real architectures.

Each is a small function registered into ``nnforge.frontend.onnx.CONVERTERS`` (imported at the end of
that module): GatherElements, ScatterElements, GatherND, CumSum, TopK, Pad, Resize (nearest / linear on
NCHW height and width), InstanceNormalization, GroupNormalization, HardSwish, HardSigmoid. A form the IR has no op for
(exclusive or reversed CumSum, reflect padding, cubic resizing, ...) is refused with the attribute named.
"""

from __future__ import annotations

import numpy as np

from .onnx import CONVERTERS, _Unsupported


def _gather_elements(imp, n, args):
    return imp.op("gather_elements", args[0], args[1], axis=imp.attrs(n).get("axis", 0))


def _scatter_elements(imp, n, args):
    reduction = imp.attrs(n).get("reduction", "none")
    if reduction not in ("none", "add"):
        raise _Unsupported(f"reduction={reduction!r} (only 'none' and 'add' are mapped)")
    return imp.op("scatter_elements", *args[:3], axis=imp.attrs(n).get("axis", 0), reduction=reduction)


def _gather_nd(imp, n, args):
    """GatherND with batch_dims 0: x[ind[..., 0], ind[..., 1], ...], the IR's multi-tensor index."""
    x, ind = imp.value(args[0]), imp.value(args[1])
    if imp.attrs(n).get("batch_dims", 0):
        raise _Unsupported("batch_dims > 0")
    k = ind.shape[-1]
    if not isinstance(k, int):
        raise _Unsupported("an index tuple of symbolic length")
    last = len(ind.shape) - 1
    parts = [imp.op("squeeze", imp.op("slice", ind, axis=last, start=i, end=i + 1), axes=[last]) for i in range(k)]
    if k == 1:
        return imp.op("gather", x, parts[0], axis=0)
    return imp.op("index", x, *parts, axes=list(range(k)))


def _cumsum(imp, n, args):
    a = imp.attrs(n)
    if a.get("exclusive", 0) or a.get("reverse", 0):
        raise _Unsupported("exclusive or reverse CumSum")
    return imp.op("cumsum", args[0], axis=imp.ints(args[1], "CumSum axis")[0])


def _topk(imp, n, args):
    a = imp.attrs(n)
    if not a.get("sorted", 1):
        raise _Unsupported("unsorted TopK")
    attrs = {"k": imp.ints(args[1], "TopK k")[0], "axis": a.get("axis", -1), "largest": bool(a.get("largest", 1))}
    node = imp.g.make_node("topk", [imp.value(args[0])], attrs, name=imp._hint(), source=f"onnx node {n.name or '?'}")
    return list(imp.g.insert_node(node).outputs)


def _pad(imp, n, args):
    x = imp.value(args[0])
    mode = imp.attrs(n).get("mode", "constant")
    if mode != "constant":
        raise _Unsupported(f"mode={mode!r} (only constant padding is mapped)")
    pads = imp.ints(args[1], "Pad pads")
    value = imp.need_const(args[2], "Pad constant_value") if len(args) > 2 and args[2] is not None else 0
    rank = len(x.shape)
    if len(args) > 3 and args[3] is not None:  # pads for the listed axes only
        axes = [a % rank for a in imp.ints(args[3], "Pad axes")]
        full = [0] * (2 * rank)
        for i, a in enumerate(axes):
            full[a], full[rank + a] = pads[i], pads[len(axes) + i]
        pads = full
    if not any(pads):
        return x
    return imp.op("pad", x, pads=pads, value=float(np.asarray(value).reshape(-1)[0]) if np.size(value) else 0.0)


_RESIZE_MODES = {
    ("nearest", "asymmetric"): False,
    ("linear", "align_corners"): True,
    ("linear", "half_pixel"): False,
    ("linear", "pytorch_half_pixel"): False,  # half_pixel except for an output of size 1
}


def _resize(imp, n, args):
    """Resize of an NCHW tensor's height and width, in the forms torch's upsampling exports."""
    x = imp.value(args[0])
    a = imp.attrs(n)
    mode, ctm = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    if (mode, ctm) not in _RESIZE_MODES or (
        mode == "nearest" and a.get("nearest_mode", "round_prefer_floor") != "floor"
    ):
        raise _Unsupported(
            f"mode={mode!r} with coordinate_transformation_mode={ctm!r} (mapped: nearest asymmetric "
            "floor, linear align_corners / half_pixel)"
        )
    if len(x.shape) != 4 or not all(isinstance(d, int) for d in x.shape[2:]):
        raise _Unsupported("a Resize that is not of a static NCHW height and width")
    rank, axes = 4, [ax % 4 for ax in a.get("axes", [0, 1, 2, 3])]
    if len(args) > 3 and args[3] is not None:
        got = dict(zip(axes, imp.ints(args[3], "Resize sizes")))
        size = [got.get(ax, x.shape[ax]) for ax in range(rank)]
    else:
        scales = dict(zip(axes, np.asarray(imp.need_const(args[2], "Resize scales"), np.float64).reshape(-1)))
        size = [
            x.shape[ax] * scales.get(ax, 1.0) if isinstance(x.shape[ax], int) else x.shape[ax] for ax in range(rank)
        ]
        if any(isinstance(s, float) and not s.is_integer() for s in size):
            raise _Unsupported("scales that do not give whole output sizes")
        size = [int(s) if isinstance(s, float) else s for s in size]
    if size[:2] != list(x.shape[:2]):
        raise _Unsupported("a Resize of the batch or channel axis")
    return imp.op("upsample2d", x, size=size[2:], mode=mode, align_corners=_RESIZE_MODES[mode, ctm])


def _instance_norm(imp, n, args):
    """InstanceNormalization is a group norm with one channel per group."""
    x = imp.value(args[0])
    channels = x.shape[1] if len(x.shape) > 1 else None
    if not isinstance(channels, int):
        raise _Unsupported("InstanceNormalization over a symbolic channel axis")
    eps = imp.attrs(n).get("epsilon", 1e-5)
    return imp.op("group_norm", x, args[1], args[2], num_groups=channels, eps=eps)


def _group_norm(imp, n, args):
    """GroupNormalization (opset 21: scale and bias per channel) is the IR's group_norm. (Opset 18's per-group
    form is deprecated; onnx.checker refuses it before it gets here.)"""
    x = imp.value(args[0])
    a = imp.attrs(n)
    if len(x.shape) < 2 or args[1].shape[0] != x.shape[1]:
        raise _Unsupported("GroupNormalization whose scale is not per channel")
    return imp.op("group_norm", x, args[1], args[2], num_groups=a["num_groups"], eps=a.get("epsilon", 1e-5))


def _hardswish(imp, n, args):
    return imp.op("hardswish", args[0])


def _hardsigmoid(imp, n, args):
    """HardSigmoid is max(0, min(1, alpha * x + beta)); torch's form (1/6, 1/2) is the IR's hardsigmoid."""
    x = imp.value(args[0])
    a = imp.attrs(n)
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    if np.isclose(alpha, 1 / 6) and np.isclose(beta, 0.5):
        return imp.op("hardsigmoid", x)
    y = imp.op(
        "add", imp.op("mul", x, imp.constant(np.asarray(alpha, x.dtype))), imp.constant(np.asarray(beta, x.dtype))
    )
    return imp.op("clamp", y, min=0.0, max=1.0)


CONVERTERS.update(
    {
        "GatherElements": _gather_elements,
        "ScatterElements": _scatter_elements,
        "GatherND": _gather_nd,
        "CumSum": _cumsum,
        "TopK": _topk,
        "Pad": _pad,
        "Resize": _resize,
        "InstanceNormalization": _instance_norm,
        "GroupNormalization": _group_norm,
        "HardSwish": _hardswish,
        "HardSigmoid": _hardsigmoid,
    }
)
