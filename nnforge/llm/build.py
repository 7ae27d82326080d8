"""A DecoderSpec written as one IR graph: a decoder step with the KV cache as explicit state.

The same graph serves prefill (S = prompt length, empty cache) and decode (S = 1) and the verification
of speculative drafts (S = k + 1 after a filled cache): the sequence length is symbolic, the cache has a
static capacity. Inputs, in order:

    input_ids     int64 [B, S]
    seqlens_k     int32 [B]      index of each sequence's last valid cache slot after this step
    total_len     int32 []       the longest sequence's length after this step
    position_ids  int64 [B, S]   (learned position tables only: GPT-2, nnforge GPT)
    last_index    int64 [B]      (logits="last") the row whose logits are returned per sequence
    past_k_i, past_v_i           float [B, kv_heads, cache_len, head_dim] for each layer i (cache_len <= capacity,
                                 the positions the RoPE tables cover)

Outputs: ``logits`` ([B, 1, V] for logits="last", [B, S, V] for "all"), then ``present_k_i`` /
``present_v_i`` (the same buffers' next contents; ONNX Runtime writes them in place).

Linear layers are ``linear`` nodes on constant weights (q/k/v as one, gate/up as one), so the low-bit
passes quantize them like any model's; the LM head is its own constant (not shared with the
embedding), so it can be quantized apart from the embedding gather.
"""

from __future__ import annotations

import numpy as np

from ..ir import Graph
from ..ir.graph import TensorType, Value
from .spec import DecoderSpec


