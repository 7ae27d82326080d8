"""Declarative rewrite rules and a worklist driver that applies them to a fixed point.

A pattern is a tree of ``P(op, *inputs, **attrs)``. Each input is one of:

- another ``P``;
- a string, which binds the value under that name (the same name twice must bind the same value);
- a leaf with tests: ``V("x", dtype="float32", rank=3, const=False, where=fn(value))``, or
  ``Const("w", where=fn(array))`` for a constant (``where`` gets its array); ``ANY`` matches anything;
- ``Opt(pattern)``, an optional trailing input: absent, it binds nothing; present, it must match;
- ``OneOf(a, b, ...)``: alternatives, tried in order;
- ``None``: the input must be absent (``None``).

A trailing ``...`` leaves the node's remaining inputs free, and ``P(op)`` with no inputs matches the op
whatever its inputs. Attribute values either must equal the given value, are bound (``Bind("name")``)
or are tested (a callable: ``axis=lambda a: a in (-1, 3)``); ``P(..., where=fn(node))`` tests the node.
``P(..., bind="name")`` also binds the matched node's output. A ``Rule`` adds an optional constraint
``check(m, graph) -> bool`` and a ``build(m, b) -> Value`` that makes the replacement with the builder
``b`` (``b.op(...)``, ``b.const(array)``). Match results ``m`` are dicts of the bound values,
attributes and nodes (``m.node("name")``).

Matching is greedy per node: a commutative node keeps the first input order that fits. A pattern with
``OneOf`` acts as the list of patterns it stands for, written out one by one: each alternative's match
is offered to the rule's check in turn.

The driver indexes rules by their root op and works through a worklist: after a rewrite only the new
nodes and those near the change go back on it. It refuses a rewrite when an interior matched node
has users outside the match (its value would be lost) or when fusing would create a cycle (a search
among the nodes between the match and its root). ``NNFORGE_DEBUG_MATCH=rule[,rule]`` prints, per
candidate root, why a rule did not apply; ``explain_match(rule, graph)`` and ``rule.why_not(value)``
give the same answers to code.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import VerificationError
from ..ir import Graph, Node, Value
from ..ir.analysis import fusion_cycle_local
from ..ir.verify import types_agree
from .manager import Pass, PassContext, PassResult


@dataclass(frozen=True)
class Bind:
    name: str


class V:
    """A leaf: binds the value under ``name`` (if given) when every test holds."""

    def __init__(
        self,
        name: str | None = None,
        *,
        const: bool | None = None,
        dtype: str | None = None,
        rank: int | None = None,
        where: Callable[[Value], bool] | None = None,
    ):
        self.name, self.const, self.dtype, self.rank, self.where = name, const, dtype, rank, where

    def failed_test(self, val: Value | None, graph: Graph | None) -> str | None:
        """The first test ``val`` fails, said in words; None when all hold."""
        if self.const is not None:
            if graph is None:
                raise ValueError("a pattern with constant tests needs the graph: match(pattern, value, graph=g)")
            if graph.is_constant(val) != self.const:
                return f"{_name(val)} is {'not ' if self.const else ''}a constant"
        if self.dtype is not None and (val is None or val.dtype != self.dtype):
            return f"{_name(val)} has dtype {val.dtype if val else None}, pattern wants {self.dtype}"
        if self.rank is not None and (val is None or val.type.rank != self.rank):
            return f"{_name(val)} has rank {val.type.rank if val else None}, pattern wants {self.rank}"
        if self.where is not None and not self._where(val, graph):
            return f"where={_fn_name(self.where)} is false for {_name(val)}"
        return None

    def _where(self, val, graph) -> bool:
        return bool(self.where(val))

    def __repr__(self) -> str:
        return self.name or "ANY"


class Const(V):
    """A constant leaf; ``where`` gets the constant's array: ``Const("c", where=lambda a: a.size == 1)``."""

    def __init__(self, name: str | None = None, where: Callable[[np.ndarray], bool] | None = None, **tests):
        super().__init__(name, const=True, where=where, **tests)

    def _where(self, val, graph) -> bool:
        return bool(self.where(graph.constant(val)))


ANY = V()


class Opt:
    """An optional trailing input: a node without it matches and binds nothing for it."""

    def __init__(self, pattern):
        self.pattern = _as_pattern(pattern)
        self._alternatives = None

    def __repr__(self) -> str:
        return f"Opt({self.pattern!r})"


