"""Token ops, created by the token and layer passes: token_merge, token_prune, attention_scores.

All of them act on a token sequence ``x: [batch, seq, hidden]`` and its token ``sizes: [batch, seq]``
(how many original tokens each one stands for; 0 marks padding). Their output shapes are static
functions of the input shape and the attributes (merge r tokens -> seq - r, keep k -> k), so every
backend can plan memory ahead. The numpy references favour obviousness over speed; the torch executor
runs them (as it did before these ops had a torch entry).

ONNX: sorting is TopK (ties go to the lower index, as the references' stable argsort). Merging picks whole
token rows with GatherND (batch_dims=1) and adds the moved rows into their destinations with one
batched MatMul of small coefficient matrices; pruning gathers with GatherElements, the index broadcast
over the hidden axis.

TVM: sorting is ``argsort`` / ``sort`` (stable on CPU, so ties go to the lower index as in the references'
stable argsort); gathering along the token axis is ``gather_elements`` with the index broadcast over
the hidden axis. The merged tokens are one kernel of their own (``backends/tvm_tokens.py``): every output
token reads its rows of the input directly. Sequence lengths may be symbolic (``seq - r``); r,
protect_first and protect_last are static.
"""

from __future__ import annotations

import math

import numpy as np

from ..ir import symbols
from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop, implement
from .attention import sdpa
from .common import LazyModule, R, float_only
from .reduce import softmax_ref as _softmax

_onnxrt = LazyModule("nnforge.backends.onnxrt")  # INT64_MAX, ONNX_DTYPES
_tvm_kernels = LazyModule("nnforge.backends.tvm_tokens")  # the merged-tokens kernel


def _tokens_infer(op: str, x: TensorType, sizes: TensorType | None):
    float_only(x, op)
    if x.rank != 3:
        raise OpError(f"{op}: tokens must be [batch, seq, hidden], got {x.shape}")
    if sizes is not None and (sizes.rank != 2 or not symbols.dims_equal(sizes.shape[1], x.shape[1])):
        raise OpError(f"{op}: sizes must be [batch, seq] = [{x.shape[0]}, {x.shape[1]}], got {sizes.shape}")


def _shorter(seq, by: int):
    return symbols.from_sympy(symbols.to_sympy(seq) - by)


def _sizes_or_ones(x: np.ndarray, sizes) -> np.ndarray:
    return np.ones(x.shape[:2], x.dtype) if sizes is None else sizes.astype(x.dtype)


# ---------------------------------------------------------------------------------------
# token merging (ToMe bipartite soft matching)
# ---------------------------------------------------------------------------------------


def _merge_infer(ts, attrs):
    x, metric = ts[0], ts[1]
    sizes = ts[2] if len(ts) > 2 else None
    _tokens_infer("token_merge", x, sizes)
    r, p = attrs["r"], attrs["protect_first"]
    if r < 0 or p < 0:
        raise OpError(f"token_merge: r={r} and protect_first={p} must be >= 0")
    if metric.rank != 3 or not symbols.dims_equal(metric.shape[1], x.shape[1]):
        raise OpError(f"token_merge: metric must be [batch, seq, features] with seq {x.shape[1]}, got {metric.shape}")
    seq = x.shape[1]
    if isinstance(seq, int) and r > (seq + 1) // 2 - (p + 1) // 2:
        raise OpError(
            f"token_merge: cannot merge r={r} of {seq} tokens ({(p + 1) // 2} of the "
            f"{(seq + 1) // 2} sources protected)"
        )
    out = _shorter(seq, r)
    return [TensorType((x.shape[0], out, x.shape[2]), x.dtype), TensorType((x.shape[0], out), x.dtype)]


