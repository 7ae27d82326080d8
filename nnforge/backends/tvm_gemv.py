"""GEMV kernels for few rows (LLM decode) on TVM CPU targets: weight-only low-bit ``qlinear`` and float ``linear``.

Decoding one token multiplies a vector by every weight matrix once: the time is reading the weights.
The matmul schedule (tvm_schedule.CPUMatmul) dequantizes a float panel of the weight per column tile,
which for one row costs more than the matmul (SmolLM2 int4: 14.6 tok/s, below float's 20.8). This
kernel reads the packed codes and turns them into floats in registers, never storing a float weight:

- the codes are re-laid out once, at load, as ``[N/T, K/2, T]`` bytes for int4 (``[N/T, K, T]`` for
  int8): for a tile of T output rows, the bytes of one input position are contiguous, so a vector load
  brings one code of T rows and the T accumulators live in vector registers (no horizontal sums);
- per group of ``group`` inputs the kernel sums ``x * code`` as floats, then folds the group's scale
  and zero point in once: ``x . w = scale * sum(x * code) - scale * zero * sum(x)`` (``sum(x)`` per group
  is computed once per call). Integer, float and default zero points all become ``scale * zero``.

The kernel is scheduled when it is made (the default schedule rules skip scheduled kernels). Rows
(batch x sequence) may be symbolic; each row re-reads the tile's codes from cache, so the kernel is
for a handful of rows: ``ops/lowbit.py`` uses it where the sequence axis is 1 (the decode-step graph,
and the LM head of the generation graph, which sees one row per sequence).

``matmul`` is the same loop nest for a float weight (re-laid out as ``[N/T, K, T]``), which ``ops/linalg.py``
uses for a decode step's linear layers: SmolLM2's weights stream at ~29 GB/s with 2 threads, where the
matmul schedule's one-row tiles read ~8 GB/s (static batch 1) to ~20 GB/s (symbolic rows).
"""

from __future__ import annotations

from tvm import relax, s_tir, te, tirx
from tvm.relax import op as R

LANES = 16  # float32 lanes of one AVX-512 register; other targets split the tile as LLVM sees fit


def tile_rows(n: int) -> int | None:
    """Output rows per tile: 64 where the tiles still spread over threads, else 32 or 16; None if N has no
    multiple-of-16 divisor the kernel can use."""
    for t in (64, 32, 16):
        if n % t == 0 and n // t >= 32:
            return t
    for t in (32, 16):
        if n % t == 0:
            return t
    return None


def available(target, n: int, k: int, bits: int, group: int) -> bool:
    return (
        target is not None
        and target.kind.name == "llvm"
        and tile_rows(n) is not None
        and k % group == 0
        and (bits == 8 or group % 2 == 0)
    )


