"""Decoding with a KV cache: ``cached_attention``, grouped-query attention over a cache of static capacity.

One op covers prefill (a prompt of S tokens, empty cache), decode (one token) and verification of
speculative drafts (a few tokens after a filled cache). Per sequence b of the batch:

    past[b]  = 0                          when total_len == S (the first prompt; right-padded in a batch)
             = seqlens_k[b] + 1 - S       otherwise
    token i of the chunk sits at position past[b] + i: RoPE rotates its q and k by that position, its
    k and v are written into the cache at that slot, and it attends to the slots 0 .. past[b] + i.

``seqlens_k[b]`` is the index of sequence b's last valid slot after the step, as ONNX Runtime's
GroupQueryAttention defines it; ``total_len`` is the longest sequence's length. Caches are
[batch, kv_heads, capacity, head_dim]; query head h reads kv head h // (num_heads // kv_heads)
(Hugging Face's ``repeat_kv``). RoPE is the rotate-half form (Llama, Mistral, Qwen2) with
``cos``/``sin`` tables [capacity, head_dim / 2] as inputs; without them no rotation.

Lowerings: ONNX Runtime's GroupQueryAttention (com.microsoft; the runtime binds past and present to one
buffer, so the cache is updated in place); TVM and torch write the new slots with a scatter into a new
cache tensor and attend over the whole capacity under a mask.
"""

from __future__ import annotations

import math

import numpy as np

from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop
from .common import LazyModule, R, float_only, torch

relax = LazyModule("tvm.relax")


def _infer(ts, attrs):
    q, k, v, pk, pv, seqlens, total = ts[:7]
    h, kvh = attrs["num_heads"], attrs["kv_num_heads"]
    float_only(q, "cached_attention")
    if h % kvh:
        raise OpError(f"cached_attention: num_heads {h} is not a multiple of kv_num_heads {kvh}")
    if q.rank != 3 or k.rank != 3 or v.rank != 3:
        raise OpError(f"cached_attention: q, k, v must be [batch, seq, heads*dim], got {q.shape}, {k.shape}, {v.shape}")
    if pk.rank != 4 or pk.shape != pv.shape or pk.shape[1] != kvh:
        raise OpError(f"cached_attention: caches must be [batch, {kvh}, capacity, dim], got {pk.shape}, {pv.shape}")
    d = pk.shape[3]
    if q.shape[2] != h * d or k.shape[2] != kvh * d or v.shape[2] != kvh * d:
        raise OpError(
            f"cached_attention: q/k/v widths {q.shape[2]}/{k.shape[2]}/{v.shape[2]} do not fit {h}/{kvh} heads of {d}"
        )
    if seqlens.dtype != "int32" or seqlens.rank != 1 or total.dtype != "int32" or total.rank != 0:
        raise OpError("cached_attention: seqlens_k must be int32 [batch] and total_len an int32 scalar")
    for t in (k, v, pk, pv) + tuple(ts[7:9]):
        if t is not None and t.dtype != q.dtype:
            raise OpError(f"cached_attention: all float inputs must be {q.dtype}, got {t.dtype}")
    return [TensorType(q.shape, q.dtype), pk, pv]


def _positions(seqlens, total, s: int) -> np.ndarray:
    """[batch, s] cache slot of each new token."""
    past = np.zeros_like(seqlens) if int(total) == s else seqlens + 1 - s
    return past[:, None].astype(np.int64) + np.arange(s)


