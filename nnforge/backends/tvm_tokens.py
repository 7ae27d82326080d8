"""Relax lowerings of the token ops (nnforge/ir/ops_tokens.py), registered into tvm_lower.LOWERINGS.

Sorting is ``argsort`` / ``sort`` (stable on CPU, so ties go to the lower index as in the references'
stable argsort); gathering along the token axis is ``gather_elements`` with the index broadcast over
the hidden axis. The merged tokens are one kernel of their own (``_merged_tokens``): every output token
reads its rows of the input directly. Sequence lengths may be symbolic (``seq - r``); r,
protect_first and protect_last are static.
"""
from __future__ import annotations

import math

import numpy as np
from tvm import relax, s_tir, te, tirx
from tvm.relax import op as R

from .tvm_lower import Ctx, lowering
from .tvm_schedule import _vector_lanes, _vectorize_row


def _tokens(c: Ctx, t, start: int, stop, step: int = 1):
    """t[:, start:stop:step] along the token axis."""
    return c.emit(R.strided_slice(t, [1], [start], [stop], [step], assume_inbound=True))


def _over_hidden(c: Ctx, idx, batch, k, hidden):
    """[batch, k] indices -> [batch, k, hidden] for gather_elements / scatter_elements on tokens."""
    return c.emit(R.broadcast_to(c.emit(R.expand_dims(idx, -1)), [batch, k, hidden]))


def _positions(c: Ctx, n):
    """int64 [n]: arange(n)."""
    return c.emit(R.arange(0, n, 1, "int64"))


def _half(n):
    return n // 2 if isinstance(n, int) else tirx.floordiv(n, 2)


def _sizes(c: Ctx, sizes):
    if sizes is not None:
        return sizes
    return c.emit(R.ones(c.dims.shape(c.in_type(0).shape[:2]), c.in_type(0).dtype))


@lowering("token_merge")
def _token_merge(c: Ctx, x, metric, sizes=None):
    dt, r, p = c.in_type(0).dtype, c.attr("r"), c.attr("protect_first")
    seq = c.dims(c.in_type(0).shape[1])
    n_src, n_dst = _half(seq + 1), _half(seq)  # sources are the even tokens, destinations the odd ones
    sizes = _sizes(c, sizes)
    norm = c.emit(R.sqrt(c.emit(R.sum(c.emit(R.multiply(metric, metric)), axis=[-1], keepdims=True))))
    m = c.emit(R.divide(metric, c.emit(R.maximum(norm, c.const(1e-12, dt)))))
    a, b = _tokens(c, m, 0, seq, 2), _tokens(c, m, 1, seq, 2)
    scores = c.emit(R.matmul(a, c.emit(R.permute_dims(b, [0, 2, 1]))))  # [batch, n_src, n_dst]
    src_pos = c.emit(R.multiply(_positions(c, n_src), c.const(2, "int64")))
    protected = c.emit(R.less(src_pos, c.const(p, "int64")))
    if p > 0:  # protected tokens neither merge (rows) nor receive (columns)
        neg_inf = c.const(-np.inf, dt)
        scores = c.emit(R.where(c.emit(R.expand_dims(protected, -1)), neg_inf, scores))
        dst_pos = c.emit(R.add(c.emit(R.multiply(_positions(c, n_dst), c.const(2, "int64"))), c.const(1, "int64")))
        scores = c.emit(R.where(c.emit(R.less(dst_pos, c.const(p, "int64"))), neg_inf, scores))
    best = c.emit(R.max(scores, axis=[-1]))
    target = c.emit(R.astype(c.emit(R.argmax(scores, axis=-1)), "int64"))
    sa = _tokens(c, sizes, 0, seq, 2)
    empty = c.emit(R.logical_and(c.emit(R.equal(sa, c.const(0.0, dt))), c.emit(R.logical_not(protected))))
    best = c.emit(R.where(empty, c.const(np.inf, dt), best))  # padding merges first: it weighs nothing
    order = c.emit(R.argsort(best, axis=-1, descending=True, dtype="int64"))
    src = _tokens(c, order, 0, r)
    keep = c.emit(R.sort(_tokens(c, order, r, n_src), axis=-1))
    dst = c.emit(R.gather_elements(target, src, axis=1))
    out = c.bb.emit_te(_merged_tokens, x, sizes, keep, src, dst, primfunc_name_hint="token_merge")
    if c.target is not None and c.target.kind.name == "llvm":
        gv = out.op if isinstance(out, relax.Call) else c.bb.lookup_binding(out).args[0]
        c.bb.update_func(gv, _schedule_merged_tokens(c.bb.get()[gv], c.target))
    out_sizes = c.bb.emit_te(_merged_sizes, sizes, keep, src, dst, primfunc_name_hint="token_merge_sizes")
    return [out, out_sizes]


