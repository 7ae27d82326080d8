"""TE kernels of the token ops' TVM lowerings (nnforge/ops/tokens.py): the merged tokens of ``token_merge``
are one kernel of their own (``merged_tokens``, scheduled by ``schedule_merged_tokens`` on CPUs): every
output token reads its rows of the input directly.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from .tvm_schedule import _vectorize_row, vector_lanes


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


def merged_tokens(x, s, keep, src, dst):
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


def schedule_merged_tokens(func, target):
    """Per output token in parallel, vectorised along hidden (left to LLVM, the loop stayed scalar:
    1.8 ms a block on the digits ViT at batch 256)."""
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("token_merge")
    b, t, _ = sch.get_loops(block)
    sch.parallel(sch.fuse(b, t))
    _vectorize_row(sch, block, vector_lanes(target, 32))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def merged_sizes(s, keep, src, dst):
    n_keep = keep.shape[1]

    def size(b, t):
        _, weight = _merge_into(s, src, dst, b, tirx.max(t - n_keep, 0))
        return tirx.if_then_else(t < n_keep, s[b, 2 * keep[b, tirx.min(t, n_keep - 1)]], weight)

    return te.compute((s.shape[0], s.shape[1] - src.shape[1]), size, name="token_merge_sizes")