def _rotate(x, cos, sin):
    """Rotate-half RoPE on [..., d] with cos/sin [..., d/2]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


@defop(
    "cached_attention",
    _infer,
    num_inputs=(7, 9),
    kind="fused",
    attrs={"num_heads": ("int", REQUIRED), "kv_num_heads": ("int", REQUIRED), "scale": ("optional_float", None)},
    doc="grouped-query attention with a KV cache of static capacity and optional fused RoPE; "
    "outputs (out, present_k, present_v)",
)
def cached_attention(q, k, v, past_k, past_v, seqlens_k, total_len, cos=None, sin=None, **attrs):
    h, kvh = attrs["num_heads"], attrs["kv_num_heads"]
    bsz, s, _ = q.shape
    d, cap = past_k.shape[3], past_k.shape[2]
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    pos = _positions(seqlens_k, total_len, s)
    if pos.max(initial=0) >= cap:
        raise OpError(f"cached_attention: position {int(pos.max())} is beyond the cache capacity {cap}")
    qh = q.reshape(bsz, s, h, d).transpose(0, 2, 1, 3)  # [b, h, s, d]
    kh = k.reshape(bsz, s, kvh, d).transpose(0, 2, 1, 3)
    vh = v.reshape(bsz, s, kvh, d).transpose(0, 2, 1, 3)
    if cos is not None:
        c, sn = cos[pos][:, None], sin[pos][:, None]  # [b, 1, s, d/2]
        qh, kh = _rotate(qh, c, sn), _rotate(kh, c, sn)
    present_k, present_v = past_k.copy(), past_v.copy()
    for b in range(bsz):
        present_k[b][:, pos[b]] = kh[b]
        present_v[b][:, pos[b]] = vh[b]
    group = h // kvh
    keys = np.repeat(present_k, group, axis=1)  # [b, h, cap, d]
    vals = np.repeat(present_v, group, axis=1)
    scores = np.matmul(qh, keys.transpose(0, 1, 3, 2)) * np.asarray(scale, q.dtype)
    allowed = np.arange(cap)[None, None, None, :] <= pos[:, None, :, None]
    p = np.exp(np.where(allowed, scores - np.where(allowed, scores, -np.inf).max(-1, keepdims=True), -np.inf))
    out = np.matmul(p / p.sum(-1, keepdims=True), vals).astype(q.dtype)
    return [out.transpose(0, 2, 1, 3).reshape(bsz, s, h * d), present_k, present_v]


@cached_attention.torch
def _(cx, q, k, v, past_k, past_v, seqlens_k, total_len, cos=None, sin=None, **attrs):
    h, kvh = attrs["num_heads"], attrs["kv_num_heads"]
    bsz, s, _ = q.shape
    d, cap = past_k.shape[3], past_k.shape[2]
    past = torch.zeros_like(seqlens_k) if int(total_len) == s else seqlens_k + 1 - s
    pos = past[:, None].long() + torch.arange(s)  # [b, s]
    qh = q.reshape(bsz, s, h, d).transpose(1, 2)
    kh = k.reshape(bsz, s, kvh, d).transpose(1, 2)
    vh = v.reshape(bsz, s, kvh, d).transpose(1, 2)
    if cos is not None:
        c, sn = cos[pos][:, None], sin[pos][:, None]

        def rot(x):
            a, b = x[..., : d // 2], x[..., d // 2 :]
            return torch.cat([a * c - b * sn, b * c + a * sn], -1)

        qh, kh = rot(qh), rot(kh)
    slots = pos[:, None, :, None].expand(bsz, kvh, s, d)
    present_k = past_k.scatter(2, slots, kh)
    present_v = past_v.scatter(2, slots, vh)
    allowed = torch.arange(cap)[None, None, None, :] <= pos[:, None, :, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        qh, present_k, present_v, attn_mask=allowed, scale=attrs["scale"], enable_gqa=True
    )
    return [out.transpose(1, 2).reshape(bsz, s, h * d), present_k, present_v]


def _ort_check(node, target: str) -> str | None:
    if target not in ("cpu", "cuda"):
        return "GroupQueryAttention is an ONNX Runtime contrib op (cpu and cuda only)"
    if node.inputs[3].shape[3] % 16:
        return f"GroupQueryAttention needs a head size that is a multiple of 16, got {node.inputs[3].shape[3]}"
    return None


@cached_attention.onnxrt(check=_ort_check)
def _(cx, q, k, v, past_k, past_v, seqlens_k, total_len, cos=None, sin=None, **attrs):
    if not cx.contrib:
        raise OpError("cached_attention: ONNX Runtime's GroupQueryAttention (a contrib op) is not allowed here")
    ins = [q, k, v, past_k, past_v, seqlens_k, total_len] + ([cos, sin] if cos else [])
    extra = {"scale": float(attrs["scale"])} if attrs["scale"] is not None else {}
    return cx.emit_multi(
        "GroupQueryAttention",
        ins,
        3,
        domain="com.microsoft",
        num_heads=attrs["num_heads"],
        kv_num_heads=attrs["kv_num_heads"],
        do_rotary=int(cos is not None),
        rotary_interleaved=0,
        **extra,
    )


def _tvm_rotate(c, x, cos, sin, half: int):
    a = c.emit(R.strided_slice(x, [3], [0], [half]))
    b = c.emit(R.strided_slice(x, [3], [half], [2 * half]))
    first = c.emit(R.subtract(c.emit(R.multiply(a, cos)), c.emit(R.multiply(b, sin))))
    second = c.emit(R.add(c.emit(R.multiply(b, cos)), c.emit(R.multiply(a, sin))))
    return c.emit(R.concat([first, second], axis=3))


@cached_attention.tvm
def _(c, q, k, v, past_k, past_v, seqlens_k, total_len, cos=None, sin=None, **attrs):
    h, kvh = attrs["num_heads"], attrs["kv_num_heads"]
    qt, ct = c.in_type(0), c.in_type(3)
    dtype, d, cap, group = qt.dtype, ct.shape[3], c.dims(ct.shape[2]), h // kvh
    bsz, s = c.dims(qt.shape[0]), c.dims(qt.shape[1])
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    # the cache slot of each new token, [b, s]
    s_tensor = c.emit(R.shape_to_tensor(relax.ShapeExpr([s])))
    first = c.emit(R.equal(c.emit(R.astype(total_len, "int64")), s_tensor))
    cont = c.emit(R.subtract(c.emit(R.add(c.emit(R.astype(seqlens_k, "int64")), c.const(1, "int64"))), s_tensor))
    past = c.emit(R.where(first, c.const(0, "int64"), cont))
    pos = c.emit(R.add(c.emit(R.expand_dims(past, 1)), c.emit(R.arange(0, s, 1, "int64"))))

    def heads(x, n):
        return c.emit(R.permute_dims(c.emit(R.reshape(x, [bsz, s, n, d])), [0, 2, 1, 3]))

    qh, kh, vh = heads(q, h), heads(k, kvh), heads(v, kvh)
    if cos is not None:
        rows = (
            c.emit(R.expand_dims(c.emit(R.take(cos, pos, axis=0)), 1)),
            c.emit(R.expand_dims(c.emit(R.take(sin, pos, axis=0)), 1)),
        )
        qh, kh = _tvm_rotate(c, qh, *rows, d // 2), _tvm_rotate(c, kh, *rows, d // 2)
    slots = c.emit(R.broadcast_to(c.emit(R.reshape(pos, [bsz, 1, s, 1])), [bsz, kvh, s, d]))
    present_k = c.emit(R.scatter_elements(past_k, slots, kh, axis=2))
    present_v = c.emit(R.scatter_elements(past_v, slots, vh, axis=2))
    # query heads of one kv head become rows of one matmul: [b, kvh, group * s, d]
    qg = c.emit(R.reshape(qh, [bsz, kvh, group * s, d]))
    scores = c.emit(R.matmul(qg, c.emit(R.permute_dims(present_k, [0, 1, 3, 2]))))
    scores = c.emit(R.multiply(scores, c.const(scale, dtype)))
    row_pos = c.emit(R.reshape(c.emit(R.tile(pos, [1, group])), [bsz, 1, group * s, 1]))
    allowed = c.emit(R.less_equal(c.emit(R.arange(0, cap, 1, "int64")), row_pos))
    p = c.emit(R.nn.softmax(c.emit(R.where(allowed, scores, c.const(-np.inf, dtype))), -1))
    out = c.emit(R.reshape(c.emit(R.matmul(p, present_v)), [bsz, h, s, d]))
    out = c.emit(R.reshape(c.emit(R.permute_dims(out, [0, 2, 1, 3])), [bsz, s, h * d]))
    return [out, present_k, present_v]
