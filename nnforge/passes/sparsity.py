"""Sparsity passes: unstructured and N:M weight pruning, structured head/FFN pruning, CSR storage.

Each pass takes its settings as an ``nnforge.Sparsity`` (below): ``PruneWanda(Sparsity(ratio=0.6))``;
by name in a pipeline it runs with the defaults.

    prune_magnitude   zero the weights with the smallest |W| (per output row; pattern from the settings)
    prune_wanda       zero the smallest |W| * ||X_j|| (Wanda: X_j = input feature j over calibration tokens)
    prune_2_4         N:M = 2:4 (two non-zeros in every 4 consecutive inputs), score from ``method``
    prune_heads       remove whole attention heads (fused ``attention`` ops), ranked by how much each head
                      adds to the output projection on calibration data; q/k/v/out matrices get smaller
    prune_ffn         remove hidden neurons of linear_act -> linear pairs, ranked by ||Y_j|| * ||W2[:, j]||
    compress_sparse   linears whose weights are mostly zeros -> ``sparse_linear`` (CSR) when that is smaller

Unstructured and N:M pruning keep dense weights with zeros (``compress_sparse`` stores them compressed);
structured pruning rewrites to smaller dense matrices. Per-layer stats (sparsity, relative output
error on calibration data) go to ``PassResult.stats["layers"]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import NnforgeError
from ..ir import Graph, Node, Value
from ..ops.lowbit import csr_from_dense
from .calib import (
    LAYER_OPS,
    Layer,
    base_name,
    channel_rows,
    collect,
    constant_bytes,
    find_layers,
    layer_error,
    plain_linear,
    replace_node,
    row_source,
    rows,
)
from .manager import Pass, PassContext, PassOptions, PassResult, register_pass


@dataclass
class Sparsity(PassOptions):
    """What to prune. ``nnforge.compile(..., sparsity=Sparsity(...), calibration=batches)``.

    method    "magnitude" (|W|) | "wanda" (|W| * ||X||, needs calibration)
    pattern   "unstructured" | "N:M" such as "2:4" (N non-zeros in every M consecutive inputs)
    ratio     unstructured: fraction of each output row's weights set to zero (0 = no weight pruning)
    heads     attention heads removed per attention layer: a count (>= 1) or a fraction (< 1)
    ffn       fraction of FFN hidden neurons removed per linear_act -> linear pair
    storage   "dense" | "csr" (compress_sparse: CSR where smaller than dense)
    exclude   layer names (weight names) containing any of these are not pruned
    """

    method: str = "magnitude"
    pattern: str = "unstructured"
    ratio: float = 0.5
    heads: float = 0
    ffn: float = 0.0
    storage: str = "dense"
    exclude: tuple = ()

    def __post_init__(self):
        if self.method not in SCORES:
            raise NnforgeError(f"Sparsity.method must be one of {sorted(SCORES)}, got {self.method!r}")
        n_m(self.pattern)
        for what, v, hi in (("ratio", self.ratio, 1.0), ("ffn", self.ffn, 1.0)):
            if not 0.0 <= v < hi:
                raise NnforgeError(f"Sparsity.{what} must lie in [0, 1), got {v}")
        if self.heads < 0:
            raise NnforgeError(f"Sparsity.heads must be >= 0, got {self.heads}")
        if self.storage not in ("dense", "csr"):
            raise NnforgeError(f"Sparsity.storage must be 'dense' or 'csr', got {self.storage!r}")
        self.exclude = tuple(self.exclude)

    pass_name = "sparsity"  # the pass that carries out all of these settings

    def passes(self) -> list[str]:
        """The single-purpose pass names that carry out these settings, in order (the "sparsity" pass
        alone does the same)."""
        out = (["prune_heads"] if self.heads else []) + (["prune_ffn"] if self.ffn else [])
        if self.ratio or self.pattern != "unstructured":
            out.append(f"prune_{self.method}")
        return out + (["compress_sparse"] if self.storage == "csr" else [])


def n_m(pattern: str) -> tuple[int, int] | None:
    """ "2:4" -> (2, 4); "unstructured" -> None."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise NnforgeError(
            f"Sparsity.pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}"
        )
    return n, m


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------


def _magnitude(w, x_norm):
    return np.abs(w)


def _wanda(w, x_norm):
    return np.abs(w) * x_norm[None, :]


