"""ONNX lowerings of the token ops (nnforge/ir/ops_tokens.py), registered into onnxrt.LOWERINGS.

Sorting is TopK (ties go to the lower index, as the references' stable argsort). Merging picks whole
token rows with GatherND (batch_dims=1) and adds the moved rows into their destinations with one
batched MatMul of small coefficient matrices; pruning gathers with GatherElements, the index broadcast
over the hidden axis.
"""
from __future__ import annotations

import math

import numpy as np

from .onnxrt import INT64_MAX, LOWERINGS, ONNX_DTYPES


def _i64(cx, values) -> str:
    return cx.const(list(values), "int64", "i")


def _tokens(cx, t: str, start: int, step: int = 1, end=None) -> str:
    """t[:, start:end:step] along the token axis."""
    ends = _i64(cx, [INT64_MAX]) if end is None else end
    return cx.emit("Slice", [t, _i64(cx, [start]), ends, _i64(cx, [1]), _i64(cx, [step])])


def _len(cx, t: str, axis: int = 1) -> str:
    """int64 [1]: t.shape[axis]."""
    return cx.emit("Shape", [t], start=axis, end=axis + 1)


def _positions(cx, n: str, scale: int = 1, offset: int = 0) -> str:
    """int64 [n]: scale * arange(n) + offset."""
    r = cx.emit("Range", [cx.const(0, "int64"), cx.emit("Squeeze", [n, _i64(cx, [0])]), cx.const(1, "int64")])
    return cx.emit("Add", [cx.emit("Mul", [r, cx.const(scale, "int64")]), cx.const(offset, "int64")])


def _over_hidden(cx, idx: str, x: str) -> str:
    """[batch, k] indices -> [batch, k, hidden] for GatherElements/ScatterElements on x."""
    shape = cx.emit("Concat", [cx.emit("Shape", [idx]), cx.emit("Shape", [x], start=2, end=3)], axis=0)
    return cx.emit("Expand", [cx.emit("Unsqueeze", [idx, _i64(cx, [-1])]), shape])


def _sort_ascending(cx, idx: str, k: str) -> str:
    return cx.emit_multi("TopK", [idx, k], 2, axis=-1, largest=0, sorted=1)[0]


def _sizes(cx, n, ins) -> str:
    if len(ins) > 2 and ins[2]:
        return ins[2]
    return cx.emit("Expand", [cx.const(1.0, n.inputs[0].dtype), cx.emit("Shape", [ins[0]], start=0, end=2)])