def bipartite_match(metric: np.ndarray, sizes: np.ndarray, r: int, protect_first: int):
    """ToMe's matching for one sequence: sources are the even tokens, destinations the odd ones.

    Returns (merged source indices, their destination indices, unmerged source indices in order);
    all are indices into the full sequence.
    """
    seq = metric.shape[0]
    src, dst = np.arange(0, seq, 2), np.arange(1, seq, 2)
    m = metric / np.maximum(np.linalg.norm(metric, axis=-1, keepdims=True), 1e-12)
    scores = m[src] @ m[dst].T
    scores[src < protect_first, :] = -np.inf  # protected tokens (class token) neither merge ...
    scores[:, dst < protect_first] = -np.inf  # ... nor receive
    best, target = scores.max(axis=-1), scores.argmax(axis=-1)
    empty = (sizes[src] == 0) & (src >= protect_first)
    best = np.where(empty, np.inf, best)  # padding weighs nothing: merging it costs nothing, so it goes first
    order = np.argsort(-best, kind="stable")
    if r > len(order) or np.isneginf(best[order[r - 1]]):
        raise ValueError(
            f"token_merge: cannot merge r={r} tokens of a sequence of {seq} with {protect_first} protected"
        )
    merged = order[:r]
    return src[merged], dst[target[merged]], np.sort(src[order[r:]])


@defop(
    "token_merge",
    _merge_infer,
    num_inputs=(2, 3),
    kind="fused",
    attrs={"r": ("int", REQUIRED), "protect_first": ("int", 0)},
    doc="ToMe: merge the r most similar (even -> odd) token pairs by size-weighted mean; returns (tokens, sizes)",
)
def token_merge(x, metric, sizes=None, r=0, protect_first=0):
    sizes = _sizes_or_ones(x, sizes)
    outs, out_sizes = [], []
    for b in range(x.shape[0]):
        src, dst, keep = bipartite_match(metric[b], sizes[b], r, protect_first)
        total = x[b] * sizes[b][:, None]
        weight = sizes[b].copy()
        np.add.at(total, dst, total[src])
        np.add.at(weight, dst, weight[src])
        odd = np.arange(1, x.shape[1], 2)
        merged = np.where(weight[odd, None] > 0, total[odd] / np.maximum(weight[odd, None], 1e-30), x[b, odd])
        outs.append(np.concatenate([x[b, keep], merged]))  # kept sources (in order) then destinations, as ToMe
        out_sizes.append(np.concatenate([sizes[b, keep], weight[odd]]))
    return np.stack(outs).astype(x.dtype), np.stack(out_sizes).astype(x.dtype)


# ---------------------------------------------------------------------------------------
# token pruning by received attention (EViT / PyramidDrop)
# ---------------------------------------------------------------------------------------

QUERIES = ("first", "last", "mean")


def _scores_infer(ts, attrs):
    q, k = ts[0], ts[1]
    mask = ts[2] if len(ts) > 2 else None
    if attrs["query"] not in QUERIES:
        raise OpError(f"attention_scores: query must be one of {QUERIES}, got {attrs['query']!r}")
    if q.rank != 3 or k.rank != 3 or not isinstance(q.shape[-1], int) or q.shape[-1] % attrs["num_heads"]:
        raise OpError(
            f"attention_scores: q, k must be [batch, seq, heads*dim] with hidden divisible by "
            f"num_heads={attrs['num_heads']}, got {q.shape}, {k.shape}"
        )
    sdpa.infer([q, k, k] + ([mask] if mask is not None else []), attrs)
    return [TensorType((q.shape[0], k.shape[1]), q.dtype)]