SCORES = {"magnitude": _magnitude, "wanda": _wanda}


def keep_mask(score: np.ndarray, ratio: float, pattern: tuple[int, int] | None) -> np.ndarray:
    """True where a weight stays. Unstructured: the lowest ``ratio`` of each row goes; N:M: the top N of
    every M consecutive entries of a row stay (a stable sort breaks ties by position)."""
    n_rows, k = score.shape
    if pattern is None:
        drop = int(round(ratio * k))
        order = np.argsort(score, axis=1, kind="stable")[:, :drop]
        mask = np.ones_like(score, dtype=bool)
        np.put_along_axis(mask, order, False, axis=1)
        return mask
    n, m = pattern
    if k % m:
        raise NnforgeError(f"{n}:{m} sparsity needs the input features ({k}) to be a multiple of {m}")
    groups = score.reshape(n_rows, k // m, m)
    order = np.argsort(-groups, axis=2, kind="stable")[..., :n]
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, order, True, axis=2)
    return mask.reshape(n_rows, k)


def _set_weight(graph: Graph, layer: Layer, w2d: np.ndarray) -> None:
    """Put a new [N, K] weight into the layer's node (in place: shapes do not change)."""
    old = graph.constant(layer.node.inputs[1])
    arr = w2d.T if layer.node.op == "matmul" else w2d.reshape(old.shape)
    layer.node.set_input(1, graph.add_constant(np.ascontiguousarray(arr, old.dtype), f"{layer.name}_sparse"))


def prune(graph: Graph, ctx: PassContext, cfg: Sparsity) -> PassResult:
    pattern = n_m(cfg.pattern)
    layers = find_layers(graph, ("linear", "conv"), cfg.exclude)
    stats = [
        {"name": l.name, "op": l.node.op, "skipped": f"{l.shape[1]} inputs are not a multiple of {pattern[1]}"}
        for l in layers
        if pattern is not None and l.shape[1] % pattern[1]
    ]
    layers = [l for l in layers if pattern is None or l.shape[1] % pattern[1] == 0]
    has_data = bool(ctx.calibration) or ctx.sample_inputs is not None
    if cfg.method == "wanda" or has_data:
        arrays = collect(graph, ctx, [l.key for l in layers], f"prune_{cfg.method}")
    else:
        arrays = {}
    for layer in layers:
        xs = arrays.get(layer.key)
        x_norm = np.sqrt(np.sum(channel_rows(layer, xs) ** 2, axis=0)) if xs else np.ones(layer.shape[1])
        mask = keep_mask(SCORES[cfg.method](layer.weight, x_norm), cfg.ratio, pattern)
        w = np.where(mask, layer.weight, 0).astype(layer.weight.dtype)
        sample = [rows(xs, layer.shape[1])[:2048]] if xs and layer.kind == "linear" else (xs[:1] if xs else None)
        stats.append(
            {
                "name": layer.name,
                "op": layer.node.op,
                "sparsity": float(1 - mask.mean()),
                "pattern": cfg.pattern,
                "method": cfg.method,
                "rel_error": layer_error(layer, sample, w),
            }
        )
        _set_weight(graph, layer, w)
    graph.remove_unused_constants()
    return PassResult(bool(layers), {"layers": stats, "pruned": len(layers)})


class _PrunePass(Pass):
    lossy = True
    Options = Sparsity
    fixed: dict = {}  # the settings this pass is about, over those it was given

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return prune(graph, ctx, dataclasses.replace(self.options, **self.fixed))


@register_pass
class PruneMagnitude(_PrunePass):
    """Zero the smallest-magnitude weights of each output row (unstructured or N:M from the settings)."""

    name = "prune_magnitude"
    fixed = {"method": "magnitude"}


@register_pass
class PruneWanda(_PrunePass):
    """Zero the weights with the smallest |W| * ||X_j|| per output row (Wanda), X from calibration."""

    name = "prune_wanda"
    fixed = {"method": "wanda"}


@register_pass
class Prune24(_PrunePass):
    """2:4 semi-structured sparsity (two non-zeros in every four inputs), scored by the settings' method."""

    name = "prune_2_4"
    fixed = {"pattern": "2:4"}


# ---------------------------------------------------------------------------------------
# structured pruning: smaller dense matrices
# ---------------------------------------------------------------------------------------