def _token_merge(cx, n, ins):
    x, metric = ins[0], ins[1]
    dt, r, p = n.inputs[0].dtype, n.attrs["r"], n.attrs["protect_first"]
    sizes = _sizes(cx, n, ins)
    inf, neg_inf = cx.const(np.inf, dt), cx.const(-np.inf, dt)
    norm = cx.emit("Max", [cx.emit("ReduceL2", [metric, _i64(cx, [-1])], keepdims=1), cx.const(1e-12, dt)])
    m = cx.emit("Div", [metric, norm])
    scores = cx.emit("MatMul", [_tokens(cx, m, 0, 2), cx.emit("Transpose", [_tokens(cx, m, 1, 2)], perm=[0, 2, 1])])
    n_src = _len(cx, _tokens(cx, m, 0, 2))
    src_pos = _positions(cx, n_src, 2, 0)
    protected = cx.emit("Less", [src_pos, cx.const(p, "int64")])
    # protected tokens neither merge (rows) nor receive (columns)
    scores = cx.emit("Where", [cx.emit("Unsqueeze", [protected, _i64(cx, [1])]), neg_inf, scores])
    dst_pos = _positions(cx, _len(cx, _tokens(cx, m, 1, 2)), 2, 1)
    scores = cx.emit("Where", [cx.emit("Less", [dst_pos, cx.const(p, "int64")]), neg_inf, scores])
    best = cx.emit("ReduceMax", [scores, _i64(cx, [-1])], keepdims=0)
    target = cx.emit("ArgMax", [scores], axis=-1, keepdims=0)
    sa, sb = _tokens(cx, sizes, 0, 2), _tokens(cx, sizes, 1, 2)
    empty = cx.emit("And", [cx.emit("Equal", [sa, cx.const(0.0, dt)]), cx.emit("Not", [protected])])
    best = cx.emit("Where", [empty, inf, best])  # padding merges first: it weighs nothing
    order = cx.emit_multi("TopK", [best, n_src], 2, axis=-1, largest=1, sorted=1)[1]
    src = _tokens(cx, order, 0, end=_i64(cx, [r]))
    keep = _sort_ascending(cx, _tokens(cx, order, r), cx.emit("Sub", [n_src, _i64(cx, [r])]))
    dst = cx.emit("GatherElements", [target, src], axis=1)
    # destination j's mean is x_j * s_j / w_j + sum of x_src * s_src / w_j over the sources merged into it:
    # small coefficient tensors, then one batched MatMul [n_dst, r] x [r, hidden] for the moved tokens
    # (the scatter-add / divide / where chain over the tokens it replaces cost ~3x as much)
    n_dst = _len(cx, sb)
    chosen = cx.emit("Cast", [cx.emit("Equal", [cx.emit("Unsqueeze", [dst, _i64(cx, [1])]),
                                                cx.emit("Unsqueeze", [_positions(cx, n_dst), _i64(cx, [1])])])],
                     to=ONNX_DTYPES[dt])  # [batch, n_dst, r]: source i merged into destination j
    contrib = cx.emit("Mul", [chosen, cx.emit("Unsqueeze", [cx.emit("GatherElements", [sa, src], axis=1), _i64(cx, [1])])])
    weight = cx.emit("Add", [sb, cx.emit("ReduceSum", [contrib, _i64(cx, [2])], keepdims=0)])
    filled = cx.emit("Greater", [weight, cx.const(0.0, dt)])  # else: padding nothing merged into, kept as is
    inv = cx.emit("Where", [filled, cx.emit("Reciprocal", [cx.emit("Max", [weight, cx.const(1e-30, dt)])]),
                            cx.const(0.0, dt)])
    own = cx.emit("Where", [filled, cx.emit("Mul", [sb, inv]), cx.const(1.0, dt)])
    moved = _gather_tokens(cx, x, src)
    merged = cx.emit("Add", [cx.emit("Mul", [_tokens(cx, x, 1, 2), cx.emit("Unsqueeze", [own, _i64(cx, [-1])])]),
                             cx.emit("MatMul", [cx.emit("Mul", [contrib, cx.emit("Unsqueeze", [inv, _i64(cx, [-1])])]),
                                                moved])])
    cx.emit("Concat", [_gather_tokens(cx, x, keep), merged], out=n.outputs[0].name, axis=1)
    cx.emit("Concat", [cx.emit("GatherElements", [sa, keep], axis=1), weight], out=n.outputs[1].name, axis=1)


def _gather_tokens(cx, x: str, src_idx: str) -> str:
    """x[b, 2 * src_idx[b, i], :]: rows of x picked per sequence by source-set index (GatherND, batch_dims=1:
    no index broadcast over hidden)."""
    rows = cx.emit("Mul", [src_idx, cx.const(2, "int64")])
    return cx.emit("GatherND", [x, cx.emit("Unsqueeze", [rows, _i64(cx, [-1])])], batch_dims=1)