@defop(
    "attention_scores",
    _scores_infer,
    num_inputs=(2, 3),
    kind="fused",
    attrs={
        "num_heads": ("int", REQUIRED),
        "scale": ("optional_float", None),
        "is_causal": ("bool", False),
        "query": ("str", "first"),
    },
    doc="attention each key token receives, averaged over heads, from the first/last query or over all queries",
)
def attention_scores(q, k, mask=None, num_heads=1, scale=None, is_causal=False, query="first"):
    def heads(t):
        b, s, e = t.shape
        return t.reshape(b, s, num_heads, e // num_heads).transpose(0, 2, 1, 3)

    qh, kh = heads(q), heads(k)
    scale = 1.0 / math.sqrt(qh.shape[-1]) if scale is None else scale
    s = np.matmul(qh, np.swapaxes(kh, -1, -2)) * np.asarray(scale, q.dtype)
    if is_causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    p = _softmax(s, -1).mean(axis=1)  # [batch, q, k], averaged over heads
    rows = {"first": p[:, 0], "last": p[:, -1], "mean": p.mean(axis=1)}
    return rows[query].astype(q.dtype)


def _prune_infer(ts, attrs):
    x, scores = ts[0], ts[1]
    sizes = ts[2] if len(ts) > 2 else None
    _tokens_infer("token_prune", x, sizes)
    if scores.rank != 2 or not symbols.dims_equal(scores.shape[1], x.shape[1]):
        raise OpError(f"token_prune: scores must be [batch, seq] with seq {x.shape[1]}, got {scores.shape}")
    keep, p, last = attrs["keep"], attrs["protect_first"], attrs["protect_last"]
    if isinstance(keep, int) and keep < p + last:
        raise OpError(f"token_prune: keep={keep} is fewer than the {p + last} protected tokens")
    if isinstance(keep, int) and isinstance(x.shape[1], int) and keep > x.shape[1]:
        raise OpError(f"token_prune: keep={keep} is more than the {x.shape[1]} tokens")
    out = symbols.simplify(keep) if not attrs["fuse_dropped"] else symbols.from_sympy(symbols.to_sympy(keep) + 1)
    return [TensorType((x.shape[0], out, x.shape[2]), x.dtype), TensorType((x.shape[0], out), x.dtype)]


def prune_indices(scores: np.ndarray, keep: int, protect_first: int, protect_last: int):
    """Indices (ascending) of the kept tokens of one sequence, and of the dropped ones."""
    seq = scores.shape[0]
    if not protect_first + protect_last <= keep <= seq:
        raise ValueError(
            f"token_prune: cannot keep {keep} of {seq} tokens with {protect_first + protect_last} protected"
        )
    pri = scores.astype(np.float64).copy()
    pri[:protect_first] = np.inf
    pri[seq - protect_last :] = np.inf
    order = np.argsort(-pri, kind="stable")
    return np.sort(order[:keep]), np.sort(order[keep:])


@defop(
    "token_prune",
    _prune_infer,
    num_inputs=(2, 3),
    kind="fused",
    attrs={
        "keep": ("dim", REQUIRED),
        "protect_first": ("int", 0),
        "protect_last": ("int", 0),
        "fuse_dropped": ("bool", False),
    },
    doc="keep the `keep` tokens with the highest scores (in order); optionally fuse the rest into one "
    "score-weighted token placed before the protected last tokens; returns (tokens, sizes)",
)
def token_prune(x, scores, sizes=None, keep=1, protect_first=0, protect_last=0, fuse_dropped=False):
    sizes = _sizes_or_ones(x, sizes)
    outs, out_sizes = [], []
    for b in range(x.shape[0]):
        kept, dropped = prune_indices(scores[b], keep, protect_first, protect_last)
        xs, ss = x[b, kept], sizes[b, kept]
        if fuse_dropped:
            w = scores[b, dropped].astype(np.float64) * sizes[b, dropped]
            w = w if w.sum() > 0 else sizes[b, dropped].astype(np.float64) + 1e-12
            fused = (x[b, dropped] * w[:, None]).sum(0) / max(w.sum(), 1e-30) if len(dropped) else np.zeros(x.shape[2])
            at = keep - protect_last
            xs = np.concatenate([xs[:at], fused[None].astype(x.dtype), xs[at:]])
            ss = np.concatenate([ss[:at], [sizes[b, dropped].sum()], ss[at:]])
        outs.append(xs)
        out_sizes.append(ss)
    return np.stack(outs).astype(x.dtype), np.stack(out_sizes).astype(x.dtype)


# ---------------------------------------------------------------------------------------
# torch executor: the numpy references
# ---------------------------------------------------------------------------------------


@implement("torch", "token_merge", "token_prune", "attention_scores")
def _(cx, *inputs, **attrs):
    return cx.reference(*inputs, **attrs)


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------


def _onnx_i64(cx, values) -> str:
    return cx.const(list(values), "int64", "i")


def _onnx_tokens(cx, t: str, start: int, step: int = 1, end=None) -> str:
    """t[:, start:end:step] along the token axis."""
    ends = _onnx_i64(cx, [_onnxrt.INT64_MAX]) if end is None else end
    return cx.emit("Slice", [t, _onnx_i64(cx, [start]), ends, _onnx_i64(cx, [1]), _onnx_i64(cx, [step])])


def _onnx_len(cx, t: str, axis: int = 1) -> str:
    """int64 [1]: t.shape[axis]."""
    return cx.emit("Shape", [t], start=axis, end=axis + 1)


def _onnx_positions(cx, n: str, scale: int = 1, offset: int = 0) -> str:
    """int64 [n]: scale * arange(n) + offset."""
    r = cx.emit("Range", [cx.const(0, "int64"), cx.emit("Squeeze", [n, _onnx_i64(cx, [0])]), cx.const(1, "int64")])
    return cx.emit("Add", [cx.emit("Mul", [r, cx.const(scale, "int64")]), cx.const(offset, "int64")])


def _onnx_over_hidden(cx, idx: str, x: str) -> str:
    """[batch, k] indices -> [batch, k, hidden] for GatherElements/ScatterElements on x."""
    shape = cx.emit("Concat", [cx.emit("Shape", [idx]), cx.emit("Shape", [x], start=2, end=3)], axis=0)
    return cx.emit("Expand", [cx.emit("Unsqueeze", [idx, _onnx_i64(cx, [-1])]), shape])


def _onnx_sort_ascending(cx, idx: str, k: str) -> str:
    return cx.emit_multi("TopK", [idx, k], 2, axis=-1, largest=0, sorted=1)[0]


def _onnx_sizes(cx, n, ins) -> str:
    if len(ins) > 2 and ins[2]:
        return ins[2]
    return cx.emit("Expand", [cx.const(1.0, n.inputs[0].dtype), cx.emit("Shape", [ins[0]], start=0, end=2)])


@token_merge.onnxrt
def _(cx, *ins, r=0, protect_first=0):
    n = cx.node
    x, metric = ins[0], ins[1]
    dt, p = n.inputs[0].dtype, protect_first
    sizes = _onnx_sizes(cx, n, ins)
    inf, neg_inf = cx.const(np.inf, dt), cx.const(-np.inf, dt)
    norm = cx.emit("Max", [cx.emit("ReduceL2", [metric, _onnx_i64(cx, [-1])], keepdims=1), cx.const(1e-12, dt)])
    m = cx.emit("Div", [metric, norm])
    scores = cx.emit(
        "MatMul", [_onnx_tokens(cx, m, 0, 2), cx.emit("Transpose", [_onnx_tokens(cx, m, 1, 2)], perm=[0, 2, 1])]
    )
    n_src = _onnx_len(cx, _onnx_tokens(cx, m, 0, 2))
    src_pos = _onnx_positions(cx, n_src, 2, 0)
    protected = cx.emit("Less", [src_pos, cx.const(p, "int64")])
    # protected tokens neither merge (rows) nor receive (columns)
    scores = cx.emit("Where", [cx.emit("Unsqueeze", [protected, _onnx_i64(cx, [1])]), neg_inf, scores])
    dst_pos = _onnx_positions(cx, _onnx_len(cx, _onnx_tokens(cx, m, 1, 2)), 2, 1)
    scores = cx.emit("Where", [cx.emit("Less", [dst_pos, cx.const(p, "int64")]), neg_inf, scores])
    best = cx.emit("ReduceMax", [scores, _onnx_i64(cx, [-1])], keepdims=0)
    target = cx.emit("ArgMax", [scores], axis=-1, keepdims=0)
    sa, sb = _onnx_tokens(cx, sizes, 0, 2), _onnx_tokens(cx, sizes, 1, 2)
    empty = cx.emit("And", [cx.emit("Equal", [sa, cx.const(0.0, dt)]), cx.emit("Not", [protected])])
    best = cx.emit("Where", [empty, inf, best])  # padding merges first: it weighs nothing
    order = cx.emit_multi("TopK", [best, n_src], 2, axis=-1, largest=1, sorted=1)[1]
    src = _onnx_tokens(cx, order, 0, end=_onnx_i64(cx, [r]))
    keep = _onnx_sort_ascending(cx, _onnx_tokens(cx, order, r), cx.emit("Sub", [n_src, _onnx_i64(cx, [r])]))
    dst = cx.emit("GatherElements", [target, src], axis=1)
    # destination j's mean is x_j * s_j / w_j + sum of x_src * s_src / w_j over the sources merged into it:
    # small coefficient tensors, then one batched MatMul [n_dst, r] x [r, hidden] for the moved tokens
    # (the scatter-add / divide / where chain over the tokens it replaces cost ~3x as much)
    n_dst = _onnx_len(cx, sb)
    chosen = cx.emit(
        "Cast",
        [
            cx.emit(
                "Equal",
                [
                    cx.emit("Unsqueeze", [dst, _onnx_i64(cx, [1])]),
                    cx.emit("Unsqueeze", [_onnx_positions(cx, n_dst), _onnx_i64(cx, [1])]),
                ],
            )
        ],
        to=_onnxrt.ONNX_DTYPES[dt],
    )  # [batch, n_dst, r]: source i merged into destination j
    contrib = cx.emit(
        "Mul", [chosen, cx.emit("Unsqueeze", [cx.emit("GatherElements", [sa, src], axis=1), _onnx_i64(cx, [1])])]
    )
    weight = cx.emit("Add", [sb, cx.emit("ReduceSum", [contrib, _onnx_i64(cx, [2])], keepdims=0)])
    filled = cx.emit("Greater", [weight, cx.const(0.0, dt)])  # else: padding nothing merged into, kept as is
    inv = cx.emit(
        "Where", [filled, cx.emit("Reciprocal", [cx.emit("Max", [weight, cx.const(1e-30, dt)])]), cx.const(0.0, dt)]
    )
    own = cx.emit("Where", [filled, cx.emit("Mul", [sb, inv]), cx.const(1.0, dt)])
    moved = _onnx_gather_tokens(cx, x, src)
    merged = cx.emit(
        "Add",
        [
            cx.emit("Mul", [_onnx_tokens(cx, x, 1, 2), cx.emit("Unsqueeze", [own, _onnx_i64(cx, [-1])])]),
            cx.emit("MatMul", [cx.emit("Mul", [contrib, cx.emit("Unsqueeze", [inv, _onnx_i64(cx, [-1])])]), moved]),
        ],
    )
    out = cx.emit("Concat", [_onnx_gather_tokens(cx, x, keep), merged], axis=1)
    out_sizes = cx.emit("Concat", [cx.emit("GatherElements", [sa, keep], axis=1), weight], axis=1)
    return [out, out_sizes]


def _onnx_gather_tokens(cx, x: str, src_idx: str) -> str:
    """x[b, 2 * src_idx[b, i], :]: rows of x picked per sequence by source-set index (GatherND, batch_dims=1:
    no index broadcast over hidden)."""
    rows = cx.emit("Mul", [src_idx, cx.const(2, "int64")])
    return cx.emit("GatherND", [x, cx.emit("Unsqueeze", [rows, _onnx_i64(cx, [-1])])], batch_dims=1)


@token_prune.onnxrt
def _(cx, *ins, **a):
    n = cx.node
    x, scores = ins[0], ins[1]
    dt = n.inputs[0].dtype
    sizes = _onnx_sizes(cx, n, ins)
    inf = cx.const(np.inf, dt)
    seq = _onnx_len(cx, x)
    pos = _onnx_positions(cx, seq)
    pri = cx.emit("Where", [cx.emit("Less", [pos, cx.const(a["protect_first"], "int64")]), inf, scores])
    last = cx.emit("Squeeze", [cx.emit("Sub", [seq, _onnx_i64(cx, [a["protect_last"]])]), _onnx_i64(cx, [0])])
    pri = cx.emit("Where", [cx.emit("GreaterOrEqual", [pos, last]), inf, pri])
    order = cx.emit_multi("TopK", [pri, seq], 2, axis=-1, largest=1, sorted=1)[1]
    keep = cx.dim(a["keep"])
    kept_idx = _onnx_sort_ascending(cx, _onnx_tokens(cx, order, 0, end=keep), keep)
    xs = cx.emit("GatherElements", [x, _onnx_over_hidden(cx, kept_idx, x)], axis=1)
    ss = cx.emit("GatherElements", [sizes, kept_idx], axis=1)
    if not a["fuse_dropped"]:
        return [cx.emit("Identity", [xs]), cx.emit("Identity", [ss])]
    dropped = cx.emit("Slice", [order, keep, _onnx_i64(cx, [_onnxrt.INT64_MAX]), _onnx_i64(cx, [1])])
    d_sizes = cx.emit("GatherElements", [sizes, dropped], axis=1)
    w = cx.emit("Mul", [cx.emit("GatherElements", [scores, dropped], axis=1), d_sizes])
    one_axis = _onnx_i64(cx, [1])
    w_sum = cx.emit("ReduceSum", [w, one_axis], keepdims=1)
    # all-zero scores: weigh by size instead (as the reference)
    w = cx.emit(
        "Where", [cx.emit("Greater", [w_sum, cx.const(0.0, dt)]), w, cx.emit("Add", [d_sizes, cx.const(1e-12, dt)])]
    )
    w_sum = cx.emit("ReduceSum", [w, one_axis], keepdims=1)
    d_x = cx.emit("GatherElements", [x, _onnx_over_hidden(cx, dropped, x)], axis=1)
    num = cx.emit(
        "ReduceSum", [cx.emit("Mul", [d_x, cx.emit("Unsqueeze", [w, _onnx_i64(cx, [-1])])]), one_axis], keepdims=1
    )
    fused = cx.emit(
        "Div", [num, cx.emit("Unsqueeze", [cx.emit("Max", [w_sum, cx.const(1e-30, dt)]), _onnx_i64(cx, [-1])])]
    )
    fused_size = cx.emit("ReduceSum", [d_sizes, one_axis], keepdims=1)
    at = (
        cx.dim(f"({a['keep']}) - {a['protect_last']}")
        if isinstance(a["keep"], str)
        else _onnx_i64(cx, [a["keep"] - a["protect_last"]])
    )
    outs = []
    for src, extra in ((xs, fused), (ss, fused_size)):
        head = _onnx_tokens(cx, src, 0, end=at)
        tail = cx.emit("Slice", [src, at, _onnx_i64(cx, [_onnxrt.INT64_MAX]), _onnx_i64(cx, [1])])
        outs.append(cx.emit("Concat", [head, extra, tail], axis=1))
    return outs


@attention_scores.onnxrt
def _(cx, *ins, **a):
    n = cx.node
    q, h = n.inputs[0], a["num_heads"]
    dt = q.dtype
    split = cx.const([0, 0, h, -1], "int64", "heads")
    qh, kh = (cx.emit("Transpose", [cx.emit("Reshape", [t, split])], perm=[0, 2, 1, 3]) for t in ins[:2])
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1] // h)
    s = cx.emit("Mul", [cx.emit("MatMul", [qh, cx.emit("Transpose", [kh], perm=[0, 1, 3, 2])]), cx.const(scale, dt)])
    neg_inf = cx.const(-np.inf, dt)
    if a["is_causal"]:  # key index <= query index
        rows = cx.emit("Unsqueeze", [_onnx_positions(cx, _onnx_len(cx, ins[0])), _onnx_i64(cx, [1])])
        s = cx.emit("Where", [cx.emit("LessOrEqual", [_onnx_positions(cx, _onnx_len(cx, ins[1])), rows]), s, neg_inf])
    if len(ins) > 2 and ins[2]:
        s = cx.emit("Where", [ins[2], s, neg_inf]) if n.inputs[2].dtype == "bool" else cx.emit("Add", [s, ins[2]])
    p = cx.emit("ReduceMean", [cx.emit("Softmax", [s], axis=-1), _onnx_i64(cx, [1])], keepdims=0)  # over heads
    if a["query"] == "mean":
        return cx.emit("ReduceMean", [p, _onnx_i64(cx, [1])], keepdims=0)
    return cx.emit("Gather", [p, cx.const(0 if a["query"] == "first" else -1, "int64")], axis=1)


