"""KV-cache kernels for the TVM backend on CPUs: in-place writes of a step's new slots, and decode attention
that reads only the filled slots (float or int8 caches).

Relax values are immutable: a ``scatter_elements`` of a step's keys into the cache makes a new cache
tensor, a copy of the whole cache per layer per step. ``write_slots`` is a TIR kernel called with
``call_tir_inplace``: it stores the new rows at their slots in the cache buffer it was given and returns
that buffer. A cache passed in from numpy memory without a copy (``TVMArtifact._to_device``, 64-byte
aligned arrays) is then updated where it lies, as ONNX Runtime's GroupQueryAttention does with IOBinding.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax import op as R

from .tvm_gemv import defined

KERNEL = "kv_write_slots"
SLOTS = 4  # cache slots whose scores the decode kernel computes together


def _kernel(dtype: str):
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True, private=True)
    def write_slots(var_cache: T.handle, var_new: T.handle, var_pos: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, h, c, d, s = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (b, h, c, d), dtype)
        new = T.match_buffer(var_new, (b, h, s, d), dtype)
        pos = T.match_buffer(var_pos, (b, s), "int64")
        for bi, hi, si in T.grid(b, h, s):
            for di in T.serial(d):
                with T.sblock("write"):
                    vb, vh, vs, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                    cache[vb, vh, pos[vb, vs], vd] = new[vb, vh, vs, vd]

    return write_slots


def write_slots(bb: relax.BlockBuilder, cache, new, positions):
    """``cache`` [B, H, C, D] with ``new`` [B, H, S, D] stored at slots ``positions`` [B, S] (int64), in place."""
    dtype = str(cache.ty.dtype)
    gv = _func(bb, f"{KERNEL}_{dtype}", lambda: _kernel(dtype))
    return bb.emit(R.call_tir_inplace(gv, [cache, new, positions], [0], cache.ty))


# -- decode attention over the filled slots -------------------------------------------------------------


def _lanes(d: int) -> int | None:
    return next((w for w in (16, 8, 4) if d % w == 0), None)


def usable(target) -> bool:
    """The kernels here are CPU loops (parallel over rows, vectorized): LLVM targets only."""
    return target is not None and target.kind.name == "llvm"


def decode_available(target, head_dim: int, steps) -> bool:
    """The decode kernels: a CPU target, a step of one token (static), a head size the vector loops divide."""
    return usable(target) and steps == 1 and _lanes(head_dim) is not None


def _scores_kernel(heads: int, d: int, scale: float, cache: str):
    """scores [B, H, R, C]: q . k * scale for the first ``limit[b, r]`` slots, -inf after (softmax's zeros). Each
    dot product runs in W-lane vectors, folded in halves: only the filled slots are read. An int8 cache
    (``cache="int8"``) is read as codes times the slot's scale ``ks`` [B, H, C, 1], applied once per dot
    product; a float cache's ``ks`` is a placeholder the kernel never reads."""
    from tvm.script import tirx as T

    w0, quantized = _lanes(d), cache == "int8"

    @T.prim_func(private=True)
    def decode_scores(var_q: T.handle, var_k: T.handle, var_ks: T.handle, var_limit: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
        b, r, c = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (b, heads, r, d), "float32")
        k = T.match_buffer(var_k, (b, heads, c, d), cache)
        ks = T.match_buffer(var_ks, (T.int64(), T.int64(), T.int64(), T.int64()), "float32")
        limit = T.match_buffer(var_limit, (b, r), "int64")
        out = T.match_buffer(var_out, (b, heads, r, c), "float32")
        for t in T.parallel(b * heads * r):
            bi, hi, ri = t // (heads * r), t // r % heads, t % r
            n = T.max(T.min(limit[bi, ri], c), T.int64(0))
            acc = T.alloc_buffer((SLOTS * w0,), "float32", scope="local")
            # SLOTS slots at a time: independent accumulator chains keep the vector units busy (the last group
            # rereads slot c - 1 for the slots past the end, whose scores are not written)
            for cg in range((n + SLOTS - 1) // SLOTS):
                for i in T.vectorized(SLOTS * w0):
                    acc[i] = T.float32(0)
                for d0 in range(d // w0):
                    for u in T.unroll(SLOTS):
                        for i in T.vectorized(w0):
                            acc[u * w0 + i] = acc[u * w0 + i] + q[bi, hi, ri, d0 * w0 + i] * T.Cast(
                                "float32", k[bi, hi, T.min(cg * SLOTS + u, c - 1), d0 * w0 + i]
                            )
                for u in T.unroll(SLOTS):
                    # fold the lanes in halves (a tree, not a chain of w0 dependent adds)
                    if w0 >= 16:
                        for i in T.vectorized(8):
                            acc[u * w0 + i] = acc[u * w0 + i] + acc[u * w0 + i + 8]
                    if w0 >= 8:
                        for i in T.vectorized(4):
                            acc[u * w0 + i] = acc[u * w0 + i] + acc[u * w0 + i + 4]
                    for i in T.vectorized(2):
                        acc[u * w0 + i] = acc[u * w0 + i] + acc[u * w0 + i + 2]
                    if cg * SLOTS + u < n:
                        if quantized:
                            out[bi, hi, ri, cg * SLOTS + u] = (acc[u * w0] + acc[u * w0 + 1]) * (
                                ks[bi, hi, cg * SLOTS + u, 0] * T.float32(scale)
                            )
                        else:
                            out[bi, hi, ri, cg * SLOTS + u] = (acc[u * w0] + acc[u * w0 + 1]) * T.float32(scale)
            for ci in range(n, c):
                out[bi, hi, ri, ci] = T.float32("-inf")

    return decode_scores


def _weighted_sum_kernel(heads: int, d: int, cache: str):
    """out [B, H, R, D] = sum over the first ``limit[b, r]`` slots of p * v, D lanes of accumulators (an int8
    cache: p * the slot's scale ``vs``, times the codes)."""
    from tvm.script import tirx as T

    quantized = cache == "int8"

    @T.prim_func(private=True)
    def decode_weighted_sum(var_p: T.handle, var_v: T.handle, var_vs: T.handle, var_limit: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "op_pattern": 8, "tirx.noalias": True})
        b, r, c = T.int64(), T.int64(), T.int64()
        p = T.match_buffer(var_p, (b, heads, r, c), "float32")
        v = T.match_buffer(var_v, (b, heads, c, d), cache)
        vs = T.match_buffer(var_vs, (T.int64(), T.int64(), T.int64(), T.int64()), "float32")
        limit = T.match_buffer(var_limit, (b, r), "int64")
        out = T.match_buffer(var_out, (b, heads, r, d), "float32")
        for t in T.parallel(b * heads * r):
            bi, hi, ri = t // (heads * r), t // r % heads, t % r
            n = T.max(T.min(limit[bi, ri], c), T.int64(0))
            acc = T.alloc_buffer((d,), "float32", scope="local")
            weight = T.alloc_buffer((1,), "float32", scope="local")
            for i in T.vectorized(d):
                acc[i] = T.float32(0)
            for ci in range(n):
                if quantized:
                    weight[0] = p[bi, hi, ri, ci] * vs[bi, hi, ci, 0]
                else:
                    weight[0] = p[bi, hi, ri, ci]
                for i in T.vectorized(d):
                    acc[i] = acc[i] + weight[0] * T.Cast("float32", v[bi, hi, ci, i])
            for i in T.vectorized(d):
                out[bi, hi, ri, i] = acc[i]

    return decode_weighted_sum


def _func(bb, name: str, make):
    """The kernel ``name`` of the module, added from ``make()`` (a PrimFunc) the first time."""
    gv = defined(bb, name)
    return gv if gv is not None else bb.add_func(make().with_attr("global_symbol", name), name)


def decode_attention(bb: relax.BlockBuilder, q, k, v, limit, scale: float, k_scale=None, v_scale=None):
    """Attention of query rows q [B, H, R, D] (float32) over the cache k, v [B, H, C, D], row r of sequence b
    seeing slots 0 .. limit[b, r] - 1: scores and the weighted sum read only those slots (the cache's
    capacity is allocated, not read), softmax in between. An int8 cache comes with its scales [B, H, C, 1]."""
    b, heads, r, d = q.ty.shape
    heads, d = int(heads), int(d)
    c = k.ty.shape[2]
    cache = str(k.ty.dtype)
    if k_scale is None:  # a float cache: the kernels' scale arguments are never read
        k_scale = v_scale = bb.emit(relax.const(np.ones((1, 1, 1, 1), np.float32)))
    tag = f"{cache}_h{heads}_d{d}"
    scale_tag = f"{scale:.8e}".replace(".", "p").replace("-", "m").replace("+", "")
    scores_fn = _func(bb, f"decode_scores_{tag}_{scale_tag}", lambda: _scores_kernel(heads, d, scale, cache))
    scores_t = relax.TensorType([b, heads, r, c], "float32")
    scores = bb.emit(relax.call_tir(scores_fn, [q, k, k_scale, limit], scores_t))
    p = bb.emit(R.nn.softmax(scores, -1))
    sum_fn = _func(bb, f"decode_weighted_sum_{tag}", lambda: _weighted_sum_kernel(heads, d, cache))
    return bb.emit(relax.call_tir(sum_fn, [p, v, v_scale, limit], relax.TensorType([b, heads, r, d], "float32")))
