"""Convolution and pooling on NCHW tensors: conv2d, max_pool2d, avg_pool2d, adaptive_avg_pool2d.

TVM: conv2d is im2col (one gather kernel, padding inlined) + a matmul written as one TE reduction into NCHW,
so it gets the CPU matmul schedule and its bias/batch-norm/activation fuse into it; 3x3 stride-1 convolutions
on CPU targets are Winograd F(2x2, 3x3) instead (backends/tvm_winograd.py), depthwise ones (groups == input
channels) a direct kernel (backends/tvm_depthwise.py). A 1-D convolution arrives as a height-1 conv2d. Max pooling propagates NaN as
torch does on both backends (TVM's max and ONNX Runtime's MaxPool would drop it). ceil_mode follows the IR
(torch): a last window that would start in the right padding is dropped; ONNX pools that cannot match
that are reported by the support check (``_pool_check``), as are uneven adaptive pools (``_adaptive_check``).
"""

from __future__ import annotations

import functools

import numpy as np

from ..ir import symbols
from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop
from .common import F, LazyModule, R, conv_out, pair, same_dtype
from .elementwise import is_float
from .reduce import onnx_nan_mask, onnx_nan_where, tvm_nan_if_any

_onnx = LazyModule("onnx")  # TensorProto
_tvm_winograd = LazyModule("nnforge.backends.tvm_winograd")  # 3x3 stride-1 convolutions on CPUs
_tvm_depthwise = LazyModule("nnforge.backends.tvm_depthwise")  # groups == channels, on CPUs


def _windows(x, kh, kw, s, d):
    """[N,C,H,W] (already padded) -> [N,C,OH,OW,kh,kw] strided view of the sliding windows."""
    v = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1), axis=(2, 3))
    return v[:, :, :: s[0], :: s[1], :: d[0], :: d[1]]


def _pads(p) -> list[int]:
    """ONNX pads (top, left, bottom, right) for symmetric IR padding."""
    p = pair(p)
    return [p[0], p[1], p[0], p[1]]


# -- conv2d ---------------------------------------------------------------------------------------------


def _conv_infer(ts, attrs):
    x, w = ts[0], ts[1]
    same_dtype(ts, "conv2d")
    if x.rank != 4 or w.rank != 4:
        raise OpError(f"conv2d: expects NCHW input and OIHW weight, got {x.shape} and {w.shape}")
    g = attrs["groups"]
    if isinstance(x.shape[1], int) and x.shape[1] != w.shape[1] * g:
        raise OpError(f"conv2d: input channels {x.shape[1]} != weight channels {w.shape[1]} x groups {g}")
    s, p, d = pair(attrs["stride"]), pair(attrs["padding"]), pair(attrs["dilation"])
    h = conv_out(x.shape[2], w.shape[2], s[0], p[0], d[0])
    wd = conv_out(x.shape[3], w.shape[3], s[1], p[1], d[1])
    return [TensorType((x.shape[0], w.shape[0], h, wd), x.dtype)]