def rope_tables(spec: DecoderSpec, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [capacity, head_dim/2], computed in float32 as Hugging Face's default RoPE computes them."""
    import torch

    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    angles = torch.arange(capacity, dtype=torch.int64).float()[:, None] * inv[None, :]
    return angles.cos().numpy(), angles.sin().numpy()


def cache_names(layers, cache: str = "float") -> list[str]:
    """The cache inputs of ``layers``, in the order of the step's cache outputs: k and v per layer, and with an
    int8 cache (``cache="int8"``) their scales."""
    parts = ("k", "v") + (("k_scale", "v_scale") if cache == "int8" else ())
    return [f"past_{kv}_{i}" for i in layers for kv in parts]


class _Writer:
    def __init__(self, g: Graph, spec: DecoderSpec):
        self.g, self.spec = g, spec

    def const(self, a: np.ndarray | None, name: str) -> Value | None:
        return None if a is None else self.g.add_constant(np.ascontiguousarray(a, dtype=np.float32), name)

    def linear(self, x: Value, w: np.ndarray, b: np.ndarray | None, name: str) -> Value:
        ins = [x, self.const(w, f"{name}_weight")] + ([self.const(b, f"{name}_bias")] if b is not None else [])
        return self.g.add_node("linear", ins, name=name).output

    def norm(self, x: Value, w: np.ndarray, b: np.ndarray | None, name: str) -> Value:
        s = self.spec
        if s.norm == "rms":
            return self.g.add_node("rms_norm", [x, self.const(w, f"{name}_weight")], {"eps": s.eps}, name=name).output
        ins = [x, self.const(w, f"{name}_weight"), self.const(b, f"{name}_bias")]
        return self.g.add_node("layer_norm", ins, {"eps": s.eps}, name=name).output

    def cols(self, x: Value, start: int, end: int, name: str) -> Value:
        return self.g.op("slice", x, axis=-1, start=start, end=end, name=name)


def build_step(spec: DecoderSpec, capacity: int, logits: str = "last", layers: list[int] | None = None) -> Graph:
    """The decoder step as IR. ``layers``: the layer indices to run (all by default): a layer-skipped draft
    has cache inputs and outputs only for the layers it runs, and the runtime binds them to the full
    model's buffers of the same layers. ``graph.meta["decoder"]`` records the layers and the logits mode."""
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    s, g = spec, Graph(f"{spec.family}_decoder_step")
    w = _Writer(g, s)
    d, h, kvh = s.head_dim, s.heads, s.kv_heads
    ids = g.add_input("input_ids", TensorType(("batch", "seq"), "int64"))
    seqlens = g.add_input("seqlens_k", TensorType(("batch",), "int32"))
    total = g.add_input("total_len", TensorType((), "int32"))
    positions = g.add_input("position_ids", TensorType(("batch", "seq"), "int64")) if s.positions is not None else None
    last = g.add_input("last_index", TensorType(("batch",), "int64")) if logits == "last" else None
    # the cache's length is symbolic: a KV-cache policy runs the same graph on a smaller cache (its budget)
    cache_t = TensorType(("batch", kvh, "cache_len", d), "float32")
    run = list(range(s.num_layers)) if layers is None else sorted(set(layers))
    past = dict(zip(cache_names(run), (g.add_input(n, cache_t) for n in cache_names(run))))
    cos = sin = None
    if s.rope_theta is not None:
        c, sn = rope_tables(s, capacity)
        cos, sin = g.add_constant(c, "rope_cos"), g.add_constant(sn, "rope_sin")

    x = g.op("gather", w.const(s.embed, "embed_tokens"), ids, axis=0, name="embed")
    if positions is not None:
        x = g.op("add", x, g.op("gather", w.const(s.positions, "embed_positions"), positions, axis=0), name="embed_pos")
    presents: list[Value] = []
    blocks = {}  # layer -> (residual stream in, out): where a layer-skipped draft cuts
    for i in run:
        layer, pk, pv = s.layers[i], past[f"past_k_{i}"], past[f"past_v_{i}"]
        block_in = x
        a = w.norm(x, layer.attn_norm, layer.attn_norm_bias, f"layers_{i}_attn_norm")
        qkv = w.linear(a, layer.qkv, layer.qkv_bias, f"layers_{i}_qkv")
        q = w.cols(qkv, 0, h * d, f"layers_{i}_q")
        k = w.cols(qkv, h * d, (h + kvh) * d, f"layers_{i}_k")
        v = w.cols(qkv, (h + kvh) * d, (h + 2 * kvh) * d, f"layers_{i}_v")
        rope = [cos, sin] if cos is not None else []
        att = g.add_node(
            "cached_attention",
            [q, k, v, pk, pv, seqlens, total, *rope],
            {"num_heads": h, "kv_num_heads": kvh},
            name=f"layers_{i}_attention",
        )
        out, nk, nv = att.outputs
        presents += [nk, nv]
        x = g.op("add", x, w.linear(out, layer.o, layer.o_bias, f"layers_{i}_o"), name=f"layers_{i}_attn_residual")
        m = w.norm(x, layer.mlp_norm, layer.mlp_norm_bias, f"layers_{i}_mlp_norm")
        up = w.linear(m, layer.up, layer.up_bias, f"layers_{i}_up")
        if s.mlp == "silu_gated":
            ffn = layer.up.shape[0] // 2
            gate = g.op("silu", w.cols(up, 0, ffn, f"layers_{i}_gate"))
            hidden = g.op("mul", gate, w.cols(up, ffn, 2 * ffn, f"layers_{i}_up_half"), name=f"layers_{i}_gated")
        else:
            hidden = g.op("gelu", up, approximate="tanh", name=f"layers_{i}_gelu")
        x = g.op(
            "add", x, w.linear(hidden, layer.down, layer.down_bias, f"layers_{i}_down"), name=f"layers_{i}_mlp_residual"
        )
        blocks[str(i)] = (block_in.name, x.name)
    x = w.norm(x, s.final_norm, s.final_norm_bias, "final_norm")
    if last is not None:  # only the rows whose next token is wanted reach the LM head
        rows = g.op("expand", g.op("reshape", last, shape=(-1, 1, 1)), shape=(-1, 1, s.hidden))
        x = g.op("gather_elements", x, rows, axis=1, name="last_rows")
    out = w.linear(x, s.lm_head, None, "lm_head")
    g.outputs = [out] + presents
    g.meta["decoder"] = {"layers": run, "logits": logits, "capacity": capacity, "blocks": blocks}
    return g