def _merge_into(s, src, dst, b, j, value=None):
    """Destination j's size-weighted total and size: its own, plus every merged source that chose it
    (r static: written out term by term, in the order of the reference's np.add.at)."""
    own = 2 * j + 1
    total, weight = (value(own) * s[b, own] if value else None), s[b, own]
    for i in range(int(src.shape[1])):
        hit, at = dst[b, i] == j, 2 * src[b, i]
        if value:
            total = total + tirx.Select(hit, value(at) * s[b, at], tirx.const(0, s.dtype))
        weight = weight + tirx.Select(hit, s[b, at], tirx.const(0, s.dtype))
    return total, weight


def _merged_tokens(x, s, keep, src, dst):
    """[batch, seq - r, hidden]: the kept sources in order, then each destination's size-weighted mean
    with the sources merged into it. One elementwise kernel over the output (vectorised along hidden):
    the gather / scatter-add / divide / concat chain it replaces made seven passes over the tokens."""
    n_keep = keep.shape[1]

    def token(b, t, h):
        j = tirx.max(t - n_keep, 0)
        total, weight = _merge_into(s, src, dst, b, j, lambda i: x[b, i, h])
        merged = tirx.Select(weight > 0, total / tirx.max(weight, tirx.const(1e-30, x.dtype)), x[b, 2 * j + 1, h])
        return tirx.if_then_else(t < n_keep, x[b, 2 * keep[b, tirx.min(t, n_keep - 1)], h], merged)

    return te.compute((x.shape[0], x.shape[1] - src.shape[1], x.shape[2]), token, name="token_merge")


def _schedule_merged_tokens(func, target):
    """Per output token in parallel, vectorised along hidden (left to LLVM, the loop stayed scalar:
    1.8 ms a block on the digits ViT at batch 256)."""
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("token_merge")
    b, t, _ = sch.get_loops(block)
    sch.parallel(sch.fuse(b, t))
    _vectorize_row(sch, block, _vector_lanes(target, 32))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _merged_sizes(s, keep, src, dst):
    n_keep = keep.shape[1]

    def size(b, t):
        _, weight = _merge_into(s, src, dst, b, tirx.max(t - n_keep, 0))
        return tirx.if_then_else(t < n_keep, s[b, 2 * keep[b, tirx.min(t, n_keep - 1)]], weight)

    return te.compute((s.shape[0], s.shape[1] - src.shape[1]), size, name="token_merge_sizes")