def column_consumers(graph: Graph, users: dict, v: Value) -> list[Layer] | None:
    """The linear layers that read ``v`` as their input, when they are all of its users."""
    if v in graph.outputs:
        return None
    layers = []
    for u in users.get(v, []):
        layer = LAYER_OPS[u.op](graph, u) if u.op in ("linear", "linear_act", "matmul") else None
        if layer is None or u.inputs[0] is not v:
            return None
        layers.append(layer)
    return layers or None


def _current(graph: Graph, layer: Layer) -> np.ndarray:
    w = graph.constant(layer.node.inputs[1])
    return w.T if layer.node.op == "matmul" else w


def drop_columns(graph: Graph, layer: Layer, cols: np.ndarray) -> None:
    """Remove input features ``cols`` of a consumer (in place: its output type does not change)."""
    w = _current(graph, layer)
    new = np.delete(w, cols, axis=1)
    layer.node.set_input(
        1, graph.add_constant(np.ascontiguousarray(new.T if layer.node.op == "matmul" else new), f"{layer.name}_pruned")
    )


def drop_rows(graph: Graph, lin: Node, drop: np.ndarray) -> Node:
    """Rebuild a linear without output channels ``drop``; its last-axis slices are re-offset."""
    users = graph.users()
    w = graph.constant(lin.inputs[1])
    inputs = [lin.inputs[0], graph.add_constant(np.delete(w, drop, axis=0), f"{base_name(lin.inputs[1].name)}_pruned")]
    if len(lin.inputs) > 2 and lin.inputs[2] is not None:
        inputs.append(
            graph.add_constant(
                np.delete(graph.constant(lin.inputs[2]), drop), f"{base_name(lin.inputs[2].name)}_pruned"
            )
        )
    new = graph.add_node(lin.op, inputs, lin.attrs, name=lin.output.name, source=lin.source, before=lin)
    if not any(u.op == "slice" for u in users.get(lin.output, [])):
        graph.replace_all_uses(lin.output, new.output)
    _reslice(graph, users, lin.output, new.output, drop)
    graph.remove_node(lin)
    return new


def _reslice(graph: Graph, users: dict, old: Value, new: Value, drop: np.ndarray) -> None:
    """Re-point the slices of ``old`` at ``new`` (which lacks channels ``drop``): a channel slice is shifted by
    the channels removed ahead of its ends, a row slice is kept and its own slices re-pointed in turn."""
    last = old.type.rank - 1
    for s in [u for u in users.get(old, []) if u.op == "slice"]:
        if s.attrs["axis"] in (-1, last):
            start, end = s.attrs["start"], min(s.attrs["end"], old.shape[-1])
            replace_node(
                graph,
                s,
                "slice",
                [new],
                {**s.attrs, "start": start - int(np.sum(drop < start)), "end": end - int(np.sum(drop < end))},
            )
        else:
            rows = replace_node(graph, s, "slice", [new], s.attrs)
            _reslice(graph, users, s.output, rows.output, drop)


def _how_many(spec: float, total: int) -> int:
    """A count (>= 1) or a fraction (< 1) of ``total``; always leaves at least one."""
    k = int(spec) if spec >= 1 else int(round(spec * total))
    return max(0, min(k, total - 1))


def _head_plan(graph: Graph, users: dict, att: Node):
    """(q/k/v row sources, output consumers) when this attention's heads can be removed, else a reason."""
    q, k, v = att.inputs[:3]
    mask = att.inputs[3] if len(att.inputs) > 3 else None
    if mask is not None and mask.type.rank == 4 and mask.shape[1] not in (1, att.attrs["num_heads"]):
        return "mask has a head axis of another size"
    sources = [row_source(graph, users, t) for t in (q, k, v)]
    if any(s is None for s in sources):
        return "q/k/v are not channels of constant-weight linears"
    spans = {}
    for lin, start, end in sources:
        for a, b in spans.get(id(lin), []):
            if start < b and a < end:
                return "q/k/v channels overlap"
        spans.setdefault(id(lin), []).append((start, end))
    consumers = column_consumers(graph, users, att.output)
    if consumers is None:
        return "output is not read only by linears"
    return sources, consumers


