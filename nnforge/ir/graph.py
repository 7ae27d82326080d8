"""The IR: a Graph of Nodes over Values, plus named constants.

A graph is plain data. Nodes are kept in topological order; values are referenced by
object identity and carry unique names. Constants (weights) are Values whose array lives
in ``graph.constants``.

Edits are cheap: nodes sit in a linked list (O(1) insert-before and removal, with order keys
that compare positions in O(1)), and the graph keeps use-lists (``graph.users_of(v)``), which
the edit API keeps right: ``add_node``/``insert_node``, ``remove_node``, ``replace_all_uses``,
``node.inputs = [...]`` and ``node.set_input(i, v)``. ``node.inputs`` is a read-only list, so an
edit that would bypass the use-lists fails instead of going stale. ``graph.nodes`` is a list built on
demand; editing it in place (the old style) still works: the graph rebuilds itself from the edited
list at its next query or edit, in O(n).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from . import symbols
from .symbols import Dim

DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    # 8-bit floats (ml_dtypes' numpy types): carried at the boundary and by kept ONNX ops
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    # sub-byte types (ml_dtypes; one element per byte in numpy, packed in ONNX) and strings (numpy object arrays)
    "int4",
    "uint4",
    "int2",
    "uint2",
    "float4_e2m1fn",
    "string",
    # complex: only inside torch_op partitions
    "complex64",
    "complex128",
)
# dtypes that values carry between the boundary and kept ONNX or torch ops, but no IR op computes on
CARRIED_DTYPES = frozenset(DTYPES[DTYPES.index("float8_e4m3fn") :])


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(symbols.simplify(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        return symbols.mul(*self.shape) if self.shape else 1

    def __str__(self) -> str:
        short = {
            "float32": "f32",
            "float16": "f16",
            "bfloat16": "bf16",
            "float64": "f64",
            "int64": "i64",
            "int32": "i32",
            "int16": "i16",
            "int8": "i8",
            "uint64": "u64",
            "uint32": "u32",
            "uint16": "u16",
            "uint8": "u8",
            "bool": "i1",
            "float8_e4m3fn": "f8e4m3fn",
            "float8_e4m3fnuz": "f8e4m3fnuz",
            "float8_e5m2": "f8e5m2",
            "float8_e5m2fnuz": "f8e5m2fnuz",
            "float8_e8m0fnu": "f8e8m0fnu",
            "int4": "i4",
            "uint4": "u4",
            "int2": "i2",
            "uint2": "u2",
            "float4_e2m1fn": "f4e2m1fn",
            "string": "str",
            "complex64": "c64",
            "complex128": "c128",
        }[self.dtype]
        return f"{short}[{','.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> "TensorType":
        return TensorType(tuple(int(d) for d in array.shape), dtype_name(array.dtype))


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype an IR dtype's arrays have (object for strings, ml_dtypes' types for the small floats)."""
    if name == "string":
        return np.dtype(object)
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name, name))


def dtype_name(dt) -> str:
    name = np.dtype(dt).name
    if np.dtype(dt).kind in "OU":  # strings: numpy object (or unicode) arrays
        name = "string"
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name}")
    return name


class Value:
    """An SSA value: graph input, node output or constant."""

    __slots__ = ("name", "type", "producer", "__weakref__")

    def __init__(self, name: str, type: TensorType, producer: "Node | None" = None):
        self.name = name
        self.type = type
        self.producer = producer

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}:{self.type}"


class ReadOnlyList(list):
    """A list to read as usual; editing it in place raises, so edits go through the API that keeps use-lists."""

    __slots__ = ()

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "read-only list: set node.inputs = [...] or call node.set_input(i, v), and add or remove "
            "nodes with graph.add_node / insert_node / remove_node, so the graph's use-lists stay right"
        )

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self):
        return ReadOnlyList, (list(self),)


