"""Depthwise convolutions (groups == input channels: MobileNet, EfficientNet, ConvNeXt) on CPUs, for TVM.

As im2col + a batched matmul, a depthwise convolution is G matmuls of one row each ([1, kh*kw] x
[kh*kw, OH*OW]) and ran 5-50x slower than ONNX Runtime (ConvNeXt's 7x7 on 96 channels at 56x56:
10 ms against 0.2). Here it is one direct kernel in three stages:

    planes[n, c, r, phase, k]  the channel's input plane, zero-padded, its columns split by phase
                               (padded column stride * k + phase), so that the window's columns
                               x * stride + j * dilation are unit-stride runs over the output x
    rows[n, o, y, 0:OWp]       sum over the kh x kw window of planes[...] * w[o, 0, i, j], over a row
                               padded to whole vectors (``padded_width``)
    out[n, o, y, 0:OW]         the row without its padding

``CPUDepthwiseConv`` schedules it: channels in parallel, each channel's padded plane built in a
thread-local buffer, then for a block of output rows the whole window unrolled into vector
multiply-adds (the block's accumulators in registers), and the fused epilogue (bias, batch norm,
activation, residual add) applied as the rows are written out. A depth multiplier (O = m * C) is taken
as well; a 1-D depthwise convolution arrives as a height-1 one.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx
from tvm.relax import op as R
from tvm.target import Target

from .tvm_schedule import CPURule, _inline, _int, _vector_registers, _vectorize_row, vector_lanes

PLANES_BLOCK, ROWS_BLOCK, CONV_BLOCK = "depthwise_planes", "depthwise_rows", "depthwise_conv2d"
INTERIOR = "nnforge.interior_columns"  # planes' block annotation: [first, end) of its unchecked columns
MAX_ROW_VECTORS = 8  # output vectors accumulated at once (in registers across the window)
MAX_UNROLLED = 1024  # multiply-adds written out per unrolled window (a 31x31 window is not unrolled whole)


def applies(target, xt, weight_shape, groups: int) -> bool:
    """A float32 convolution with one input channel per group (groups == C > 1) and static channels and
    image size (the batch may be symbolic), on an llvm target (cpu, arm, wasm)."""
    _, c, h, w = xt.shape
    o, cg = weight_shape[:2]
    return (
        target is not None
        and target.kind.name == "llvm"
        and groups > 1
        and groups == c
        and cg == 1
        and isinstance(o, int)
        and o % c == 0
        and xt.dtype == "float32"
        and all(isinstance(d, int) for d in (c, h, w, *weight_shape[2:]))
    )


def padded_width(ow: int, lanes: int) -> int:
    """The output row width computed: whole vectors (the extra columns are computed and dropped), so
    the row loop vectorises without a scalar or partial tail; a row narrower than a vector takes the
    next power of two (7 -> 8)."""
    if ow < lanes:
        return 1 << (ow - 1).bit_length()
    return -(-ow // lanes) * lanes


def _planes(x, kh: int, kw: int, stride, padding, dilation, oh: int, owp: int):
    """planes[n, c, r, ph, k] = x[n, c, r - pad_top, stride * k + ph - pad_left], zero outside x."""
    n, c, h, w = x.shape
    rows = (oh - 1) * stride[0] + (kh - 1) * dilation[0] + 1
    cols = owp + (kw - 1) * dilation[1] // stride[1]

    def plane(b, ch, r, ph, k):
        yy, xx = r - padding[0], stride[1] * k + ph - padding[1]
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        # clamped on both sides: vectorised, the load is made for every lane before the select
        clamp = lambda i, size: tirx.min(tirx.max(i, 0), size - 1)  # noqa: E731
        return tirx.if_then_else(inside, x[b, ch, clamp(yy, h), clamp(xx, w)], tirx.const(0, x.dtype))

    # the columns k whose every phase lies inside x: there the schedule drops the bound checks
    interior = [-(-padding[1] // stride[1]), (w + padding[1] - stride[1]) // stride[1] + 1]
    interior = [min(interior[0], cols), min(max(interior), cols)]
    return te.compute((n, c, rows, stride[1], cols), plane, name=PLANES_BLOCK, attrs={INTERIOR: interior})


def _depthwise(x, w, stride, padding, dilation, oh: int, ow: int, owp: int):
    """planes -> rows[n, o, y, 0:owp] (the window sums over whole vectors) -> out[n, o, y, 0:ow]."""
    o, _, kh, kw = (int(d) for d in w.shape)
    mult = o // int(x.shape[1])
    planes = _planes(x, kh, kw, stride, padding, dilation, oh, owp)
    i = te.reduce_axis((0, kh), name="i")
    j = te.reduce_axis((0, kw), name="j")
    s, d = stride, dilation

    def conv(b, oc, y, xx):
        ch = oc // mult if mult > 1 else oc
        col = j * d[1]
        tap = planes[b, ch, y * s[0] + i * d[0], col % s[1], xx + col // s[1]]
        return te.sum(tap * w[oc, 0, i, j], axis=[i, j])

    rows = te.compute((x.shape[0], o, oh, owp), conv, name=ROWS_BLOCK)
    return te.compute((x.shape[0], o, oh, ow), lambda b, oc, y, xx: rows[b, oc, y, xx], name=CONV_BLOCK)


def conv2d(c, x, w, b, stride, padding, dilation):
    """y = conv2d(x, w, groups=C) + b for a convolution ``applies`` accepted; ``c`` is tvm_lower's Ctx."""
    _, _, oh, ow = c.out_type().shape
    owp = padded_width(ow, vector_lanes(c.target, 32))
    y = c.bb.emit_te(_depthwise, x, w, stride, padding, dilation, oh, ow, owp, primfunc_name_hint="depthwise_conv2d")
    if b is not None:  # elementwise on the kernel's output: Relax fuses it into the same kernel
        y = c.emit(R.add(y, c.emit(R.reshape(b, [1, c.in_type(1).shape[0], 1, 1]))))
    return y


