"""A CSR sparse matmul kernel for ``sparse_linear`` on TVM CPU targets, used where it beats dense.

``y = x @ W.T`` with ``W [N, K]`` in CSR (values, column indices, row starts). The kernel works on
``x`` transposed, ``xT [K, M]``, so that each stored weight multiplies a contiguous run of M activations:
per output channel (in parallel) and per 64 rows, 64 float32 accumulators (four AVX-512 registers) sum
``value * xT[col, rows]`` over the channel's stored weights; the rows past the last multiple of 64
take a scalar tail. Each stored weight costs one vector load per 16 rows and no multiply by zero, so the
kernel wins only when few weights are stored: ``MAX_DENSITY`` is where ``nnforge bench --sparse``
measured it level with the dense matmul schedule on this CPU (see the README), and denser layers keep
the dense kernel (their CSR weights are scattered into a dense matrix once, at load).
"""

from __future__ import annotations

from tvm import relax
from tvm.relax import op as R

MAX_DENSITY = 0.2  # stored / all weights at or below which the CSR kernel is used (nnforge bench --sparse)
TILE = 64  # rows per accumulator tile: four 16-lane vectors


def _kernel(n: int, k: int, nnz: int):
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def csr_matmul(
        var_xt: T.handle,
        values: T.Buffer((nnz,), "float32"),
        cols: T.Buffer((nnz,), "int32"),
        row_ptr: T.Buffer((n + 1,), "int32"),
        var_yt: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
        m = T.int64()
        xt = T.match_buffer(var_xt, (k, m), "float32")
        yt = T.match_buffer(var_yt, (n, m), "float32")
        for j in T.parallel(n):
            acc = T.alloc_buffer((TILE,), "float32", scope="local")
            for mo in range(m // TILE):
                for i in T.vectorized(TILE):
                    acc[i] = T.float32(0)
                for p in range(row_ptr[j], row_ptr[j + 1]):
                    for i in T.vectorized(TILE):
                        acc[i] = acc[i] + values[p] * xt[cols[p], mo * TILE + i]
                for i in T.vectorized(TILE):
                    yt[j, mo * TILE + i] = acc[i]
            for i in range(m % TILE):
                acc[0] = T.float32(0)
                for p in range(row_ptr[j], row_ptr[j + 1]):
                    acc[0] = acc[0] + values[p] * xt[cols[p], m // TILE * TILE + i]
                yt[j, m // TILE * TILE + i] = acc[0]

    return csr_matmul


def worth_it(target, nnz: int, n: int, k: int) -> bool:
    """The CSR kernel on a CPU target when the layer keeps at most MAX_DENSITY of its weights."""
    return target is not None and target.kind.name == "llvm" and nnz <= MAX_DENSITY * n * k


def matmul(bb: relax.BlockBuilder, x2d, rows, values, cols, row_ptr, n: int, k: int, nnz: int):
    """y [rows, N] = x2d [rows, K] @ W.T for the CSR weight (values f32 [nnz], cols and row_ptr int)."""
    gv = bb.add_func(_kernel(n, k, nnz), "csr_matmul")
    xt = bb.emit(R.permute_dims(x2d, [1, 0]))
    # the index casts read weights only: LiftTransformParams runs them once, at load
    args = [xt, values, bb.emit(R.astype(cols, "int32")), bb.emit(R.astype(row_ptr, "int32"))]
    yt = bb.emit(relax.call_tir(gv, args, relax.TensorType([n, rows], "float32")))
    return bb.emit(R.permute_dims(yt, [1, 0]))
