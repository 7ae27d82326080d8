"""ONNX Runtime's contrib fusions: groups of IR nodes that lower to one com.microsoft kernel together.

``to_onnx(graph, contrib=True)`` (the cpu and cuda targets) asks ``contrib_fusions`` which nodes such a kernel
takes: it lowers those with the kernel and skips the nodes folded into it. Portable ONNX files and wasm get none.
Today: an attention whose q, k, v are the three thirds of one linear is ORT's Attention, with the projection
inside. (The ops' own contrib lowerings, such as attention's MultiHeadAttention, sit with the ops in nnforge/ops.)
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from ..ir import Graph


def _packed_attention(graph: Graph) -> dict:
    """attention(q, k, v) whose q, k, v are the three thirds of one linear with constant weights, read by nothing
    else: {attention node: (linear node, its slice nodes)}, lowered as one ORT Attention (projection inside)."""
    users = graph.users()
    out = {}
    for n in graph.nodes:
        if n.op != "attention" or len(n.inputs) != 3 or n.attrs["is_causal"]:
            continue
        slices = [v.producer for v in n.inputs]
        lin = slices[0].inputs[0].producer if slices[0] is not None and slices[0].op == "slice" else None
        if lin is None or lin.op != "linear" or not all(graph.is_constant(v) for v in lin.inputs[1:] if v is not None):
            continue
        x, hidden = lin.inputs[0], n.inputs[0].shape[-1]
        if x.type.rank != 3 or not isinstance(hidden, int) or lin.output.shape[-1] != 3 * hidden:
            continue
        parts = [
            (s.op, s.inputs[0], s.attrs["axis"] % 3, s.attrs["start"], s.attrs["end"], s.attrs["step"])
            for s in slices
            if s is not None
        ]
        if parts != [("slice", lin.output, 2, i * hidden, (i + 1) * hidden, 1) for i in range(3)]:
            continue
        if (
            len(set(slices)) == 3
            and set(users[lin.output]) == set(slices)
            and all(users[s.output] == [n] for s in slices)
            and lin.output not in graph.outputs
        ):
            out[n] = (lin, slices)
    return out


def _attention_packed(cx, n, lin):
    """ORT's Attention: the q/k/v projection (pre-packed weights) and attention in one kernel, no Split."""
    g = cx.graph
    w = g.constant(lin.inputs[1])
    has_bias = len(lin.inputs) > 2 and lin.inputs[2] is not None
    b = g.constant(lin.inputs[2]) if has_bias else np.zeros(w.shape[0], w.dtype)
    h = n.attrs["num_heads"]
    scale = n.attrs["scale"] if n.attrs["scale"] is not None else 1.0 / math.sqrt(n.inputs[0].shape[-1] // h)
    weights = cx.const(np.ascontiguousarray(w.T), hint="qkv_w")
    cx.emit(
        "Attention",
        [cx.value(lin.inputs[0]), weights, cx.const(b, hint="qkv_b")],
        out=n.output.name,
        domain="com.microsoft",
        num_heads=h,
        scale=float(scale),
    )


def _residual_rms_norms(graph: Graph) -> dict:
    """rms_norm over the last axis of a residual ``add`` of two same-shaped tensors: {add node: rms_norm node},
    lowered as one SkipSimplifiedLayerNormalization (the sum stays an output: the residual stream goes on)."""
    out = {}
    for n in graph.nodes:
        if n.op != "rms_norm" or n.attrs["naxes"] != 1 or len(n.inputs) < 2 or not graph.is_constant(n.inputs[1]):
            continue
        add = n.inputs[0].producer
        if add is None or add.op != "add" or add in out or n.inputs[0].dtype != "float32":
            continue
        a, b = add.inputs
        if a.shape != b.shape or a.shape != n.inputs[0].shape or a.type.rank < 2:
            continue
        out[add] = n
    return out


def _skip_rms_norm(cx, add, norm):
    a, b = (cx.value(v) for v in add.inputs)
    cx.nodes.append(
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [a, b, cx.value(norm.inputs[1])],
            [norm.output.name, "", "", add.output.name],
            name=norm.output.name,
            domain="com.microsoft",
            epsilon=float(norm.attrs["eps"]),
        )
    )
    cx.domains.add("com.microsoft")


def _packed_qkv(graph: Graph) -> dict:
    """cached_attention whose q, k, v are consecutive slices (along the last axis) of one tensor read by nothing
    else: {attention node: slice nodes}; GroupQueryAttention takes the packed tensor as its query."""
    users = graph.users()
    out = {}
    for n in graph.nodes:
        if n.op != "cached_attention":
            continue
        slices = [v.producer for v in n.inputs[:3]]
        if any(s is None or s.op != "slice" for s in slices) or len({s.inputs[0] for s in slices}) != 1:
            continue
        packed = slices[0].inputs[0]
        ends = [0] + [s.attrs["end"] for s in slices]
        consecutive = all(
            s.attrs["axis"] in (-1, packed.type.rank - 1) and s.attrs["step"] == 1 and s.attrs["start"] == ends[i]
            for i, s in enumerate(slices)
        )
        if consecutive and ends[-1] == packed.shape[-1] and set(users[packed]) == set(slices):
            if all(users[s.output] == [n] for s in slices):
                out[n] = slices
    return out


def _gqa_packed(cx, att, packed):
    from ..ops.decode import group_query_attention

    ins = [cx.value(packed), "", ""] + [cx.value(v) if v is not None else None for v in att.inputs[3:]]
    ins += [None] * (9 - len(ins))
    names = group_query_attention(cx, ins, att.attrs)
    for value, name in zip(att.outputs, names):
        cx.alias[value.name] = name


def contrib_fusions(graph: Graph) -> tuple[dict, set]:
    """Groups of IR nodes that lower to one ONNX Runtime contrib kernel: ({node: lower(cx)}, nodes lowered by them)."""
    fused, skip = {}, set()
    for att, (lin, slices) in _packed_attention(graph).items():
        fused[att] = lambda cx, att=att, lin=lin: _attention_packed(cx, att, lin)
        skip.update([lin, *slices])
    # (ORT's SkipLayerNormalization was tried for add + layer_norm: its CPU kernel is ~5x slower than the two ops
    # on BERT's [batch, 128, 384]; the RMS variant replaces seven small ops per norm in a decoder step)
    for att, slices in _packed_qkv(graph).items():
        fused[att] = lambda cx, att=att, packed=slices[0].inputs[0]: _gqa_packed(cx, att, packed)
        skip.update(slices)
    for add, norm in _residual_rms_norms(graph).items():
        fused[add] = lambda cx, add=add, norm=norm: _skip_rms_norm(cx, add, norm)
        skip.add(norm)
    return fused, skip