class CPUDepthwiseConv(CPURule):
    """Schedules the kernel made by ``_depthwise`` with whatever Relax fused around it.

    Per (image, channel), in parallel: the padded plane goes into a thread-local buffer (an elementwise
    producer fused before the convolution is computed into it), then for each block of output rows
    and up to MAX_ROW_VECTORS vectors along them (``_register_block``) the kh x kw window is unrolled,
    each tap one vector multiply-add per accumulator, the accumulators in registers across the window;
    the rows are then written out through the fused epilogue (bias, batch norm, activation),
    vectorised. (Left to the generic rules, the kernel ran at about 1 GFLOP/s.)"""

    def _apply(self, func, target: Target):
        sch = s_tir.Schedule(func)
        try:
            planes, rows = sch.get_sblock(PLANES_BLOCK), sch.get_sblock(ROWS_BLOCK)
        except Exception:  # noqa: BLE001  (no such block: not a depthwise kernel)
            return None
        while any(_inline(sch, p) for p in sch.get_producers(planes)):
            pass  # an elementwise producer (a fused activation) is computed into the plane
        after = _consumers(sch, rows)
        for blk in after[:-1]:  # the crop and the epilogue fold into the last block
            _inline(sch, blk)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if sch.get_producers(planes) or len(blocks) != 3:
            return None  # something else was fused in: leave the kernel to the generic rules
        out = blocks[-1]
        lanes, registers = vector_lanes(target, 32), _vector_registers(target)
        b, oc, y, x, i, j = sch.get_loops(rows)
        channel = sch.fuse(b, oc)
        sch.parallel(channel)
        width, taps = _int(sch.get(x).extent), _int(sch.get(i).extent) * _int(sch.get(j).extent)
        vectors, rows_at_once = _register_block(_int(sch.get(y).extent), width, lanes, registers, taps)
        yo, yi = sch.split(y, [None, rows_at_once])
        xo, xv, xi = sch.split(x, [None, vectors, min(width, lanes)])
        sch.reorder(yo, xo, i, j, yi, xv, xi)
        sch.reverse_compute_at(out, yo, preserve_unit_loops=True)  # rows written out once summed
        sch.set_scope(rows, 0, "local")
        sch.compute_at(planes, channel, preserve_unit_loops=True)
        sch.set_scope(planes, 0, "local")
        _vectorize_row(sch, out, lanes)
        _fill_planes(sch, planes)
        # every accumulator its own register: LLVM splits a vector of 7 x 16 lanes poorly (its
        # broadcasts became chains of inserts)
        for loop in (i, j, yi, xv) if taps <= MAX_UNROLLED else (j, yi, xv):
            sch.unroll(loop)
        sch.vectorize(xi)
        sch.decompose_reduction(rows, i)
        return sch


def _fill_planes(sch, planes) -> None:
    """The plane's columns split into the left padding, the interior and the right padding: in the
    interior TVM's simplifier drops the bound checks, so its loop is a plain copy (stride 1) or a
    deinterleave (stride s: the s phases unrolled inside the column loop, one interleaved access group),
    both left to LLVM's vectoriser. Vectorised by TVM with the bound checks, each lane's load was scalar
    (a stride-2 layer spent 95% of its time here)."""
    first, end = (int(v) for v in sch.get(planes).annotations[INTERIOR])
    ph, k = sch.get_loops(planes)[-2:]
    phases, cols = _int(sch.get(ph).extent), _int(sch.get(k).extent)
    if phases > 1:
        sch.reorder(k, ph)
    sizes = [n for n in (first, end - first, cols - end) if n > 0]
    parts = sch.loop_partition(k, sizes[:-1] + [None]) if len(sizes) > 1 else [k]
    middle = parts[1 if first > 0 else 0] if end > first else None
    if middle is None:
        return
    if phases > 1:
        sch.unroll(sch.get_loops(sch.get_child_blocks(middle)[-1])[-1])
    # stride 1: a plain copy, which LLVM vectorises (TVM's split or partition of a loop that does not
    # start at 0 lost columns)


def _register_block(oh: int, width: int, lanes: int, registers: int, taps: int = 1) -> tuple[int, int]:
    """(vectors per row, rows) accumulated at once across the window, each vector one register: up to
    MAX_ROW_VECTORS vectors along the row and then more rows, for about half the vector registers in
    all, and no more than MAX_UNROLLED multiply-adds in the unrolled window. One chain of 49 dependent
    multiply-adds per vector ran at the FMA latency (ConvNeXt's 7x7 on 7x7 planes: one vector per row);
    independent accumulators hide it."""
    per_row = max(width // lanes, 1)
    most = registers // 2
    fit = lambda n: n <= most and n * taps <= MAX_UNROLLED  # noqa: E731
    vectors = max(v for v in range(1, min(MAX_ROW_VECTORS, per_row) + 1) if per_row % v == 0 and (v == 1 or fit(v)))
    rows = max(r for r in range(1, oh + 1) if oh % r == 0 and (r == 1 or fit(r * vectors)))
    return vectors, rows


def _consumers(sch, block) -> list:
    out, frontier = [], [block]
    while frontier:
        frontier = [c for b in frontier for c in sch.get_consumers(b)]
        out += frontier
    return out