class Node:
    # graph, _prev, _next, _order: the node's place in its graph's linked list (None/0 when not in a graph)
    __slots__ = ("op", "_inputs", "_outputs", "attrs", "name", "source", "graph", "_prev", "_next", "_order")

    def __init__(
        self,
        op: str,
        inputs: Sequence[Value | None],
        outputs: Sequence[Value],
        attrs: dict[str, Any] | None = None,
        name: str = "",
        source: str = "",
    ):
        self.graph: Graph | None = None
        self._prev = self._next = None
        self._order = 0
        self.op = op
        self._inputs = ReadOnlyList(inputs)
        self.outputs = outputs
        self.attrs = dict(attrs or {})
        self.name = name
        self.source = source  # model source line, for error messages

    @property
    def inputs(self) -> ReadOnlyList:
        return self._inputs

    @inputs.setter
    def inputs(self, inputs: Sequence[Value | None]) -> None:
        if self.graph is not None:
            self.graph._sync()  # an in-place edit of graph.nodes may have taken this node out
        if self.graph is None:
            self._inputs = ReadOnlyList(inputs)
            return
        self.graph._unlink_uses(self)
        self._inputs = ReadOnlyList(inputs)
        self.graph._link_uses(self)

    def set_input(self, index: int, value: Value | None) -> None:
        inputs = list(self._inputs)
        inputs[index] = value
        self.inputs = inputs

    @property
    def outputs(self) -> ReadOnlyList:
        return self._outputs

    @outputs.setter
    def outputs(self, outputs: Sequence[Value]) -> None:
        self._outputs = ReadOnlyList(outputs)
        for o in self._outputs:
            o.producer = self

    @property
    def output(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]

    def __repr__(self) -> str:
        return f"Node({self.op}, {[i.name if i else None for i in self.inputs]} -> {[o.name for o in self.outputs]})"


class _ListEnd:
    """The linked list's sentinel: before the first node and after the last."""

    __slots__ = ("_prev", "_next", "_order")

    def __init__(self):
        self._prev = self._next = self
        self._order = 0


ORDER_GAP = 1 << 32  # room between neighbours' order keys: many inserts at one spot before a renumbering


class NodeList(list):
    """``graph.nodes``: a list in node order. Edited in place, it marks itself so that the graph adopts it
    at its next query or edit (several edits, such as a swap, may pass through invalid states first)."""

    __slots__ = ("graph", "edited")

    def __init__(self, nodes, graph: "Graph"):
        super().__init__(nodes)
        self.graph, self.edited = graph, False

    def __reduce__(self):
        return list, (list(self),)


def _node_list_edit(name: str):
    def edit(self, *args, **kwargs):
        if self.graph is None:
            raise TypeError("this node list is stale (the graph changed since it was read): read graph.nodes again")
        self.edited = True
        return getattr(list, name)(self, *args, **kwargs)

    return edit


for _name in (
    "__setitem__",
    "__delitem__",
    "__iadd__",
    "__imul__",
    "append",
    "extend",
    "insert",
    "pop",
    "remove",
    "clear",
    "sort",
    "reverse",
):
    setattr(NodeList, _name, _node_list_edit(_name))