def _token_prune(cx, n, ins):
    x, scores = ins[0], ins[1]
    a, dt = n.attrs, n.inputs[0].dtype
    sizes = _sizes(cx, n, ins)
    inf = cx.const(np.inf, dt)
    seq = _len(cx, x)
    pos = _positions(cx, seq)
    pri = cx.emit("Where", [cx.emit("Less", [pos, cx.const(a["protect_first"], "int64")]), inf, scores])
    last = cx.emit("Squeeze", [cx.emit("Sub", [seq, _i64(cx, [a["protect_last"]])]), _i64(cx, [0])])
    pri = cx.emit("Where", [cx.emit("GreaterOrEqual", [pos, last]), inf, pri])
    order = cx.emit_multi("TopK", [pri, seq], 2, axis=-1, largest=1, sorted=1)[1]
    keep = cx.dim(a["keep"])
    kept_idx = _sort_ascending(cx, _tokens(cx, order, 0, end=keep), keep)
    xs = cx.emit("GatherElements", [x, _over_hidden(cx, kept_idx, x)], axis=1)
    ss = cx.emit("GatherElements", [sizes, kept_idx], axis=1)
    if not a["fuse_dropped"]:
        cx.emit("Identity", [xs], out=n.outputs[0].name)
        cx.emit("Identity", [ss], out=n.outputs[1].name)
        return
    dropped = cx.emit("Slice", [order, keep, _i64(cx, [INT64_MAX]), _i64(cx, [1])])
    d_sizes = cx.emit("GatherElements", [sizes, dropped], axis=1)
    w = cx.emit("Mul", [cx.emit("GatherElements", [scores, dropped], axis=1), d_sizes])
    one_axis = _i64(cx, [1])
    w_sum = cx.emit("ReduceSum", [w, one_axis], keepdims=1)
    # all-zero scores: weigh by size instead (as the reference)
    w = cx.emit("Where", [cx.emit("Greater", [w_sum, cx.const(0.0, dt)]), w, cx.emit("Add", [d_sizes, cx.const(1e-12, dt)])])
    w_sum = cx.emit("ReduceSum", [w, one_axis], keepdims=1)
    d_x = cx.emit("GatherElements", [x, _over_hidden(cx, dropped, x)], axis=1)
    num = cx.emit("ReduceSum", [cx.emit("Mul", [d_x, cx.emit("Unsqueeze", [w, _i64(cx, [-1])])]), one_axis], keepdims=1)
    fused = cx.emit("Div", [num, cx.emit("Unsqueeze", [cx.emit("Max", [w_sum, cx.const(1e-30, dt)]), _i64(cx, [-1])])])
    fused_size = cx.emit("ReduceSum", [d_sizes, one_axis], keepdims=1)
    at = cx.dim(f"({a['keep']}) - {a['protect_last']}") if isinstance(a["keep"], str) else _i64(cx, [a["keep"] - a["protect_last"]])
    for src, extra, out in ((xs, fused, n.outputs[0].name), (ss, fused_size, n.outputs[1].name)):
        head = _tokens(cx, src, 0, end=at)
        tail = cx.emit("Slice", [src, at, _i64(cx, [INT64_MAX]), _i64(cx, [1])])
        cx.emit("Concat", [head, extra, tail], out=out, axis=1)


def _attention_scores(cx, n, ins):
    q, h, a = n.inputs[0], n.attrs["num_heads"], n.attrs
    dt = q.dtype
    split = cx.const([0, 0, h, -1], "int64", "heads")
    qh, kh = (cx.emit("Transpose", [cx.emit("Reshape", [t, split])], perm=[0, 2, 1, 3]) for t in ins[:2])
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1] // h)
    s = cx.emit("Mul", [cx.emit("MatMul", [qh, cx.emit("Transpose", [kh], perm=[0, 1, 3, 2])]), cx.const(scale, dt)])
    neg_inf = cx.const(-np.inf, dt)
    if a["is_causal"]:  # key index <= query index
        rows = cx.emit("Unsqueeze", [_positions(cx, _len(cx, ins[0])), _i64(cx, [1])])
        s = cx.emit("Where", [cx.emit("LessOrEqual", [_positions(cx, _len(cx, ins[1])), rows]), s, neg_inf])
    if len(ins) > 2 and ins[2]:
        s = cx.emit("Where", [ins[2], s, neg_inf]) if n.inputs[2].dtype == "bool" else cx.emit("Add", [s, ins[2]])
    p = cx.emit("ReduceMean", [cx.emit("Softmax", [s], axis=-1), _i64(cx, [1])], keepdims=0)  # over heads
    out = n.output.name
    if a["query"] == "mean":
        cx.emit("ReduceMean", [p, _i64(cx, [1])], out=out, keepdims=0)
    else:
        cx.emit("Gather", [p, cx.const(0 if a["query"] == "first" else -1, "int64")], out=out, axis=1)


LOWERINGS.update({"token_merge": _token_merge, "token_prune": _token_prune, "attention_scores": _attention_scores})