# ---------------------------------------------------------------------------------------
# TVM
# ---------------------------------------------------------------------------------------


def _tvm_tokens(c, t, start: int, stop, step: int = 1):
    """t[:, start:stop:step] along the token axis."""
    return c.emit(R.strided_slice(t, [1], [start], [stop], [step], assume_inbound=True))


def _tvm_over_hidden(c, idx, batch, k, hidden):
    """[batch, k] indices -> [batch, k, hidden] for gather_elements / scatter_elements on tokens."""
    return c.emit(R.broadcast_to(c.emit(R.expand_dims(idx, -1)), [batch, k, hidden]))


def _tvm_positions(c, n):
    """int64 [n]: arange(n)."""
    return c.emit(R.arange(0, n, 1, "int64"))


def _half(n):
    from tvm import tirx

    return n // 2 if isinstance(n, int) else tirx.floordiv(n, 2)


def _tvm_sizes(c, sizes):
    if sizes is not None:
        return sizes
    return c.emit(R.ones(c.dims.shape(c.in_type(0).shape[:2]), c.in_type(0).dtype))


@token_merge.tvm
def _(c, x, metric, sizes=None, r=0, protect_first=0):
    from tvm import relax

    dt, p = c.in_type(0).dtype, protect_first
    seq = c.dims(c.in_type(0).shape[1])
    n_src, n_dst = _half(seq + 1), _half(seq)  # sources are the even tokens, destinations the odd ones
    sizes = _tvm_sizes(c, sizes)
    norm = c.emit(R.sqrt(c.emit(R.sum(c.emit(R.multiply(metric, metric)), axis=[-1], keepdims=True))))
    m = c.emit(R.divide(metric, c.emit(R.maximum(norm, c.const(1e-12, dt)))))
    a, b = _tvm_tokens(c, m, 0, seq, 2), _tvm_tokens(c, m, 1, seq, 2)
    scores = c.emit(R.matmul(a, c.emit(R.permute_dims(b, [0, 2, 1]))))  # [batch, n_src, n_dst]
    src_pos = c.emit(R.multiply(_tvm_positions(c, n_src), c.const(2, "int64")))
    protected = c.emit(R.less(src_pos, c.const(p, "int64")))
    if p > 0:  # protected tokens neither merge (rows) nor receive (columns)
        neg_inf = c.const(-np.inf, dt)
        scores = c.emit(R.where(c.emit(R.expand_dims(protected, -1)), neg_inf, scores))
        dst_pos = c.emit(R.add(c.emit(R.multiply(_tvm_positions(c, n_dst), c.const(2, "int64"))), c.const(1, "int64")))
        scores = c.emit(R.where(c.emit(R.less(dst_pos, c.const(p, "int64"))), neg_inf, scores))
    best = c.emit(R.max(scores, axis=[-1]))
    target = c.emit(R.astype(c.emit(R.argmax(scores, axis=-1)), "int64"))
    sa = _tvm_tokens(c, sizes, 0, seq, 2)
    empty = c.emit(R.logical_and(c.emit(R.equal(sa, c.const(0.0, dt))), c.emit(R.logical_not(protected))))
    best = c.emit(R.where(empty, c.const(np.inf, dt), best))  # padding merges first: it weighs nothing
    order = c.emit(R.argsort(best, axis=-1, descending=True, dtype="int64"))
    src = _tvm_tokens(c, order, 0, r)
    keep = c.emit(R.sort(_tvm_tokens(c, order, r, n_src), axis=-1))
    dst = c.emit(R.gather_elements(target, src, axis=1))
    out = c.bb.emit_te(_tvm_kernels.merged_tokens, x, sizes, keep, src, dst, primfunc_name_hint="token_merge")
    if c.target is not None and c.target.kind.name == "llvm":
        gv = out.op if isinstance(out, relax.Call) else c.bb.lookup_binding(out).args[0]
        c.bb.update_func(gv, _tvm_kernels.schedule_merged_tokens(c.bb.get()[gv], c.target))
    out_sizes = c.bb.emit_te(_tvm_kernels.merged_sizes, sizes, keep, src, dst, primfunc_name_hint="token_merge_sizes")
    return [out, out_sizes]


