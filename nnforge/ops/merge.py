"""Token merging on a spatial grid, for diffusion self-attention (ToMe for Stable Diffusion): grid_merge.

``grid_merge(x, r, grid=[h, w], stride=[sy, sx])`` takes the tokens ``x: [batch, h*w, hidden]`` of an h x w
grid (row-major, as a U-Net's or DiT's ``[B, C, H, W] -> [B, H*W, C]`` flattening lays them out). The
destinations are the top-left token of every sy x sx cell (every token whose row is a multiple of sy and
whose column is a multiple of sx); the other tokens are sources. Each source is matched with its most
similar destination (cosine similarity of x), the r sources with the most similar matches are merged into
their destinations (the mean of a destination and everything merged into it), the rest are kept. Outputs:

- ``merged: [batch, h*w - r, hidden]``: the kept sources in grid order, then the destinations in grid order;
- ``slot: [batch, h*w]`` (int64): where each original token went in ``merged``.

Unmerging is a gather: ``merged[b, slot[b, n]]`` is what token n reads back (``gather_elements`` along the
token axis with ``slot`` broadcast over hidden), so a destination's output is copied to every source merged
into it. With r = 0 nothing merges: ``merged`` is a permutation of x and the gather restores it exactly.

Unlike ``token_merge`` (nnforge/ops/tokens.py, ToMe for ViTs: the sequence stays short for good, sizes weight
later merges), nothing here tracks sizes: the merge is undone after the attention it serves.

ONNX and TVM: the source/destination partition is static (a constant index list); the matching is a MatMul of
the normalised tokens, ReduceMax/ArgMax per source, a descending sort of the best scores (TopK / argsort; ties go
to the lower index, as the reference's stable argsort); the slots are two ScatterElements into a constant base,
and the means (ONNX) a ScatterND with reduction add of the merged sources' rows into their destinations' rows
divided by the counts, (TVM) a scatter_elements with reduction add of all tokens into zeros, divided likewise.
"""

from __future__ import annotations

import numpy as np

from ..ir import symbols
from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop, implement
from .common import R, float_only


def _merge_infer(ts, attrs):
    (x,) = ts
    float_only(x, "grid_merge")
    if x.rank != 3:
        raise OpError(f"grid_merge: tokens must be [batch, h*w, hidden], got {x.shape}")
    (h, w), (sy, sx), r = attrs["grid"], attrs["stride"], attrs["r"]
    if h < 1 or w < 1 or sy < 1 or sx < 1:
        raise OpError(f"grid_merge: grid {h}x{w} and stride {sy}x{sx} must be positive")
    if not symbols.dims_equal(x.shape[1], h * w):
        raise OpError(f"grid_merge: {x.shape[1]} tokens are not a {h}x{w} grid")
    n_src = len(partition(h, w, sy, sx)[0])
    if not 0 <= r <= n_src:
        raise OpError(f"grid_merge: r={r} must be in [0, {n_src}] (the sources of a {h}x{w} grid, stride {sy}x{sx})")
    return [TensorType((x.shape[0], h * w - r, x.shape[2]), x.dtype), TensorType((x.shape[0], h * w), "int64")]


def partition(h: int, w: int, sy: int, sx: int) -> tuple[np.ndarray, np.ndarray]:
    """(sources, destinations): token indices of an h x w grid; a destination at the top-left of each cell."""
    rows, cols = np.divmod(np.arange(h * w), w)
    is_dst = (rows % sy == 0) & (cols % sx == 0)
    return np.flatnonzero(~is_dst), np.flatnonzero(is_dst)


def _slot_base(src: np.ndarray, dst: np.ndarray, n_keep: int) -> np.ndarray:
    """[h*w] int64: the destinations' slots (after the kept sources); 0 at the sources, overwritten later."""
    base = np.zeros(len(src) + len(dst), np.int64)
    base[dst] = n_keep + np.arange(len(dst))
    return base