def _kernel(x, packed, scales, offsets, bits: int, group: int):
    """y [M, N] = x [M, K] times the weight held as ``packed`` codes, ``scales`` and ``offsets`` (scale * zero)
    [N/T, G, T]; ``offsets`` None: symmetric codes (int8)."""
    m, k = x.shape
    nt, _, t = packed.shape
    n, groups = nt * t, k // group

    def code(j, kk):
        if bits == 4:
            byte = packed[j // t, kk // 2, j % t]
            shift = tirx.Cast("uint8", tirx.floormod(kk, 2) * 4)
            return tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, "uint8")).astype("float32")
        return packed[j // t, kk, j % t].astype("float32")

    r = te.reduce_axis((0, group), name="r")
    dot = te.compute(
        (m, groups, n), lambda i, g, j: te.sum(x[i, g * group + r] * code(j, g * group + r), axis=r), name="group_dot"
    )
    rg = te.reduce_axis((0, groups), name="g")
    if offsets is None:
        return te.compute((m, n), lambda i, j: te.sum(scales[j // t, rg, j % t] * dot[i, rg, j], axis=rg), name="gemv")
    rs = te.reduce_axis((0, group), name="rs")
    xsum = te.compute((m, groups), lambda i, g: te.sum(x[i, g * group + rs], axis=rs), name="group_sum")
    return te.compute(
        (m, n),
        lambda i, j: te.sum(
            scales[j // t, rg, j % t] * dot[i, rg, j] - offsets[j // t, rg, j % t] * xsum[i, rg], axis=rg
        ),
        name="gemv",
    )


def _row_tiles(sch, out, t: int):
    """Both GEMVs' outer schedule: T output rows per tile, tiles in parallel, the tile's T accumulators in
    registers (written back as one vector). Returns the loops (row, reduction, tile row)."""
    i, j, r = sch.get_loops(out)
    jo, ji = sch.split(j, [None, t])
    sch.reorder(jo, i, r, ji)
    acc = sch.cache_write(out, 0, "local")
    sch.reverse_compute_at(acc, i, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.parallel(jo)
    return i, r, ji


def _schedule(func, t: int, bits: int, with_sum: bool):
    sch = s_tir.Schedule(func)
    out, dot = sch.get_sblock("gemv"), sch.get_sblock("group_dot")
    _, g, ji = _row_tiles(sch, out, t)
    # the group's dot products: computed per group into T registers, reduced over the group's inputs
    sch.compute_at(dot, g, preserve_unit_loops=True)
    sch.set_scope(dot, 0, "local")
    dj, dr = sch.get_loops(dot)[-2:]
    if bits == 4:  # the two nibbles of a byte: unrolled, so each shift is a constant
        dro, dri = sch.split(dr, [None, 2])
        sch.reorder(dro, dri, dj)
        sch.unroll(dri)
    else:
        sch.reorder(dr, dj)
    sch.vectorize(dj)
    sch.decompose_reduction(dot, sch.get_loops(dot)[-3 if bits == 4 else -2])
    sch.vectorize(ji)
    sch.decompose_reduction(out, g)
    if with_sum:  # sum(x) per group: one small pass over the rows
        sch.parallel(sch.get_loops(sch.get_sblock("group_sum"))[0])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # 8: opaque


def qmatmul(bb: relax.BlockBuilder, x, qweight, scales, zeros, n: int, k: int, bits: int, group: int, zero: float):
    """y [M, N] float32 from x [M, K] and weight codes ``qweight`` ([N, K] int8 or [N, K/2] uint8 of two
    nibbles), ``scales`` [N, G] and ``zeros`` [N, G] (integer or float; None: ``zero`` for every group).
    The re-layout of codes, scales and offsets reads weights alone: LiftTransformParams runs it at load."""
    t = tile_rows(n)
    groups = k // group
    width = k // 2 if bits == 4 else k
    packed = bb.emit(R.permute_dims(bb.emit(R.reshape(qweight, [n // t, t, width])), [0, 2, 1]))

    def tiled(v):
        return bb.emit(R.permute_dims(bb.emit(R.reshape(v, [n // t, t, groups])), [0, 2, 1]))

    offsets = None
    if zeros is not None:
        offsets = tiled(bb.emit(R.multiply(scales, bb.emit(R.astype(zeros, "float32")))))
    elif zero:
        offsets = tiled(bb.emit(R.multiply(scales, relax.const(float(zero), "float32"))))
    args = [x, packed, tiled(scales)] + ([offsets] if offsets is not None else [])
    name = f"qgemv_int{bits}_g{group}_{n}x{k}" + ("_zero" if offsets is not None else "")
    gv = defined(bb, name)
    if gv is not None:
        return bb.emit(relax.call_tir(gv, args, relax.TensorType([x.ty.shape[0], n], "float32")))
    call = bb.call_te(_kernel, *args[:3], offsets, bits, group, primfunc_name_hint=name)
    bb.update_func(call.args[0], _schedule(bb.get()[call.args[0]], t, bits, offsets is not None))
    return bb.emit(call)


def defined(bb: relax.BlockBuilder, name: str):
    """The module's kernel called ``name``, if made already: every layer of one shape calls one function,
    scheduled and compiled once."""
    return next((gv for gv in bb.get().get_global_vars() if gv.name_hint == name), None)


def _float_kernel(x, packed):
    """y [M, N] = x [M, K] times a float weight packed as [N/T, K, T]."""
    m, k = x.shape
    nt, _, t = packed.shape
    r = te.reduce_axis((0, k), name="r")
    return te.compute((m, nt * t), lambda i, j: te.sum(x[i, r] * packed[j // t, r, j % t], axis=r), name="gemv")


def _float_schedule(func, t: int):
    sch = s_tir.Schedule(func)
    out = sch.get_sblock("gemv")
    _, r, ji = _row_tiles(sch, out, t)
    sch.vectorize(ji)
    sch.decompose_reduction(out, r)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


def matmul(bb: relax.BlockBuilder, x, weight, n: int, k: int):
    """y [M, N] float32 = x [M, K] @ weight[N, K].T for a few rows, the weight re-laid out at load as [N/T, K, T]
    (T output rows' values of one input position side by side: one vector load, T accumulators)."""
    t = tile_rows(n)
    packed = bb.emit(R.permute_dims(bb.emit(R.reshape(weight, [n // t, t, k])), [0, 2, 1]))
    name = f"gemv_f32_{n}x{k}"
    gv = defined(bb, name)
    if gv is not None:
        return bb.emit(relax.call_tir(gv, [x, packed], relax.TensorType([x.ty.shape[0], n], "float32")))
    call = bb.call_te(_float_kernel, x, packed, primfunc_name_hint=name)
    bb.update_func(call.args[0], _float_schedule(bb.get()[call.args[0]], t))
    return bb.emit(call)