@token_prune.tvm
def _(c, x, scores, sizes=None, keep=1, protect_first=0, protect_last=0, fuse_dropped=False):
    dt = c.in_type(0).dtype
    p, last, fuse = protect_first, protect_last, fuse_dropped
    batch, seq, hidden = c.dims.shape(c.in_type(0).shape)
    keep = c.dims(keep)
    sizes = _tvm_sizes(c, sizes)
    inf = c.const(np.inf, dt)
    pos = _tvm_positions(c, seq)
    pri = scores
    if p > 0:
        pri = c.emit(R.where(c.emit(R.less(pos, c.const(p, "int64"))), inf, pri))
    if last > 0:  # the last tokens: positions counted from the end (flip of arange) below `last`
        pri = c.emit(R.where(c.emit(R.less(c.emit(R.flip(pos, 0)), c.const(last, "int64"))), inf, pri))
    order = c.emit(R.argsort(pri, axis=-1, descending=True, dtype="int64"))
    kept_idx = c.emit(R.sort(_tvm_tokens(c, order, 0, keep), axis=-1))
    xs = c.emit(R.gather_elements(x, _tvm_over_hidden(c, kept_idx, batch, keep, hidden), axis=1))
    ss = c.emit(R.gather_elements(sizes, kept_idx, axis=1))
    if not fuse:
        return [xs, ss]
    n_drop = seq - keep
    dropped = _tvm_tokens(c, order, keep, seq)
    d_sizes = c.emit(R.gather_elements(sizes, dropped, axis=1))
    w = c.emit(R.multiply(c.emit(R.gather_elements(scores, dropped, axis=1)), d_sizes))
    w_sum = c.emit(R.sum(w, axis=[1], keepdims=True))
    # all-zero scores: weigh by size instead (as the reference)
    w = c.emit(R.where(c.emit(R.greater(w_sum, c.const(0.0, dt))), w, c.emit(R.add(d_sizes, c.const(1e-12, dt)))))
    w_sum = c.emit(R.sum(w, axis=[1], keepdims=True))
    d_x = c.emit(R.gather_elements(x, _tvm_over_hidden(c, dropped, batch, n_drop, hidden), axis=1))
    num = c.emit(R.sum(c.emit(R.multiply(d_x, c.emit(R.expand_dims(w, -1)))), axis=[1], keepdims=True))
    fused = c.emit(R.divide(num, c.emit(R.expand_dims(c.emit(R.maximum(w_sum, c.const(1e-30, dt))), -1))))
    fused_size = c.emit(R.sum(d_sizes, axis=[1], keepdims=True))
    at = keep - last
    return [
        c.emit(R.concat([_tvm_tokens(c, t, 0, at), extra, _tvm_tokens(c, t, at, keep)], axis=1))
        for t, extra in ((xs, fused), (ss, fused_size))
    ]


