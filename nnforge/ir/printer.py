"""Readable text form of a graph, one line per node, in the style of MLIR."""

from __future__ import annotations

import json

from .graph import Graph, Node, Value


def _ref(g: Graph, v: Value | None) -> str:
    if v is None:
        return "none"
    return f"@{v.name}" if g.is_constant(v) else f"%{v.name}"


def _attr(v) -> str:
    return (
        json.dumps(v) if isinstance(v, str) else ("[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v))
    )


def format_node(g: Graph, n: Node) -> str:
    outs = ", ".join(f"%{o.name}" for o in n.outputs)
    args = ", ".join(_ref(g, i) for i in n.inputs)
    attrs = ", ".join(f"{k}={_attr(v)}" for k, v in n.attrs.items())
    if n.op == "torch_op":  # an opaque op prints as the torch call it stands for
        from ..ops.fallback import describe

        attrs = describe(n.attrs)
    types = ", ".join(str(o.type) for o in n.outputs)
    return f"{outs} = {n.op}({args})" + (f" {{{attrs}}}" if attrs else "") + f" : {types}"


def format_graph(g: Graph, constants: bool = False) -> str:
    ins = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    nbytes = sum(a.nbytes for a in g.constants.values())
    lines = [f"graph {g.name}({ins}) {{  # {len(g.nodes)} nodes, {len(g.constants)} constants, {nbytes / 1e6:.2f} MB"]
    if constants:
        lines += [f"  @{k}: {g.const_values[k].type}" for k in g.constants]
    lines += ["  " + format_node(g, n) for n in g.nodes]
    lines.append("  return " + ", ".join(_ref(g, o) for o in g.outputs))
    lines.append("}")
    return "\n".join(lines)


def summary(g: Graph) -> str:
    counts = sorted(g.op_counts().items(), key=lambda kv: (-kv[1], kv[0]))
    params = sum(a.size for a in g.constants.values())
    return f"{g.name}: {len(g.nodes)} nodes, {params:,} parameters; ops: " + ", ".join(f"{op} x{c}" for op, c in counts)