@lowering("token_prune")
def _token_prune(c: Ctx, x, scores, sizes=None):
    dt = c.in_type(0).dtype
    p, last, fuse = c.attr("protect_first"), c.attr("protect_last"), c.attr("fuse_dropped")
    batch, seq, hidden = c.dims.shape(c.in_type(0).shape)
    keep = c.dims(c.attr("keep"))
    sizes = _sizes(c, sizes)
    inf = c.const(np.inf, dt)
    pos = _positions(c, seq)
    pri = scores
    if p > 0:
        pri = c.emit(R.where(c.emit(R.less(pos, c.const(p, "int64"))), inf, pri))
    if last > 0:  # the last tokens: positions counted from the end (flip of arange) below `last`
        pri = c.emit(R.where(c.emit(R.less(c.emit(R.flip(pos, 0)), c.const(last, "int64"))), inf, pri))
    order = c.emit(R.argsort(pri, axis=-1, descending=True, dtype="int64"))
    kept_idx = c.emit(R.sort(_tokens(c, order, 0, keep), axis=-1))
    xs = c.emit(R.gather_elements(x, _over_hidden(c, kept_idx, batch, keep, hidden), axis=1))
    ss = c.emit(R.gather_elements(sizes, kept_idx, axis=1))
    if not fuse:
        return [xs, ss]
    n_drop = seq - keep
    dropped = _tokens(c, order, keep, seq)
    d_sizes = c.emit(R.gather_elements(sizes, dropped, axis=1))
    w = c.emit(R.multiply(c.emit(R.gather_elements(scores, dropped, axis=1)), d_sizes))
    w_sum = c.emit(R.sum(w, axis=[1], keepdims=True))
    # all-zero scores: weigh by size instead (as the reference)
    w = c.emit(R.where(c.emit(R.greater(w_sum, c.const(0.0, dt))), w, c.emit(R.add(d_sizes, c.const(1e-12, dt)))))
    w_sum = c.emit(R.sum(w, axis=[1], keepdims=True))
    d_x = c.emit(R.gather_elements(x, _over_hidden(c, dropped, batch, n_drop, hidden), axis=1))
    num = c.emit(R.sum(c.emit(R.multiply(d_x, c.emit(R.expand_dims(w, -1)))), axis=[1], keepdims=True))
    fused = c.emit(R.divide(num, c.emit(R.expand_dims(c.emit(R.maximum(w_sum, c.const(1e-30, dt))), -1))))
    fused_size = c.emit(R.sum(d_sizes, axis=[1], keepdims=True))
    at = keep - last
    return [c.emit(R.concat([_tokens(c, t, 0, at), extra, _tokens(c, t, at, keep)], axis=1))
            for t, extra in ((xs, fused), (ss, fused_size))]


@lowering("attention_scores")
def _attention_scores(c: Ctx, q, k, mask=None):
    h, scale, query = c.attr("num_heads"), c.attr("scale"), c.attr("query")
    qt, kt = c.in_type(0), c.in_type(1)
    dt = qt.dtype

    def heads(t, tt):
        b, s, e = tt.shape
        return c.emit(R.permute_dims(c.emit(R.reshape(t, c.dims.shape([b, s, h, e // h]))), [0, 2, 1, 3]))

    scale = 1.0 / math.sqrt(qt.shape[-1] // h) if scale is None else scale
    s = c.emit(R.matmul(heads(q, qt), c.emit(R.permute_dims(heads(k, kt), [0, 1, 3, 2]))))
    s = c.emit(R.multiply(s, c.const(scale, dt)))
    neg_inf = c.const(-np.inf, dt)
    if c.attr("is_causal"):  # key index <= query index
        rows = c.emit(R.expand_dims(_positions(c, c.dims(qt.shape[1])), -1))
        s = c.emit(R.where(c.emit(R.less_equal(_positions(c, c.dims(kt.shape[1])), rows)), s, neg_inf))
    if mask is not None:
        s = c.emit(R.where(mask, s, neg_inf) if c.in_type(2).dtype == "bool" else R.add(s, mask))
    p = c.emit(R.mean(c.emit(R.nn.softmax(s, -1)), axis=[1]))  # [batch, q, k], averaged over heads
    if query == "mean":
        return R.mean(p, axis=[1])
    lq = c.dims(qt.shape[1])
    row = _tokens(c, p, 0, 1) if query == "first" else _tokens(c, p, lq - 1, lq)
    return R.squeeze(row, [1])