@attention_scores.tvm
def _(c, q, k, mask=None, num_heads=1, scale=None, is_causal=False, query="first"):
    h = num_heads
    qt, kt = c.in_type(0), c.in_type(1)
    dt = qt.dtype

    def heads(t, tt):
        b, s, e = tt.shape
        return c.emit(R.permute_dims(c.emit(R.reshape(t, c.dims.shape([b, s, h, e // h]))), [0, 2, 1, 3]))

    scale = 1.0 / math.sqrt(qt.shape[-1] // h) if scale is None else scale
    s = c.emit(R.matmul(heads(q, qt), c.emit(R.permute_dims(heads(k, kt), [0, 1, 3, 2]))))
    s = c.emit(R.multiply(s, c.const(scale, dt)))
    neg_inf = c.const(-np.inf, dt)
    if is_causal:  # key index <= query index
        rows = c.emit(R.expand_dims(_tvm_positions(c, c.dims(qt.shape[1])), -1))
        s = c.emit(R.where(c.emit(R.less_equal(_tvm_positions(c, c.dims(kt.shape[1])), rows)), s, neg_inf))
    if mask is not None:
        s = c.emit(R.where(mask, s, neg_inf) if c.in_type(2).dtype == "bool" else R.add(s, mask))
    p = c.emit(R.mean(c.emit(R.nn.softmax(s, -1)), axis=[1]))  # [batch, q, k], averaged over heads
    if query == "mean":
        return R.mean(p, axis=[1])
    lq = c.dims(qt.shape[1])
    row = _tvm_tokens(c, p, 0, 1) if query == "first" else _tvm_tokens(c, p, lq - 1, lq)
    return R.squeeze(row, [1])