class Graph:
    def __init__(self, name: str = "graph"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self._end = _ListEnd()
        self._node_list: NodeList | None = None  # graph.nodes, materialised on demand, dropped on edits
        self._uses: dict[Value, dict[Node, int]] = {}  # value -> {node reading it: how many of its inputs do}
        self.constants: dict[str, np.ndarray] = {}
        self.const_values: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}  # free-form (frontend info, symbol bindings)
        self._names: set[str] = set()
        self._counter = itertools.count()

    # -- naming -------------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        hint = "".join(c if c.isalnum() or c == "_" else "_" for c in (hint or "v"))
        name = hint
        while name in self._names:
            name = f"{hint}_{next(self._counter)}"
        self._names.add(name)
        return name

    # -- building -------------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self.fresh_name(name), type)
        self.inputs.append(v)
        return v

    def remove_input(self, v: Value) -> None:
        """Drop a graph input nothing reads any more; its name is free again (a later add_input may take it)."""
        if self.has_users(v):
            raise ValueError(f"remove_input: input {v.name!r} is still read")
        self.inputs.remove(v)
        self._names.discard(v.name)

    def add_constant(self, array, name: str = "c") -> Value:
        array = np.asarray(array, order="C")  # not ascontiguousarray: it turns 0-d scalars into shape (1,)
        v = Value(self.fresh_name(name), TensorType.of(array))
        self.constants[v.name] = array
        self.const_values[v.name] = v
        return v

    def make_node(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict | None = None,
        name: str = "",
        source: str = "",
        out_types: Sequence[TensorType] | None = None,
    ) -> Node:
        """Create a node (not inserted); output types come from the op registry unless given."""
        from .registry import get_op, infer_types  # local: registry imports graph

        attrs = get_op(op).check_attrs(attrs or {})
        if out_types is None:
            out_types = infer_types(op, [i.type if i is not None else None for i in inputs], attrs)
        outs = [Value(self.fresh_name(name or op), t) for t in out_types]
        return Node(op, inputs, outs, attrs, name=outs[0].name if outs else op, source=source)

    def add_node(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict | None = None,
        name: str = "",
        source: str = "",
        out_types=None,
        before: Node | None = None,
    ) -> Node:
        return self.insert_node(self.make_node(op, inputs, attrs, name, source, out_types), before)

    def insert_node(self, node: Node, before: Node | None = None) -> Node:
        """Put a made node into the graph, at the end or just before ``before``."""
        self._sync()
        if node.graph is not None:
            raise ValueError(f"{node!r} is already in a graph")
        nxt = self._end if before is None else before
        if before is not None and before.graph is not self:
            raise ValueError(f"{before!r} is not in this graph")
        prv = nxt._prev
        node._prev, node._next = prv, nxt
        prv._next = nxt._prev = node
        node.graph = self
        if nxt is self._end:
            node._order = prv._order + ORDER_GAP
        elif nxt._order - prv._order > 1:
            node._order = (prv._order + nxt._order) // 2
        else:
            self._renumber()
        self._link_uses(node)
        self._drop_node_list()
        return node

    def op(self, op: str, *inputs: Value | None, name: str = "", **attrs) -> Value:
        """Shorthand used by passes and tests: append a single-output node, return its value."""
        return self.add_node(op, list(inputs), attrs, name=name).output

    # -- queries --------------------------------------------------------------------------
    def is_constant(self, v: Value | None) -> bool:
        return v is not None and self.const_values.get(v.name) is v

    def constant(self, v: Value) -> np.ndarray:
        return self.constants[v.name]

    @property
    def nodes(self) -> NodeList:
        """The nodes in order, as a list (built on demand, kept until the next edit)."""
        if self._node_list is None:
            out, n = [], self._end._next
            while n is not self._end:
                out.append(n)
                n = n._next
            self._node_list = NodeList(out, self)
        return self._node_list

    @nodes.setter
    def nodes(self, nodes: Iterable[Node]) -> None:
        """Replace the node list wholesale (passes that rebuild the order, e.g. DCE, toposort): O(n)."""
        nodes = list(nodes)
        n = self._end._next
        while n is not self._end:
            n.graph, n._prev, n._next, n = None, None, None, n._next
        self._end = _ListEnd()
        self._uses = {}
        self._drop_node_list()
        for n in nodes:
            self.insert_node(n)

    def _sync(self) -> None:
        """Adopt graph.nodes if it was edited in place since it was read."""
        if self._node_list is not None and self._node_list.edited:
            self.nodes = list(self._node_list)

    def _drop_node_list(self) -> None:
        if self._node_list is not None:
            self._node_list.graph = None  # editing the old list now raises instead of being lost
            self._node_list = None

    def contains(self, node: Node) -> bool:
        self._sync()
        return node.graph is self

    def users_of(self, v: Value) -> list[Node]:
        """The nodes that read ``v`` (each once), from the use-lists."""
        self._sync()
        return list(self._uses.get(v, ()))

    def has_users(self, v: Value) -> bool:
        self._sync()
        return v in self._uses

    def precedes(self, a: Node, b: Node) -> bool:
        """Whether node ``a`` comes before node ``b`` (both in this graph)."""
        self._sync()
        return a._order < b._order

    def order_key(self, node: Node) -> int:
        """A number that grows along the node order, to sort nodes by (valid until the next edit)."""
        self._sync()
        return node._order

    def users(self) -> dict[Value, list[Node]]:
        """Every used value -> its users in node order, a node once per input slot (a full scan: in a loop,
        use ``users_of``)."""
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i is not None:
                    out.setdefault(i, []).append(n)
        return out

    def all_values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.const_values.values()
        for n in self.nodes:
            yield from n.outputs

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def symbols(self) -> list[str]:
        seen: list[str] = []
        for v in self.inputs:
            for d in v.shape:
                for s in sorted(symbols.symbols_in(d)):
                    if s not in seen:
                        seen.append(s)
        return seen

    # -- editing --------------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        self._sync()
        if old is not new:
            for n in self.users_of(old):
                n.inputs = [new if i is old else i for i in n.inputs]
        self.outputs = [new if o is old else o for o in self.outputs]

    def remove_node(self, node: Node) -> None:
        self._sync()
        if node.graph is not self:
            raise ValueError(f"{node!r} is not in this graph")
        self._unlink_uses(node)
        node._prev._next, node._next._prev = node._next, node._prev
        node.graph, node._prev, node._next = None, None, None
        self._drop_node_list()

    def _link_uses(self, node: Node) -> None:
        for v in node._inputs:
            if v is not None:
                users = self._uses.setdefault(v, {})
                users[node] = users.get(node, 0) + 1

    def _unlink_uses(self, node: Node) -> None:
        for v in node._inputs:
            if v is not None:
                users = self._uses[v]
                users[node] -= 1
                if not users[node]:
                    del users[node]
                    if not users:
                        del self._uses[v]

    def _renumber(self) -> None:
        """Spread the order keys out again (when an insert found no room between two neighbours)."""
        n, k = self._end._next, 0
        while n is not self._end:
            k += ORDER_GAP
            n._order = k
            n = n._next

    def remove_unused_constants(self) -> int:
        self._sync()
        used = {v.name for v in self._uses} | {o.name for o in self.outputs}
        dead = [k for k in self.constants if k not in used]
        for k in dead:
            del self.constants[k]
            del self.const_values[k]
        return len(dead)

    def toposort(self) -> None:
        """Re-order nodes topologically (stable), after passes that inserted nodes out of order."""
        from .analysis import topological_order

        self.nodes = topological_order(self)

    def copy(self) -> "Graph":
        """Deep copy of structure; constant arrays are shared (treat them as immutable)."""
        g = Graph(self.name)
        g.meta = dict(self.meta)
        g._names = set(self._names)
        g._counter = itertools.count(next(self._counter) + 1000000)
        vmap: dict[Value, Value] = {}

        def cp(v: Value) -> Value:
            if v not in vmap:
                vmap[v] = Value(v.name, v.type)
            return vmap[v]

        g.inputs = [cp(v) for v in self.inputs]
        for name, v in self.const_values.items():
            g.const_values[name] = cp(v)
            g.constants[name] = self.constants[name]
        for n in self.nodes:
            g.insert_node(
                Node(
                    n.op,
                    [cp(i) if i is not None else None for i in n.inputs],
                    [cp(o) for o in n.outputs],
                    dict(n.attrs),
                    n.name,
                    n.source,
                )
            )
        g.outputs = [cp(v) for v in self.outputs]
        return g

    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)
