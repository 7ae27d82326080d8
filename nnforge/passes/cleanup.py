"""Cleanup passes every pipeline runs: dead code, common subexpressions, constant folding, canonical forms."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..ir import Graph, Node, get_op, symbols
from ..ir.interpret import run_node
from ..ir.registry import infer_types
from ..ir.verify import types_agree
from .manager import Pass, PassContext, PassResult, register_pass
from .pattern import Bind, P, RewritePass, Rule

FOLD_LIMIT = 1 << 24  # elements: folding must not blow a small constant up into a huge one (e.g. expand)


@register_pass
class DeadCodeElimination(Pass):
    """Remove nodes whose outputs nobody uses, and constants no node reads."""

    name = "dce"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        live = set(graph.outputs)
        kept: list[Node] = []
        for node in reversed(graph.nodes):
            if any(o in live for o in node.outputs):
                kept.append(node)
                live.update(i for i in node.inputs if i is not None)
        removed = len(graph.nodes) - len(kept)
        graph.nodes = kept[::-1]
        consts = graph.remove_unused_constants()
        return PassResult(bool(removed or consts), {"nodes_removed": removed, "constants_removed": consts})


def _attr_key(attrs: dict) -> str:
    return json.dumps(attrs, sort_keys=True, default=str)


@register_pass
class CommonSubexpressionElimination(Pass):
    """Merge identical constants, then nodes with the same op, inputs and attributes."""

    name = "cse"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        merged_consts = self._merge_constants(graph)
        seen: dict[tuple, Node] = {}
        keep: list[Node] = []
        merged = 0
        for node in graph.nodes:
            key = (node.op, tuple(id(i) for i in node.inputs), _attr_key(node.attrs))
            twin = seen.get(key)
            if twin is None:
                seen[key] = node
                keep.append(node)
                continue
            for old, new in zip(node.outputs, twin.outputs):
                graph.replace_all_uses(old, new)
            merged += 1
        graph.nodes = keep
        graph.remove_unused_constants()
        return PassResult(bool(merged or merged_consts), {"nodes_merged": merged, "constants_merged": merged_consts})

    @staticmethod
    def _merge_constants(graph: Graph) -> int:
        by_content: dict[tuple, object] = {}
        merged = 0
        for name, value in list(graph.const_values.items()):
            arr = graph.constants[name]
            key = (arr.dtype.str, arr.shape, hashlib.sha1(arr.tobytes()).hexdigest())
            twin = by_content.setdefault(key, value)
            if twin is not value:
                graph.replace_all_uses(value, twin)
                merged += 1
        return merged


def _has_symbols(node: Node) -> bool:
    """Attributes with symbolic dims depend on run-time sizes, so such nodes cannot fold."""
    kinds = get_op(node.op).attrs
    for key, value in node.attrs.items():
        kind = kinds[key][0]
        if (kind == "dims" and any(isinstance(d, str) for d in value)) or (kind == "dim" and isinstance(value, str)):
            return True
    return False


@register_pass
class ConstantFolding(Pass):
    """Evaluate nodes whose inputs are all constants (weights-only subgraphs) into new constants."""

    name = "fold_constants"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = 0
        keep: list[Node] = []
        for node in graph.nodes:
            foldable = (
                all(i is None or graph.is_constant(i) for i in node.inputs)
                and not _has_symbols(node)
                and all(o.type.is_static for o in node.outputs)
                and all(np.prod(o.type.shape, dtype=np.int64) <= FOLD_LIMIT for o in node.outputs)
            )
            if not foldable:
                keep.append(node)
                continue
            results = run_node(node, [graph.constant(i) if i is not None else None for i in node.inputs], {})
            for out, arr in zip(node.outputs, results):
                const = graph.add_constant(
                    np.asarray(arr, order="C"), name=out.name
                )  # (ascontiguousarray makes 0-d 1-d)
                graph.replace_all_uses(out, const)
            folded += 1
        graph.nodes = keep
        graph.remove_unused_constants()
        return PassResult(bool(folded), {"nodes_folded": folded})


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(symbols.dims_equal(x, y) for x, y in zip(a, b))


def _is_noop(m, graph: Graph) -> bool:
    node, x = m.node("root"), m["x"]
    out = node.output
    if out in graph.outputs and x in graph.inputs:  # keep a graph output distinct from its input
        return False
    if node.op == "permute":
        return node.attrs["perm"] == list(range(len(node.attrs["perm"])))
    if node.op == "cast":
        return node.attrs["dtype"] == x.dtype
    if node.op == "concat":
        return True
    same = out.type.dtype == x.type.dtype and _same_shape(out.shape, x.shape)
    return same and (node.op != "slice" or node.attrs["step"] == 1)


NOOP = Rule(
    "remove_noop",
    P(("permute", "reshape", "expand", "slice", "squeeze", "unsqueeze", "cast", "concat"), "x", bind="root"),
    lambda m, b: m["x"],
    _is_noop,
)
# permute(permute(y, p), q) = permute(y, p[q]); an identity result is then removed by NOOP
COMPOSE_PERMUTES = Rule(
    "compose_permutes",
    P("permute", P("permute", "y", perm=Bind("p")), perm=Bind("q")),
    lambda m, b: b.op("permute", m["y"], perm=[m["p"][i] for i in m["q"]]),
)


def _merged_reshape(m, b):
    """reshape(y, shape); a -1 is spelled out when y's own size would infer another (still equal) type,
    e.g. y: [n] reshaped to a static [1, 2] then to [-1] keeps [2], not [n]."""
    shape, want = m["shape"], m.node("root").output.type
    if -1 in shape and not types_agree(infer_types("reshape", [m["y"].type], {"shape": shape})[0], want):
        shape = list(want.shape)
    return b.op("reshape", m["y"], shape=shape)


# reshape(reshape(y)) = reshape(y): only the last shape matters
MERGE_RESHAPES = Rule(
    "merge_reshapes", P("reshape", P("reshape", "y"), shape=Bind("shape"), bind="root"), _merged_reshape
)
CANONICAL_RULES = [NOOP, COMPOSE_PERMUTES, MERGE_RESHAPES]


@register_pass
class Canonicalize(RewritePass):
    """Remove no-op reshapes/transposes/casts/expands/slices; cancel and merge transpose and reshape chains."""

    name = "canonicalize"
    rules = CANONICAL_RULES