@defop(
    "conv2d",
    _conv_infer,
    num_inputs=(2, 3),
    attrs={"stride": ("ints", [1, 1]), "padding": ("ints", [0, 0]), "dilation": ("ints", [1, 1]), "groups": ("int", 1)},
)
def conv2d(x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """2-D cross-correlation, NCHW input and OIHW weight (as torch.nn.functional.conv2d)."""
    s, p, d = pair(stride), pair(padding), pair(dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    win = _windows(xp, w.shape[2], w.shape[3], s, d)  # N,C,OH,OW,kh,kw
    n, c = x.shape[:2]
    cg, og = c // groups, w.shape[0] // groups
    outs = []
    for gi in range(groups):
        wg = w[gi * og : (gi + 1) * og]
        outs.append(np.einsum("nchwij,ocij->nohw", win[:, gi * cg : (gi + 1) * cg], wg, optimize=True))
    y = np.concatenate(outs, axis=1)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y.astype(x.dtype)


@conv2d.torch
def _(cx, x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    return F.conv2d(x, w, b, pair(stride), pair(padding), pair(dilation), groups)


@conv2d.onnxrt
def _(cx, x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    kh, kw = cx.node.inputs[1].shape[2:]
    return cx.emit(
        "Conv",
        [i for i in (x, w, b) if i],
        kernel_shape=[kh, kw],
        strides=pair(stride),
        pads=_pads(padding),
        dilations=pair(dilation),
        group=groups,
    )


@conv2d.tvm
def conv2d_tvm(c, x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, weight_shape=None):
    """Convolution as im2col + matmul: [G, O/G, C/G*kh*kw] @ [N, G, C/G*kh*kw, OH*OW].

    TVM has no untuned schedule for direct convolution on CPUs (naive loops, ~10x slower than
    ONNX Runtime); as a matmul it gets the register-blocked matmul schedule (and dlight's GPU
    matmul rule on CUDA). The patches come from one gather kernel with the zero padding inlined;
    a 1x1 stride-1 convolution reads its input as it is. ``weight_shape``: [O, C/G, kh, kw] when the
    node's weight input is not that tensor (qconv2d's codes).
    """
    xt, ot = c.in_type(0), c.out_type()
    o, cg, kh, kw = weight_shape or c.in_type(1).shape
    s, p, d, g = pair(stride), pair(padding), pair(dilation), groups
    if not (isinstance(kh, int) and isinstance(kw, int) and isinstance(xt.shape[1], int)):
        return _conv2d_direct(c, x, w, b, s, p, d, g)
    n, cin, h, wd = xt.shape
    oh, ow = ot.shape[2], ot.shape[3]
    dims = c.dims
    if weight_shape is None and _tvm_depthwise.applies(c.target, xt, (o, cg, kh, kw), g):
        return _tvm_depthwise.conv2d(c, x, w, b, s, p, d)
    if weight_shape is None and _tvm_winograd.applies(c.target, xt, (kh, kw), s, p, d, g):
        return _tvm_winograd.conv2d_3x3(c, x, w, b, p)
    if kh == kw == 1 and s == [1, 1] and not any(p):
        cols = x  # a 1x1 convolution reads the input as it is
    else:
        cols = c.bb.emit_te(_im2col, x, kh, kw, s, p, d, dims(oh), dims(ow), primfunc_name_hint="im2col")
    pix = dims(symbols.mul(oh, ow))
    if g == 1:
        # one TE reduction writing NCHW directly: the bias, batch norm and activation that follow
        # are elementwise on its output and fuse into the same kernel (a reshape in between would
        # stop Relax's FuseOps)
        cols = c.emit(R.reshape(cols, [dims(n), cg * kh * kw, pix]))
        wm = c.emit(R.reshape(w, [o, cg * kh * kw]))
        y = c.bb.emit_te(_conv_as_matmul, wm, cols, dims(oh), dims(ow), primfunc_name_hint="conv2d_mm")
        if b is not None:
            y = c.emit(R.add(y, c.emit(R.reshape(b, [1, o, 1, 1]))))
        return y
    cols = c.emit(R.reshape(cols, [dims(n), g, cg * kh * kw, pix]))
    wm = c.emit(R.reshape(w, [g, o // g, cg * kh * kw]))
    y = c.emit(R.matmul(wm, cols))  # [N, G, O/G, OH*OW]
    if b is not None:
        y = c.emit(R.add(y, c.emit(R.reshape(b, [g, o // g, 1]))))
    return R.reshape(y, c.out_shape())


def _im2col(x, kh, kw, s, p, d, oh, ow):
    """[N, C, H, W] -> [N, C, kh, kw, OH, OW] patches, zero outside the input (padding inlined)."""
    from tvm import te, tirx

    n, cin, h, w = x.shape

    def f(b, ch, i, j, y, xx):
        r = y * s[0] + i * d[0] - p[0]
        q = xx * s[1] + j * d[1] - p[1]
        if not any(p):
            return x[b, ch, r, q]
        inside = tirx.all(r >= 0, r < h, q >= 0, q < w)
        return tirx.if_then_else(inside, x[b, ch, tirx.max(r, 0), tirx.max(q, 0)], tirx.const(0, x.dtype))

    return te.compute((n, cin, kh, kw, oh, ow), f, name="im2col")


def _conv_as_matmul(wm, cols, oh, ow):
    """out[n, o, y, x] = sum_k wm[o, k] * cols[n, k, y * OW + x] (a matmul over im2col columns).

    A unit output axis (a 1-D convolution is a height-1 2-D one) is left out of the column index:
    ``y * OW + x`` with y always 0 made one buffer axis hold two loop variables, which CPUMatmul's
    trait detection refuses, and the kernel ran as naive loops (Whisper's stem 40x slower than ORT)."""
    from tvm import te

    n, ck, pix = cols.shape
    o = wm.shape[0]
    k = te.reduce_axis((0, ck), name="k")

    def column(y, x):
        if isinstance(oh, int) and oh == 1:
            return x
        if isinstance(ow, int) and ow == 1:
            return y
        return y * ow + x

    return te.compute(
        (n, o, oh, ow), lambda b, oc, y, x: te.sum(wm[oc, k] * cols[b, k, column(y, x)], axis=k), name="conv2d_mm"
    )


def _conv2d_direct(c, x, w, b, stride, padding, dilation, groups):
    y = R.nn.conv2d(x, w, strides=stride, padding=padding, dilation=dilation, groups=groups)
    if b is None:
        return y
    return R.add(c.emit(y), c.emit(R.reshape(b, [1, -1, 1, 1])))


# -- max_pool2d, avg_pool2d -----------------------------------------------------------------------------

_POOL_ATTRS = {
    "kernel": ("ints", REQUIRED),
    "stride": ("ints", REQUIRED),
    "padding": ("ints", [0, 0]),
    "ceil_mode": ("bool", False),
}


def _pool_infer(ts, attrs):
    x = ts[0]
    if x.rank != 4:
        raise OpError(f"pool2d: expects NCHW input, got {x.shape}")
    k, s, p = pair(attrs["kernel"]), pair(attrs["stride"]), pair(attrs["padding"])
    d = pair(attrs.get("dilation", [1, 1]))
    h = conv_out(x.shape[2], k[0], s[0], p[0], d[0], attrs["ceil_mode"])
    w = conv_out(x.shape[3], k[1], s[1], p[1], d[1], attrs["ceil_mode"])
    return [TensorType((x.shape[0], x.shape[1], h, w), x.dtype)]


def _pool_pad(x, k, s, p, d, ceil_mode, value):
    oh = conv_out(x.shape[2], k[0], s[0], p[0], d[0], ceil_mode)
    ow = conv_out(x.shape[3], k[1], s[1], p[1], d[1], ceil_mode)
    extra_h = max(0, (oh - 1) * s[0] + d[0] * (k[0] - 1) + 1 - (x.shape[2] + 2 * p[0]))
    extra_w = max(0, (ow - 1) * s[1] + d[1] * (k[1] - 1) + 1 - (x.shape[3] + 2 * p[1]))
    return np.pad(x, ((0, 0), (0, 0), (p[0], p[0] + extra_h), (p[1], p[1] + extra_w)), constant_values=value)


def _pool_plan(n):
    """(pads, ceil_mode) for ONNX, or a reason string.

    ONNX's ceil_mode keeps a last window that starts in the right padding; the IR (like torch)
    drops it. Where they differ, floor mode with extra right padding gives the IR's windows; that
    is exact for max and for averages that do not count padding. (ORT, like torch, leaves the
    overhang past the padding out of an average's divisor, so agreeing cases keep ceil_mode.)
    """
    a = n.attrs
    k, s, p = pair(a["kernel"]), pair(a["stride"]), pair(a["padding"])
    d = pair(a.get("dilation", [1, 1]))
    if not a["ceil_mode"]:
        return _pads(p), 0
    end, differs = list(p), False
    for i, size in enumerate(n.inputs[0].shape[2:]):
        if not isinstance(size, int):
            return "ceil_mode with a symbolic spatial dim"
        eff = d[i] * (k[i] - 1) + 1
        onnx_out = -(-(size + 2 * p[i] - eff) // s[i]) + 1
        out = onnx_out - 1 if (onnx_out - 1) * s[i] >= size + p[i] else onnx_out  # the IR drops it
        differs |= out != onnx_out
        end[i] += max(0, (out - 1) * s[i] + eff - (size + 2 * p[i]))  # floor mode then yields `out`
    if not differs:
        return _pads(p), 1
    if n.op == "avg_pool2d" and a["count_include_pad"]:  # extra padding would count in the divisor
        return "ceil_mode drops a window ONNX keeps, with count_include_pad"
    return [p[0], p[1], end[0], end[1]], 0


def _pool_check(node, target: str) -> str | None:
    plan = _pool_plan(node)
    return plan if isinstance(plan, str) else None


def _pool_padding(c, k, s, p, d, ceil_mode):
    """TVM: (top, left, bottom, right) padding that realises ceil_mode exactly as the IR (torch) does."""
    xt, ot = c.in_type(0), c.out_type()
    pads = [p[0], p[1], p[0], p[1]]
    if not ceil_mode:
        return pads, [0, 0]
    extra = []
    for ax in (0, 1):
        size, out = xt.shape[2 + ax], ot.shape[2 + ax]
        if not (isinstance(size, int) and isinstance(out, int)):
            return None, None
        extra.append(max(0, (out - 1) * s[ax] + d[ax] * (k[ax] - 1) + 1 - (size + 2 * p[ax])))
    return [p[0], p[1], p[0] + extra[0], p[1] + extra[1]], extra


@defop("max_pool2d", _pool_infer, attrs={**_POOL_ATTRS, "dilation": ("ints", [1, 1])})
def max_pool2d(x, kernel, stride, padding=(0, 0), ceil_mode=False, dilation=(1, 1)):
    """Window maximum; padding is -inf, a window holding NaN gives NaN (as torch)."""
    k, s, p, d = pair(kernel), pair(stride), pair(padding), pair(dilation)
    xp = _pool_pad(x, k, s, p, d, ceil_mode, -np.inf)
    return _windows(xp, k[0], k[1], s, d).max(axis=(-2, -1))


@max_pool2d.torch
def _(cx, x, kernel, stride, padding=(0, 0), ceil_mode=False, dilation=(1, 1)):
    return F.max_pool2d(x, pair(kernel), pair(stride), pair(padding), pair(dilation), ceil_mode)


@max_pool2d.onnxrt(check=_pool_check)
def _(cx, x, kernel, stride, padding=(0, 0), ceil_mode=False, dilation=(1, 1)):
    xv, dtype = cx.node.inputs[0], cx.node.output.dtype
    pads, ceil = _pool_plan(cx.node)
    pool = dict(kernel_shape=pair(kernel), strides=pair(stride), pads=pads, dilations=pair(dilation), ceil_mode=ceil)
    if not is_float(xv.dtype):
        return cx.emit("MaxPool", [x], **pool)
    if _never_neg_inf(xv) and xv.dtype == "float32" and ceil == 0 and isinstance(xv.shape[1], int):
        return _max_pool2d_nan_probe(cx, x, xv.shape[1], pool)
    # MaxPool also turns a window of only -Inf into the dtype's lowest finite value: keep -Inf there
    ninf = cx.const(-np.inf, dtype, "ninf")
    above = cx.emit("MaxPool", [cx.emit("Cast", [cx.emit("Greater", [x, ninf])], to=_onnx.TensorProto.FLOAT)], **pool)
    y = cx.emit(
        "Where", [cx.emit("Greater", [above, cx.const(0.0, "float32", "zero")]), cx.emit("MaxPool", [x], **pool), ninf]
    )
    return onnx_nan_where(cx, cx.emit("MaxPool", [onnx_nan_mask(cx, x)], **pool), y, dtype)


def _never_neg_inf(v) -> bool:
    """True when v is a relu output (never -Inf; NaN stays NaN)."""
    return v.producer is not None and v.producer.op == "relu"


def _max_pool2d_nan_probe(cx, x: str, channels: int, pool: dict) -> str:
    """MaxPool plus a NaN probe made of convolutions only, so ONNX Runtime keeps it all in its NCHWc layout.

    With no -Inf in the input, a window's sum is NaN exactly when the window holds a NaN; tanh maps
    the sum to [-1, 1] or NaN and a zero 1x1 depthwise conv turns that into 0 or NaN, added to MaxPool
    (which skips NaN). ORT fuses the tanh and the add into the convolutions.
    """
    k = pool["kernel_shape"]
    probe = cx.const(np.ones([channels, 1] + k, np.float32), hint="nan_probe")
    keep = cx.const(np.zeros([channels, 1, 1, 1], np.float32), hint="nan_keep")
    sums = cx.emit(
        "Conv",
        [x, probe],
        kernel_shape=k,
        strides=pool["strides"],
        pads=pool["pads"],
        dilations=pool["dilations"],
        group=channels,
    )
    nan = cx.emit("Conv", [cx.emit("Tanh", [sums]), keep], kernel_shape=[1, 1], group=channels)
    return cx.emit("Add", [nan, cx.emit("MaxPool", [x], **pool)])


@max_pool2d.tvm
def _(c, x, kernel, stride, padding=(0, 0), ceil_mode=False, dilation=(1, 1)):
    k, s, p, d = pair(kernel), pair(stride), pair(padding), pair(dilation)
    pads, _ = _pool_padding(c, k, s, p, d, ceil_mode)
    if pads is None:  # symbolic spatial dims: trust TVM's ceil_mode
        pool = lambda t: R.nn.max_pool2d(t, k, s, p, d, ceil_mode=True)  # noqa: E731
        return tvm_nan_if_any(c, x, c.emit(pool(x)), pool)
    if not is_float(c.in_type(0).dtype):
        return R.nn.max_pool2d(x, k, s, pads, d, ceil_mode=False)
    _, _, oh, ow = c.out_shape()
    return c.bb.emit_te(_max_pool_nan, x, k, s, pads[:2], d, oh, ow, primfunc_name_hint="max_pool2d")


def _max_pool_nan(x, k, s, top_left, d, oh, ow):
    """Max pool whose window maximum is NaN when the window holds one (torch's), in one kernel. The
    window is written out term by term, without a reduction axis, so the kernel is elementwise: the
    loop along the output row is innermost and vectorises. (TVM's max would drop a NaN; a second pool
    over isnan flags cost two more kernels, 0.2 ms on ResNet-18's stem.)"""
    from tvm import te, tirx

    n, ch, h, w = x.shape

    def window_max(b, cc, i, j):
        values = []
        for u in range(k[0]):
            for v in range(k[1]):
                r, q = i * s[0] + u * d[0] - top_left[0], j * s[1] + v * d[1] - top_left[1]
                inside = tirx.all(r >= 0, r < h, q >= 0, q < w)
                values.append(
                    tirx.if_then_else(inside, x[b, cc, tirx.max(r, 0), tirx.max(q, 0)], tirx.min_value(x.dtype))
                )
        return tirx.Select(
            tirx.any(*[tirx.isnan(v) for v in values]), tirx.const(np.nan, x.dtype), functools.reduce(tirx.max, values)
        )

    return te.compute((n, ch, oh, ow), window_max, name="max_pool2d")


@defop("avg_pool2d", _pool_infer, attrs={**_POOL_ATTRS, "count_include_pad": ("bool", True)})
def avg_pool2d(x, kernel, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True):
    """Window mean; the divisor counts padding only when asked, and never the ceil-mode overhang (as torch)."""
    k, s, p, d = pair(kernel), pair(stride), pair(padding), [1, 1]
    xp = _pool_pad(x, k, s, p, d, ceil_mode, 0.0)
    total = _windows(xp, k[0], k[1], s, d).sum(axis=(-2, -1))
    ones = _pool_pad(np.ones((1, 1) + x.shape[2:], x.dtype), k, s, p, d, ceil_mode, 0.0)
    if count_include_pad:
        ones[:, :, : x.shape[2] + 2 * p[0], : x.shape[3] + 2 * p[1]] = 1
    count = _windows(ones, k[0], k[1], s, d).sum(axis=(-2, -1))
    return (total / count).astype(x.dtype)


@avg_pool2d.torch
def _(cx, x, kernel, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True):
    return F.avg_pool2d(x, pair(kernel), pair(stride), pair(padding), ceil_mode, count_include_pad)


@avg_pool2d.onnxrt(check=_pool_check)
def _(cx, x, kernel, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True):
    pads, ceil = _pool_plan(cx.node)
    return cx.emit(
        "AveragePool",
        [x],
        kernel_shape=pair(kernel),
        strides=pair(stride),
        pads=pads,
        ceil_mode=ceil,
        count_include_pad=int(count_include_pad),
    )


@avg_pool2d.tvm
def _(c, x, kernel, stride, padding=(0, 0), ceil_mode=False, count_include_pad=True):
    k, s, p = pair(kernel), pair(stride), pair(padding)
    pads, extra = _pool_padding(c, k, s, p, [1, 1], ceil_mode)
    if pads is None:
        return R.nn.avg_pool2d(x, k, s, p, ceil_mode=True, count_include_pad=count_include_pad)
    if count_include_pad and any(extra) and any(p):
        # the divisor counts the explicit padding but never the ceil-mode overhang: pad first, then
        # pool without counting what lies outside the padded input
        x = c.emit(R.nn.pad(x, [0, 0, 0, 0, p[0], p[0], p[1], p[1]], pad_value=0.0))
        return R.nn.avg_pool2d(x, k, s, [0, 0, extra[0], extra[1]], count_include_pad=False)
    return R.nn.avg_pool2d(x, k, s, pads, count_include_pad=count_include_pad and not any(extra))


# -- adaptive_avg_pool2d --------------------------------------------------------------------------------


def _adaptive_infer(ts, attrs):
    x = ts[0]
    if x.rank != 4:
        raise OpError(f"adaptive_avg_pool2d: expects NCHW input, got {x.shape}")
    oh, ow = pair(attrs["output_size"])
    return [TensorType((x.shape[0], x.shape[1], oh, ow), x.dtype)]


@defop("adaptive_avg_pool2d", _adaptive_infer, attrs={"output_size": ("ints", REQUIRED)})
def adaptive_avg_pool2d(x, output_size):
    """Mean over output_size windows spread evenly over H and W (windows may overlap, as torch)."""
    oh, ow = pair(output_size)
    h, w = x.shape[2:]
    out = np.empty(x.shape[:2] + (oh, ow), x.dtype)
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


@adaptive_avg_pool2d.torch
def _(cx, x, output_size):
    return F.adaptive_avg_pool2d(x, pair(output_size))


def _adaptive_check(node, target: str) -> str | None:
    oh, ow = pair(node.attrs["output_size"])
    if (oh, ow) == (1, 1):
        return None
    h, w = node.inputs[0].shape[2:]
    if not (isinstance(h, int) and isinstance(w, int)):
        return f"output {oh}x{ow} of a symbolic {h}x{w} input needs uneven windows ONNX has no op for"
    if h % oh or w % ow:
        return f"input {h}x{w} is not divisible by output {oh}x{ow} (uneven windows)"
    return None


@adaptive_avg_pool2d.onnxrt(check=_adaptive_check)
def _(cx, x, output_size):
    oh, ow = pair(output_size)
    if (oh, ow) == (1, 1):
        return cx.emit("GlobalAveragePool", [x])
    h, w = cx.node.inputs[0].shape[2:]
    k = [h // oh, w // ow]
    return cx.emit("AveragePool", [x], kernel_shape=k, strides=k)


@adaptive_avg_pool2d.tvm
def _(c, x, output_size):
    return R.nn.adaptive_avg_pool2d(x, pair(output_size))
