"""Graph analyses on a networkx view of the IR: order, reachability, dominators, fusion safety."""

from __future__ import annotations

from typing import Iterable

import networkx as nx

from .graph import Graph, Node


def to_networkx(g: Graph) -> nx.DiGraph:
    """Node-level dataflow graph: an edge producer -> consumer for every value use."""
    dg = nx.DiGraph()
    dg.add_nodes_from(g.nodes)
    for n in g.nodes:
        for i in n.inputs:
            if i is not None and i.producer is not None and i.producer in dg:
                dg.add_edge(i.producer, n)
    return dg


def topological_order(g: Graph) -> list[Node]:
    index = {n: k for k, n in enumerate(g.nodes)}
    dg = to_networkx(g)
    if not nx.is_directed_acyclic_graph(dg):
        raise ValueError(f"graph has a cycle: {nx.find_cycle(dg)}")
    return list(nx.lexicographical_topological_sort(dg, key=lambda n: index[n]))


def has_cycle(g: Graph) -> bool:
    return not nx.is_directed_acyclic_graph(to_networkx(g))


def reachable(g: Graph, src: Node, dst: Node) -> bool:
    return nx.has_path(to_networkx(g), src, dst)


def fusion_creates_cycle(g: Graph, group: Iterable[Node], dg: nx.DiGraph | None = None) -> bool:
    """Would replacing ``group`` by a single node create a cycle?

    It does when a path leaves the group and comes back into it through an outside node.
    """
    dg = dg if dg is not None else to_networkx(g)
    group = set(group)
    contracted = nx.DiGraph()
    rep = object()
    m = {n: (rep if n in group else n) for n in dg.nodes}
    contracted.add_nodes_from(set(m.values()))
    contracted.add_edges_from((m[a], m[b]) for a, b in dg.edges if m[a] is not m[b])
    return not nx.is_directed_acyclic_graph(contracted)


def fusion_cycle_local(g: Graph, group: Iterable[Node]) -> Node | None:
    """``fusion_creates_cycle`` on the graph's use-lists, without building a networkx view: the outside node
    through which a path leaves the group and comes back, or None. In node order such a path ends before
    the group's last node, so only the nodes up to it are searched."""
    group = list(dict.fromkeys(group))
    inside = set(group)
    if len(inside) < 2:
        return None
    last = max(group, key=g.order_key)
    todo = [(u, u) for n in group for o in n.outputs for u in g.users_of(o) if u not in inside]
    seen: set[Node] = set()
    while todo:
        u, exit_ = todo.pop()
        if u in inside:
            return exit_
        if u in seen or not g.precedes(u, last):
            continue
        seen.add(u)
        todo.extend((w, exit_) for o in u.outputs for w in g.users_of(o))
    return None


def immediate_dominators(g: Graph) -> dict[Node, Node]:
    """Dominator tree of the dataflow graph rooted at a virtual entry feeding every source node."""
    dg = to_networkx(g)
    entry = "entry"
    dg.add_node(entry)
    for n in list(dg.nodes):
        if n is not entry and dg.in_degree(n) == 0:
            dg.add_edge(entry, n)
    idom = nx.immediate_dominators(dg, entry)
    return {n: d for n, d in idom.items() if n is not entry and d is not entry}