def _keep_heads(graph: Graph, att: Node, mask, keep: list):
    """A per-head mask [batch, heads, q, k] cut to the kept heads: one slice per run of kept heads, concatenated."""
    runs = []
    for h in keep:
        if runs and runs[-1][1] == h:
            runs[-1][1] = h + 1
        else:
            runs.append([h, h + 1])
    parts = [
        graph.add_node("slice", [mask], {"axis": 1, "start": a, "end": b}, source=att.source, before=att).output
        for a, b in runs
    ]
    return (
        parts[0]
        if len(parts) == 1
        else graph.add_node("concat", parts, {"axis": 1}, source=att.source, before=att).output
    )


@register_pass
class PruneHeads(Pass):
    """Remove attention heads: score_h = sum over output projections of ||o_h W_o[:, h]^T||^2 on calibration
    data; the lowest ``heads`` per layer go, shrinking q/k/v (rows) and the output projection (columns)."""

    name = "prune_heads"
    lossy = True
    version = "2"  # fuses attention first where the graph has none
    Options = Sparsity

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = self.options
        if not cfg.heads:
            return PassResult(False, {"heads_removed": 0})
        atts = [n for n in graph.nodes if n.op == "attention"]
        if not atts:  # O2 leaves nn.TransformerEncoderLayer's attention unfused: fuse it as the block analysis does
            from .blocks import prepare

            fused = prepare(graph)
            if fused is not graph:  # the manager edits in place; keep the caller's object
                graph.__dict__.update(fused.__dict__)
            atts = [n for n in graph.nodes if n.op == "attention"]
        users = graph.users()
        plans = {id(a): _head_plan(graph, users, a) for a in atts}
        ok = [a for a in atts if not isinstance(plans[id(a)], str)]
        outs = collect(graph, ctx, [a.output for a in ok], "prune_heads") if ok else {}
        before = constant_bytes(graph)
        stats = [{"name": a.output.name, "skipped": plans[id(a)]} for a in atts if isinstance(plans[id(a)], str)]
        for att in ok:
            stats.append(self._prune(graph, att, cfg, outs[att.output]))
        graph.remove_unused_constants()
        removed = sum(s.get("heads_removed", 0) for s in stats)
        return PassResult(
            removed > 0,
            {"layers": stats, "heads_removed": removed, "bytes_before": before, "bytes_after": constant_bytes(graph)},
        )

    def _prune(self, graph: Graph, att: Node, cfg: Sparsity, outputs: list) -> dict:
        users = graph.users()
        plan = _head_plan(graph, users, att)  # again: earlier rewrites re-routed values
        if isinstance(plan, str):
            return {"name": att.output.name, "skipped": plan}
        sources, consumers = plan
        heads = att.attrs["num_heads"]
        dv = att.output.shape[-1] // heads
        o = rows(outputs, att.output.shape[-1])
        score = np.zeros(heads)
        for layer in consumers:
            w = _current(graph, layer)
            for h in range(heads):
                cols = slice(h * dv, (h + 1) * dv)
                score[h] += float(np.sum((o[:, cols] @ w[:, cols].T) ** 2))
        drop = np.sort(np.argsort(score, kind="stable")[: _how_many(cfg.heads, heads)])
        if not len(drop):
            return {"name": att.output.name, "heads_removed": 0}
        per_linear: dict[int, tuple[Node, list]] = {}
        for lin, start, end in sources:
            d = (end - start) // heads
            chans = [start + h * d + i for h in drop for i in range(d)]
            per_linear.setdefault(id(lin), (lin, []))[1].extend(chans)
        for lin, chans in per_linear.values():
            drop_rows(graph, lin, np.array(sorted(chans)))
        inputs = list(att.inputs)
        if len(inputs) > 3 and inputs[3] is not None and inputs[3].type.rank == 4 and inputs[3].shape[1] != 1:
            inputs[3] = _keep_heads(graph, att, inputs[3], [h for h in range(heads) if h not in set(drop)])
        new = replace_node(graph, att, "attention", inputs, {**att.attrs, "num_heads": heads - len(drop)})
        cols = np.array([h * dv + i for h in drop for i in range(dv)])
        for layer in consumers:
            drop_columns(graph, layer, cols)
        return {
            "name": new.output.name,
            "heads": heads,
            "heads_removed": int(len(drop)),
            "removed": [int(h) for h in drop],
            "scores": [float(s) for s in score],
        }


