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
from ..ir.registry import REQUIRED, OpError, defop, implement
from .attention import INT64_MAX
from .common import LazyModule, R, float_only, torch

relax = LazyModule("tvm.relax")
_tvm_cache = LazyModule("nnforge.backends.tvm_cache")


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
    qh, kh, vh, pos, scale = _step(q, k, v, seqlens_k, total_len, cos, sin, attrs, past_k.shape[2], past_k.shape[3])
    present_k, present_v = _write(past_k, kh, pos), _write(past_v, vh, pos)
    return [_attend(qh, present_k, present_v, pos, scale, h // kvh), present_k, present_v]


def _step(q, k, v, seqlens_k, total_len, cos, sin, attrs, cap: int, d: int):
    """(q, k, v per head [b, heads, s, d], RoPE applied; the slot of each new token [b, s]; the scale)."""
    h, kvh = attrs["num_heads"], attrs["kv_num_heads"]
    bsz, s, _ = q.shape
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    pos = _positions(seqlens_k, total_len, s)
    if pos.max(initial=0) >= cap:
        raise OpError(f"cached_attention: position {int(pos.max())} is beyond the cache capacity {cap}")
    qh = q.reshape(bsz, s, h, d).transpose(0, 2, 1, 3)
    kh = k.reshape(bsz, s, kvh, d).transpose(0, 2, 1, 3)
    vh = v.reshape(bsz, s, kvh, d).transpose(0, 2, 1, 3)
    if cos is not None:
        c, sn = cos[pos][:, None], sin[pos][:, None]  # [b, 1, s, d/2]
        qh, kh = _rotate(qh, c, sn), _rotate(kh, c, sn)
    return qh, kh, vh, pos, scale


def _write(cache: np.ndarray, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The cache with ``rows`` [b, heads, s, ...] stored at slots ``pos`` [b, s]."""
    out = cache.copy()
    for b in range(len(pos)):
        out[b][:, pos[b]] = rows[b]
    return out


def _attend(qh, keys, values, pos, scale, group: int) -> np.ndarray:
    """Attention of qh [b, h, s, d] over caches [b, kv_heads, cap, d], token i seeing slots 0 .. pos[b, i]:
    [b, s, h * d]."""
    bsz, h, s, d = qh.shape
    cap = keys.shape[2]
    keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)  # [b, h, cap, d]
    scores = np.matmul(qh, keys.transpose(0, 1, 3, 2)) * np.asarray(scale, qh.dtype)
    allowed = np.arange(cap)[None, None, None, :] <= pos[:, None, :, None]
    p = np.exp(np.where(allowed, scores - np.where(allowed, scores, -np.inf).max(-1, keepdims=True), -np.inf))
    out = np.matmul(p / p.sum(-1, keepdims=True), values).astype(qh.dtype)
    return out.transpose(0, 2, 1, 3).reshape(bsz, s, h * d)


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
    return group_query_attention(cx, [q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin], attrs)


def group_query_attention(cx, ins: list, attrs: dict) -> list[str]:
    """ORT's GroupQueryAttention on ONNX names (q, k, v, caches, seqlens_k, total_len, cos, sin); k and v ""
    when q is the packed q/k/v projection (onnxrt_fusions lowers the slices of one linear that way)."""
    q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin = ins
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


def _tvm_positions(c, seqlens_k, total_len, s):
    """[b, s] int64: the cache slot of each new token."""
    s_tensor = c.emit(R.shape_to_tensor(relax.ShapeExpr([s])))
    first = c.emit(R.equal(c.emit(R.astype(total_len, "int64")), s_tensor))
    cont = c.emit(R.subtract(c.emit(R.add(c.emit(R.astype(seqlens_k, "int64")), c.const(1, "int64"))), s_tensor))
    past = c.emit(R.where(first, c.const(0, "int64"), cont))
    return c.emit(R.add(c.emit(R.expand_dims(past, 1)), c.emit(R.arange(0, s, 1, "int64"))))


def _tvm_step(c, q, k, v, seqlens_k, total_len, cos, sin, attrs):
    """q, k, v per head ([b, heads, s, d], RoPE applied), the slot of each new token [b, s], and the sizes."""
    h, kvh = attrs["num_heads"], attrs["kv_num_heads"]
    qt = c.in_type(0)
    d = qt.shape[2] // h
    bsz, s = c.dims(qt.shape[0]), c.dims(qt.shape[1])
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    pos = _tvm_positions(c, seqlens_k, total_len, s)

    def heads(x, n):
        return c.emit(R.permute_dims(c.emit(R.reshape(x, [bsz, s, n, d])), [0, 2, 1, 3]))

    qh, kh, vh = heads(q, h), heads(k, kvh), heads(v, kvh)
    if cos is not None:
        rows = (
            c.emit(R.expand_dims(c.emit(R.take(cos, pos, axis=0)), 1)),
            c.emit(R.expand_dims(c.emit(R.take(sin, pos, axis=0)), 1)),
        )
        qh, kh = _tvm_rotate(c, qh, *rows, d // 2), _tvm_rotate(c, kh, *rows, d // 2)
    return qh, kh, vh, pos, dict(bsz=bsz, s=s, d=d, h=h, kvh=kvh, scale=scale, steps=qt.shape[1])


def _tvm_attend(c, qh, pos, z: dict, keys, values, k_scale=None, v_scale=None):
    """[b, s, h * d]: attention of qh over the cache (float, or int8 codes with their scales [b, kvh, cap, 1])."""
    bsz, s, d, h, kvh = z["bsz"], z["s"], z["d"], z["h"], z["kvh"]
    group = h // kvh
    # query heads of one kv head become rows of one matmul: [b, kvh, group * s, d]
    qg = c.emit(R.reshape(qh, [bsz, kvh, group * s, d]))
    row_pos = c.emit(R.reshape(c.emit(R.tile(pos, [1, group])), [bsz, 1, group * s, 1]))
    if c.in_type(0).dtype == "float32" and _tvm_cache.decode_available(c.target, d, z["steps"]):
        # a decode step: kernels that read only the filled slots of the cache, not its whole capacity
        limit = c.emit(R.add(c.emit(R.reshape(row_pos, [bsz, group * s])), c.const(1, "int64")))
        out = _tvm_cache.decode_attention(c.bb, qg, keys, values, limit, z["scale"], k_scale, v_scale)
    else:
        if k_scale is not None:  # an int8 cache, dequantized whole (a prompt's step reads every slot anyway)
            keys = c.emit(R.multiply(c.emit(R.astype(keys, "float32")), k_scale))
            values = c.emit(R.multiply(c.emit(R.astype(values, "float32")), v_scale))
        dtype = c.in_type(0).dtype
        scores = c.emit(R.matmul(qg, c.emit(R.permute_dims(keys, [0, 1, 3, 2]))))
        scores = c.emit(R.multiply(scores, c.const(z["scale"], dtype)))
        cap = keys.ty.shape[2]
        allowed = c.emit(R.less_equal(c.emit(R.arange(0, cap, 1, "int64")), row_pos))
        p = c.emit(R.nn.softmax(c.emit(R.where(allowed, scores, c.const(-np.inf, dtype))), -1))
        out = c.emit(R.matmul(p, values))
    out = c.emit(R.reshape(out, [bsz, h, s, d]))
    return c.emit(R.reshape(c.emit(R.permute_dims(out, [0, 2, 1, 3])), [bsz, s, h * d]))


def _tvm_write(c, cache, rows, pos):
    """``cache`` with ``rows`` [b, heads, s, x] stored at slots ``pos`` [b, s]: in place on CPUs (tvm_cache: no
    copy of the cache per step), elsewhere a scatter into a new cache tensor."""
    if _tvm_cache.usable(c.target):
        return _tvm_cache.write_slots(c.bb, cache, rows, pos)
    bsz, heads, s, width = rows.ty.shape
    slots = c.emit(R.broadcast_to(c.emit(R.reshape(pos, [bsz, 1, s, 1])), [bsz, heads, s, width]))
    return c.emit(R.scatter_elements(cache, slots, rows, axis=2))


@cached_attention.tvm
def _(c, q, k, v, past_k, past_v, seqlens_k, total_len, cos=None, sin=None, **attrs):
    qh, kh, vh, pos, z = _tvm_step(c, q, k, v, seqlens_k, total_len, cos, sin, attrs)
    present_k, present_v = _tvm_write(c, past_k, kh, pos), _tvm_write(c, past_v, vh, pos)
    return [_tvm_attend(c, qh, pos, z, present_k, present_v), present_k, present_v]


# -- cached_attention_int8 ------------------------------------------------------------------------------


def _int8_infer(ts, attrs):
    q, k, v, pk, pv, pks, pvs, seqlens, total = ts[:9]
    if pk.dtype != "int8" or pv.dtype != "int8":
        raise OpError(f"cached_attention_int8: the caches must be int8 codes, got {pk.dtype}, {pv.dtype}")
    scales = TensorType((*pk.shape[:3], 1), "float32")
    if pks.dtype != "float32" or pvs.dtype != "float32" or pks.shape != scales.shape or pvs.shape != scales.shape:
        raise OpError(f"cached_attention_int8: cache scales must be float32 {scales.shape}, got {pks}, {pvs}")
    as_float = TensorType(pk.shape, q.dtype)
    out = _infer([q, k, v, as_float, as_float, seqlens, total, *ts[9:]], attrs)[0]
    return [out, pk, pv, pks, pvs]


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of the last axis (one key or value of one head): codes and scales [..., 1]."""
    amax = np.abs(x).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return np.clip(np.round(x / scale), -127, 127).astype(np.int8), scale


@defop(
    "cached_attention_int8",
    _int8_infer,
    num_inputs=(9, 11),
    kind="fused",
    attrs={"num_heads": ("int", REQUIRED), "kv_num_heads": ("int", REQUIRED), "scale": ("optional_float", None)},
    doc="cached_attention over an int8 KV cache: each new key and value is stored as int8 codes with one float "
    "scale per head and slot (symmetric); outputs (out, present_k, present_v, present_k_scale, present_v_scale)",
)
def cached_attention_int8(
    q, k, v, past_k, past_v, past_k_scale, past_v_scale, seqlens_k, total_len, cos=None, sin=None, **attrs
):
    h, kvh = attrs["num_heads"], attrs["kv_num_heads"]
    qh, kh, vh, pos, scale = _step(q, k, v, seqlens_k, total_len, cos, sin, attrs, past_k.shape[2], past_k.shape[3])
    (kq, ks), (vq, vs) = quantize_rows(kh), quantize_rows(vh)
    pk, pv = _write(past_k, kq, pos), _write(past_v, vq, pos)
    pks, pvs = _write(past_k_scale, ks, pos), _write(past_v_scale, vs, pos)
    keys, values = pk.astype(q.dtype) * pks, pv.astype(q.dtype) * pvs
    return [_attend(qh, keys, values, pos, scale, h // kvh), pk, pv, pks, pvs]


@implement("torch", "cached_attention_int8")
def _(cx, *inputs, **attrs):
    return cx.reference(*inputs, **attrs)


cached_attention_int8.not_on(
    "onnxrt", "ONNX Runtime's GroupQueryAttention keeps a float cache: an int8 KV cache runs on TVM"
)


def _tvm_quantize_rows(c, x):
    amax = c.emit(R.max(c.emit(R.abs(x)), axis=[-1], keepdims=True))
    scale = c.emit(
        R.where(R.greater(amax, c.const(0, "float32")), R.divide(amax, c.const(127, "float32")), c.const(1, "float32"))
    )
    codes = c.emit(R.astype(c.emit(R.clip(c.emit(R.round(c.emit(R.divide(x, scale)))), -127, 127)), "int8"))
    return codes, scale


@cached_attention_int8.tvm
def _(c, q, k, v, past_k, past_v, past_k_scale, past_v_scale, seqlens_k, total_len, cos=None, sin=None, **attrs):
    qh, kh, vh, pos, z = _tvm_step(c, q, k, v, seqlens_k, total_len, cos, sin, attrs)
    (kq, ks), (vq, vs) = _tvm_quantize_rows(c, kh), _tvm_quantize_rows(c, vh)
    pk, pv = _tvm_write(c, past_k, kq, pos), _tvm_write(c, past_v, vq, pos)
    pks, pvs = _tvm_write(c, past_k_scale, ks, pos), _tvm_write(c, past_v_scale, vs, pos)
    return [_tvm_attend(c, qh, pos, z, pk, pv, pks, pvs), pk, pv, pks, pvs]


# -- attention_mass -------------------------------------------------------------------------------------


def _mass_infer(ts, attrs):
    q, pk, seqlens, total = ts[:4]
    h, kvh = attrs["num_heads"], attrs["kv_num_heads"]
    float_only(q, "attention_mass")
    if q.rank != 3 or pk.rank != 4 or pk.shape[1] != kvh or q.shape[2] != h * pk.shape[3]:
        raise OpError(f"attention_mass: q {q.shape} and cache {pk.shape} do not fit {h}/{kvh} heads")
    if seqlens.dtype != "int32" or total.dtype != "int32":
        raise OpError("attention_mass: seqlens_k and total_len must be int32")
    return [TensorType((pk.shape[0], kvh, pk.shape[2]), q.dtype)]


@defop(
    "attention_mass",
    _mass_infer,
    num_inputs=(4, 6),
    attrs={
        "num_heads": ("int", REQUIRED),
        "kv_num_heads": ("int", REQUIRED),
        "scale": ("optional_float", None),
        "window": ("int", 0),
    },
    doc="the attention each cache slot receives in a cached_attention step: softmax probabilities summed over "
    "the query heads of each kv head and over the chunk's last ``window`` rows (0: all), [batch, kv_heads, capacity]",
)
def attention_mass(q, present_k, seqlens_k, total_len, cos=None, sin=None, **attrs):
    """What KV-cache compression ranks slots by (H2O's accumulated attention, SnapKV's observation window).
    ``q`` is the step's query before RoPE (as cached_attention takes it), ``present_k`` the updated cache."""
    h, kvh, window = attrs["num_heads"], attrs["kv_num_heads"], attrs["window"]
    bsz, s, _ = q.shape
    d, cap = present_k.shape[3], present_k.shape[2]
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    pos = _positions(seqlens_k, total_len, s)
    qh = q.reshape(bsz, s, h, d).transpose(0, 2, 1, 3)
    if cos is not None:
        qh = _rotate(qh, cos[pos][:, None], sin[pos][:, None])
    keys = np.repeat(present_k, h // kvh, axis=1)
    scores = np.matmul(qh, keys.transpose(0, 1, 3, 2)) * np.asarray(scale, q.dtype)
    allowed = np.arange(cap)[None, None, None, :] <= pos[:, None, :, None]
    z = np.where(allowed, scores, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)  # [b, h, s, cap]
    rows = p[:, :, -window:] if window else p
    return rows.sum(2).reshape(bsz, kvh, h // kvh, cap).sum(2).astype(q.dtype)


@attention_mass.torch
def _(cx, q, present_k, seqlens_k, total_len, cos=None, sin=None, **attrs):
    h, kvh, window = attrs["num_heads"], attrs["kv_num_heads"], attrs["window"]
    bsz, s, _ = q.shape
    d, cap = present_k.shape[3], present_k.shape[2]
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    past = torch.zeros_like(seqlens_k) if int(total_len) == s else seqlens_k + 1 - s
    pos = past[:, None].long() + torch.arange(s)
    qh = q.reshape(bsz, s, h, d).transpose(1, 2)
    if cos is not None:
        c, sn = cos[pos][:, None], sin[pos][:, None]
        a, b = qh[..., : d // 2], qh[..., d // 2 :]
        qh = torch.cat([a * c - b * sn, b * c + a * sn], -1)
    keys = present_k.repeat_interleave(h // kvh, dim=1)
    scores = (qh @ keys.transpose(-1, -2)) * scale
    allowed = torch.arange(cap)[None, None, None, :] <= pos[:, None, :, None]
    p = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1)
    rows = p[:, :, -window:] if window else p
    return rows.sum(2).reshape(bsz, kvh, h // kvh, cap).sum(2)


def _onnx_positions(cx, seqlens, total, s_dim):
    """[b, s] int64 slot of each new token, as cached_attention places them."""
    i64 = lambda name: cx.emit("Cast", [name], to=7)  # noqa: E731
    s = cx.emit("Reshape", [s_dim, cx.const([], "int64", "scalar_shape")])
    first = cx.emit("Equal", [i64(total), s])
    cont = cx.emit("Sub", [cx.emit("Add", [i64(seqlens), cx.const(1, "int64")]), s])
    past = cx.emit("Where", [first, cx.const(0, "int64"), cont])
    steps = cx.emit("Range", [cx.const(0, "int64"), s, cx.const(1, "int64")])
    return cx.emit("Add", [cx.emit("Unsqueeze", [past, cx.const([1], "int64")]), steps])


@attention_mass.onnxrt
def _(cx, q, present_k, seqlens_k, total_len, cos=None, sin=None, **attrs):
    h, kvh, window = attrs["num_heads"], attrs["kv_num_heads"], attrs["window"]
    qt, ct = cx.node.inputs[0].type, cx.node.inputs[1].type
    d, group = ct.shape[3], h // kvh
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    shape = cx.emit("Shape", [q])
    b_dim = cx.emit("Slice", [shape, cx.const([0], "int64"), cx.const([1], "int64")])
    s_dim = cx.emit("Slice", [shape, cx.const([1], "int64"), cx.const([2], "int64")])
    pos = _onnx_positions(cx, seqlens_k, total_len, s_dim)
    heads = cx.emit("Concat", [b_dim, s_dim, cx.const([h, d], "int64")], axis=0)
    qh = cx.emit("Transpose", [cx.emit("Reshape", [q, heads])], perm=[0, 2, 1, 3])  # [b, h, s, d]
    if cos:
        c = cx.emit("Unsqueeze", [cx.emit("Gather", [cos, pos], axis=0), cx.const([1], "int64")])
        sn = cx.emit("Unsqueeze", [cx.emit("Gather", [sin, pos], axis=0), cx.const([1], "int64")])
        half = d // 2
        a = cx.emit("Slice", [qh, cx.const([0], "int64"), cx.const([half], "int64"), cx.const([3], "int64")])
        b = cx.emit("Slice", [qh, cx.const([half], "int64"), cx.const([d], "int64"), cx.const([3], "int64")])
        first = cx.emit("Sub", [cx.emit("Mul", [a, c]), cx.emit("Mul", [b, sn])])
        second = cx.emit("Add", [cx.emit("Mul", [b, c]), cx.emit("Mul", [a, sn])])
        qh = cx.emit("Concat", [first, second], axis=3)
    # [b, kvh, group, s, d]: the query heads of one kv head together
    grouped = cx.emit("Concat", [b_dim, cx.const([kvh, group], "int64"), s_dim, cx.const([d], "int64")], axis=0)
    qg = cx.emit("Reshape", [qh, grouped])
    keys = cx.emit("Unsqueeze", [cx.emit("Transpose", [present_k], perm=[0, 1, 3, 2]), cx.const([2], "int64")])
    scores = cx.emit("Mul", [cx.emit("MatMul", [qg, keys]), cx.const(scale, qt.dtype)])  # [b, kvh, g, s, cap]
    cap = cx.emit("Gather", [cx.emit("Shape", [present_k]), cx.const(2, "int64")], axis=0)
    slots = cx.emit("Range", [cx.const(0, "int64"), cap, cx.const(1, "int64")])
    row_pos = cx.emit("Unsqueeze", [pos, cx.const([1, 2, 4], "int64")])  # [b, 1, 1, s, 1]
    allowed = cx.emit("LessOrEqual", [slots, row_pos])
    p = cx.emit("Softmax", [cx.emit("Where", [allowed, scores, cx.const(-np.inf, qt.dtype)])], axis=-1)
    if window:
        p = cx.emit("Slice", [p, cx.const([-window], "int64"), cx.const([INT64_MAX], "int64"), cx.const([3], "int64")])
    return cx.emit("ReduceSum", [p, cx.const([2, 3], "int64")], keepdims=0)


@attention_mass.tvm
def _(c, q, present_k, seqlens_k, total_len, cos=None, sin=None, **attrs):
    h, kvh, window = attrs["num_heads"], attrs["kv_num_heads"], attrs["window"]
    qt, ct = c.in_type(0), c.in_type(1)
    dtype, d, cap, group = qt.dtype, ct.shape[3], c.dims(ct.shape[2]), h // kvh
    bsz, s = c.dims(qt.shape[0]), c.dims(qt.shape[1])
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    pos = _tvm_positions(c, seqlens_k, total_len, s)
    qh = c.emit(R.permute_dims(c.emit(R.reshape(q, [bsz, s, h, d])), [0, 2, 1, 3]))
    if cos is not None:
        rows = [c.emit(R.expand_dims(c.emit(R.take(t, pos, axis=0)), 1)) for t in (cos, sin)]
        qh = _tvm_rotate(c, qh, *rows, d // 2)
    qg = c.emit(R.reshape(qh, [bsz, kvh, group, s, d]))
    keys = c.emit(R.expand_dims(c.emit(R.permute_dims(present_k, [0, 1, 3, 2])), 2))
    scores = c.emit(R.multiply(c.emit(R.matmul(qg, keys)), c.const(scale, dtype)))  # [b, kvh, g, s, cap]
    row_pos = c.emit(R.reshape(pos, [bsz, 1, 1, s, 1]))
    allowed = c.emit(R.less_equal(c.emit(R.arange(0, cap, 1, "int64")), row_pos))
    p = c.emit(R.nn.softmax(c.emit(R.where(allowed, scores, c.const(-np.inf, dtype))), -1))
    if window:
        p = c.emit(R.strided_slice(p, [3], [-window], [2**62]))
    return R.sum(p, axis=[2, 3])
