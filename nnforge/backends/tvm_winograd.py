"""3x3 stride-1 convolutions as Winograd F(2x2, 3x3) on CPUs, for the TVM backend.

Each 2x2 output tile comes from a 4x4 input tile with 16 multiplications per (input, output) channel
pair instead of 36, so the multiply-adds of a 3x3 convolution drop 2.25x (Lavin & Gray, 2016):

    U = G g G^T          weights [O, C, 3, 3] -> [16, O, C]; Relax ops on the weights alone, which
                         LiftTransformParams runs once at load
    V = B^T d B          input tiles -> [16, C, tiles]; one gather kernel over the zero-padded input
    M = U @ V            16 independent matmuls [O, C] x [C, tiles]: the CPU matmul schedule
    Y = A^T M A          [16, O, tiles] -> NCHW; elementwise for Relax, so the bias, batch norm,
                         residual add and activation that follow fuse into it

B^T and A^T hold only 0 and +-1, so both transforms are additions; G holds 1/2, exact in binary.
The error stays at float32 rounding (about 1e-6 relative on ResNet-18).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, s_tir, te, tirx
from tvm.relax import op as R

# G for F(2x2, 3x3): a 3-tap filter -> 4 transformed taps
G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=np.float32)
# each row of B^T has two non-zero entries: row a = d[FIRST[a]] + SIGN[a] * d[SECOND[a]]
FIRST, SECOND, SIGN = (0, 1, 2, 1), (2, 2, 1, 3), (-1.0, 1.0, -1.0, -1.0)


# tvm_schedule.CPUWinogradOutput schedules the kernel holding these blocks
OUTPUT_BLOCK, TILES_BLOCK = "winograd_output", "winograd_tiles"


def applies(target, xt, kernel: tuple, stride, padding, dilation, groups: int) -> bool:
    """A 3x3, stride-1, undilated, ungrouped float32 convolution with static channels and image size,
    on an llvm target (CPU, arm, wasm); padding at most 1 keeps every tile's window inside the pad."""
    _, c, h, w = xt.shape
    return (
        target is not None
        and target.kind.name == "llvm"
        and tuple(kernel) == (3, 3)
        and list(stride) == [1, 1]
        and list(dilation) == [1, 1]
        and groups == 1
        and all(p <= 1 for p in padding)
        and xt.dtype == "float32"
        and all(isinstance(d, int) for d in (c, h, w))
    )


def _pick(table, index):
    """table[index] for a loop variable index in 0..3 (constant once the loop is unrolled)."""
    dtype = "float32" if isinstance(table[-1], float) else str(index.ty)
    out = tirx.const(table[-1], dtype)
    for k in range(len(table) - 2, -1, -1):
        out = tirx.Select(index == k, tirx.const(table[k], dtype), out)
    return out