class OneOf:
    """Alternatives for one input (or a whole pattern), tried in order, as if the rule were written once per
    alternative."""

    def __init__(self, *alternatives):
        self.alternatives = tuple(_as_pattern(a) for a in alternatives)
        self._alternatives = None

    def __repr__(self) -> str:
        return f"OneOf({', '.join(map(repr, self.alternatives))})"


def _as_pattern(p):
    return V(p) if isinstance(p, str) else p


class P:
    """A node pattern: op name (or a tuple of alternatives), input patterns, attribute constraints."""

    def __init__(
        self,
        op: str | tuple[str, ...],
        *inputs,
        bind: str | None = None,
        commutative: bool = False,
        where: Callable[[Node], bool] | None = None,
        **attrs,
    ):
        self.ops = (op,) if isinstance(op, str) else tuple(op)
        self.prefix = bool(inputs) and inputs[-1] is Ellipsis  # trailing inputs are free
        self.inputs = tuple(_as_pattern(i) for i in (inputs[:-1] if self.prefix else inputs))
        optional = [isinstance(i, Opt) for i in self.inputs]
        if any(optional[k] and not optional[k + 1] for k in range(len(optional) - 1)):
            raise ValueError(f"P({'|'.join(self.ops)}): optional inputs must come last")
        self.min_inputs = optional.count(False)
        self.bind = bind
        self.commutative = commutative
        self.where = where
        self.attrs = attrs
        self._alternatives = None

    def with_inputs(self, inputs) -> "P":
        p = copy.copy(self)
        p.inputs, p._alternatives = tuple(inputs), None
        return p

    def accepts_input_count(self, n: int) -> bool:
        if not self.inputs and not self.prefix:
            return True  # P(op): any inputs
        return self.min_inputs <= n and (self.prefix or n <= len(self.inputs))

    def __repr__(self) -> str:
        return f"P({'|'.join(self.ops)}, {', '.join(map(repr, self.inputs + ((...,) if self.prefix else ())))})"


def pattern_depth(p) -> int:
    """Nodes on the longest root-to-leaf path: how far below a change a root can still see it."""
    if isinstance(p, P):
        return 1 + max((pattern_depth(i) for i in p.inputs), default=0)
    if isinstance(p, Opt):
        return pattern_depth(p.pattern)
    if isinstance(p, OneOf):
        return max(pattern_depth(a) for a in p.alternatives)
    return 0


def root_ops(p) -> tuple[str, ...]:
    if isinstance(p, P):
        return p.ops
    if isinstance(p, OneOf):
        return tuple(op for a in p.alternatives for op in root_ops(a))
    raise TypeError(f"a rule's pattern must be rooted at a node pattern P(...), not {p!r}")


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


_ABSENT = object()  # an input position the node does not have


def _name(v) -> str:
    return "absent input" if v is _ABSENT else "None" if v is None else f"%{v.name}"


def _fn_name(fn) -> str:
    name = getattr(fn, "__name__", "predicate")
    return "lambda" if name == "<lambda>" else f"{name}()"


def alternatives(p) -> list:
    """The OneOf-free patterns ``p`` stands for, in the order they are tried (as if written out one by one)."""
    if not isinstance(p, (P, OneOf, Opt)):
        return [p]
    if p._alternatives is None:  # worked out once per pattern object
        if isinstance(p, OneOf):
            p._alternatives = [e for a in p.alternatives for e in alternatives(a)]
        elif isinstance(p, Opt):
            p._alternatives = [Opt(e) for e in alternatives(p.pattern)]
        else:
            combos = list(itertools.product(*[alternatives(i) for i in p.inputs]))
            p._alternatives = [p] if len(combos) == 1 else [p.with_inputs(c) for c in combos]
    return p._alternatives