def grid_match(x: np.ndarray, r: int, grid, stride) -> np.ndarray:
    """The slot of each token of one sequence ``x: [h*w, hidden]`` in the merged sequence."""
    src, dst = partition(*grid, *stride)
    m = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    scores = m[src] @ m[dst].T
    best, target = scores.max(axis=-1), scores.argmax(axis=-1)
    order = np.argsort(-best, kind="stable")
    merged, kept = order[:r], np.sort(order[r:])
    slot = _slot_base(src, dst, len(kept))
    slot[src[kept]] = np.arange(len(kept))
    slot[src[merged]] = len(kept) + target[merged]
    return slot


@defop(
    "grid_merge",
    _merge_infer,
    num_inputs=(1, 1),
    kind="fused",
    attrs={"r": ("int", REQUIRED), "grid": ("ints", REQUIRED), "stride": ("ints", [2, 2])},
    doc="ToMe-SD: merge the r sources of an h x w token grid most similar to their destination (one per "
    "stride cell) by mean; returns (merged tokens, each token's slot in them)",
)
def grid_merge(x, r=0, grid=(1, 1), stride=(2, 2)):
    n_out = x.shape[1] - r
    outs, slots = [], []
    for b in range(x.shape[0]):
        slot = grid_match(x[b], r, grid, stride)
        total = np.zeros((n_out, x.shape[2]), np.float64)
        np.add.at(total, slot, x[b])
        outs.append(total / np.bincount(slot, minlength=n_out)[:, None])
        slots.append(slot)
    return np.stack(outs).astype(x.dtype), np.stack(slots)


@implement("torch", "grid_merge")
def _(cx, *inputs, **attrs):
    return cx.reference(*inputs, **attrs)


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------


@grid_merge.onnxrt
def _(cx, x, r=0, grid=(1, 1), stride=(2, 2)):
    dt = cx.node.inputs[0].dtype
    src, dst = partition(*grid, *stride)
    n, n_keep = len(src) + len(dst), len(src) - r
    i64 = lambda v: cx.const(v, "int64", "i")  # noqa: E731
    src_pos = cx.const(src, "int64", "src")
    norm = cx.emit("Max", [cx.emit("ReduceL2", [x, i64([-1])], keepdims=1), cx.const(1e-12, dt)])
    m = cx.emit("Div", [x, norm])
    ms = cx.emit("Gather", [m, src_pos], axis=1)
    md = cx.emit("Gather", [m, cx.const(dst, "int64", "dst")], axis=1)
    scores = cx.emit("MatMul", [ms, cx.emit("Transpose", [md], perm=[0, 2, 1])])  # [batch, n_src, n_dst]
    best = cx.emit("ReduceMax", [scores, i64([-1])], keepdims=0)
    target = cx.emit("ArgMax", [scores], axis=-1, keepdims=0)
    order = cx.emit_multi("TopK", [best, i64([len(src)])], 2, axis=-1, largest=1, sorted=1)[1]
    tail = cx.emit("Slice", [order, i64([r]), i64([len(src)]), i64([1])])
    kept = cx.emit_multi("TopK", [tail, i64([n_keep])], 2, axis=-1, largest=0, sorted=1)[0]  # grid order
    batch = cx.emit("Shape", [x], start=0, end=1)
    shape = lambda *dims: cx.emit("Concat", [batch, i64(list(dims))], axis=0)  # noqa: E731
    slot = cx.emit("Expand", [cx.const(_slot_base(src, dst, n_keep), "int64", "slots"), shape(n)])
    kept_pos = cx.emit("Gather", [src_pos, kept], axis=0)
    slot = cx.emit(
        "ScatterElements", [slot, kept_pos, cx.emit("Expand", [i64(list(range(n_keep))), shape(n_keep)])], axis=1
    )
    rows = lambda pos: cx.emit("GatherND", [x, cx.emit("Unsqueeze", [pos, i64([-1])])], batch_dims=1)  # noqa: E731
    means = cx.emit("Gather", [x, cx.const(dst, "int64", "dst")], axis=1)
    if r:
        merged = cx.emit("Slice", [order, i64([0]), i64([r]), i64([1])])
        to = cx.emit("GatherElements", [target, merged], axis=1)  # [batch, r]: destination of each merged source
        slot = cx.emit(
            "ScatterElements",
            [slot, cx.emit("Gather", [src_pos, merged], axis=0), cx.emit("Add", [to, i64(n_keep)])],
            axis=1,
        )
        # the merged sources' rows added into their destinations' rows (ScatterND on whole rows: ScatterElements
        # over every element cost about 3x as much), then divided by the counts
        positions = cx.emit("Range", [i64(0), cx.emit("Squeeze", [batch, i64([0])]), i64(1)])
        at_batch = cx.emit("Expand", [cx.emit("Unsqueeze", [positions, i64([1])]), cx.emit("Shape", [to])])
        at = cx.emit("Concat", [cx.emit("Unsqueeze", [t, i64([-1])]) for t in (at_batch, to)], axis=-1)
        means = cx.emit("ScatterND", [means, at, rows(cx.emit("Gather", [src_pos, merged], axis=0))], reduction="add")
        ones = cx.emit("Expand", [cx.const(1.0, dt), shape(len(dst))])
        count = cx.emit(
            "ScatterElements", [ones, to, cx.emit("Expand", [cx.const(1.0, dt), shape(r)])], axis=1, reduction="add"
        )
        means = cx.emit("Div", [means, cx.emit("Unsqueeze", [count, i64([-1])])])
    return [cx.emit("Concat", [rows(kept_pos), means], axis=1), slot]