@register_pass
class PruneFFN(Pass):
    """Remove hidden neurons of linear_act -> linear(s): score_j = ||Y_j|| * ||W2[:, j]|| on calibration data;
    the lowest ``ffn`` fraction goes from the first layer's rows and the consumers' columns."""

    name = "prune_ffn"
    lossy = True
    Options = Sparsity

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = self.options
        if not cfg.ffn:
            return PassResult(False, {"neurons_removed": 0})
        users = graph.users()
        pairs = [
            n
            for n in graph.nodes
            if n.op == "linear_act"
            and plain_linear(graph, n)
            and not any(e and e in n.inputs[1].name for e in cfg.exclude)
            and column_consumers(graph, users, n.output)
        ]
        ys = collect(graph, ctx, [n.output for n in pairs], "prune_ffn") if pairs else {}
        before = constant_bytes(graph)
        stats = []
        for node in pairs:
            consumers = column_consumers(graph, graph.users(), node.output)
            if consumers is None:
                continue
            y = rows(ys[node.output], node.output.shape[-1])
            w2 = np.sqrt(sum(np.sum(_current(graph, c) ** 2, axis=0) for c in consumers))
            score = np.sqrt(np.sum(y**2, axis=0)) * w2
            drop = np.sort(np.argsort(score, kind="stable")[: _how_many(cfg.ffn, len(score))])
            if not len(drop):
                continue
            name = base_name(node.inputs[1].name)
            drop_rows(graph, node, drop)
            for c in consumers:
                drop_columns(graph, c, drop)
            stats.append({"name": name, "neurons": int(len(score)), "neurons_removed": int(len(drop))})
        graph.remove_unused_constants()
        return PassResult(
            bool(stats),
            {
                "layers": stats,
                "neurons_removed": sum(s["neurons_removed"] for s in stats),
                "bytes_before": before,
                "bytes_after": constant_bytes(graph),
            },
        )


# ---------------------------------------------------------------------------------------
# compressed storage
# ---------------------------------------------------------------------------------------


@register_pass
class CompressSparse(Pass):
    """Linear layers whose weights are mostly zeros -> sparse_linear with CSR weights, where CSR
    (values + int16/int32 column indices + row pointers) takes fewer bytes than the dense matrix."""

    name = "compress_sparse"
    lossy = False  # same numbers, other storage
    Options = Sparsity
    # pruning reads dense weights: compressing first would leave nothing to prune or to compress
    runs_after = ("prune_magnitude", "prune_wanda", "prune_2_4", "prune_heads", "prune_ffn")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = constant_bytes(graph)
        stats = []
        for layer in find_layers(graph, ("linear",), self.options.exclude):
            values, cols, row_ptr = csr_from_dense(layer.weight)
            csr_bytes = values.nbytes + cols.nbytes + row_ptr.nbytes
            if csr_bytes >= layer.weight.nbytes:
                continue
            consts = [
                graph.add_constant(a, f"{layer.name}_{part}")
                for a, part in ((values, "values"), (cols, "col_idx"), (row_ptr, "row_ptr"))
            ]
            bias = [layer.bias] if layer.bias is not None else []
            replace_node(
                graph,
                layer.node,
                "sparse_linear",
                [layer.x, *consts, *bias],
                {"in_features": layer.shape[1], "act": layer.act},
            )
            stats.append(
                {
                    "name": layer.name,
                    "density": float(len(values) / layer.weight.size),
                    "bytes_before": int(layer.weight.nbytes),
                    "bytes_after": int(csr_bytes),
                }
            )
        graph.remove_unused_constants()
        return PassResult(bool(stats), {"layers": stats, "bytes_before": before, "bytes_after": constant_bytes(graph)})


@register_pass
class SparsityFromSettings(Pass):
    """Everything its nnforge.Sparsity asks for: heads, FFN neurons, weight pruning, then CSR storage,
    each step on the result of the one before."""

    name = "sparsity"
    lossy = True
    Options = Sparsity

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        changed, stats, layers = False, {}, []
        for name in self.options.passes():
            res = STEPS[name](self.options).run(graph, ctx)
            changed |= res.changed
            layers += [{**rec, "step": name} for rec in res.stats.get("layers", [])]
            stats[name] = {k: v for k, v in res.stats.items() if k != "layers"}
        return PassResult(changed, {"layers": layers, **stats})


STEPS = {
    "prune_heads": PruneHeads,
    "prune_ffn": PruneFFN,
    "prune_magnitude": PruneMagnitude,
    "prune_wanda": PruneWanda,
    "compress_sparse": CompressSparse,
}