class Matcher:
    """Matches OneOf-free patterns at a value, greedily: each node takes the first input order that fits,
    as it always has. With ``explain``, remembers why the attempt that got furthest failed (the first
    sub-pattern that did not fit on that path)."""

    def __init__(self, graph: Graph | None, explain: bool = False):
        self.graph = graph
        self.explain = explain
        self.failure: tuple[tuple[int, int], str] | None = None

    def matches(self, pattern, value: Value, m: Match | None = None) -> Iterator[Match]:
        """One match per alternative of ``pattern`` that fits, in order."""
        for alt in alternatives(_as_pattern(pattern)):
            got = self._one(alt, value, m if m is not None else Match(), ())
            if got is not None:
                yield got

    def why(self) -> str:
        return self.failure[1] if self.failure else "no match"

    def _fail(self, m: Match, path: tuple, text: str) -> None:
        progress = (len(m.nodes), len(path))
        if self.failure is None or progress > self.failure[0]:
            where = " > ".join(path)
            self.failure = (progress, f"{where}: {text}" if where else text)

    def _one(self, pat, val, m: Match, path: tuple) -> Match | None:
        if isinstance(pat, Opt):
            if val is _ABSENT:
                return m
            pat = pat.pattern
        if val is _ABSENT:
            if self.explain:
                self._fail(m, path, "the node has no such input")
            return None
        if pat is None:
            if val is not None and self.explain:
                self._fail(m, path, f"{_name(val)} is present, pattern wants no input")
            return m if val is None else None
        if isinstance(pat, V):
            return self._leaf(pat, val, m, path)
        if isinstance(pat, P):
            if val is None:
                if self.explain:
                    self._fail(m, path, f"input is None, pattern wants {'|'.join(pat.ops)}")
                return None
            return self._node(pat, val, m, path)
        raise TypeError(f"bad pattern input {pat!r}")

    def _leaf(self, pat: V, val, m: Match, path: tuple) -> Match | None:
        if pat.name is not None and pat.name in m and m[pat.name] is not val:
            if self.explain:
                self._fail(m, path, f"binding conflict: {pat.name} is already {_name(m[pat.name])}, here {_name(val)}")
            return None
        failed = pat.failed_test(val, self.graph)
        if failed is not None:
            if self.explain:
                self._fail(m, path, f"predicate false: {failed}")
            return None
        if pat.name is not None:
            m = m.copy()
            m[pat.name] = val
        return m

    def _node(self, pat: P, value: Value, m: Match, path: tuple) -> Match | None:
        node = value.producer
        if node is None or node.op not in pat.ops:
            if self.explain:
                what = (
                    f"made by {node.op}"
                    if node
                    else "a constant"
                    if self.graph and self.graph.is_constant(value)
                    else "a graph input"
                )
                self._fail(m, path, f"op differs: {_name(value)} is {what}, pattern wants {'|'.join(pat.ops)}")
            return None
        if len(node.outputs) != 1:
            if self.explain:
                self._fail(m, path, f"{node.op} {_name(value)} has {len(node.outputs)} outputs, pattern wants one")
            return None
        if not pat.accepts_input_count(len(node.inputs)):
            if self.explain:
                most = "+" if pat.prefix else f"..{len(pat.inputs)}" if pat.min_inputs < len(pat.inputs) else ""
                self._fail(
                    m,
                    path,
                    f"{node.op} {_name(value)} has {len(node.inputs)} inputs, pattern wants {pat.min_inputs}{most}",
                )
            return None
        m = m.copy()
        for key, want in pat.attrs.items():
            have = node.attrs.get(key)
            if isinstance(want, Bind):
                if want.name in m and m[want.name] != have:
                    if self.explain:
                        self._fail(
                            m,
                            path,
                            f"attribute mismatch: {node.op}.{key}={have!r} but {want.name} is already {m[want.name]!r}",
                        )
                    return None
                m[want.name] = have
            elif callable(want):
                if not want(have):
                    if self.explain:
                        self._fail(
                            m, path, f"attribute mismatch: {key}={_fn_name(want)} is false for {node.op}.{key}={have!r}"
                        )
                    return None
            elif have != want:
                if self.explain:
                    self._fail(m, path, f"attribute mismatch: {node.op}.{key}={have!r}, pattern wants {want!r}")
                return None
        if pat.where is not None and not pat.where(node):
            if self.explain:
                self._fail(
                    m, path, f"predicate false: where={_fn_name(pat.where)} is false for {node.op} {_name(value)}"
                )
            return None
        if pat.bind:
            m[pat.bind] = node.output
            m.named_nodes[pat.bind] = node
        m.nodes.append(node)
        orders = [list(node.inputs)]
        if pat.commutative and len(node.inputs) == 2:
            orders.append(orders[0][::-1])
        for inputs in orders:  # greedy: the swapped order only when this one does not fit
            got = m
            for k, sub in enumerate(pat.inputs):
                got = self._one(sub, inputs[k] if k < len(inputs) else _ABSENT, got, path + (f"{node.op}[{k}]",))
                if got is None:
                    break
            if got is not None:
                return got
        return None


def match(pattern, value: Value, m: Match | None = None, graph: Graph | None = None) -> Match | None:
    """The first match of ``pattern`` at the producer of ``value`` (structure and leaf tests only), or None."""
    graph = graph if graph is not None else (value.producer.graph if value.producer is not None else None)
    return next(Matcher(graph).matches(pattern, value, m), None)


