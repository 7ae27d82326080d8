"""Declarative rewrite rules and a greedy driver that applies them to a fixed point.

A pattern is a tree of ``P(op, *inputs, **attrs)``. Each input is another ``P``, a string that
binds the value under that name (the same name twice must bind the same value), or ``ANY``;
a trailing ``...`` leaves the node's remaining inputs free, and ``P(op)`` with no inputs
matches the op whatever its inputs.
Attribute values either must equal the given value or, given as ``Bind("name")``, are bound.
``P(..., bind="name")`` also binds the matched node's output. A ``Rule`` adds an optional
constraint ``check(m, graph) -> bool`` and a ``build(m, b) -> Value`` that makes the replacement
with the builder ``b`` (``b.op(...)``, ``b.const(array)``). Match results ``m`` are dicts of the
bound values, attributes and nodes (``m.node("name")``).

The driver refuses a rewrite when an interior matched node has users outside the match (its
value would be lost) or when fusing would create a cycle (checked on the networkx view).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import VerificationError
from ..ir import Graph, Node, Value
from ..ir.verify import types_agree
from ..ir.analysis import fusion_creates_cycle, to_networkx
from .manager import Pass, PassContext, PassResult

ANY = object()


@dataclass(frozen=True)
class Bind:
    name: str


class P:
    """A node pattern: op name (or a tuple of alternatives), input patterns, attribute constraints."""

    def __init__(self, op: str | tuple[str, ...], *inputs, bind: str | None = None, commutative: bool = False, **attrs):
        self.ops = (op,) if isinstance(op, str) else tuple(op)
        self.inputs = inputs
        self.bind = bind
        self.commutative = commutative
        self.attrs = attrs

    def __repr__(self) -> str:
        return f"P({'|'.join(self.ops)}, {', '.join(map(repr, self.inputs))})"


class Match(dict):
    """Bound names -> Values or attribute values; ``nodes`` lists the matched nodes, root first."""

    def __init__(self):
        super().__init__()
        self.nodes: list[Node] = []
        self.named_nodes: dict[str, Node] = {}

    def node(self, name: str) -> Node:
        return self.named_nodes[name]

    def copy(self) -> "Match":
        m = Match()
        m.update(self)
        m.nodes = list(self.nodes)
        m.named_nodes = dict(self.named_nodes)
        return m


def match(pattern: P, value: Value, m: Match | None = None) -> Match | None:
    """Match ``pattern`` against the producer of ``value``; returns the bindings or None."""
    m = Match() if m is None else m
    node = value.producer
    if node is None or node.op not in pattern.ops or len(node.outputs) != 1:
        return None
    pats = pattern.inputs
    if pats and pats[-1] is Ellipsis:  # prefix match: trailing inputs are free
        pats = pats[:-1]
        if len(node.inputs) < len(pats):
            return None
    elif pats and len(node.inputs) != len(pats):
        return None
    m = m.copy()
    for key, want in pattern.attrs.items():
        have = node.attrs.get(key)
        if isinstance(want, Bind):
            if want.name in m and m[want.name] != have:
                return None
            m[want.name] = have
        elif have != want:
            return None
    if pattern.bind:
        m[pattern.bind] = node.output
        m.named_nodes[pattern.bind] = node
    m.nodes.append(node)
    orders = [list(node.inputs)]
    if pattern.commutative and len(node.inputs) == 2:
        orders.append(list(reversed(node.inputs)))
    for inputs in orders:
        got = _match_inputs(pats, inputs, m)
        if got is not None:
            return got
    return None


def _match_inputs(pats: Sequence, values: Sequence[Value | None], m: Match) -> Match | None:
    for pat, val in zip(pats, values):
        if pat is ANY:
            continue
        if isinstance(pat, str):
            if pat in m and m[pat] is not val:
                return None
            m = m.copy()
            m[pat] = val
        elif isinstance(pat, P):
            if val is None:
                return None
            m = match(pat, val, m)
            if m is None:
                return None
        elif pat is None:
            if val is not None:
                return None
        else:
            raise TypeError(f"bad pattern input {pat!r}")
    return m


class Builder:
    """Creates replacement nodes just before the matched root, so they see every bound value."""

    def __init__(self, graph: Graph, root: Node):
        self.graph = graph
        self.root = root

    def op(self, op: str, *inputs: Value | None, **attrs) -> Value:
        return self.graph.add_node(op, list(inputs), attrs, name=op, source=self.root.source, before=self.root).output

    def const(self, array, name: str = "c") -> Value:
        return self.graph.add_constant(np.asarray(array, order="C"), name)  # (ascontiguousarray makes 0-d 1-d)

    def constant_of(self, v: Value) -> np.ndarray | None:
        return self.graph.constant(v) if self.graph.is_constant(v) else None


@dataclass
class Rule:
    name: str
    pattern: P
    build: Callable[[Match, Builder], Value]
    check: Callable[[Match, Graph], bool] | None = None
    allow_shared: Sequence[str] = field(default_factory=tuple)  # bound interior nodes that may have other users


def _interior_is_private(m: Match, graph: Graph, users: dict, allowed: set) -> bool:
    root = m.nodes[0]
    inside = set(m.nodes)
    for node in m.nodes[1:]:
        if node.output in graph.outputs and node is not root:
            if not any(m.named_nodes.get(a) is node for a in allowed):
                return False
        for u in users.get(node.output, []):
            if u not in inside and not any(m.named_nodes.get(a) is node for a in allowed):
                return False
    return True


def apply_rules(graph: Graph, rules: Sequence[Rule], max_rounds: int = 50) -> dict[str, int]:
    """Greedy driver: apply the first matching rule at each node, repeat until nothing matches."""
    counts = {r.name: 0 for r in rules}
    for _ in range(max_rounds):
        changed = False
        users = graph.users()
        dg = None
        for root in list(graph.nodes):
            if root not in graph.nodes or len(root.outputs) != 1:
                continue
            for rule in rules:
                m = match(rule.pattern, root.output)
                if m is None or (rule.check is not None and not rule.check(m, graph)):
                    continue
                if not _interior_is_private(m, graph, users, set(rule.allow_shared)):
                    continue
                dg = dg if dg is not None else to_networkx(graph)
                if len(m.nodes) > 1 and fusion_creates_cycle(graph, m.nodes, dg):
                    continue
                new = rule.build(m, Builder(graph, root))
                if new is None:
                    continue
                if not types_agree(new.type, root.output.type):
                    raise VerificationError(f"rule {rule.name} made {new.type} where %{root.output.name} was {root.output.type}")
                graph.replace_all_uses(root.output, new)
                _remove_dead(graph, m.nodes)
                counts[rule.name] += 1
                changed = True
                users = graph.users()
                dg = None
                break
        if not changed:
            break
    graph.remove_unused_constants()
    return counts


def _remove_dead(graph: Graph, candidates: Sequence[Node]) -> None:
    """Remove matched nodes nothing reads any more (root first, then its now-orphaned inputs)."""
    pending = list(candidates)
    removed = True
    while removed:  # a node shared inside the match dies only after all its matched users
        removed = False
        users = graph.users()
        for node in list(pending):
            if node in graph.nodes and all(not users.get(o) and o not in graph.outputs for o in node.outputs):
                graph.remove_node(node)
                pending.remove(node)
                removed = True
                users = graph.users()


class RewritePass(Pass):
    """A pass made of rules: subclasses set ``name`` and ``rules``."""

    rules: Sequence[Rule] = ()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        counts = apply_rules(graph, self.rules)
        return PassResult(any(counts.values()), {k: v for k, v in counts.items() if v})
