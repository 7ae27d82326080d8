"""int8 dot products for W8A8 ``qlinear`` on x86 CPUs with AVX-512 VNNI (vpdpbusd), for the TVM backend.

One kernel, scheduled when it is made (the default schedule rules skip scheduled kernels) and kept out
of Relax fusion: float activations quantized to uint8 codes ``a[M, K]`` (once per call, in parallel,
inside the kernel) times int8 weight codes packed
``[N/16, K/4, 16, 4]`` (16 output channels x 4 inputs: one vpdpbusd operand), int32 accumulators held
in registers across K for a tile of MR rows x 16*NV columns, then in the same tile the float rescale

    y[i, j] = (acc[i, j] - zero_point * colsum[j]) * x_scale[i] * w_scale[j] (+ bias[j])

(``colsum[j] = sum_k w[j, k]`` takes the activation zero point out of the integer sum). Rows are padded
to a multiple of MR with zeros, so the batch x sequence size may be symbolic. The weight packing and the
column sums are Relax ops on the weights alone, which LiftTransformParams runs once at load.

TVM 0.27 ships a VNNI tensor intrinsic whose LLVM call no longer type-checks (LLVM now takes the
vpdpbusd operands as <64 x i8>); ``_intrin`` registers the same computation with today's types.
"""

from __future__ import annotations

from tvm import relax, s_tir, te, tirx
from tvm.relax import op as R
from tvm.s_tir import TensorIntrin
from tvm.s_tir.schedule import ScheduleError
from tvm.target.codegen import target_has_features

MR = 4  # rows per register tile
LANES, DEPTH = 16, 4  # one vpdpbusd: 16 int32 lanes, each a sum of 4 u8 x s8 products


def _intrin() -> str:
    """Register the tensor intrinsic on first use (TVMScript parsing; importing TVM's own x86 intrinsics
    would load all of TVM's tensor intrinsics, ~20 s)."""
    if TensorIntrin.get(INTRIN, allow_missing=True) is not None:
        return INTRIN
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a, 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(INTRIN, desc, impl)
    return INTRIN


INTRIN = "nnforge_dot_16x4_u8i8i32_vnni"


def available(target, n: int, k: int) -> bool:
    """Whether the kernel fits: an LLVM x86 target with VNNI, N a multiple of 16 and K of 4."""
    return (
        target is not None
        and target.kind.name == "llvm"
        and n % LANES == 0
        and k % DEPTH == 0
        and bool(target_has_features("avx512vnni", target))
    )


def _columns_per_tile(n: int) -> int:
    """16 x NV columns: NV vectors of accumulators (4 x NV registers with MR = 4), NV dividing N/16."""
    for nv in (4, 2, 1):
        if (n // LANES) % nv == 0:
            return nv
    return 1


def _kernel(x, w, colsum, x_scale, zero_point, w_scale, bias, qmin: int, padded_output: bool = False):
    """TE stages: the activation codes (rows padded with zeros), the int32 sum, the float rescale.
    codes = clip(round(x / x_scale) + zero_point, qmin, 255); ``x_scale`` [M, 1] or [], ``zero_point`` [].
    ``padded_output``: the output has the padded row count too (the caller slices it)."""
    m, k = x.shape
    n = w.shape[0] * LANES
    rows = tirx.floordiv(m + MR - 1, MR) * MR

    def scale(i):
        return x_scale[tirx.min(i, m - 1), 0] if len(x_scale.shape) == 2 else x_scale[()]

    def code(i, r):
        q = tirx.round(x[tirx.min(i, m - 1), r] / scale(i)) + zero_point[()]
        return tirx.if_then_else(
            i < m, tirx.max(tirx.min(q, 255.0), float(qmin)).astype("uint8"), tirx.const(0, "uint8")
        )

    codes = te.compute((rows, k), code, name="a_pad")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (rows, n),
        lambda i, j: te.sum(
            codes[i, r].astype("int32") * w[j // LANES, r // DEPTH, j % LANES, r % DEPTH].astype("int32"), axis=r
        ),
        name="acc",
    )

    def rescale(i, j):
        y = (acc[i, j] - zero_point[()].astype("int32") * colsum[j]).astype("float32") * scale(i) * w_scale[j]
        return y + bias[j] if bias is not None else y

    return te.compute((rows if padded_output else m, n), rescale, name="rescale")


def _schedule(func, n: int):
    nv = _columns_per_tile(n)
    sch = s_tir.Schedule(func)
    pad, acc, out = (sch.get_sblock(b) for b in ("a_pad", "acc", "rescale"))
    # output tiles in parallel; each computes its MR x 16*NV accumulators over the whole of K
    i, j = sch.get_loops(out)
    io, ii = sch.split(i, [None, MR])
    jo, ji = sch.split(j, [None, LANES * nv])
    sch.reorder(io, jo, ii, ji)
    tile = sch.fuse(io, jo)
    sch.parallel(tile)
    sch.vectorize(ji)
    sch.compute_at(acc, tile)
    ai, aj, ak = sch.get_loops(acc)[-3:]
    ajm, aji = sch.split(aj, [nv, LANES])
    ako, aki = sch.split(ak, [None, DEPTH])
    sch.reorder(ako, ai, ajm, aji, aki)
    sch.decompose_reduction(acc, ako)
    sch.unroll(ai)
    sch.unroll(ajm)
    sch.tensorize(aji, _intrin())
    # padded rows once, in parallel
    pi, pk = sch.get_loops(pad)
    sch.parallel(pi)
    sch.vectorize(pk)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # 8: opaque, not fused


def qmatmul(bb: relax.BlockBuilder, x, qweight, n: int, k: int, x_scale, zero_point, qmin: int, w_scale, bias=None):
    """y [M, N] float32 from x [M, K] float32 quantized in the kernel, codes = clip(round(x / x_scale) +
    zero_point, qmin, 255) (``x_scale`` [M, 1] or [], ``zero_point`` [] float32), times int8 weight codes
    [N, K] with per-channel ``w_scale`` [N]."""
    packed = bb.emit(R.permute_dims(bb.emit(R.reshape(qweight, [n // LANES, LANES, k // DEPTH, DEPTH])), [0, 2, 1, 3]))
    colsum = bb.emit(R.sum(bb.emit(R.astype(qweight, "int32")), axis=[1]))
    for padded in (False, True):
        call = bb.call_te(
            _kernel,
            x,
            packed,
            colsum,
            x_scale,
            zero_point,
            w_scale,
            bias,
            qmin,
            padded,
            primfunc_name_hint="qmatmul_vnni",
        )
        try:
            bb.update_func(call.args[0], _schedule(bb.get()[call.args[0]], n))
            break
        except ScheduleError:
            # with some symbolic row counts (batch * 46, not batch * 44 or batch * 65) TVM cannot show that
            # the padded accumulator rows cover the output's: compute the padded rows, slice them off after
            if padded:
                raise
    y = bb.emit(call)
    return bb.emit(R.strided_slice(y, [0], [0], [x.ty.shape[0]])) if padded else y