class Builder:
    """Creates replacement nodes just before the matched root, so they see every bound value."""

    def __init__(self, graph: Graph, root: Node):
        self.graph = graph
        self.root = root
        self.created: list[Node] = []

    def op(self, op: str, *inputs: Value | None, **attrs) -> Value:
        node = self.graph.add_node(op, list(inputs), attrs, name=op, source=self.root.source, before=self.root)
        self.created.append(node)
        return node.output

    def const(self, array, name: str = "c") -> Value:
        return self.graph.add_constant(np.asarray(array, order="C"), name)  # (ascontiguousarray makes 0-d 1-d)

    def constant_of(self, v: Value) -> np.ndarray | None:
        return self.graph.constant(v) if self.graph.is_constant(v) else None


@dataclass
class Rule:
    name: str
    pattern: Any
    build: Callable[[Match, Builder], Value]
    check: Callable[[Match, Graph], bool] | None = None
    allow_shared: Sequence[str] = field(default_factory=tuple)  # bound interior nodes that may have other users

    def why_not(self, value: Value) -> str | None:
        """Why this rule would not rewrite at ``value``'s producer; None when it would (build aside)."""
        node = value.producer
        if node is None or node.graph is None:
            return f"{_name(value)} is not made by a node in a graph"
        return _explain_root(self, node.graph, node)


def explain_match(rule: Rule, graph: Graph) -> list[str]:
    """One line per candidate root (each node whose op is the rule's root op): would apply, or the first reason not."""
    ops = set(root_ops(rule.pattern))
    return [
        f"{rule.name} at %{n.outputs[0].name if n.outputs else '?'} ({n.op}): "
        + (_explain_root(rule, graph, n) or "would apply")
        for n in graph.nodes
        if n.op in ops
    ]


def _explain_root(rule: Rule, graph: Graph, root: Node) -> str | None:
    matcher = Matcher(graph, explain=True)
    refusals: list[str] = []
    for _ in _accepted(rule, graph, root, matcher, refusals):
        return None
    return refusals[0] if refusals else f"no match: {matcher.why()}"


def _accepted(rule: Rule, graph: Graph, root: Node, matcher: Matcher, refusals: list | None) -> Iterator[Match]:
    """Structural matches at ``root`` that the check, the users of interior nodes and cycles allow."""
    if len(root.outputs) != 1:
        if refusals is not None:
            refusals.append(f"no match: {root.op} has {len(root.outputs)} outputs")
        return
    for m in matcher.matches(rule.pattern, root.output):
        if rule.check is not None and not rule.check(m, graph):
            why = f"check {_fn_name(rule.check)} returned False"
        else:
            why = _shared_interior(m, graph, rule.allow_shared) or _cycle_through(m, graph)
        if why is None:
            yield m
        elif refusals is not None:
            refusals.append(why)


def _shared_interior(m: Match, graph: Graph, allow_shared: Sequence[str]) -> str | None:
    """Why an interior matched node cannot go (its value is read outside the match), or None."""
    root, inside = m.nodes[0], set(m.nodes)
    for node in m.nodes[1:]:
        if any(m.named_nodes.get(a) is node for a in allow_shared):
            continue
        if node.output in graph.outputs and node is not root:
            return f"interior node {node.op} %{node.output.name} is a graph output"
        for u in graph.users_of(node.output):
            if u not in inside:
                return (
                    f"interior node {node.op} %{node.output.name} has users outside the match: "
                    f"{u.op} %{u.outputs[0].name if u.outputs else '?'}"
                )
    return None


def _cycle_through(m: Match, graph: Graph) -> str | None:
    """Would the matched nodes, made one node, be their own ancestor? (a search among the nodes before the root)"""
    exit_ = fusion_cycle_local(graph, m.nodes)
    if exit_ is None:
        return None
    return (
        f"would create a cycle: {exit_.op} %{exit_.outputs[0].name if exit_.outputs else '?'} reads the match "
        f"and feeds it"
    )


def _remove_dead(graph: Graph, candidates: Sequence[Node]) -> list[Node]:
    """Remove matched nodes nothing reads any more (root first, then its now-orphaned inputs)."""
    pending, removed = list(dict.fromkeys(candidates)), []
    progress = True
    while progress:  # a node shared inside the match dies only after all its matched users
        progress = False
        for node in list(pending):
            if graph.contains(node) and not any(graph.has_users(o) or o in graph.outputs for o in node.outputs):
                graph.remove_node(node)
                pending.remove(node)
                removed.append(node)
                progress = True
    return removed