def _input_transform(x, pad: list, th: int, tw: int):
    """V[a*4+b, c, t] = (B^T d B)[a, b] for the 4x4 window d of tile t = (n, ty, tx), whose top-left
    corner is at (2ty - pad, 2tx - pad) of ``x``, zero outside it.

    A first stage copies each channel's plane zero-padded and split into even and odd columns
    (``planes[n, c, row, parity, k]`` = padded column 2k + parity), so that the window's columns
    2tx..2tx+3 are four unit-stride runs over tx: the tile loop vectorises without gathers."""
    n, c, h, w = x.shape

    def plane(nb, ch, r, par, k):
        yy, xx = r - pad[0], 2 * k + par - pad[1]
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        # clamped on both sides: vectorised, the load is made for every lane before the select
        clamp = lambda i, size: tirx.min(tirx.max(i, 0), size - 1)  # noqa: E731
        return tirx.if_then_else(inside, x[nb, ch, clamp(yy, h), clamp(xx, w)], tirx.const(0, x.dtype))

    planes = te.compute((n, c, 2 * th + 2, 2, tw + 1), plane, name="winograd_planes")

    def v(e, ch, t):
        a, b = e // 4, e % 4
        nb, ty, tx = t // (th * tw), t // tw % th, t % tw

        def tap(i, j):
            return planes[nb, ch, 2 * ty + i, j % 2, tx + j // 2]

        def row(i):  # (d B)[i, b]
            return tap(i, _pick(FIRST, b)) + _pick(SIGN, b) * tap(i, _pick(SECOND, b))

        return row(_pick(FIRST, a)) + _pick(SIGN, a) * row(_pick(SECOND, a))

    return te.compute((16, c, n * th * tw), v, name="winograd_input")


def _schedule_input(func, th: int, tw: int):
    """Per (image, channel), in parallel: pad the plane into a thread-local buffer, then for each row of
    tiles and each of the 16 transformed taps one vector over the tiles of that row."""
    sch = s_tir.Schedule(func)
    planes, out = sch.get_sblock("winograd_planes"), sch.get_sblock("winograd_input")
    e, ch, t = sch.get_loops(out)
    nb, ty, tx = sch.split(t, [None, th, tw])
    sch.reorder(nb, ch, ty, e, tx)
    image = sch.fuse(nb, ch)
    sch.parallel(image)
    sch.compute_at(planes, image)
    sch.set_scope(planes, 0, "local")
    sch.vectorize(sch.get_loops(planes)[-1])
    sch.unroll(e)
    sch.vectorize(tx)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # 8: opaque, not fused


def _output_transform(m, n, oh: int, ow: int, th: int, tw: int):
    """Y[n, o, y, x] = (A^T M A)[y % 2, x % 2] of tile (n, y // 2, x // 2), in two stages: the tiles
    ``Z[n, o, ty, i, j, tx]`` (unit stride over tx), then Y, which picks Z[.., y % 2, x % 2, x // 2].
    Row i of A^T is M[i] + s (M[i+1] + M[i+2]) with s = 1 - 2i."""
    o = m.shape[1]

    def z(nb, oc, ty, i, j, tx):
        t = (nb * th + ty) * tw + tx
        si, sj = (1 - 2 * i).astype("float32"), (1 - 2 * j).astype("float32")

        def col(a):  # (M A)[a, j]
            return m[a * 4 + j, oc, t] + sj * (m[a * 4 + j + 1, oc, t] + m[a * 4 + j + 2, oc, t])

        return col(i) + si * (col(i + 1) + col(i + 2))

    tiles = te.compute((n, o, th, 2, 2, tw), z, name=TILES_BLOCK)
    return te.compute(
        (n, o, oh, ow), lambda nb, oc, y, x: tiles[nb, oc, y // 2, y % 2, x % 2, x // 2], name=OUTPUT_BLOCK
    )


def conv2d_3x3(c, x, w, b, padding):
    """y = conv2d(x, w) + b for a convolution ``applies`` accepted; ``c`` is tvm_lower's Ctx."""
    n, cin, h, wd = c.in_type(0).shape
    o = c.in_type(1).shape[0]
    oh, ow = h + 2 * padding[0] - 2, wd + 2 * padding[1] - 2
    th, tw = (oh + 1) // 2, (ow + 1) // 2
    # weights: U[a*4+b, o, c] = (G g G^T)[a, b]
    gw = c.emit(R.matmul(c.emit(R.matmul(c.const(G, "float32"), w)), c.const(G.T, "float32")))  # [O, C, 4, 4]
    u = c.emit(R.reshape(c.emit(R.permute_dims(gw, [2, 3, 0, 1])), [16, o, cin]))
    v = c.bb.emit_te(_input_transform, x, padding, th, tw, primfunc_name_hint="winograd_input")
    gv = v.op if isinstance(v, relax.Call) else c.bb.lookup_binding(v).args[0]
    c.bb.update_func(gv, _schedule_input(c.bb.get()[gv], th, tw))
    m = c.emit(R.matmul(u, v))  # [16, O, tiles]
    y = c.bb.emit_te(_output_transform, m, c.dims(n), oh, ow, th, tw, primfunc_name_hint="winograd_output")
    if b is not None:
        y = c.emit(R.add(y, c.emit(R.reshape(b, [1, o, 1, 1]))))
    return y