# ---------------------------------------------------------------------------------------
# TVM
# ---------------------------------------------------------------------------------------


@grid_merge.tvm
def _(c, x, r=0, grid=(1, 1), stride=(2, 2)):
    dt = c.in_type(0).dtype
    batch, n, hidden = c.dims.shape(c.in_type(0).shape)
    src, dst = partition(*grid, *stride)
    n_src, n_keep = len(src), len(src) - r
    src_pos = c.const(src, "int64")
    norm = c.emit(R.sqrt(c.emit(R.sum(c.emit(R.multiply(x, x)), axis=[-1], keepdims=True))))
    m = c.emit(R.divide(x, c.emit(R.maximum(norm, c.const(1e-12, dt)))))
    ms, md = c.emit(R.take(m, src_pos, axis=1)), c.emit(R.take(m, c.const(dst, "int64"), axis=1))
    scores = c.emit(R.matmul(ms, c.emit(R.permute_dims(md, [0, 2, 1]))))  # [batch, n_src, n_dst]
    best = c.emit(R.max(scores, axis=[-1]))
    target = c.emit(R.astype(c.emit(R.argmax(scores, axis=-1)), "int64"))
    order = c.emit(R.argsort(best, axis=-1, descending=True, dtype="int64"))
    kept = c.emit(R.sort(c.emit(R.strided_slice(order, [1], [r], [n_src], assume_inbound=True)), axis=-1))
    slot = c.emit(R.broadcast_to(c.const(_slot_base(src, dst, n_keep), "int64"), [batch, n]))
    kept_pos = c.emit(R.take(src_pos, kept, axis=0))
    ranks = c.emit(R.broadcast_to(c.const(np.arange(n_keep), "int64"), [batch, n_keep]))
    slot = c.emit(R.scatter_elements(slot, kept_pos, ranks, 1))
    if r:
        merged = c.emit(R.strided_slice(order, [1], [0], [r], assume_inbound=True))
        to = c.emit(R.add(c.emit(R.gather_elements(target, merged, axis=1)), c.const(n_keep, "int64")))
        slot = c.emit(R.scatter_elements(slot, c.emit(R.take(src_pos, merged, axis=0)), to, 1))
    over_hidden = c.emit(R.broadcast_to(c.emit(R.expand_dims(slot, -1)), [batch, n, hidden]))
    total = c.emit(R.scatter_elements(c.emit(R.zeros([batch, n - r, hidden], dt)), over_hidden, x, 1, "add"))
    ones = c.emit(R.ones([batch, n], dt))
    count = c.emit(R.scatter_elements(c.emit(R.zeros([batch, n - r], dt)), slot, ones, 1, "add"))
    return [c.emit(R.divide(total, c.emit(R.expand_dims(count, -1)))), slot]
