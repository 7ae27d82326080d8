"""IR invariants: SSA, definition before use, known ops, valid attributes, types agree with inference,
and the graph's own bookkeeping (node links, order keys, use-lists) agrees with the nodes."""

from __future__ import annotations

from ..errors import VerificationError
from . import symbols
from .graph import Graph
from .registry import OpError, get_op, infer_types


def types_agree(a, b) -> bool:
    return a.dtype == b.dtype and a.rank == b.rank and all(symbols.dims_equal(x, y) for x, y in zip(a.shape, b.shape))


def verify(g: Graph) -> None:
    """Raise VerificationError naming the first broken node."""
    g._sync()
    defined = set()
    names = set()
    for v in list(g.inputs) + list(g.const_values.values()):
        if v.name in names:
            raise VerificationError(f"value name {v.name!r} defined twice")
        names.add(v.name)
        defined.add(v)
    for k, v in g.const_values.items():
        if k not in g.constants or v.name != k:
            raise VerificationError(f"constant {k!r} has no array or a mismatched name")
    for idx, n in enumerate(g.nodes):
        where = f"node #{idx} ({n.op} -> {', '.join(o.name for o in n.outputs)})"
        try:
            opdef = get_op(n.op)
            opdef.check_attrs(n.attrs)
        except OpError as e:
            raise VerificationError(f"{where}: {e}") from None
        for i in n.inputs:
            if i is not None and i not in defined:
                raise VerificationError(f"{where}: input %{i.name} is used before it is defined (or never defined)")
        try:
            want = infer_types(n.op, [i.type if i is not None else None for i in n.inputs], n.attrs)
        except (OpError, ValueError) as e:
            raise VerificationError(f"{where}: {e}") from None
        if len(want) != len(n.outputs):
            raise VerificationError(f"{where}: has {len(n.outputs)} outputs, op defines {len(want)}")
        for o, t in zip(n.outputs, want):
            if o.name in names:
                raise VerificationError(f"{where}: value %{o.name} defined twice (SSA)")
            if o.producer is not n:
                raise VerificationError(f"{where}: output %{o.name} does not point back to its producer")
            if not types_agree(o.type, t):
                raise VerificationError(f"{where}: output %{o.name} is {o.type} but inference gives {t}")
            names.add(o.name)
            defined.add(o)
    for o in g.outputs:
        if o not in defined:
            raise VerificationError(f"graph output %{o.name} is not defined")
    _verify_links(g)


def _describe(n) -> str:
    return f"{n.op} -> {', '.join(o.name for o in n.outputs) or '()'}"


def _verify_links(g: Graph) -> None:
    """The node links and order keys give graph.nodes' order; each use-list holds exactly the nodes reading
    its value."""
    prev = g._end
    for idx, n in enumerate(g.nodes):
        if n.graph is not g or n._prev is not prev or prev._next is not n:
            raise VerificationError(
                f"node #{idx} ({_describe(n)}) is not linked into the graph where graph.nodes has it"
            )
        if n._order <= prev._order:
            raise VerificationError(f"node #{idx} ({_describe(n)}) has an order key not above its predecessor's")
        prev = n
    if prev._next is not g._end or g._end._prev is not prev:
        raise VerificationError("the graph's node links do not end at the last node of graph.nodes")
    want: dict = {}
    for n in g.nodes:
        for v in n.inputs:
            if v is not None:
                want.setdefault(v, {})
                want[v][n] = want[v].get(n, 0) + 1
    for n in g.nodes:
        for v in n.inputs:
            if v is not None and g._uses.get(v, {}).get(n) != want[v][n]:
                raise VerificationError(
                    f"use-list of %{v.name} is stale: it does not hold node {_describe(n)} "
                    f"{want[v][n]} time(s), the times it reads the value (an input edited "
                    f"around the Graph API?)"
                )
    for v, users in g._uses.items():
        for n, count in users.items():
            if want.get(v, {}).get(n) != count:
                raise VerificationError(
                    f"use-list of %{v.name} is stale: it lists node {_describe(n)}, which does "
                    f"not read the value (a node removed or edited around the Graph API?)"
                )
