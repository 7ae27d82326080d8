"""Ops created by the token and layer passes; registered into nnforge.ir.ops.REGISTRY on import.

All of them act on a token sequence ``x: [batch, seq, hidden]`` and its token ``sizes: [batch, seq]``
(how many original tokens each one stands for; 0 marks padding). Their output shapes are static
functions of the input shape and the attributes (merge r tokens -> seq - r, keep k -> k), so every
backend can plan memory ahead. The numpy references favour obviousness over speed.
"""
from __future__ import annotations

import math

import numpy as np

from . import symbols
from .graph import TensorType
from .ops import REQUIRED, OpError, _float_only, _sdpa_infer, _softmax, register  # noqa: F401


def _tokens_infer(op: str, x: TensorType, sizes: TensorType | None):
    _float_only(x, op)
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
        raise OpError(f"token_merge: cannot merge r={r} of {seq} tokens ({(p + 1) // 2} of the "
                      f"{(seq + 1) // 2} sources protected)")
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
        raise ValueError(f"token_merge: cannot merge r={r} tokens of a sequence of {seq} "
                         f"with {protect_first} protected")
    merged = order[:r]
    return src[merged], dst[target[merged]], np.sort(src[order[r:]])


@register("token_merge", _merge_infer, num_inputs=(2, 3), kind="fused",
          attrs={"r": ("int", REQUIRED), "protect_first": ("int", 0)},
          doc="ToMe: merge the r most similar (even -> odd) token pairs by size-weighted mean; returns (tokens, sizes)")
def _token_merge(x, metric, sizes=None, r=0, protect_first=0):
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
        raise OpError(f"attention_scores: q, k must be [batch, seq, heads*dim] with hidden divisible by "
                      f"num_heads={attrs['num_heads']}, got {q.shape}, {k.shape}")
    _sdpa_infer([q, k, k] + ([mask] if mask is not None else []), attrs)
    return [TensorType((q.shape[0], k.shape[1]), q.dtype)]


@register("attention_scores", _scores_infer, num_inputs=(2, 3), kind="fused",
          attrs={"num_heads": ("int", REQUIRED), "scale": ("optional_float", None), "is_causal": ("bool", False),
                 "query": ("str", "first")},
          doc="attention each key token receives, averaged over heads, from the first/last query or over all queries")
def _attention_scores(q, k, mask=None, num_heads=1, scale=None, is_causal=False, query="first"):
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
        raise ValueError(f"token_prune: cannot keep {keep} of {seq} tokens with {protect_first + protect_last} protected")
    pri = scores.astype(np.float64).copy()
    pri[:protect_first] = np.inf
    pri[seq - protect_last:] = np.inf
    order = np.argsort(-pri, kind="stable")
    return np.sort(order[:keep]), np.sort(order[keep:])


@register("token_prune", _prune_infer, num_inputs=(2, 3), kind="fused",
          attrs={"keep": ("dim", REQUIRED), "protect_first": ("int", 0), "protect_last": ("int", 0),
                 "fuse_dropped": ("bool", False)},
          doc="keep the `keep` tokens with the highest scores (in order); optionally fuse the rest into one "
              "score-weighted token placed before the protected last tokens; returns (tokens, sizes)")
def _token_prune(x, scores, sizes=None, keep=1, protect_first=0, protect_last=0, fuse_dropped=False):
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