def _near(graph: Graph, changed: Sequence[Node], depth: int) -> list[Node]:
    """``changed`` and the nodes up to ``depth - 1`` uses below them: the roots whose matches can see a change."""
    frontier = [n for n in dict.fromkeys(changed) if graph.contains(n)]
    seen = set(frontier)
    for _ in range(depth - 1):
        below = []
        for n in frontier:
            for o in n.outputs:
                for u in graph.users_of(o):
                    if u not in seen:
                        seen.add(u)
                        below.append(u)
        frontier = below
    return list(seen)


def _debug_rules() -> set[str]:
    return {r.strip() for r in os.environ.get("NNFORGE_DEBUG_MATCH", "").split(",") if r.strip()}


def apply_rules(
    graph: Graph, rules: Sequence[Rule], max_rounds: int = 50, name: str = "rewrite", stats: dict | None = None
) -> dict[str, int]:
    """Apply the first rule that rewrites at each node until nothing does; returns rewrites per rule name.

    Rounds go through the worklist in node order; a rewrite puts its new nodes and the nodes near the
    change on the next round's list. ``stats`` (if given) receives match_attempts, rounds and, when
    the round limit stopped the driver before a fixed point, round_limit_hit (with a warning).
    """
    counts = {r.name: 0 for r in rules}
    by_op: dict[str, list[Rule]] = {}
    for r in rules:
        for op in dict.fromkeys(root_ops(r.pattern)):
            by_op.setdefault(op, []).append(r)
    depth = max((pattern_depth(r.pattern) for r in rules), default=1)
    debug = _debug_rules()
    attempts, rounds = 0, 0
    pending: dict[Node, None] = dict.fromkeys(graph.nodes)
    fired: list[str] = []
    while pending:
        if rounds == max_rounds:
            why = (
                f"{name}: rewriting stopped at the round limit ({max_rounds}) before reaching a fixed point; "
                f"rules still rewriting in the last round: {', '.join(dict.fromkeys(fired))}"
            )
            warnings.warn(why, RuntimeWarning, stacklevel=2)
            if stats is not None:
                stats["round_limit_hit"] = 1
            break
        rounds += 1
        batch = sorted((n for n in pending if graph.contains(n)), key=graph.order_key)
        pending, fired = {}, []
        for root in batch:
            if not graph.contains(root) or len(root.outputs) != 1:
                continue
            for rule in by_op.get(root.op, ()):
                attempts += 1
                changed = _rewrite_at(graph, rule, root, debug)
                if changed is not None:
                    counts[rule.name] += 1
                    fired.append(rule.name)
                    pending.update(dict.fromkeys(_near(graph, changed, depth)))
                    break
    graph.remove_unused_constants()
    if stats is not None:
        stats["match_attempts"] = stats.get("match_attempts", 0) + attempts
        stats["rounds"] = stats.get("rounds", 0) + rounds
    return counts


def _rewrite_at(graph: Graph, rule: Rule, root: Node, debug: set[str]) -> list[Node] | None:
    """Rewrite at ``root`` with ``rule`` if it applies; returns the nodes whose surroundings changed."""
    explain = rule.name in debug or "*" in debug
    matcher = Matcher(graph, explain=explain)
    refusals: list[str] | None = [] if explain else None
    for m in _accepted(rule, graph, root, matcher, refusals):
        b = Builder(graph, root)
        new = rule.build(m, b)
        if new is None:
            if refusals is not None:
                refusals.append("build returned None")
            continue
        if not types_agree(new.type, root.output.type):
            raise VerificationError(
                f"rule {rule.name} made {new.type} where %{root.output.name} was {root.output.type}"
            )
        readers = graph.users_of(root.output)
        graph.replace_all_uses(root.output, new)
        removed = _remove_dead(graph, m.nodes)
        if explain:
            print(f"[nnforge match] {rule.name} at %{root.output.name} ({root.op}): applied", file=sys.stderr)
        inputs_of_removed = [v.producer for n in removed for v in n.inputs if v is not None and v.producer is not None]
        return b.created + readers + inputs_of_removed
    if explain:
        why = refusals[0] if refusals else f"no match: {matcher.why()}"
        print(f"[nnforge match] {rule.name} at %{root.output.name} ({root.op}): {why}", file=sys.stderr)
    return None


class RewritePass(Pass):
    """A pass made of rules: subclasses set ``name`` and ``rules``."""

    rules: Sequence[Rule] = ()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        info: dict = {}
        counts = apply_rules(graph, self.rules, name=self.name, stats=info)
        stats = {k: v for k, v in counts.items() if v}
        if info.get("round_limit_hit"):
            stats["round_limit_hit"] = 1
        return PassResult(any(counts.values()), stats)
