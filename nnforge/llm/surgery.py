"""Edits of a built decoder-step graph that keep its passes' work (a quantized graph stays quantized).

``last_rows``: the generation variant of a graph that returns logits for every position: only the
row each sequence continues from reaches the LM head (a 49152-wide head on a 121-token prompt would
otherwise cost more than the rest of the prefill). ``skip_layers``: a layer-skipped draft (the
residual stream jumps over the skipped layers; their cache inputs and outputs disappear).
"""

from __future__ import annotations

from ..errors import NnforgeError
from ..ir import Graph
from ..ir.graph import TensorType
from ..passes.cleanup import DeadCodeElimination
from ..passes.manager import PassContext
from .build import cache_names


def _meta(graph: Graph) -> dict:
    meta = graph.meta.get("decoder")
    if not meta:
        raise NnforgeError(f"{graph.name!r} is not a decoder step graph (no decoder metadata)")
    return meta


def last_rows(graph: Graph) -> Graph:
    meta = _meta(graph)
    if meta["logits"] != "all":
        raise NnforgeError("last_rows: the graph already returns only the last rows")
    g = graph.copy()
    head = g.outputs[0].producer
    hidden_in = head.inputs[0]
    last = g.add_input("last_index", TensorType(("batch",), "int64"))
    g.inputs.remove(last)
    g.inputs.insert(next(i for i, v in enumerate(g.inputs) if v.name.startswith("past_")), last)
    width = hidden_in.shape[-1]
    idx = g.add_node("reshape", [last], {"shape": (-1, 1, 1)}, before=head).output
    idx = g.add_node("expand", [idx], {"shape": (-1, 1, width)}, before=head).output
    rows = g.add_node("gather_elements", [hidden_in, idx], {"axis": 1}, name="last_rows", before=head).output
    head.set_input(0, rows)
    logits = g.add_node(head.op, list(head.inputs), dict(head.attrs), name="lm_head", before=head).output
    g.replace_all_uses(head.output, logits)
    g.outputs[0] = logits
    g.remove_node(head)
    g.meta["decoder"] = {**meta, "logits": "last"}
    return g


def all_rows(graph: Graph) -> Graph:
    """The inverse of last_rows: logits for every row again. A bundle keeps the generation ("last") graph;
    scoring, draft verification and drafts are built from this one."""
    meta = _meta(graph)
    if meta["logits"] != "last":
        raise NnforgeError("all_rows: the graph already returns every row's logits")
    g = graph.copy()
    head = g.outputs[0].producer
    rows = head.inputs[0].producer
    if rows is None or rows.op != "gather_elements" or rows.inputs[1].producer is None:
        raise NnforgeError("all_rows: the LM head does not read the last rows' gather that last_rows adds")
    expand = rows.inputs[1].producer
    reshape = expand.inputs[0].producer
    ins = [rows.inputs[0], *head.inputs[1:]]
    logits = g.add_node(head.op, ins, dict(head.attrs), name="lm_head", before=head).output
    g.replace_all_uses(head.output, logits)
    g.outputs[0] = logits
    for node in (head, rows, expand, reshape):  # users first: each is dead once the one before is gone
        g.remove_node(node)
    g.remove_input(reshape.inputs[0])  # last_index: last_rows adds it again by that name
    g.meta["decoder"] = {**meta, "logits": "all"}
    return g


def skip_layers(graph: Graph, skipped) -> Graph:
    meta = _meta(graph)
    skipped = sorted(set(int(i) for i in skipped))
    bad = [i for i in skipped if i not in meta["layers"]]
    if bad:
        raise NnforgeError(f"skip_layers: layers {bad} are not in the graph (it runs {meta['layers']})")
    g = graph.copy()
    values = {v.name: v for v in g.all_values()}
    for i in reversed(skipped):  # from the last: a run of skipped layers then resolves to the first one's input
        block_in, block_out = (values[n] for n in meta["blocks"][str(i)])
        g.replace_all_uses(block_out, block_in)
    kept = [i for i in meta["layers"] if i not in skipped]
    cache = meta.get("cache", "float")
    drop = set(cache_names(skipped, cache))
    positions = {name: k for k, name in enumerate(cache_names(meta["layers"], cache))}
    g.outputs = [g.outputs[0]] + [g.outputs[1 + positions[n]] for n in positions if n not in drop]
    DeadCodeElimination().run(g, PassContext())
    g.inputs = [v for v in g.inputs if v.name not in drop]
    g.meta["decoder"] = {**meta, "layers": kept, "blocks": {str(i): meta["blocks"][str(i)] for i in kept}}
    return g


def int8_cache(graph: Graph) -> Graph:
    """The graph with an int8 KV cache: every ``cached_attention`` becomes ``cached_attention_int8``, whose cache
    inputs are int8 codes plus one float scale per head and slot (``past_k_scale_i`` [B, kv_heads, cache_len, 1]);
    the step's outputs are per layer k, v, k scale, v scale (``cache_names(layers, "int8")``)."""
    meta = _meta(graph)
    if meta.get("cache", "float") != "float" or meta.get("mass_window") is not None:
        raise NnforgeError("int8_cache: the graph's cache is not a plain float cache")
    g = graph.copy()
    presents = {}
    for i, node in zip(meta["layers"], [n for n in g.nodes if n.op == "cached_attention"]):
        pk, pv = node.inputs[3], node.inputs[4]
        if (pk.name, pv.name) != (f"past_k_{i}", f"past_v_{i}"):
            raise NnforgeError(f"int8_cache: layer {i}'s attention does not read its cache inputs")
        for past in (pk, pv):
            past.type = TensorType(past.type.shape, "int8")
        scale_t = TensorType((*pk.shape[:3], 1), "float32")
        ks, vs = (g.add_input(f"past_{kv}_scale_{i}", scale_t) for kv in ("k", "v"))
        q, k, v, _, _, seqlens, total, *rope = node.inputs
        new = g.add_node(
            "cached_attention_int8", [q, k, v, pk, pv, ks, vs, seqlens, total, *rope], dict(node.attrs), before=node
        )
        g.replace_all_uses(node.outputs[0], new.outputs[0])
        names = cache_names([i], "int8")
        presents.update(dict(zip(names, new.outputs[1:])))
        g.remove_node(node)
    g.outputs = [g.outputs[0]] + [presents[n] for n in cache_names(meta["layers"], "int8")]
    g.meta["decoder"] = {**meta, "cache": "int8"}
    return g


def with_attention_mass(graph: Graph, window: int = 0) -> Graph:
    """The graph with one more output per layer: the attention each cache slot received in the step
    (``attention_mass`` over the chunk's last ``window`` rows, 0: all), read by the KV-cache policies."""
    meta = _meta(graph)
    if meta.get("mass_window") is not None:
        raise NnforgeError("with_attention_mass: the graph has attention-mass outputs already")
    g = graph.copy()
    masses = []
    for node in [n for n in g.nodes if n.op == "cached_attention"]:
        q, seqlens, total, rope = node.inputs[0], node.inputs[5], node.inputs[6], list(node.inputs[7:])
        attrs = {k: node.attrs[k] for k in ("num_heads", "kv_num_heads", "scale")}
        mass = g.add_node("attention_mass", [q, node.outputs[1], seqlens, total, *rope], {**attrs, "window": window})
        masses.append(mass.output)
    if len(masses) != len(meta["layers"]):
        raise NnforgeError("with_attention_mass: expected one cached_attention per layer")
    g.outputs = list(g.outputs) + masses
    g.meta["decoder"] = {**meta, "mass_window": window}
    return g
